// Host-side checks of the index math of the backward's tiled grad_pw kernel (csrc/sepconv_infer_tiling.h,
// the "grad_pw" section; grad_pw_tiled_kernel in sepconv_infer.cu) against brute force. Built and run
// by tests/test_infer_tiling.py with the host compiler; no GPU and no CUDA headers needed.
//
// Checked, per geometry and tile candidate: the shared-memory layout (regions disjoint, aligned, in
// bounds, ldmatrix pitches odd in 16-byte units); the grid's work units (every (chunk, pass, split)
// once); the splits (every position tile in exactly one, contiguous); the split choice against a
// brute-force search; the grad_z staging (every element of the tile once, 16-byte aligned); and the
// whole kernel emulated: ldmatrix.x4.trans at the kernel's addresses (PTX ISA semantics), mma.m16n8k16
// with the PTX fragment layouts, the partial stores with the kernel's masks (each (split, co, c) at most
// once, every real one exactly once), and the sum of the partials equal to grad_z^T d computed directly
// (small integers: exact in float). d of padding rows is the clamped last position's, as the depthwise
// phase leaves it: the zero grad_z rows must cancel it.
#include <algorithm>

#include "host_test.h"

static std::mt19937 rng(77);

static void check_layout(const Plan& p) {
  const SmemLayout s = gp_smem_layout(p, 2);
  const Range d{0, static_cast<long>(p.bm) * gp_ld_d() * 2};
  const Range gz{s.ring, s.ring + static_cast<long>(p.bm) * gp_ld_gz() * 2};
  const long halo = static_cast<long>(p.halo_rows) * p.halo_cols * kBK * 2;
  const Range h0{s.halo[0], s.halo[0] + halo}, h1{s.halo[1], s.halo[1] + halo};
  const long wts = 4L * p.kh * p.kw * kBK;
  const Range w0{s.wts[0], s.wts[0] + wts}, w1{s.wts[1], s.wts[1] + wts};
  const Range table{s.table, s.table + 4L * p.halo_rows * p.halo_cols};
  const Range all[] = {d, gz, h0, h1, w0, w1, table};
  for (int i = 0; i < 7; ++i) {
    EXPECT(all[i].begin >= 0 && all[i].end <= s.total && all[i].begin % 128 == 0);
    for (int j = i + 1; j < 7; ++j) EXPECT(disjoint(all[i], all[j]));
  }
  EXPECT(s.d_ld == gp_ld_d() && s.ring_ld == gp_ld_gz());
  EXPECT((gp_ld_d() * 2 / 16) % 2 == 1 && (gp_ld_d() * 2) % 16 == 0);
  EXPECT((gp_ld_gz() * 2 / 16) % 2 == 1 && (gp_ld_gz() * 2) % 16 == 0);
  EXPECT(p.bm % 16 == 0 && gp_ld_d() >= kBK && gp_ld_gz() >= kGpN);
  EXPECT(kGpWarpCols * (kThreads / 32) == kGpN && kGpWarpCols % 16 == 0);
}

static void check_grid(const Plan& p) {
  const int tiles = num_tiles(p);
  for (int splits : {1, 2, 3, 7, kGpMaxSplits, 66, 132, gp_max_splits(1)}) {
    if (splits > (tiles > 0 ? tiles : 1)) continue;
    std::vector<int> seen(static_cast<size_t>(gp_units(p)) * splits, 0);
    for (int w = 0; w < gp_units(p) * splits; ++w) {
      const GpUnit u = gp_unit(p, w);
      EXPECT(u.chunk >= 0 && u.chunk < gp_chunks(p) && u.pass >= 0 && u.pass < gp_passes(p) && u.split >= 0 &&
             u.split < splits);
      seen[(static_cast<size_t>(u.split) * gp_passes(p) + u.pass) * gp_chunks(p) + u.chunk]++;
    }
    for (int v : seen) EXPECT(v == 1);
    std::vector<int> tile_seen(tiles, 0);
    int next = 0;
    for (int s = 0; s < splits; ++s) {
      const TileSpan span = gp_split_tiles(p, s, splits);
      EXPECT(span.begin == next && span.end >= span.begin && (tiles == 0 || span.end > span.begin));
      next = span.end;
      for (int t = span.begin; t < span.end; ++t) tile_seen.at(t)++;
    }
    EXPECT(next == tiles);
    for (int v : tile_seen) EXPECT(v == 1);
  }
  std::vector<int> gz_seen(static_cast<size_t>(p.bm) * kGpN, 0);
  EXPECT(kGpGzThreads <= kThreads && kGpGzThreads % 32 == 0);
  for (int tid = 0; tid < kGpGzThreads; ++tid) {
    const int col = gp_gz_col(tid);
    for (int r = gp_gz_row0(tid); r < p.bm; r += kGpGzRowStep) {
      EXPECT(r >= 0 && col >= 0 && col + 8 <= kGpN && ((r * gp_ld_gz() + col) * 2) % 16 == 0);
      for (int e = 0; e < 8; ++e) gz_seen[r * kGpN + col + e]++;
    }
  }
  for (int v : gz_seen) EXPECT(v == 1);
}

static void check_choose_splits() {
  where = "gp_choose_splits";
  for (int units : {1, 2, 3, 5, 23, 46, 64, 200})
    for (int sms : {108, 132, 148})
      for (int tiles : {1, 5, 16, 722, 1444})
        for (int max_splits : {1, 4, 16, 66, 256}) {
          const int s = gp_choose_splits(units, tiles, sms, max_splits);
          // The counts tried: at most the workspace's room, one per tile, and 16 or one wave's worth.
          const int one_wave = (sms + units - 1) / units;
          const int limit = std::min({max_splits, tiles, std::max(16, one_wave)});
          EXPECT(s >= 1 && s <= limit);
          const auto eff = [&](int k) { return double(units * k) / (double((units * k + sms - 1) / sms) * sms); };
          for (int k = 1; k <= limit; ++k) EXPECT(eff(k) <= eff(s) + 1e-9 && (k >= s || eff(k) < eff(s) - 1e-9));
        }
  // The workspace (sized without the SM count) has room for the choice on up to kGpMaxSms SMs.
  for (int units = 1; units <= 300; ++units)
    for (int sms = 1; sms <= kGpMaxSms; sms += 7) EXPECT(gp_max_splits(units) >= gp_split_limit(units, sms));
  // The entry flow's grad_pw (64 -> 128 channels: 2 units) and grad_dw (2 chunks) on 132 SMs: one full
  // wave, not 32 CTAs (the former cap of 16 splits).
  EXPECT(gp_choose_splits(2, 86700, 132, gp_max_splits(2)) == 66);
  EXPECT(gp_choose_splits(1, 86700, 132, gp_max_splits(1)) == 132);
  // The middle flow (23 units) keeps its choice under the 16 splits.
  EXPECT(gp_choose_splits(23, 1444, 132, gp_max_splits(23)) == gp_choose_splits(23, 1444, 132, kGpMaxSplits));
}

// ldmatrix.x4.trans as the PTX ISA defines it: lanes 8m..8m+7 give the row addresses of matrix m;
// thread t receives, in register m, the elements (row 2 (t % 4), column t / 4) and (row 2 (t % 4) + 1,
// column t / 4) of matrix m: the matrix transposed.
static void ldmatrix_x4_trans(const std::vector<float>& smem, const int (&addr)[32], float (&regs)[32][4][2]) {
  for (int t = 0; t < 32; ++t)
    for (int m = 0; m < 4; ++m)
      for (int e = 0; e < 2; ++e) regs[t][m][e] = smem.at(addr[8 * m + 2 * (t % 4) + e] + t / 4);
}

// mma.m16n8k16 on fragments (g = lane / 4, t = lane % 4): A element h (0..7) at row g + 8 ((h / 2) % 2),
// column 2 t + h % 2 + 8 (h / 4); B element h (0..3) at k 2 t + h % 2 + 8 (h / 2), column g; C element i
// at row g + 8 (i / 2), column 2 t + i % 2.
static void mma(float (&c)[32][4], const float (&a)[32][4][2], const float (&b)[32][4][2], int b0) {
  float af[16][16], bf[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 8; ++h) af[g + 8 * ((h / 2) % 2)][2 * t + h % 2 + 8 * (h / 4)] = a[lane][h / 2][h % 2];
    for (int h = 0; h < 4; ++h) bf[2 * t + h % 2 + 8 * (h / 2)][g] = b[lane][b0 + h / 2][h % 2];
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int g = lane / 4, t = lane % 4, r = g + 8 * (i / 2), col = 2 * t + i % 2;
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) sum += af[r][k] * bf[k][col];
      c[lane][i] += sum;
    }
}

// The whole kernel, emulated, against grad_z^T d.
static void check_kernel(const Plan& p, int splits) {
  const long positions = static_cast<long>(p.n) * p.h_out * p.w_out;
  std::vector<float> dd(positions * p.c), gz(positions * p.c_out);  // d [P][C], grad_z [P][Cout]
  for (float& v : dd) v = static_cast<float>(static_cast<int>(rng() % 7) - 3);
  for (float& v : gz) v = static_cast<float>(static_cast<int>(rng() % 5) - 2);
  std::vector<float> partial(static_cast<size_t>(splits) * p.c_out * p.c, 0.f);
  std::vector<int> written(partial.size(), 0);
  constexpr int kNF = kGpWarpCols / 8;
  for (int w = 0; w < gp_units(p) * splits; ++w) {
    const GpUnit u = gp_unit(p, w);
    const TileSpan span = gp_split_tiles(p, u.split, splits);
    std::vector<float> acc(static_cast<size_t>(kThreads / 32) * 2 * kNF * 32 * 4, 0.f);
    for (int tile = span.begin; tile < span.end; ++tile) {
      const TileRange t = tile_range(p, tile);
      const long first = static_cast<long>(t.img) * p.h_out * p.w_out + t.q0;
      // Shared memory as the kernel leaves it before the MMA: d of the chunk (padding rows: the last
      // position; channels past C: 0) and the grad_z rows (0 past the tile's positions and Cout).
      std::vector<float> ds(static_cast<size_t>(p.bm) * gp_ld_d(), 1e9f), gs(static_cast<size_t>(p.bm) * gp_ld_gz(), 1e9f);
      for (int r = 0; r < p.bm; ++r) {
        const long pos = first + (r < t.count ? r : t.count - 1);
        for (int cl = 0; cl < kBK; ++cl) {
          const int c = u.chunk * kBK + cl;
          ds[r * gp_ld_d() + cl] = c < p.c ? dd[pos * p.c + c] : 0.f;
        }
      }
      for (int tid = 0; tid < kGpGzThreads; ++tid)
        for (int r = gp_gz_row0(tid); r < p.bm; r += kGpGzRowStep) {
          const int col = gp_gz_col(tid), co = u.pass * kGpN + col;
          const bool real = r < t.count && co < p.c_out;
          for (int e = 0; e < 8; ++e) gs[r * gp_ld_gz() + col + e] = real ? gz[(first + r) * p.c_out + co + e] : 0.f;
        }
      for (int warp = 0; warp < kThreads / 32; ++warp) {
        if (u.pass * kGpN + warp * kGpWarpCols >= p.c_out) continue;  // the kernel's `live`
        for (int ks = 0; ks < p.bm / 16; ++ks) {
          float af[2][32][4][2];
          for (int i = 0; i < 2; ++i) {
            int addr[32];
            for (int lane = 0; lane < 32; ++lane)
              addr[lane] = gp_a_k(lane) * gp_ld_d() + gp_a_m(lane) + ks * 16 * gp_ld_d() + i * 16;
            ldmatrix_x4_trans(ds, addr, af[i]);
          }
          for (int jj = 0; jj < kNF / 2; ++jj) {
            float bf[32][4][2];
            int addr[32];
            for (int lane = 0; lane < 32; ++lane)
              addr[lane] = gp_b_k(lane) * gp_ld_gz() + warp * kGpWarpCols + gp_b_n(lane) + ks * 16 * gp_ld_gz() + jj * 16;
            ldmatrix_x4_trans(gs, addr, bf);
            for (int i = 0; i < 2; ++i)
              for (int half = 0; half < 2; ++half) {
                float c[32][4];
                const size_t base = ((static_cast<size_t>(warp) * 2 + i) * kNF + 2 * jj + half) * 32 * 4;
                for (int lane = 0; lane < 32; ++lane)
                  for (int e = 0; e < 4; ++e) c[lane][e] = acc[base + lane * 4 + e];
                mma(c, af[i], bf, 2 * half);
                for (int lane = 0; lane < 32; ++lane)
                  for (int e = 0; e < 4; ++e) acc[base + lane * 4 + e] = c[lane][e];
              }
          }
        }
      }
    }
    // The partial stores, with the kernel's masks.
    for (int warp = 0; warp < kThreads / 32; ++warp) {
      const int co_warp = u.pass * kGpN + warp * kGpWarpCols;
      if (co_warp >= p.c_out) continue;
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < kNF; ++j)
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) {
              const int c = u.chunk * kBK + 16 * i + acc_row(lane, e), co = co_warp + 8 * j + acc_col(lane, e);
              if (c >= p.c || co >= p.c_out) continue;
              const int64_t off = gp_partial_offset(p, u.split, co, c);
              EXPECT(off >= 0 && off < static_cast<int64_t>(partial.size()));
              partial[off] = acc[((static_cast<size_t>(warp) * 2 + i) * kNF + j) * 32 * 4 + lane * 4 + e];
              written[off]++;
            }
    }
  }
  for (int v : written) EXPECT(v == 1);
  for (int co = 0; co < p.c_out; ++co)
    for (int c = 0; c < p.c; ++c) {
      float got = 0.f, want = 0.f;
      for (int s = 0; s < splits; ++s) got += partial[gp_partial_offset(p, s, co, c)];
      for (long pos = 0; pos < positions; ++pos) want += gz[pos * p.c_out + co] * dd[pos * p.c + c];
      EXPECT(got == want);
    }
}

struct Geometry {
  int n, c, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw;
};

int main() {
  check_choose_splits();
  const std::vector<Geometry> geometries = {
      {2, 40, 7, 9, 24, 3, 3, 1, 1, 1, 1, 1, 1},
      {1, 33, 11, 10, 16, 3, 3, 2, 1, 1, 2, 1, 2},
      {2, 70, 13, 11, 776, 3, 3, 1, 1, 1, 1, 1, 1},  // two Cout passes, the second with dead warps
      {1, 8, 3, 150, 8, 3, 3, 1, 1, 1, 1, 1, 1},     // row segments
      {1, 8, 1, 1, 8, 3, 3, 1, 1, 1, 1, 1, 1},       // one position
  };
  const std::vector<Geometry> layout_only = {
      {256, 728, 19, 19, 728, 3, 3, 1, 1, 1, 1, 1, 1},  // Xception middle flow
      {256, 64, 147, 147, 128, 3, 3, 1, 1, 1, 1, 1, 1},
      {256, 1536, 10, 10, 2048, 3, 3, 1, 1, 1, 1, 1, 1},
  };
  int checked = 0;
  for (int full = 0; full < 2; ++full)
    for (const Geometry& g : full ? geometries : layout_only)
      for (int i = 0; gp_tile_candidate(i).bm > 0; ++i) {
        const Plan p = make_plan(g.n, g.c, g.h, g.w, g.c_out, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                                 gp_tile_candidate(i).bm, gp_tile_candidate(i).row_segments);
        where = "n" + std::to_string(g.n) + " c" + std::to_string(g.c) + " " + std::to_string(g.h) + "x" +
                std::to_string(g.w) + " cout" + std::to_string(g.c_out) + " bm" + std::to_string(p.bm) +
                (p.row_segments ? " segments" : " ranges");
        check_layout(p);
        if (full) {
          check_grid(p);
          for (int splits : {1, 3}) {
            if (splits <= num_tiles(p)) check_kernel(p, splits);
          }
        }
        ++checked;
      }
  // Xception's middle flow on an H100 (227 KB, 132 SMs): the tile and split the launcher picks.
  const Plan middle = make_plan(256, 728, 19, 19, 728, 3, 3, 1, 1, 1, 1, 1, 1, 64, 0);
  where = "middle flow";
  EXPECT(gp_fits_smem(middle, 2, 227 * 1024));
  const int splits = gp_choose_splits(gp_units(middle), num_tiles(middle), 132, kGpMaxSplits);
  std::printf("middle flow grad_pw: bm 64, %d tiles, %d units x %d splits, %d bytes of shared memory\n",
              num_tiles(middle), gp_units(middle), splits, gp_smem_layout(middle, 2).total);
  // The entry flow's block1.rep.0 (64 -> 128 channels, 147 x 147): every position tile in exactly one
  // of the splits the launcher now picks on 132 SMs.
  const Plan entry = make_plan(256, 64, 147, 147, 128, 3, 3, 1, 1, 1, 1, 1, 1, 64, 0);
  where = "entry flow";
  const int entry_splits = gp_choose_splits(gp_units(entry), num_tiles(entry), 132, gp_max_splits(gp_units(entry)));
  EXPECT(gp_units(entry) * entry_splits == 132);
  std::vector<int> entry_seen(num_tiles(entry), 0);
  for (int s = 0; s < entry_splits; ++s) {
    const TileSpan span = gp_split_tiles(entry, s, entry_splits);
    for (int t = span.begin; t < span.end; ++t) entry_seen.at(t)++;
  }
  for (int v : entry_seen) EXPECT(v == 1);
  std::printf("entry flow grad_pw: bm 64, %d tiles, %d units x %d splits\n", num_tiles(entry), gp_units(entry),
              entry_splits);
  return report(checked);
}
