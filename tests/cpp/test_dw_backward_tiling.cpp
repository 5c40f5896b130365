// Host-side checks of the index math of the backward's tiled grad_x / grad_dw kernel
// (csrc/sepconv_infer_tiling.h, "grad_x and grad_dw"; dw_backward_tiled_kernel in
// sepconv_tiled_backward.cuh) against brute force. Built and run by tests/test_infer_tiling.py with the
// host compiler; no GPU and no CUDA headers needed.
//
// Checked, per geometry (stride 1, 3x3, paddings 0..2 per side, dilations 1..2) and tile candidate:
// the transposed plan's grid is the input's; every tap of every pixel gathers the grad_d position the
// transposed convolution needs (or padding, exactly where that position does not exist); the walks
// (GridWalk over a box's pixels, RowWalk over a thread's tile rows) give what the divisions give; the
// shared-memory regions are disjoint and in bounds; the xor butterfly reaches exactly the lanes of a
// channel vector; the tile choice takes the cheapest candidate that fits; and the whole kernel
// emulated (the box staged as the kernel stages it, walking its pixels, the flipped weights as packed,
// depthwise_backward_rows per thread and row with the kernel's row walk and offsets, the grad_x stores
// and the grad_dw partials) equals a direct transposed convolution and a direct weight gradient, each
// grad_x element, each staged element and each partial written exactly once (small integers: exact in
// float).
#include "host_test.h"

static std::mt19937 rng(99);

struct Unit {
  int n, c, h, w, ph, pw, dh, dw;  // 3x3, stride 1
};

static void check_gather(const Unit& u, const Plan& p) {
  const int ho = u.h + 2 * u.ph - 2 * u.dh, wo = u.w + 2 * u.pw - 2 * u.dw;  // grad_d's grid
  EXPECT(p.h_out == u.h && p.w_out == u.w && p.h == ho && p.w == wo);
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = dx_box(p, t);
    for (int r = 0; r < t.count; ++r) {
      const int q = t.q0 + r, hi = q / u.w, wi = q % u.w;
      const int base = halo_base_pixel(p, t, b, r);
      for (int tap = 0; tap < 9; ++tap) {
        const int pixel = base + halo_tap_offset(p, b, tap / 3, tap % 3);
        const int ft = dx_forward_tap(p, tap), i = ft / 3, j = ft % 3;  // the forward's tap
        const int gh = hi + u.ph - i * u.dh, gw = wi + u.pw - j * u.dw;  // the output it fed
        EXPECT(pixel >= 0 && pixel < b.rows * b.cols);
        EXPECT(b.h0 + pixel / b.cols == gh && b.w0 + pixel % b.cols == gw);
        const bool exists = gh >= 0 && gh < ho && gw >= 0 && gw < wo;
        EXPECT((halo_source_offset(p, b, pixel) >= 0) == exists);
      }
    }
  }
}

// dx_box: halo_box's rows and origin, the plan's full width (every tile's box no wider than it).
static void check_box(const Plan& p) {
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox a = halo_box(p, t), b = dx_box(p, t);
    EXPECT(a.h0 == b.h0 && a.w0 == b.w0 && a.rows == b.rows && a.cols <= b.cols && b.cols == p.halo_cols);
    EXPECT(b.rows <= p.halo_rows);
  }
}

static void check_layout(const Plan& p, int eb) {
  const DxSmem s = dx_grad_smem_layout(p, eb);
  const long halo = static_cast<long>(p.halo_rows) * p.halo_cols * kBK * eb, wts = 4L * 9 * kBK;
  const Range box{s.halo, s.halo + halo}, weights{s.wts, s.wts + wts}, red{s.red, s.red + 4L * (kThreads / 32) * 9 * kBK};
  for (Range r : {box, weights, red}) EXPECT(r.begin >= 0 && r.end <= s.total && r.begin % 128 == 0);
  EXPECT(disjoint(box, weights));  // the reduction area reuses both, after the last tile
  for (int warp = 0; warp < kThreads / 32; ++warp)
    for (int tap = 0; tap < 9; ++tap)
      for (int ch = 0; ch < kBK; ++ch) {
        const int idx = dx_red_index(p, warp, tap, ch);
        EXPECT(idx >= 0 && idx < (kThreads / 32) * 9 * kBK);
      }
}

// The walks against the divisions they replace: GridWalk over every grid width and start, and the
// kernel's RowWalk over each thread's rows of every tile (its base pixel is halo_base_pixel, its
// source offsets halo_source_offset).
static void check_walks(const Plan& p, int eb) {
  for (int cols = 1; cols < 150; cols += cols < 40 ? 1 : 13)
    for (int step : {32, 64})
      for (int start = 0; start < step; start += 3) {
        GridWalk w = grid_walk(start, cols, step);
        for (int i = start; i < start + 40 * step; i += step, grid_advance(w))
          EXPECT(w.row == i / cols && w.col == i % cols);
      }
  const int slots = dw_slots(eb);
  const RowStep step = dx_row_step(p, slots);
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = dx_box(p, t);
    for (int slot = 0; slot < slots; ++slot) {
      RowWalk w = dx_row_walk(p, t, b, slot);
      for (int r = slot; r < t.count; r += slots, dx_row_advance(p, b, step, w)) {
        EXPECT(w.base == halo_base_pixel(p, t, b, r) && w.col == (t.q0 + r) % p.w_out);
        EXPECT(dx_pixel_offset(p, t, r, 5) == (t.q0 + r) * p.c + 5);
      }
      GridWalk g = grid_walk(slot, b.cols, slots);
      for (int px = slot; px < b.rows * b.cols; px += slots, grid_advance(g))
        EXPECT(dx_source_offset(p, b, g) == halo_source_offset(p, b, px));
    }
  }
}
static void check_butterfly(int eb) {
  for (int lane = 0; lane < 32; ++lane) {
    std::vector<int> reached = {lane};
    for (int m = dx_lane_xor_first(eb); m < 32; m *= 2) {
      const size_t k = reached.size();
      for (size_t i = 0; i < k; ++i) reached.push_back(reached[i] ^ m);
    }
    std::vector<int> seen(32, 0);
    for (int l : reached) seen[l]++;
    for (int l = 0; l < 32; ++l) EXPECT(seen[l] == (dw_cv(l, eb) == dw_cv(lane, eb) ? 1 : 0));
  }
}

template <int kVec>
static void check_kernel(const Unit& u, const Plan& p, int eb, bool pre_relu, int splits) {
  const int ho = p.h, wo = p.w, c = u.c, slots = dw_slots(eb);
  std::vector<float> x(static_cast<size_t>(u.n) * u.h * u.w * c), gd(static_cast<size_t>(u.n) * ho * wo * c),
      dw(static_cast<size_t>(c) * 9);
  for (float& v : x) v = static_cast<float>(static_cast<int>(rng() % 7) - 3);
  for (float& v : gd) v = static_cast<float>(static_cast<int>(rng() % 5) - 2);
  for (float& v : dw) v = static_cast<float>(static_cast<int>(rng() % 5) - 2);
  std::vector<float> packed(static_cast<size_t>(9) * p.kp, 0.f);  // PackMode::kFlipped
  for (int tap = 0; tap < 9; ++tap)
    for (int ci = 0; ci < c; ++ci) packed[packed_dw_offset(p, tap, ci)] = dw[ci * 9 + dx_forward_tap(p, tap)];
  std::vector<float> gx(x.size(), 1e9f), partial(static_cast<size_t>(splits) * c * 9, 1e9f);
  std::vector<int> gx_writes(x.size(), 0), partial_writes(partial.size(), 0);
  const RowStep step = dx_row_step(p, slots);
  for (int blk = 0; blk < gp_chunks(p) * splits; ++blk) {
    const int chunk = blk % gp_chunks(p), split = blk / gp_chunks(p);
    const TileSpan span = gp_split_tiles(p, split, splits);
    std::vector<float> gw(static_cast<size_t>(kThreads) * 9 * kVec, 0.f);
    for (int tile = span.begin; tile < span.end; ++tile) {
      const TileRange t = tile_range(p, tile);
      const HaloBox b = dx_box(p, t);
      const int pixels = b.rows * b.cols;
      // The staging as the kernel's 16-byte path: thread (slot, cv) copies its channel vector of the
      // pixels slot, slot + slots, ... (grad_d's box, 0 for padding and past C).
      std::vector<float> staged(static_cast<size_t>(pixels) * kBK, 1e9f);
      std::vector<int> staged_writes(staged.size(), 0);
      for (int tid = 0; tid < kThreads; ++tid) {
        const int cv = dw_cv(tid, eb), slot = dw_row(tid, 0, eb), c0 = chunk * kBK + cv * kVec;
        GridWalk w = grid_walk(slot, b.cols, slots);
        for (int px = slot; px < pixels; px += slots, grid_advance(w)) {
          const int off = dx_source_offset(p, b, w);
          for (int e = 0; e < kVec; ++e) {
            const size_t at = static_cast<size_t>(px) * kBK + cv * kVec + e;
            staged.at(at) = off >= 0 && c0 + e < c ? gd[static_cast<size_t>(t.img) * ho * wo * c + off + c0 + e] : 0.f;
            staged_writes[at]++;
          }
        }
      }
      for (int v : staged_writes) EXPECT(v == 1);
      for (int tid = 0; tid < kThreads; ++tid) {
        const int cv = dw_cv(tid, eb), slot = dw_row(tid, 0, eb), c0 = chunk * kBK + cv * kVec;
        float w[9][kVec];
        for (int k = 0; k < 9; ++k)
          for (int e = 0; e < kVec; ++e) w[k][e] = gw[(static_cast<size_t>(tid) * 9 + k) * kVec + e];
        RowWalk rw = dx_row_walk(p, t, b, slot);
        const int end = dx_pixel_offset(p, t, t.count, c0);
        for (int off = dx_pixel_offset(p, t, slot, c0); off < end; off += slots * c) {
          const int base[1] = {rw.base};
          dx_row_advance(p, b, step, rw);
          const size_t img = static_cast<size_t>(t.img) * u.h * u.w * c;
          float xr[1][kVec], g[1][kVec];
          for (int e = 0; e < kVec; ++e) {
            const float xv = c0 + e < c ? x[img + off + e] : 0.f;
            xr[0][e] = pre_relu && xv < 0.f ? 0.f : xv;
            g[0][e] = 0.f;
          }
          depthwise_backward_rows<3, 3, 1, kVec>(
              p, b, base,
              [&](int pixel, float(&v)[kVec]) {
                for (int e = 0; e < kVec; ++e) v[e] = staged.at(pixel * kBK + cv * kVec + e);
              },
              [&](int tap, float(&v)[kVec]) {
                for (int e = 0; e < kVec; ++e) v[e] = packed[packed_dw_offset(p, tap, c0 + e)];
              },
              xr, g, w);
          for (int e = 0; e < kVec; ++e) {
            if (c0 + e >= c) continue;  // the kernel's store mask
            gx[img + off + e] = pre_relu && !(xr[0][e] > 0.f) ? 0.f : g[0][e];
            gx_writes[img + off + e]++;
          }
        }
        for (int k = 0; k < 9; ++k)
          for (int e = 0; e < kVec; ++e) gw[(static_cast<size_t>(tid) * 9 + k) * kVec + e] = w[k][e];
      }
    }
    // grad_dw: all threads of a channel vector (the butterfly and the warp sum), into the partial.
    for (int tap = 0; tap < 9; ++tap)
      for (int ch = 0; ch < kBK; ++ch) {
        const int cc = chunk * kBK + ch;
        float sum = 0.f;
        for (int tid = 0; tid < kThreads; ++tid)
          if (dw_cv(tid, eb) == ch / kVec) sum += gw[(static_cast<size_t>(tid) * 9 + tap) * kVec + ch % kVec];
        if (cc >= c) continue;
        const int64_t off = dx_partial_offset(p, split, cc, dx_forward_tap(p, tap));
        EXPECT(off >= 0 && off < static_cast<int64_t>(partial.size()));
        partial[off] = sum;
        partial_writes[off]++;
      }
  }
  for (int v : gx_writes) EXPECT(v == 1);
  for (int v : partial_writes) EXPECT(v == 1);
  // Direct: grad_x = mask * transposed conv of grad_d; grad_dw = sum over outputs of grad_d * pre(x).
  for (int n = 0; n < u.n; ++n)
    for (int hi = 0; hi < u.h; ++hi)
      for (int wi = 0; wi < u.w; ++wi)
        for (int cc = 0; cc < c; ++cc) {
          float want = 0.f;
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) {
              const int gh = hi + u.ph - i * u.dh, gw2 = wi + u.pw - j * u.dw;
              if (gh < 0 || gh >= ho || gw2 < 0 || gw2 >= wo) continue;
              want += gd[((static_cast<size_t>(n) * ho + gh) * wo + gw2) * c + cc] * dw[cc * 9 + i * 3 + j];
            }
          const size_t off = ((static_cast<size_t>(n) * u.h + hi) * u.w + wi) * c + cc;
          if (pre_relu && !(x[off] > 0.f)) want = 0.f;
          EXPECT(gx[off] == want);
        }
  for (int cc = 0; cc < c; ++cc)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        float want = 0.f, got = 0.f;
        for (int n = 0; n < u.n; ++n)
          for (int oh = 0; oh < ho; ++oh)
            for (int ow = 0; ow < wo; ++ow) {
              const int hi = oh - u.ph + i * u.dh, wi = ow - u.pw + j * u.dw;
              if (hi < 0 || hi >= u.h || wi < 0 || wi >= u.w) continue;
              float xv = x[((static_cast<size_t>(n) * u.h + hi) * u.w + wi) * c + cc];
              if (pre_relu && xv < 0.f) xv = 0.f;
              want += gd[((static_cast<size_t>(n) * ho + oh) * wo + ow) * c + cc] * xv;
            }
        for (int s = 0; s < splits; ++s) got += partial[dx_partial_offset(p, s, cc, i * 3 + j)];
        EXPECT(got == want);
      }
}

// The launcher's tile: a candidate that fits, no cheaper one that fits, none where nothing fits.
static void check_choice(const Unit& u, int eb, int max_smem) {
  const Plan chosen = dx_choose_tile(u.n, u.c, u.h, u.w, u.ph, u.pw, u.dh, u.dw, eb, max_smem);
  bool any = false;
  for (int i = 0; dx_tile_candidate(i).bm > 0; ++i) {
    const Plan p = dx_plan(u.n, u.c, u.h, u.w, 3, 3, u.ph, u.pw, u.dh, u.dw, dx_tile_candidate(i).bm,
                           dx_tile_candidate(i).row_segments);
    if (!dx_fits_smem(p, eb, max_smem)) continue;
    any = true;
    EXPECT(chosen.bm > 0 && dx_tile_cost(chosen, eb) <= dx_tile_cost(p, eb));
  }
  EXPECT(any == (chosen.bm > 0));
  if (chosen.bm > 0) EXPECT(dx_fits_smem(chosen, eb, max_smem) && chosen.bm >= dw_slots(eb));
}

int main() {
  check_butterfly(2);
  check_butterfly(4);
  const std::vector<Unit> units = {
      {2, 40, 7, 9, 1, 1, 1, 1},   // Xception's: same padding
      {1, 19, 11, 10, 0, 2, 1, 1}, // valid rows, padding 2 columns
      {2, 8, 9, 8, 2, 2, 2, 2},    // dilation 2
      {1, 33, 6, 7, 1, 0, 1, 2},
      {1, 16, 3, 140, 1, 1, 1, 1}, // row segments
      {1, 8, 1, 1, 1, 1, 1, 1},    // one pixel, every tap outside but the centre
      {0, 8, 5, 5, 1, 1, 1, 1},    // empty batch
      {2, 40, 19, 19, 1, 1, 1, 1}, // the middle flow's grid: up to 8 rows per thread, walks that wrap
      {1, 8, 2, 600, 1, 1, 1, 1},  // row segments of every size
  };
  int checked = 0;
  for (const Unit& u : units) {
    EXPECT(dx_supported(3, 3, 1, 1, u.ph, u.pw, u.dh, u.dw));
    for (int eb : {2, 4}) {
      for (int smem : {232448, 166912, 48 * 1024, 12 * 1024}) check_choice(u, eb, smem);  // H100, A100, small
      for (int i = 0; dx_tile_candidate(i).bm > 0; ++i) {
        const Plan p = dx_plan(u.n, u.c, u.h, u.w, 3, 3, u.ph, u.pw, u.dh, u.dw, dx_tile_candidate(i).bm,
                               dx_tile_candidate(i).row_segments);
        where = "n" + std::to_string(u.n) + " c" + std::to_string(u.c) + " " + std::to_string(u.h) + "x" +
                std::to_string(u.w) + " pad" + std::to_string(u.ph) + "," + std::to_string(u.pw) + " dil" +
                std::to_string(u.dh) + "," + std::to_string(u.dw) + " bm" + std::to_string(p.bm) +
                (p.row_segments ? " segments " : " ranges ") + std::to_string(eb) + "B";
        check_gather(u, p);
        check_box(p);
        check_layout(p, eb);
        check_walks(p, eb);
        for (int pre = 0; pre < 2; ++pre)
          for (int splits : {1, 2, 3}) {
            if (splits > num_tiles(p) && splits > 1) continue;
            if (eb == 4) check_kernel<4>(u, p, eb, pre, splits);
            if (eb == 2) check_kernel<8>(u, p, eb, pre, splits);
          }
        ++checked;
      }
    }
  }
  where = "coverage";
  EXPECT(!dx_supported(3, 3, 2, 1, 1, 1, 1, 1) && !dx_supported(5, 5, 1, 1, 2, 2, 1, 1) &&
         !dx_supported(3, 3, 1, 1, 3, 1, 1, 1));
  return report(checked);
}
