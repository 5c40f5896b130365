// Host-side checks of the training forward's BatchNorm statistics (csrc/sepconv_elementwise.h, the
// statistics' partials; csrc/sepconv_infer_tiling.h, the moments; csrc/sepconv_stats_merge.h, their
// merge), against brute force in double precision. Built and run by tests/test_infer_tiling.py with
// the host compiler; no GPU and no CUDA headers needed. Prints one line per failure and exits non-zero
// on any.
//
// The two kernels are emulated with the headers' own functions, in the kernels' order:
// 1. z_stats_partial_kernel (sepconv_forward.cu) over the stored z [rows, Cout]: per row block, column
//    block and thread (kV channels: 1, 4 or 8; the block shape stats_cols picks: 32, 16 or 8 channel
//    vectors by 8, 16 or 32 lanes), the lane's rows (stats_row, stats_lane_count) streamed into shifted
//    sums about its first row (stats_lane_moments), then the lanes of each channel merged depth first
//    (merge_tree_depth_first, checked bit-equal to merge_tree over all lanes): one partial per (row
//    block, channel) (merge_offset);
// 2. the row blocks of a channel as bn_stats_merge_kernel's passes merge them (groups of 64 partials
//    as binary trees, lane by lane, pass after pass), through a scratch area laid out as
//    take_merge_scratch lays it out.
// Checked: every element of z read exactly once, a lane's real rows a prefix of its rows, every partial
// written exactly once, the counts adding up to the row block's (stats_block_count) and the batch's,
// and mean / biased var / invstd against double precision for unit-scale data, per-channel scales from
// 1e-2 to 1e2, and a large mean with a small spread (1e4 + N(0, 1e-2)), where statistics without the
// pivot lose most of the variance's digits.
// The merge on its own (check_merge_passes): synthetic partials at partial counts around the group size
// and its powers (1 to 262,145: up to three passes before the final one), per-partial counts that
// differ (the last partial short, some empty with NaN payloads), means of 1e4 with spreads of a few
// ulps (variances 2.5e-5 and 1e-6), against two-pass mean and variance in double over the values behind
// the partials; every partial read once per channel and pass, every scratch slot written once.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "host_test.h"
#include "sepconv_elementwise.h"
#include "sepconv_stats_merge.h"

static std::mt19937 rng(2024);
static const float kNaN = std::numeric_limits<float>::quiet_NaN();
static double worst_merge_var = 0;  // printed: how far inside its tolerance check_merge_passes ran
static double worst_stats_var[3] = {0, 0, 0};  // the same for check_stats, per distribution

// The data distributions of z (one per check).
enum Dist { kUnit, kScaled, kLargeMean };

static std::vector<float> make_z(long positions, int c_out, Dist dist) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> z(static_cast<size_t>(positions) * c_out);
  for (long r = 0; r < positions; ++r)
    for (int co = 0; co < c_out; ++co) {
      float v = normal(rng);
      if (dist == kScaled) v = static_cast<float>((co % 7 - 3) * 50) + v * std::pow(10.f, static_cast<float>(co % 5 - 2));
      if (dist == kLargeMean) v = 1e4f + 1e-2f * v;
      z[r * c_out + co] = v;
    }
  return z;
}

// Level 3 as bn_stats_merge_kernel's passes run it (launch_bn_stats_merge, sepconv_device.cuh): over
// n partials `partial` [n][3][c_out] with counts count(t), each pass's blocks (group g, channel co)
// emulated lane by lane with the header's functions, the passes' outputs in one scratch area of
// merge_scratch_partials(n) partials, pass after pass. Checked: every partial's three moments read once
// per channel in each pass, every scratch slot (moments and counts) written once, the scratch used to
// its end.
// Returns the final pass's moments per channel (what finalize_moments turns into the statistics).
static std::vector<Moments> merge_passes(const std::vector<float>& partial, int64_t n,
                                         std::function<int64_t(int64_t)> count, int c_out) {
  if (c_out == 0) return {};  // the launchers return before the merge
  const int64_t scratch_partials = merge_scratch_partials(n);
  std::vector<float> scratch(static_cast<size_t>(scratch_partials) * 3 * c_out, kNaN);
  std::vector<int64_t> scratch_counts(static_cast<size_t>(scratch_partials), -1);
  std::vector<int> writes(scratch.size(), 0), count_writes(scratch_counts.size(), 0);
  std::vector<Moments> result(c_out);
  const float* src = partial.data();
  int64_t out = 0;  // the current pass's first output partial in the scratch
  for (;;) {
    const bool final = merge_is_final(n);
    const int64_t groups = final ? 1 : merge_groups(n);
    std::vector<int> reads(static_cast<size_t>(n) * c_out, 0);
    for (int64_t g = 0; g < groups; ++g)
      for (int co = 0; co < c_out; ++co) {
        auto value = [&](int64_t t, int k) {
          EXPECT(t >= 0 && t < n && k >= 0 && k < 3);
          reads[t * c_out + co]++;
          return src[merge_offset(t, k, c_out, co)];
        };
        Moments lanes[kMergeLanes];
        for (int l = 0; l < kMergeLanes; ++l) lanes[l] = merge_lane(count, value, n, g, l);
        merge_tree(lanes);
        if (final) {
          result[co] = lanes[0];
          continue;
        }
        const float vals[3] = {lanes[0].pivot, lanes[0].mu, lanes[0].m2};
        for (int k = 0; k < 3; ++k) {
          const int64_t off = out * 3 * c_out + merge_offset(g, k, c_out, co);
          EXPECT(off >= 0 && off < static_cast<int64_t>(scratch.size()));
          if (off < 0 || off >= static_cast<int64_t>(scratch.size())) continue;
          scratch[off] = vals[k];
          writes[off]++;
        }
        if (co == 0 && out + g < scratch_partials) {
          scratch_counts[out + g] = lanes[0].count;
          count_writes[out + g]++;
        }
      }
    for (int r : reads) EXPECT(r == 3);  // pivot, mu and M2 of each partial, once
    if (final) break;
    src = scratch.data() + out * 3 * c_out;
    count = [&scratch_counts, out](int64_t t) { return scratch_counts[out + t]; };
    n = groups;
    out += groups;
  }
  EXPECT(out == scratch_partials);
  for (int w : writes) EXPECT(w == 1);
  for (int w : count_writes) EXPECT(w == 1);
  return result;
}

// merge_tree over all n lanes (the reference order) and the kernel's depth-first evaluation of it.
template <int kN>
static Moments whole_tree(const std::vector<Moments>& lanes) {
  Moments m[kN];
  for (int l = 0; l < kN; ++l) m[l] = lanes[l];
  merge_tree(m);
  return m[0];
}
template <int kN>
static Moments depth_first(const std::vector<Moments>& lanes) {
  return merge_tree_depth_first<kN>([&](int l) { return lanes.at(l); });
}

// z_stats_partial_kernel over z [rows, c_out] with kv channels per thread (the block shape the launcher
// picks: stats_cols), then the merge.
static void check_stats(int64_t rows, int c_out, int kv, Dist dist) {
  const long positions = static_cast<long>(rows);
  const std::vector<float> z = make_z(positions, c_out, dist);
  const int cols = stats_cols((c_out + kv - 1) / kv), lanes = stats_lanes(cols);
  EXPECT(cols * lanes == kStatsThreads && lanes >= kStatsMinLanes && lanes % 8 == 0);
  EXPECT(cols == 32 || (c_out + kv - 1) / kv <= cols);  // narrower blocks only where a row has fewer vectors
  const int64_t blocks = stats_row_blocks(rows, lanes);
  EXPECT(blocks <= stats_row_blocks(rows, kStatsMinLanes));  // the workspace's bound
  std::vector<float> partial(static_cast<size_t>(blocks) * 3 * c_out, kNaN);
  std::vector<int> partial_writes(partial.size(), 0), reads(z.size(), 0);
  const int64_t col_blocks = ((c_out + kv - 1) / kv + cols - 1) / cols;
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t cb = 0; cb < col_blocks; ++cb)
      for (int tx = 0; tx < cols; ++tx) {
        const int64_t co0 = (cb * cols + tx) * kv;
        const bool live = co0 < c_out;
        std::vector<std::vector<Moments>> lane_m(lanes, std::vector<Moments>(kv, Moments{0, 0.f, 0.f, 0.f}));
        for (int ty = 0; ty < lanes; ++ty) {
          // The lane's real rows: a prefix of its kStatsLaneRows rows, in the block.
          const int count = live ? stats_lane_count(block, ty, rows, lanes) : 0;
          int seen = 0;
          for (int k = 0; k < kStatsLaneRows; ++k) {
            const int64_t row = stats_row(block, ty, k, lanes);
            EXPECT(row >= block * stats_block_rows(lanes) && row < (block + 1) * stats_block_rows(lanes));
            if (live && row < rows) {
              EXPECT(k == seen);  // a prefix
              ++seen;
            }
          }
          EXPECT(seen == count);
          for (int e = 0; e < kv && live; ++e) {
            EXPECT(co0 + e < c_out);
            float pivot = 0.f, s1 = 0.f, s2 = 0.f;
            for (int k = 0; k < count; ++k) {
              const int64_t at = stats_row(block, ty, k, lanes) * c_out + co0 + e;
              reads[at]++;
              if (k == 0) {
                pivot = z[at];  // its own deviation is 0: the kernel adds nothing for it
                continue;
              }
              const float d = z[at] - pivot;
              s1 += d;
              s2 = std::fmaf(d, d, s2);
            }
            lane_m[ty][e] = stats_lane_moments(count, pivot, s1, s2);
            EXPECT(lane_m[ty][e].m2 >= 0.f);
          }
        }
        if (!live) continue;
        for (int e = 0; e < kv; ++e) {
          std::vector<Moments> per_lane(lanes);
          for (int l = 0; l < lanes; ++l) per_lane[l] = lane_m[l][e];
          const Moments got = lanes == 8 ? depth_first<8>(per_lane) : lanes == 16 ? depth_first<16>(per_lane)
                                                                                  : depth_first<32>(per_lane);
          const Moments ref = lanes == 8 ? whole_tree<8>(per_lane) : lanes == 16 ? whole_tree<16>(per_lane)
                                                                                 : whole_tree<32>(per_lane);
          EXPECT(got.count == ref.count && got.pivot == ref.pivot && got.mu == ref.mu && got.m2 == ref.m2);
          EXPECT(got.count == stats_block_count(block, rows, lanes));
          const float vals[3] = {got.pivot, got.mu, got.m2};
          for (int k = 0; k < 3; ++k) {
            const int64_t off = merge_offset(block, k, c_out, co0 + e);
            EXPECT(off >= 0 && off < static_cast<int64_t>(partial.size()));
            if (off < 0 || off >= static_cast<int64_t>(partial.size())) continue;
            partial[off] = vals[k];
            partial_writes[off]++;
          }
        }
      }
  for (int r : reads) EXPECT(r == 1);
  for (int w : partial_writes) EXPECT(w == 1);
  int64_t counted = 0;
  for (int64_t b = 0; b < blocks; ++b) counted += stats_block_count(b, rows, lanes);
  EXPECT(counted == rows);

  // Level 3, as bn_stats_merge_kernel's passes, then the reference in double.
  const double var_tol = dist == kLargeMean ? 2e-3 : 2e-5;
  const auto block_count = [&](int64_t t) { return stats_block_count(t, rows, lanes); };
  const std::vector<Moments> merged = merge_passes(partial, blocks, block_count, c_out);
  for (int co = 0; co < c_out; ++co) {
    const Moments acc = merged[co];
    EXPECT(acc.count == positions);
    float mean, var, invstd;
    finalize_moments(acc, 1e-5f, mean, var, invstd);
    double ref_mean = 0, ref_var = 1;
    if (positions > 0) {
      double s = 0, s2 = 0;
      for (long r = 0; r < positions; ++r) s += z[r * c_out + co];
      ref_mean = s / positions;
      for (long r = 0; r < positions; ++r) s2 += (z[r * c_out + co] - ref_mean) * (z[r * c_out + co] - ref_mean);
      ref_var = s2 / positions;
    }
    const double scale = std::sqrt(ref_var) + 1e-30;
    EXPECT(std::fabs(mean - ref_mean) <= 1e-5 * scale + 4 * std::fabs(ref_mean) * 6e-8);
    EXPECT(std::fabs(var - ref_var) <= var_tol * ref_var + 1e-30);
    if (ref_var > 0) worst_stats_var[dist] = std::max(worst_stats_var[dist], std::fabs(var - ref_var) / ref_var);
    EXPECT(std::fabs(invstd - 1.0 / std::sqrt(ref_var + 1e-5)) <= 1e-5 / std::sqrt(ref_var + 1e-5) + var_tol);
  }
}

// merge_moments on its own: merging singletons in any split gives the two-pass result; an empty side
// changes nothing.
static void check_merge() {
  where = "merge_moments";
  std::uniform_int_distribution<int> len(1, 300);
  for (int trial = 0; trial < 200; ++trial) {
    const int n = len(rng);
    const std::vector<float> v = make_z(n, 1, trial % 2 ? kLargeMean : kScaled);
    Moments a{0, 0.f, 0.f, 0.f};
    merge_moments(a, Moments{0, kNaN, kNaN, kNaN});  // an empty part is skipped, NaN and all
    for (float x : v) merge_moments(a, Moments{1, x, 0.f, 0.f});
    double s = 0, s2 = 0;
    for (float x : v) s += x;
    const double mean = s / n;
    for (float x : v) s2 += (x - mean) * (x - mean);
    EXPECT(a.count == n);
    EXPECT(std::fabs(a.pivot + a.mu - mean) <= 1e-5 * std::sqrt(s2 / n) + 4 * std::fabs(mean) * 6e-8);
    EXPECT(std::fabs(a.m2 - s2) <= (trial % 2 ? 5e-3 : 1e-4) * s2 + 1e-30);
  }
  float mean, var, invstd;
  finalize_moments(Moments{0, kNaN, kNaN, kNaN}, 1e-5f, mean, var, invstd);
  EXPECT(mean == 0.f && var == 1.f && std::fabs(invstd - 1.f / std::sqrt(1.f + 1e-5f)) == 0.f);
}

// Level 3 on its own: n synthetic partials per channel, each the moments of `count` values computed as
// level 2 leaves them (pivot the first value, mu and M2 about it in fp32), merged by merge_passes, then
// finalised, against two-pass statistics in double of all the values. Channels: unit normal; mean 1e4
// with std 5e-3 and 1e-3 (5 and 1 ulps of fp32 at 1e4: the values differ in their last bits, variances
// about 2.5e-5 and 1e-6); mean -3e3 with std 0.5; mean 0 with std 1e3.
static void check_merge_passes() {
  const int64_t sizes[] = {0, 1, 2, 7, 63, 64, 65, 127, 129, 4095, 4096, 4097, 262145};
  const float means[] = {0.f, 1e4f, 1e4f, -3e3f, 0.f}, stds[] = {1.f, 5e-3f, 1e-3f, 0.5f, 1e3f};
  constexpr int kC = 5;
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t n : sizes) {
    where = "merge passes n=" + std::to_string(n);
    // Counts per partial: up to 130 (a tile's positions), fewer for large n (the value count stays
    // small); the last partial short, every 17th empty with NaN moments (skipped whatever they hold).
    const int max_count = n > 10000 ? 6 : 130;
    std::uniform_int_distribution<int> count_dist(1, max_count);
    std::vector<int64_t> counts(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) counts[t] = t % 17 == 5 ? 0 : count_dist(rng);
    if (n > 1) counts[n - 1] = 1 + counts[n - 1] / 3;
    std::vector<float> partial(static_cast<size_t>(n) * 3 * kC, kNaN);
    std::vector<std::vector<float>> values(kC);
    int64_t total = 0;
    for (int64_t t = 0; t < n; ++t) {
      total += counts[t];
      for (int co = 0; co < kC; ++co) {
        if (counts[t] == 0) continue;  // an empty partial: its NaN moments stay
        std::vector<float> v(static_cast<size_t>(counts[t]));
        for (float& x : v) x = means[co] + stds[co] * normal(rng);
        values[co].insert(values[co].end(), v.begin(), v.end());
        const float pivot = v[0];
        float sum = 0.f, m2 = 0.f;
        for (float x : v) sum += x - pivot;
        const float mu = sum / static_cast<float>(v.size());
        for (float x : v) m2 = std::fmaf((x - pivot) - mu, (x - pivot) - mu, m2);
        partial[merge_offset(t, 0, kC, co)] = pivot;
        partial[merge_offset(t, 1, kC, co)] = mu;
        partial[merge_offset(t, 2, kC, co)] = m2;
      }
    }
    const std::vector<Moments> merged = merge_passes(partial, n, [&](int64_t t) { return counts[t]; }, kC);
    for (int co = 0; co < kC; ++co) {
      EXPECT(merged[co].count == total);
      float mean, var, invstd;
      finalize_moments(merged[co], 1e-5f, mean, var, invstd);
      double ref_mean = 0, ref_var = 1;
      if (total > 0) {
        double s1 = 0, s2 = 0;
        for (float x : values[co]) s1 += x;
        ref_mean = s1 / total;
        for (float x : values[co]) s2 += (x - ref_mean) * (x - ref_mean);
        ref_var = s2 / total;
      }
      // The mean to a few ulps of its size plus 1e-5 of a standard deviation; the variance to 1e-5
      // relative (fp32 rounds to 6e-8: a tree of depth log2(n) over short partials stays well inside).
      EXPECT(ref_var > 0 || total < 2);
      EXPECT(std::fabs(mean - ref_mean) <= 1e-5 * std::sqrt(ref_var) + 4 * std::fabs(ref_mean) * 6e-8);
      EXPECT(std::fabs(var - ref_var) <= 1e-5 * ref_var);
      EXPECT(std::fabs(invstd - 1.0 / std::sqrt(ref_var + 1e-5)) <= 1e-5 / std::sqrt(ref_var + 1e-5));
      worst_merge_var = std::max(worst_merge_var, total > 0 ? std::fabs(var - ref_var) / ref_var : 0.0);
    }
  }
  std::printf("merge passes: worst relative variance error %.2e\n", worst_merge_var);
}

int main() {
  check_merge();
  check_merge_passes();
  // (rows, Cout): Xception's middle flow at batch 2 (722 rows, 728 channels), odd sizes, a partial row
  // block and column block, more than 64 row blocks (a merge pass before the final one), one row, an
  // empty batch (mean 0, var 1), no output channels.
  // Cout 128 / 24 / 16 / 8 / 7 / 3: blocks of 16 or 8 channel vectors (16 or 32 lanes).
  const std::pair<int64_t, int> shapes[] = {{722, 728}, {63, 7}, {257, 130}, {17000, 8}, {1, 3}, {0, 8},
                                            {5, 0},     {513, 33}, {300, 16}, {2000, 128}, {1100, 24}};
  int checked = 0;
  for (const auto& [rows, c_out] : shapes)
    for (int kv : {1, 4, 8}) {
      if (kv > 1 && c_out % kv) continue;  // the vector path needs Cout % kV == 0
      for (Dist dist : {kUnit, kScaled, kLargeMean}) {
        where = "rows " + std::to_string(rows) + " cout " + std::to_string(c_out) + " kv " + std::to_string(kv) +
                " dist" + std::to_string(dist);
        check_stats(rows, c_out, kv, dist);
      }
      ++checked;
    }
  std::printf("partials: worst relative variance error %.2e (unit), %.2e (scaled), %.2e (mean 1e4, std 1e-2)\n",
              worst_stats_var[kUnit], worst_stats_var[kScaled], worst_stats_var[kLargeMean]);
  return report(checked);
}
