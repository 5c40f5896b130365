// The last level of the training forward's BatchNorm statistics (level 3 in sepconv_infer_tiling.h):
// the per-tile moment partials of every output channel merged into one, in parallel and in a fixed
// order. Plain C++ like sepconv_infer_tiling.h: bn_stats_merge_kernel (sepconv_device.cuh) runs these
// functions, tests/cpp/test_train_stats.cpp runs the same ones on the CPU against brute force.
//
// Why parallel: one block per 32 channels with 8 lanes each merging every 8th tile in sequence put
// the entry flow's 43,264 tiles (128 channels: 4 blocks) through chains of 5,400 dependent merges,
// each waiting for its loads: 3.3 ms on an H200, for 66 MB of partials.
//
// The order. A pass turns n partials into ceil(n / kMergeGroup): group g (partials 64 g .. 64 g + 63)
// of 32 channels is one iteration of a 32 x 8 block; lane l loads its 8 leaves 64 g + 8 l .. + 7 (all
// loads in flight at once) and merges them as a binary tree (merge_tree), then lane 0 merges the 8 lane
// results as a binary tree. So a group is a perfect binary tree of 64 leaves, the leaves past n empty
// (an empty side changes nothing). Passes repeat while more than kMergeGroup partials remain; the last
// pass (one group) finalises mean, var and invstd. The order depends on n alone (no atomics, the same
// result on every GPU), and the rounding error of a tree grows with its depth (log2 n) rather than n.
#pragma once

#include <cstdint>

#include "sepconv_infer_tiling.h"

namespace xception_fast {
namespace infer {

constexpr int kMergeLeaves = 8;                          // partials one lane loads
constexpr int kMergeLanes = 8;                           // lanes per channel (the reduction blocks' kRedLanes)
constexpr int kMergeGroup = kMergeLeaves * kMergeLanes;  // partials one pass merges into one

// Whether n partials are merged by the final pass (one group), rather than by another pass.
XF_HD bool merge_is_final(int64_t n) { return n <= kMergeGroup; }

// Partials a pass over n leaves behind: one per group.
XF_HD int64_t merge_groups(int64_t n) { return (n + kMergeGroup - 1) / kMergeGroup; }

// Index of leaf i of lane `lane` in group g (a partial when < n).
XF_HD int64_t merge_leaf(int64_t g, int lane, int i) { return g * kMergeGroup + lane * kMergeLeaves + i; }

// Offset of (partial t, k, channel co) in a float [n][3][c_out] array, k = 0 pivot, 1 mu, 2 M2: the
// tiles' partials (stats_partial_offset) and every pass's output share this layout.
XF_HD int64_t merge_offset(int64_t t, int k, int64_t c_out, int64_t co) { return (t * 3 + k) * c_out + co; }

// The passes' outputs before the final pass, all kept (each pass reads the previous one's): partials
// in all, for n tiles. Pass 1 writes at 0, pass 2 after pass 1's merge_groups(n), and so on.
XF_HD int64_t merge_scratch_partials(int64_t n) {
  int64_t total = 0;
  while (!merge_is_final(n)) {
    n = merge_groups(n);
    total += n;
  }
  return total;
}

// m[0] = the binary-tree merge of m[0 .. kN): pairs (0, 1), (2, 3), ..., then (0, 2), (4, 6), ...;
// kN a power of two. The pairs of one level are independent (instruction-level parallelism).
template <int kN>
XF_HD void merge_tree(Moments (&m)[kN]) {
  static_assert(kN > 0 && (kN & (kN - 1)) == 0, "merge_tree: a power of two");
  XF_UNROLL
  for (int s = 1; s < kN; s *= 2) {
    XF_UNROLL
    for (int i = 0; i + s < kN; i += 2 * s) merge_moments(m[i], m[i + s]);
  }
}

// Lane `lane`'s share of group g over n partials, merged as a tree: partial t holds count(t) values,
// its moments k = 0 pivot, 1 mu, 2 M2 are value(t, k); leaves past n are empty and not read. The counts
// come first, in a loop of their own: a kernel then keeps one copy of the loads and merges whatever
// branches count() takes.
template <class Count, class Value>
XF_HD Moments merge_lane(const Count& count, const Value& value, int64_t n, int64_t g, int lane) {
  Moments m[kMergeLeaves];
  XF_UNROLL
  for (int i = 0; i < kMergeLeaves; ++i) {
    const int64_t t = merge_leaf(g, lane, i);
    m[i].count = t < n ? count(t) : 0;
  }
  XF_UNROLL
  for (int i = 0; i < kMergeLeaves; ++i) {
    const int64_t t = merge_leaf(g, lane, i);
    const bool live = t < n;
    m[i].pivot = live ? value(t, 0) : 0.f;
    m[i].mu = live ? value(t, 1) : 0.f;
    m[i].m2 = live ? value(t, 2) : 0.f;
  }
  merge_tree(m);
  return m[0];
}

}  // namespace infer
}  // namespace xception_fast
