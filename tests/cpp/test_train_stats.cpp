// Host-side checks of the training forward's BatchNorm statistics (csrc/sepconv_infer_tiling.h, the
// "Training statistics" section), against brute force in double precision. Built and run by
// tests/test_infer_tiling.py with the host compiler; no GPU and no CUDA headers needed. Prints one
// line per failure and exits non-zero on any.
//
// The three levels of the kernel are emulated with the header's own functions, in the kernel's order:
// 1. per part of a tile (mma.sync: each lane's rows of the m16n8 accumulator fragments, then the xor
//    butterfly over the 8 lanes of a column, the pivot from lane % 4; FFMA: one thread per column),
//    with the padding rows of the MMA tile holding the z of the tile's last position, as in the kernel;
// 2. the parts of a Cout tile through the shared-memory moments area (stats_smem_index), merged in
//    part order into one partial per (tile, channel) (stats_partial_offset);
// 3. the tiles of a channel as bn_stats_merge_kernel's passes merge them (csrc/sepconv_stats_merge.h:
//    groups of 64 partials as binary trees, lane by lane, pass after pass), through a scratch area
//    laid out as take_merge_scratch lays it out.
// Checked: every shared-memory slot and every partial written exactly once, part counts against a
// brute-force count of each part's valid rows, the pivot row inside its part, the counts adding up to
// the tile's and the batch's positions, and mean / biased var / invstd against double precision for
// unit-scale data, per-channel scales from 1e-2 to 1e2, and a large mean with a small spread
// (1e4 + N(0, 1e-2)), where statistics without the pivot lose most of the variance's digits.
// Level 3 on its own (check_merge_passes): synthetic partials at partial counts around the group size
// and its powers (1 to 262,145: up to three passes before the final one), per-partial counts that
// differ (the last partial short, some empty with NaN payloads), means of 1e4 with spreads of a few
// ulps (variances 2.5e-5 and 1e-6), against two-pass mean and variance in double over the values behind
// the partials; every partial read once per channel and pass, every scratch slot written once.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "host_test.h"
#include "sepconv_stats_merge.h"

static std::mt19937 rng(2024);
static const float kNaN = std::numeric_limits<float>::quiet_NaN();
static double worst_merge_var = 0;  // printed: how far inside its tolerance check_merge_passes ran

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

// The xor butterfly of column_sum_mma over the 32 lanes' values: offsets 4, 8, 16.
static void butterfly(float (&v)[32]) {
  for (int m = 4; m < 32; m *= 2) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ m];
    for (int l = 0; l < 32; ++l) v[l] = next[l];
  }
}

// Level 1 for one Cout tile, written to the emulated shared-memory moments area `st` (slot writes
// counted in `st_writes`). zt(r, co): the z the accumulator of tile row r, channel co holds.
template <int kMF, class Z>
static void level1_mma(const Plan& p, const TileRange& t, int nt, Z&& zt, std::vector<float>& st,
                       std::vector<int>& st_writes) {
  constexpr int kRows = 2 * kMF;
  for (int warp = 0; warp < kThreads / 32; ++warp) {
    const int row0 = warp_row0(warp, p.bm), col0 = warp_col0(warp), part = mma_stats_part(warp);
    const int count = stats_part_rows(p.bm, t.count, part, 2);
    // Brute force: the rows of the part (the rows this warp's fragments hold) below count.
    int brute = 0;
    for (int lane = 0; lane < 32; lane += 4)
      for (int i = 0; i < kMF; ++i)
        for (int h = 0; h < 2; ++h) brute += row0 + 16 * i + acc_row(lane, 2 * h) < t.count;
    EXPECT(count == brute);
    EXPECT(stats_pivot_row(p.bm, part, 2) == row0 + acc_row(0, 0));
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e) {
        float z[32][kRows], sum[32], m2[32], pivot[32], mu[32];
        bool valid[32][kRows];
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < kMF; ++i)
            for (int h = 0; h < 2; ++h) {
              const int r = row0 + 16 * i + acc_row(lane, 2 * h), co = nt * kBN + col0 + 8 * j + acc_col(lane, e);
              z[lane][2 * i + h] = zt(r, co);
              valid[lane][2 * i + h] = r < t.count;
            }
        for (int lane = 0; lane < 32; ++lane) {
          pivot[lane] = z[lane % 4][0];  // __shfl_sync(z[0], lane % 4)
          sum[lane] = stats_lane_sum<kRows>(z[lane], valid[lane], pivot[lane]);
        }
        butterfly(sum);
        for (int lane = 0; lane < 32; ++lane) {
          mu[lane] = stats_mean(sum[lane], count);
          m2[lane] = stats_lane_m2<kRows>(z[lane], valid[lane], pivot[lane], mu[lane]);
        }
        butterfly(m2);
        for (int lane = 0; lane < 4; ++lane) {
          for (int l = lane; l < 32; l += 4) EXPECT(mu[l] == mu[lane] && m2[l] == m2[lane]);  // one value per column
          const int col = col0 + 8 * j + acc_col(lane, e);
          const float vals[3] = {pivot[lane], mu[lane], m2[lane]};
          for (int k = 0; k < 3; ++k) {
            const int idx = stats_smem_index(part, k, col);
            EXPECT(idx >= 0 && idx * 4 < stats_smem_bytes(2));
            st[idx] = vals[k];
            st_writes[idx]++;
          }
        }
      }
  }
}

template <class Z>
static void level1_ffma(const Plan& p, const TileRange& t, int nt, Z&& zt, std::vector<float>& st,
                        std::vector<int>& st_writes) {
  constexpr int kRows = 4;  // bm 32: ffma rows per thread
  EXPECT(p.bm / 8 == kRows);
  for (int tid = 0; tid < kThreads; ++tid) {
    const int part = ffma_stats_part(tid), count = stats_part_rows(p.bm, t.count, part, 4);
    int brute = 0;
    for (int q = 0; q < kRows; ++q) brute += ffma_row(tid, q) < t.count;
    EXPECT(count == brute);
    EXPECT(stats_pivot_row(p.bm, part, 4) == ffma_row(tid, 0));
    bool valid[kRows];
    for (int q = 0; q < kRows; ++q) valid[q] = ffma_row(tid, q) < t.count;
    for (int j = 0; j < 4; ++j) {
      float z[kRows];
      for (int q = 0; q < kRows; ++q) z[q] = zt(ffma_row(tid, q), nt * kBN + ffma_col(tid, j));
      const float pivot = z[0];
      const float mu = stats_mean(stats_lane_sum<kRows>(z, valid, pivot), count);
      const float m2 = stats_lane_m2<kRows>(z, valid, pivot, mu);
      const float vals[3] = {pivot, mu, m2};
      for (int k = 0; k < 3; ++k) {
        const int idx = stats_smem_index(part, k, ffma_col(tid, j));
        EXPECT(idx >= 0 && idx * 4 < stats_smem_bytes(4));
        st[idx] = vals[k];
        st_writes[idx]++;
      }
    }
  }
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

static void check_stats(const Plan& p, int eb, Dist dist) {
  const long positions = static_cast<long>(p.n) * p.h_out * p.w_out;
  const std::vector<float> z = make_z(positions, p.c_out, dist);
  const int tiles = num_tiles(p);
  std::vector<float> partial(static_cast<size_t>(tiles) * 3 * p.c_out, kNaN);
  std::vector<int> partial_writes(partial.size(), 0);
  const int parts = stats_parts(eb);
  for (int tile = 0; tile < tiles; ++tile) {
    const TileRange t = tile_range(p, tile);
    const long first = static_cast<long>(t.img) * p.h_out * p.w_out + t.q0;
    // The accumulators: padding rows (r >= count) hold the last position's z, columns past Cout 0.
    auto zt = [&](int r, int co) -> float {
      if (co >= p.c_out) return 0.f;
      return z[(first + (r < t.count ? r : t.count - 1)) * p.c_out + co];
    };
    int part_total = 0;
    for (int part = 0; part < parts; ++part) part_total += stats_part_rows(p.bm, t.count, part, eb);
    EXPECT(part_total == t.count);
    for (int nt = 0; nt < p.cout_tiles; ++nt) {
      std::vector<float> st(stats_smem_bytes(eb) / 4, kNaN);
      std::vector<int> st_writes(st.size(), 0);
      if (eb == 2) {
        if (p.bm == 128) level1_mma<4>(p, t, nt, zt, st, st_writes);
        if (p.bm == 64) level1_mma<2>(p, t, nt, zt, st, st_writes);
        if (p.bm == 32) level1_mma<1>(p, t, nt, zt, st, st_writes);
      } else {
        level1_ffma(p, t, nt, zt, st, st_writes);
      }
      for (int w : st_writes) EXPECT(w == 1);
      // Level 2: thread col merges the parts in order.
      for (int col = 0; col < kBN; ++col) {
        const int co = nt * kBN + col;
        if (co >= p.c_out) continue;
        Moments m{0, 0.f, 0.f, 0.f};
        for (int part = 0; part < parts; ++part)
          merge_moments(m, Moments{stats_part_rows(p.bm, t.count, part, eb), st[stats_smem_index(part, 0, col)],
                                   st[stats_smem_index(part, 1, col)], st[stats_smem_index(part, 2, col)]});
        EXPECT(m.count == t.count);
        const float vals[3] = {m.pivot, m.mu, m.m2};
        for (int k = 0; k < 3; ++k) {
          const int64_t off = stats_partial_offset(p, tile, k, co);
          EXPECT(off >= 0 && off < static_cast<int64_t>(partial.size()));
          partial[off] = vals[k];
          partial_writes[off]++;
        }
      }
    }
  }
  for (int w : partial_writes) EXPECT(w == 1);

  // Level 3, as bn_stats_merge_kernel's passes, then the reference in double.
  const double var_tol = dist == kLargeMean ? 2e-3 : 2e-5;
  for (int t = 0; t < tiles; ++t)
    for (int k = 0; k < 3; ++k)
      for (int co = 0; co < p.c_out; ++co) EXPECT(stats_partial_offset(p, t, k, co) == merge_offset(t, k, p.c_out, co));
  const auto tile_count = [&](int64_t t) { return static_cast<int64_t>(tile_range(p, static_cast<int>(t)).count); };
  const std::vector<Moments> merged = merge_passes(partial, tiles, tile_count, p.c_out);
  for (int co = 0; co < p.c_out; ++co) {
    const Moments acc = merged[co];
    EXPECT(acc.count == positions);
    float mean, var, invstd;
    finalize_moments(acc, 1e-5f, mean, var, invstd);
    double ref_mean = 0, ref_var = 1;
    if (positions > 0) {
      double s = 0, s2 = 0;
      for (long r = 0; r < positions; ++r) s += z[r * p.c_out + co];
      ref_mean = s / positions;
      for (long r = 0; r < positions; ++r) s2 += (z[r * p.c_out + co] - ref_mean) * (z[r * p.c_out + co] - ref_mean);
      ref_var = s2 / positions;
    }
    const double scale = std::sqrt(ref_var) + 1e-30;
    EXPECT(std::fabs(mean - ref_mean) <= 1e-5 * scale + 4 * std::fabs(ref_mean) * 6e-8);
    EXPECT(std::fabs(var - ref_var) <= var_tol * ref_var + 1e-30);
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
        const float mu = stats_mean(sum, static_cast<int>(v.size()));
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

struct Geometry {
  int n, c, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw;
};

int main() {
  check_merge();
  check_merge_passes();
  const std::vector<Geometry> geometries = {
      {2, 728, 19, 19, 728, 3, 3, 1, 1, 1, 1, 1, 1},  // Xception middle flow
      {2, 5, 7, 9, 7, 3, 3, 1, 1, 1, 1, 1, 1},
      {3, 70, 13, 11, 130, 3, 3, 1, 1, 1, 1, 1, 1},   // two Cout tiles, the second partial
      {5, 8, 41, 37, 12, 3, 3, 1, 1, 1, 1, 1, 1},     // 60 to 240 tiles: a merge pass before the final one
      {1, 19, 11, 10, 19, 3, 3, 2, 1, 1, 2, 1, 2},
      {1, 16, 3, 300, 9, 3, 3, 1, 1, 1, 1, 1, 1},     // row segments
      {1, 8, 1, 1, 3, 3, 3, 1, 1, 1, 1, 1, 1},        // one position
      {0, 8, 5, 5, 8, 3, 3, 1, 1, 1, 1, 1, 1},        // empty batch: mean 0, var 1
      {2, 8, 5, 5, 0, 3, 3, 1, 1, 1, 1, 1, 1},        // no output channels
  };
  int checked = 0;
  for (const Geometry& g : geometries)
    for (int eb : {2, 4})
      for (int i = 0; tile_candidate(i, eb).bm > 0; ++i) {
        Plan p = make_plan(g.n, g.c, g.h, g.w, g.c_out, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                           tile_candidate(i, eb).bm, tile_candidate(i, eb).row_segments);
        p.stats = 1;
        for (Dist dist : {kUnit, kScaled, kLargeMean}) {
          where = "n" + std::to_string(g.n) + " " + std::to_string(g.h) + "x" + std::to_string(g.w) + " cout" +
                  std::to_string(g.c_out) + " bm" + std::to_string(p.bm) + (p.row_segments ? " segments " : " ranges ") +
                  std::to_string(eb) + "B dist" + std::to_string(dist);
          check_stats(p, eb, dist);
        }
        ++checked;
      }
  return report(checked);
}
