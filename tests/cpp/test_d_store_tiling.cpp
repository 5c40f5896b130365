// Host-side checks of the index math of the backward's d store (csrc/sepconv_infer_tiling.h, the "d store"
// section; d_store_kernel in sepconv_tiled_backward.cuh) and of the splits the tiled grad_x / grad_dw
// kernel takes, against brute force. Built and run by tests/test_infer_tiling.py with the host
// compiler; no GPU and no CUDA headers needed.
//
// Checked, per geometry (odd sizes, stride 2, dilation 2, k=5, C not a multiple of the vector, row
// segments, one position, rows of 1 to 300 outputs), element size and tile candidate: the tile choice
// (ranges of whole output rows or row segments, at most one run per slot); the shared-memory layout (the
// staging regions disjoint, aligned, in bounds); the whole kernel emulated (the halo staged per chunk as
// the depthwise phase stages it, the pre-ReLU, each slot's run (ds_run) through ds_run_depthwise, every
// read inside the tile's halo box and its slack, the stores with the kernel's masks at d_store_offset): every
// (position, channel) of d written exactly once, nothing outside it, each value bit-equal to a direct
// depthwise with the same fma order, through both the shared-column path (3x3, stride and dilation 1
// along W) and the run-time one. Then the split choice (gp_choose_splits) against a brute-force search
// and the splits' tile coverage.
#include <algorithm>
#include <cmath>

#include "host_test.h"

static std::mt19937 rng(77);

static void check_layout(const Plan& p, int elem) {
  const SmemLayout s = ds_smem_layout(p, elem);
  const long halo = (static_cast<long>(ds_halo_rows(p)) * p.halo_cols + ds_halo_slack(p)) * kBK * elem;
  const Range h0{s.halo[0], s.halo[0] + halo}, h1{s.halo[1], s.halo[1] + halo};
  const long wts = 4L * p.kh * p.kw * kBK;
  const Range w0{s.wts[0], s.wts[0] + wts}, w1{s.wts[1], s.wts[1] + wts};
  const Range table{s.table, s.table + 4L * ds_halo_rows(p) * p.halo_cols};
  const Range all[] = {h0, h1, w0, w1, table};
  for (int i = 0; i < 5; ++i) {
    EXPECT(all[i].begin >= 0 && all[i].end <= s.total && all[i].begin % 128 == 0);
    for (int j = i + 1; j < 5; ++j) EXPECT(disjoint(all[i], all[j]));
  }
}

// The tile plan of candidate `choice`: whole output rows (ranges, bm a multiple of w_out) or row
// segments, each tile at most dw_slots runs; the runs of a tile cover its positions once.
static void check_tiles(const Plan& p, int elem) {
  EXPECT(p.row_segments ? p.bm <= p.w_out && p.bm % kDsRun == 0 : p.bm % p.w_out == 0);
  EXPECT(ds_row_runs(p) * (p.row_segments ? 1 : p.bm / p.w_out) <= dw_slots(elem));
  const int per_warp = 32 / vectors_per_pixel(elem);
  int warps = 0;  // warps with a run, over the first image's tiles
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = halo_box(p, t);
    // The kernel's tile and box (ds_tile) are tile_range's and halo_box's.
    const DsTile d = ds_tile(p, tile, ds_tile_rows(p));
    EXPECT(d.t.img == t.img && d.t.q0 == t.q0 && d.t.count == t.count);
    EXPECT(d.b.h0 == b.h0 && d.b.w0 == b.w0 && d.b.rows == b.rows && d.b.cols == b.cols);
    EXPECT(d.ho * p.w_out + d.wo == t.q0 && (p.row_segments ? d.rows == 1 : d.rows * p.w_out == t.count));
    std::vector<int> seen(t.count, 0);
    std::vector<int> busy(dw_slots(elem) / per_warp, 0);
    for (int slot = 0; slot < dw_slots(elem); ++slot) {
      const DsRun run = ds_run(p, d, ds_row_runs(p), slot);
      EXPECT(run.outputs >= 0 && run.outputs <= kDsRun);
      if (run.outputs == 0) continue;
      EXPECT(run.base == halo_base_pixel(p, t, b, run.r));  // the run's base without a division
      busy[slot / per_warp] = 1;
      const int wo = (t.q0 + run.r) % p.w_out;
      EXPECT(wo + run.outputs <= p.w_out);  // one output row
      for (int g = 0; g < run.outputs; ++g) seen.at(run.r + g)++;
    }
    for (int v : seen) EXPECT(v == 1);
    if (t.img == 0)
      for (int b : busy) warps += b;
  }
  // The count ds_tile_candidate minimises, and its choice: no k the budget holds takes fewer warps.
  if (!p.row_segments && p.h_out > 0) {
    const int k = p.bm / p.w_out, runs = ds_row_runs(p);
    EXPECT(ds_image_warps(p.h_out, k, runs, elem) == warps);
    for (int j = 1; j <= std::min(dw_slots(elem) / runs, p.h_out); ++j)
      EXPECT(ds_image_warps(p.h_out, j, runs, elem) >= warps || p.bm != ds_tile_candidate(0, p.h_out, p.w_out, elem).bm);
  }
}

// The kernel on every tile, thread and chunk, against the direct depthwise; `unit_w`: the
// shared-column instance (3x3, stride and dilation 1 along W), else the run-time one.
template <int kVec>
static void check_kernel(const Plan& p, bool pre_relu, bool unit_w) {
  const int elem = 16 / kVec, taps = p.kh * p.kw;
  const long positions = static_cast<long>(p.n) * p.h_out * p.w_out;
  std::vector<float> x(static_cast<size_t>(p.n) * p.h * p.w * p.c), dw(static_cast<size_t>(p.c) * taps);
  for (float& v : x) v = static_cast<float>(static_cast<int>(rng() % 9) - 4) * 0.25f;
  for (float& v : dw) v = static_cast<float>(static_cast<int>(rng() % 7) - 3) * 0.5f;
  const auto pre = [&](float v) { return pre_relu && v < 0.f ? 0.f : v; };
  std::vector<float> d(positions * p.c, NAN);
  std::vector<int> written(d.size(), 0);
  long stray = 0, outside = 0;
  // A halo buffer as ds_smem_layout sizes it: the largest box and the slack.
  std::vector<float> halo(static_cast<size_t>(ds_smem_layout(p, elem).halo_elems)), wts(static_cast<size_t>(taps) * kBK);
  EXPECT(static_cast<long>(halo.size()) == (static_cast<long>(ds_halo_rows(p)) * p.halo_cols + ds_halo_slack(p)) * kBK);
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    const DsTile dt = ds_tile(p, tile, ds_tile_rows(p));  // as the kernel derives it (check_tiles: == tile_range, halo_box)
    const TileRange t = dt.t;
    const HaloBox b = dt.b;
    EXPECT(b.rows <= ds_halo_rows(p) && b.cols <= p.halo_cols);  // ds_smem_layout's box
    const long img = static_cast<long>(t.img) * p.h * p.w * p.c;
    for (int ck = 0; ck < k_chunks(p); ++ck) {
      const int c0 = ck * kBK;
      std::fill(halo.begin(), halo.end(), NAN);  // past the box: read by outputs past a row only, never stored
      for (int pixel = 0; pixel < b.rows * b.cols; ++pixel) {  // stage: zeros for padding and past C
        const int off = halo_source_offset(p, b, pixel);
        for (int ch = 0; ch < kBK; ++ch)
          halo[pixel * kBK + ch] = off >= 0 && c0 + ch < p.c ? pre(x.at(img + off + c0 + ch)) : 0.f;
      }
      for (int tap = 0; tap < taps; ++tap)
        for (int ch = 0; ch < kBK; ++ch) wts[tap * kBK + ch] = c0 + ch < p.c ? dw[(c0 + ch) * taps + tap] : 0.f;
      for (int tid = 0; tid < kThreads; ++tid) {
        const int cv = dw_cv(tid, elem), c = c0 + cv * kVec;
        const DsRun run = ds_run(p, dt, ds_row_runs(p), dw_row(tid, 0, elem));
        if (run.outputs == 0) continue;
        const int base = run.base;
        float acc[kDsRun][kVec];
        const auto load_x = [&](int pixel, float(&v)[kVec]) {
          if (pixel < 0 || pixel >= b.rows * b.cols + ds_halo_slack(p)) ++outside;  // the staged box and its slack
          for (int e = 0; e < kVec; ++e) v[e] = halo.at(pixel * kBK + cv * kVec + e);
        };
        const auto load_w = [&](int tap, float(&v)[kVec]) {
          for (int e = 0; e < kVec; ++e) v[e] = wts[tap * kBK + cv * kVec + e];
        };
        if (unit_w) {
          ds_run_depthwise<3, 3, true, kVec>(p, b, base, load_x, load_w, acc);
        } else {
          ds_run_depthwise<0, 0, false, kVec>(p, b, base, load_x, load_w, acc);
        }
        if (c >= p.c) continue;  // the kernel's masks
        for (int g = 0; g < run.outputs; ++g)
          for (int e = 0; e < kVec; ++e) {
            if (c + e >= p.c) continue;
            const int64_t off = d_store_offset(p, t, run.r + g, c) + e;
            if (off < 0 || off >= static_cast<int64_t>(d.size())) {
              ++stray;
              continue;
            }
            d[off] = acc[g][e];
            written[off]++;
          }
      }
    }
  }
  EXPECT(stray == 0);
  EXPECT(outside == 0);
  for (int v : written) EXPECT(v == 1);
  // Direct: output (n, ho, wo), taps in row-major order, one fmaf each (depthwise_rows' order).
  long wrong = 0;
  for (long pos = 0; pos < positions; ++pos) {
    const long n = pos / (p.h_out * p.w_out), ho = pos / p.w_out % p.h_out, wo = pos % p.w_out;
    for (int c = 0; c < p.c; ++c) {
      float acc = 0.f;
      for (int i = 0; i < p.kh; ++i)
        for (int j = 0; j < p.kw; ++j) {
          const long hi = ho * p.stride_h - p.pad_h + i * p.dil_h, wi = wo * p.stride_w - p.pad_w + j * p.dil_w;
          const bool inside = hi >= 0 && hi < p.h && wi >= 0 && wi < p.w;
          const float v = inside ? pre(x[((n * p.h + hi) * p.w + wi) * p.c + c]) : 0.f;
          acc = std::fmaf(v, dw[c * p.kh * p.kw + i * p.kw + j], acc);
        }
      if (!(d[pos * p.c + c] == acc)) ++wrong;
    }
  }
  EXPECT(wrong == 0);
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
  // The entry flow's grad_dw (2 chunks) on 132 SMs: one full wave, not 32 CTAs (a cap of 16 splits).
  EXPECT(gp_choose_splits(2, 86700, 132, gp_max_splits(2)) == 66);
  EXPECT(gp_choose_splits(1, 86700, 132, gp_max_splits(1)) == 132);
  EXPECT(gp_choose_splits(23, 1444, 132, gp_max_splits(23)) == gp_choose_splits(23, 1444, 132, kGpMaxSplits));
  // Every position tile in exactly one split, the splits contiguous.
  const Plan p = make_plan(2, 40, 7, 9, 40, 3, 3, 1, 1, 1, 1, 1, 1, 32, 0);
  for (int splits : {1, 2, 3, num_tiles(p)}) {
    std::vector<int> seen(num_tiles(p), 0);
    int next = 0;
    for (int s = 0; s < splits; ++s) {
      const TileSpan span = gp_split_tiles(p, s, splits);
      EXPECT(span.begin == next && span.end > span.begin);
      next = span.end;
      for (int t = span.begin; t < span.end; ++t) seen.at(t)++;
    }
    EXPECT(next == num_tiles(p));
    for (int v : seen) EXPECT(v == 1);
  }
}

struct Geometry {
  int n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw;
};

int main() {
  check_choose_splits();
  const std::vector<Geometry> geometries = {
      {2, 40, 7, 9, 3, 3, 1, 1, 1, 1, 1, 1},
      {1, 33, 11, 10, 3, 3, 2, 1, 1, 2, 1, 2},  // C not a multiple of a vector, stride 2, dilation 2
      {2, 64, 13, 11, 3, 3, 2, 2, 1, 1, 1, 1},
      {1, 24, 9, 12, 3, 3, 1, 1, 2, 2, 2, 2},   // dilation 2
      {1, 16, 6, 7, 5, 3, 1, 1, 2, 1, 1, 1},    // 5x3: the run-time taps
      {1, 16, 7, 9, 5, 5, 1, 1, 2, 2, 1, 1},    // 5x5
      {1, 8, 3, 150, 3, 3, 1, 1, 1, 1, 1, 1},   // rows of 150: one range of a row (16-bit), segments (fp32)
      {1, 8, 2, 300, 3, 3, 1, 1, 1, 1, 1, 1},   // rows of 300: segments in both sizes
      {1, 8, 2, 301, 3, 3, 1, 2, 1, 1, 1, 1},   // stride 2 along W: 151 outputs a row, segments
      {2, 16, 21, 19, 3, 3, 1, 1, 1, 1, 1, 1},  // the middle flow's 19 wide rows, two tiles an image
      {1, 8, 12, 1, 3, 3, 1, 1, 1, 1, 1, 1},    // one output a row
      {1, 8, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1},     // one position
  };
  int checked = 0;
  for (int elem : {2, 4})
    for (const Geometry& g : geometries) {
      const Plan shape = make_plan(g.n, g.c, g.h, g.w, 0, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, 32, 0);
      const bool unit_w = g.kh == 3 && g.kw == 3 && g.sw == 1 && g.dw == 1;
      for (int i = 0; ds_tile_candidate(i, shape.h_out, shape.w_out, elem).bm > 0; ++i) {
        const TileChoice choice = ds_tile_candidate(i, shape.h_out, shape.w_out, elem);
        const Plan p = make_plan(g.n, g.c, g.h, g.w, 0, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, choice.bm,
                                 choice.row_segments);
        EXPECT(p.row_segments == choice.row_segments);  // make_plan keeps the segments the choice asks for
        for (int pre_relu = 0; pre_relu < 2; ++pre_relu) {
          where = "elem" + std::to_string(elem) + " n" + std::to_string(g.n) + " c" + std::to_string(g.c) + " " +
                  std::to_string(g.h) + "x" + std::to_string(g.w) + " k" + std::to_string(g.kh) + "x" +
                  std::to_string(g.kw) + " bm" + std::to_string(p.bm) + (p.row_segments ? " segments" : " ranges") +
                  (pre_relu ? " relu" : "");
          EXPECT(p.cout_pad == 0 && packed_pw_elems(p) == 0);  // c_out 0: nothing packed for a pointwise
          check_tiles(p, elem);
          check_layout(p, elem);
          for (int path = unit_w ? 0 : 1; path < 2; ++path) {
            if (elem == 2) {
              check_kernel<8>(p, pre_relu, path == 0);
            } else {
              check_kernel<4>(p, pre_relu, path == 0);
            }
          }
          ++checked;
        }
      }
    }
  // The candidates: whole rows up to one run per slot, the fewest warps with runs; wider rows in even
  // segments. The middle flow in 16-bit: 9 rows a tile (tiles of 63, 63 and 7 runs: 17 warps).
  where = "candidates";
  const int slots2 = dw_slots(2), slots4 = dw_slots(4);  // 64 and 32
  EXPECT(ds_tile_candidate(0, 19, 19, 2).bm == 9 * 19 && ds_tile_candidate(0, 19, 19, 2).row_segments == 0);
  EXPECT(ds_image_warps(19, 9, 7, 2) == 17 && ds_image_warps(19, 7, 7, 2) == 19);
  EXPECT(ds_tile_candidate(0, 10, 10, 2).bm == 100);  // the exit flow: one tile an image
  EXPECT(ds_tile_candidate(0, 147, 147, 2).bm == (slots2 >= 49 ? 147 : 0));
  EXPECT(ds_tile_candidate(0, 147, 147, 4).row_segments == 1 && ds_tile_candidate(0, 147, 147, 4).bm % kDsRun == 0);
  for (int elem : {2, 4}) {
    int i = 0;
    while (ds_tile_candidate(i, 19, 19, elem).bm > 0) ++i;
    EXPECT(i == (elem == 2 ? 7 : 6));  // budgets slots, slots / 2, ..., 1
    EXPECT(ds_tile_candidate(i - 1, 19, 19, elem).row_segments == 1 && ds_tile_candidate(i - 1, 19, 19, elem).bm == kDsRun);
  }
  (void)slots4;
  // Xception's middle flow on an H100 (227 KB): the d store's tile and shared memory.
  const TileChoice mc = ds_tile_candidate(0, 19, 19, 2);
  const Plan middle = make_plan(256, 728, 19, 19, 0, 3, 3, 1, 1, 1, 1, 1, 1, mc.bm, mc.row_segments);
  where = "middle flow";
  EXPECT(ds_fits_smem(middle, 2, 227 * 1024));
  std::printf("middle flow d store: bm %d, %d tiles, %d bytes of shared memory\n", middle.bm, num_tiles(middle),
              ds_smem_layout(middle, 2).total);
  return report(checked);
}
