// Index math of the CUDA forward's element-wise passes over [P, Cout] (sepconv_forward.cu): the
// inference epilogue and bn_apply (a grid-stride loop of kV-element steps) and the training
// statistics' partial kernel (row blocks of lanes). Plain C++ like sepconv_infer_tiling.h:
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
// the kStatsLaneRows rows k * lanes + l (stats_row; a warp reads whole rows: consecutive channel
// vectors), a prefix of them real (stats_lane_count). A lane's moments are shifted sums in one pass
// (stats_lane_moments: pivot its first row, s1 = sum(z - pivot), s2 = sum((z - pivot)^2) in row order,
// fp32 from zero), the lanes of each channel merged as a binary tree (merge_tree over the lanes,
// evaluated depth first: merge_tree_depth_first): one partial per (row block, channel), merged by
// bn_stats_merge_kernel. The pivot is a data value, so z - pivot is exact where z is near it (Sterbenz)
// and s2 - s1^2 / n cancels little: a mean of 1e4 with a spread of 1e-2 keeps its variance.
constexpr int kStatsThreads = 256;
constexpr int kStatsLaneRows = 32;
constexpr int kStatsMinLanes = 8;  // 32 columns: the smallest row blocks, the most partials (the workspace)

XF_HD int stats_cols(int64_t vectors_per_row) { return vectors_per_row > 16 ? 32 : vectors_per_row > 8 ? 16 : 8; }
XF_HD int stats_lanes(int cols) { return kStatsThreads / cols; }
XF_HD int64_t stats_block_rows(int lanes) { return static_cast<int64_t>(lanes) * kStatsLaneRows; }
XF_HD int64_t stats_row_blocks(int64_t rows, int lanes) {
  return (rows + stats_block_rows(lanes) - 1) / stats_block_rows(lanes);
}
// Row k of lane `lane` in row block `block`.
XF_HD int64_t stats_row(int64_t block, int lane, int k, int lanes) {
  return block * stats_block_rows(lanes) + static_cast<int64_t>(k) * lanes + lane;
}
// Real rows of the lane: those k with stats_row < rows, a prefix of 0 .. kStatsLaneRows - 1.
XF_HD int stats_lane_count(int64_t block, int lane, int64_t rows, int lanes) {
  const int64_t left = rows - stats_row(block, lane, 0, lanes);  // rows from the lane's first one on
  if (left <= 0) return 0;
  const int64_t k = (left + lanes - 1) / lanes;
  return k < kStatsLaneRows ? static_cast<int>(k) : kStatsLaneRows;
}
// Rows of row block `block` (its partial's count).
XF_HD int64_t stats_block_count(int64_t block, int64_t rows, int lanes) {
  const int64_t left = rows - block * stats_block_rows(lanes);
  return left < stats_block_rows(lanes) ? left : stats_block_rows(lanes);
}
// A lane's moments from its shifted sums over `count` values about `pivot`: mu = s1 / n and
// M2 = s2 - s1 mu (one rounding: fma), negative rounding clamped to 0 (NaN stays NaN).
XF_HD Moments stats_lane_moments(int count, float pivot, float s1, float s2) {
  if (count == 0) return Moments{0, 0.f, 0.f, 0.f};
  const float mu = s1 / static_cast<float>(count);
  const float m2 = fmaf(-s1, mu, s2);
  return Moments{count, pivot, mu, m2 < 0.f ? 0.f : m2};
}
// merge_tree<kN> over the moments load(first .. first + kN - 1), depth first: the same merges of the
// same operands (so the same bits), with log2(kN) + 1 moments live instead of kN (registers: the 32
// lanes of a block of 8 channel vectors).
template <int kN, class Load>
XF_HD Moments merge_tree_depth_first(const Load& load, int first = 0) {
  static_assert(kN > 0 && (kN & (kN - 1)) == 0, "merge_tree_depth_first: a power of two");
  if constexpr (kN == 1) {
    return load(first);
  } else {
    Moments a = merge_tree_depth_first<kN / 2>(load, first);
    merge_moments(a, merge_tree_depth_first<kN / 2>(load, first + kN / 2));
    return a;
  }
}

}  // namespace infer
}  // namespace xception_fast
