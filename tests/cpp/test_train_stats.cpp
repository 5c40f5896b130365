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
// 3. the tiles of a channel as bn_stats_merge_kernel merges them (8 lanes, then lane 0).
// Checked: every shared-memory slot and every partial written exactly once, part counts against a
// brute-force count of each part's valid rows, the pivot row inside its part, the counts adding up to
// the tile's and the batch's positions, and mean / biased var / invstd against double precision for
// unit-scale data, per-channel scales from 1e-2 to 1e2, and a large mean with a small spread
// (1e4 + N(0, 1e-2)), where statistics without the pivot lose most of the variance's digits.
#include <cmath>
#include <limits>

#include "host_test.h"

static std::mt19937 rng(2024);
static const float kNaN = std::numeric_limits<float>::quiet_NaN();

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

  // Level 3, as bn_stats_merge_kernel (8 lanes), then the reference in double.
  const double var_tol = dist == kLargeMean ? 2e-3 : 2e-5;
  for (int co = 0; co < p.c_out; ++co) {
    Moments lanes[8];
    for (int l = 0; l < 8; ++l) {
      lanes[l] = Moments{0, 0.f, 0.f, 0.f};
      for (int t = l; t < tiles; t += 8)
        merge_moments(lanes[l], Moments{tile_range(p, t).count, partial[stats_partial_offset(p, t, 0, co)],
                                        partial[stats_partial_offset(p, t, 1, co)],
                                        partial[stats_partial_offset(p, t, 2, co)]});
    }
    Moments acc = lanes[0];
    for (int l = 1; l < 8; ++l) merge_moments(acc, lanes[l]);
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

struct Geometry {
  int n, c, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw;
};

int main() {
  check_merge();
  const std::vector<Geometry> geometries = {
      {2, 728, 19, 19, 728, 3, 3, 1, 1, 1, 1, 1, 1},  // Xception middle flow
      {2, 5, 7, 9, 7, 3, 3, 1, 1, 1, 1, 1, 1},
      {3, 70, 13, 11, 130, 3, 3, 1, 1, 1, 1, 1, 1},   // two Cout tiles, the second partial
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
