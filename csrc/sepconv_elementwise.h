// Index math of the CUDA forward's element-wise passes over [P, Cout] (sepconv_forward.cu): the
// inference epilogue and bn_apply (a grid-stride loop of kV-element steps) and the training
// statistics' partial kernel (row blocks of lanes and groups). Plain C++ like sepconv_infer_tiling.h:
// the kernels run these functions, tests/cpp/test_forward_elementwise.cpp runs the same ones on the CPU
// against brute force (every element visited exactly once, the channel of every vector lane).
#pragma once

#include <cstdint>

#include "sepconv_infer_tiling.h"

namespace xception_fast {
namespace infer {

// The element-wise step `step` of a pass with kV elements per step over [rows, c_out] (total elements):
// its first flat element and the channel of its lane 0; lane e is element first + e, channel co + e.
// The vector path (kV > 1) is taken only where c_out % kV == 0, so a step never crosses a row.
struct ElemStep {
  int64_t first, co;
};
XF_HD int64_t elem_steps(int64_t total, int kv) { return total / kv; }  // kv divides total on every path
XF_HD ElemStep elem_step(int64_t step, int kv, int64_t c_out) {
  const int64_t first = step * kv;
  return {first, first % c_out};
}
// The step width a pass takes: kV (16 bytes of T) where c_out allows and the pointers are aligned, else 1.
XF_HD int elem_width(int64_t c_out, int elem_bytes, bool aligned16) {
  const int kv = 16 / elem_bytes;
  return aligned16 && c_out % kv == 0 ? kv : 1;
}

// The training statistics' partials (z_stats_partial_kernel): z [rows, c_out] in row blocks; a block
// of kStatsThreads threads is `cols` channel vectors (threadIdx.x) by lanes = kStatsThreads / cols row
// lanes (threadIdx.y), cols 32, or 16 / 8 where a row has fewer vectors (the entry flow's 128
// channels: 16 vectors of 8), so that few threads of a block have no channel. In a block, lane l owns
// kStatsGroups groups of kStatsGroupRows rows, row i of group j being block row
// (j * kStatsGroupRows + i) * lanes + l (a warp reads whole rows: consecutive channel vectors). A
// group's moments are exact two-pass sums held in registers (pivot: its first row), the groups of a
// lane merged in order, then the lanes as a binary tree (merge_tree): one partial per (row block,
// channel), merged by bn_stats_merge_kernel.
constexpr int kStatsThreads = 256;
constexpr int kStatsGroupRows = 8;
constexpr int kStatsGroups = 4;
constexpr int kStatsMinLanes = 8;  // 32 columns: the smallest row blocks, the most partials (the workspace)

XF_HD int stats_cols(int64_t vectors_per_row) { return vectors_per_row > 16 ? 32 : vectors_per_row > 8 ? 16 : 8; }
XF_HD int stats_lanes(int cols) { return kStatsThreads / cols; }
XF_HD int64_t stats_block_rows(int lanes) { return static_cast<int64_t>(lanes) * kStatsGroupRows * kStatsGroups; }
XF_HD int64_t stats_row_blocks(int64_t rows, int lanes) {
  return (rows + stats_block_rows(lanes) - 1) / stats_block_rows(lanes);
}
XF_HD int64_t stats_row(int64_t block, int lane, int group, int i, int lanes) {
  return block * stats_block_rows(lanes) + static_cast<int64_t>(group * kStatsGroupRows + i) * lanes + lane;
}
// Rows of row block `block` (its partial's count).
XF_HD int64_t stats_block_count(int64_t block, int64_t rows, int lanes) {
  const int64_t left = rows - block * stats_block_rows(lanes);
  return left < stats_block_rows(lanes) ? left : stats_block_rows(lanes);
}

}  // namespace infer
}  // namespace xception_fast
