// Host-side checks of csrc/sepconv_infer_tiling.h, the index math of the tiled CUDA inference
// kernel, against brute force. Built and run by tests/test_infer_tiling.py with the host compiler;
// no GPU and no CUDA headers needed. Prints one line per failure and exits non-zero on any.
//
// What is checked, per geometry and tile size:
// - tiles: every output position in exactly one tile, tiles inside one image, count in 1..bm;
// - halo boxes: within the planned bounds; every tap of every tile row maps to the box pixel that
//   holds its input coordinate; pixel table (source offsets, -1 = padding) against brute force;
// - shared memory: the d tile, the two halo buffers, the pixel table and the weight ring in bounds,
//   aligned, and not overlapping within a phase; ldmatrix pitches odd in 16-byte units;
// - thread mappings: depthwise rows x channel vectors, halo staging, packed weights: each element
//   exactly once, sources consistent with the packed layout;
// - the depthwise of every tile (staged as the kernel stages it, 16-byte or element path, pre-ReLU
//   once per staged element) equal to a direct loop over the taps, NaN included.
// (The fused forward's pointwise mappings, ldmatrix / mma.sync and FFMA, went with it.)
#include <cmath>
#include <cstdlib>
#include <limits>

#include "host_test.h"

struct Geometry {
  int n, c, h, w, c_out, kh, kw, sh, sw, ph, pw, dh, dw;
};

static std::mt19937 rng(12345);

// --- tiles and halo boxes ---------------------------------------------------------------------------

static void check_tiles(const Plan& p) {
  const int hw = p.h_out * p.w_out;
  std::vector<int> seen(static_cast<size_t>(p.n) * hw, 0);
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    const TileRange t = tile_range(p, tile);
    EXPECT(t.img >= 0 && t.img < p.n);
    EXPECT(t.count >= 1 && t.count <= p.bm);
    EXPECT(t.q0 >= 0 && t.q0 + t.count <= hw);
    if (p.row_segments) EXPECT(t.q0 / p.w_out == (t.q0 + t.count - 1) / p.w_out);
    for (int r = 0; r < t.count; ++r) seen[static_cast<size_t>(t.img) * hw + t.q0 + r]++;

    const HaloBox b = halo_box(p, t);
    EXPECT(b.rows >= 1 && b.rows <= p.halo_rows);
    EXPECT(b.cols >= 1 && b.cols <= p.halo_cols);
    for (int r = 0; r < p.bm; ++r) {
      const int base = halo_base_pixel(p, t, b, r);
      const int q = t.q0 + (r < t.count ? r : t.count - 1);
      const int ho = q / p.w_out, wo = q % p.w_out;
      for (int i = 0; i < p.kh; ++i)
        for (int j = 0; j < p.kw; ++j) {
          const int pixel = base + halo_tap_offset(p, b, i, j);
          EXPECT(pixel >= 0 && pixel < b.rows * b.cols);
          EXPECT(b.h0 + pixel / b.cols == ho * p.stride_h - p.pad_h + i * p.dil_h);
          EXPECT(b.w0 + pixel % b.cols == wo * p.stride_w - p.pad_w + j * p.dil_w);
        }
    }
    for (int pixel = 0; pixel < b.rows * b.cols; ++pixel) {
      const int hi = b.h0 + pixel / b.cols, wi = b.w0 + pixel % b.cols;
      const bool inside = hi >= 0 && hi < p.h && wi >= 0 && wi < p.w;
      EXPECT(halo_source_offset(p, b, pixel) == (inside ? (hi * p.w + wi) * p.c : -1));
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) EXPECT(seen[i] == 1);
}

// --- shared memory ----------------------------------------------------------------------------------

static void check_smem(const Plan& p, int eb) {
  const SmemLayout s = smem_layout(p, eb);
  const int v = vec_elems(eb);
  const Range d{0, static_cast<long>(p.bm) * s.d_ld * eb};
  const long halo_bytes = static_cast<long>(p.halo_rows) * p.halo_cols * kBK * eb;
  const Range h0{s.halo[0], s.halo[0] + halo_bytes}, h1{s.halo[1], s.halo[1] + halo_bytes};
  const Range table{s.table, s.table + 4L * p.halo_rows * p.halo_cols};
  const long wts_bytes = 4L * p.kh * p.kw * kBK;
  const Range w0{s.wts[0], s.wts[0] + wts_bytes}, w1{s.wts[1], s.wts[1] + wts_bytes};
  const Range ring{s.ring, s.ring + static_cast<long>(kStages) * s.ring_tile_elems * eb};
  EXPECT(s.d_bytes == d.end);
  EXPECT(s.d_ld >= p.kp && s.d_ld % v == 0);
  for (Range r : {h0, h1, w0, w1, table, ring}) EXPECT(r.begin >= s.region && r.end <= s.total);
  const Range phase1[] = {d, h0, h1, w0, w1, table};
  for (int i = 0; i < 6; ++i)
    for (int j = i + 1; j < 6; ++j) EXPECT(disjoint(phase1[i], phase1[j]));
  EXPECT(s.region >= d.end);
  EXPECT(disjoint(d, ring));
  for (long off : {static_cast<long>(s.halo[0]), static_cast<long>(s.halo[1]), static_cast<long>(s.wts[0]),
                   static_cast<long>(s.wts[1]), static_cast<long>(s.table), static_cast<long>(s.ring)})
    EXPECT(off % 128 == 0);
  EXPECT(s.total % 128 == 0);
  EXPECT((s.ring_ld * eb) % 16 == 0);
  EXPECT((s.ring_tile_elems * eb) % 16 == 0);
  if (eb == 2) {  // 8 ldmatrix row addresses in 8 distinct 16-byte bank groups
    EXPECT((s.d_ld * eb / 16) % 2 == 1);
    EXPECT((s.ring_ld * eb / 16) % 2 == 1);
    EXPECT(s.ring_tile_elems == kBN * s.ring_ld && s.ring_ld >= kBK);
  } else {
    EXPECT(s.ring_tile_elems == kBK * s.ring_ld && s.ring_ld >= kBN);
  }
}

// --- thread mappings ----------------------------------------------------------------------------------

static void check_thread_maps(const Plan& p, int eb) {
  const int v = vec_elems(eb), vp = vectors_per_pixel(eb), slots = dw_slots(eb);
  const int pos = dw_rows_per_thread(p.bm, eb);
  EXPECT(vp * v == kBK && slots * vp == kThreads && (pos * slots == p.bm || (pos == 1 && slots % p.bm == 0)));
  std::vector<int> seen(p.bm * vp, 0);
  for (int tid = 0; tid < kThreads; ++tid) {
    // Idle threads are whole warps (no divergence in the depthwise).
    EXPECT(dw_active(tid, p.bm, eb) == dw_active(tid - tid % 32, p.bm, eb));
    if (!dw_active(tid, p.bm, eb)) continue;
    for (int q = 0; q < pos; ++q) {
      const int r = dw_row(tid, q, eb), cv = dw_cv(tid, eb);
      EXPECT(r >= 0 && r < p.bm && cv >= 0 && cv < vp);
      if (r >= 0 && r < p.bm && cv >= 0 && cv < vp) seen[r * vp + cv]++;
    }
  }
  for (int x : seen) EXPECT(x == 1);

  // Halo staging: for any box size, every (pixel, channel vector) staged by exactly one thread.
  for (int pixels : {1, 63, 64, 65, 210, p.halo_rows * p.halo_cols}) {
    std::vector<int> staged(pixels * vp, 0);
    for (int tid = 0; tid < kThreads; ++tid)
      for (int pixel = dw_row(tid, 0, eb); pixel < pixels; pixel += slots) staged[pixel * vp + dw_cv(tid, eb)]++;
    for (int x : staged) EXPECT(x == 1);
  }
  // Depthwise weights of a chunk: every [tap][kBK] float once, from the chunk's packed weights.
  std::vector<int> wts(p.kh * p.kw * kBK, 0);
  for (int u = 0; u < wts_vectors(p); ++u) {
    const int tap = u / (kBK / 4), part = u % (kBK / 4);
    for (int e = 0; e < 4; ++e) wts.at(tap * kBK + part * 4 + e)++;
    EXPECT(packed_dw_offset(p, tap, (k_chunks(p) > 0 ? k_chunks(p) - 1 : 0) * kBK + part * 4) % 4 == 0);
  }
  for (int x : wts) EXPECT(x == 1);

  // Packed weights: a bijection onto [0, elems).
  if (static_cast<long>(p.cout_pad) * p.kp <= 4'000'000) {
    std::vector<int> pw(packed_pw_elems(p), 0);
    for (int co = 0; co < p.cout_pad; ++co)
      for (int ci = 0; ci < p.kp; ++ci) {
        const int off = packed_pw_offset(p, co, ci, eb);
        EXPECT(off >= 0 && off < packed_pw_elems(p));
        if (off >= 0 && off < packed_pw_elems(p)) pw[off]++;
      }
    for (int x : pw) EXPECT(x == 1);
  }
  std::vector<int> dwp(packed_dw_elems(p), 0);
  for (int tap = 0; tap < p.kh * p.kw; ++tap)
    for (int ci = 0; ci < p.kp; ++ci) dwp[packed_dw_offset(p, tap, ci)]++;
  for (int x : dwp) EXPECT(x == 1);
}

// --- the depthwise of a tile ------------------------------------------------------------------------

template <int KH, int KW, int kPos, int kVec>
static void depthwise_tile(const Plan& p, const std::vector<float>& x, const std::vector<float>& dwp, int tile,
                           bool pre_relu, bool vectors, std::vector<float>& d /* [bm][kp] */) {
  const int eb = 16 / kVec, vp = kBK / kVec;
  const TileRange t = tile_range(p, tile);
  const HaloBox b = halo_box(p, t);
  const int pixels = b.rows * b.cols;
  const float* x_img = x.data() + static_cast<size_t>(t.img) * p.h * p.w * p.c;
  std::vector<int> table(pixels);
  for (int q = 0; q < pixels; ++q) table[q] = halo_source_offset(p, b, q);
  std::vector<float> halo(static_cast<size_t>(pixels) * kBK, std::numeric_limits<float>::quiet_NaN());
  for (int c0 = 0; c0 < p.kp; c0 += kBK) {
    if (vectors) {  // as the 16-byte cp.async path: whole vectors or zero fill, then ReLU in place
      for (int idx = 0; idx < pixels * vp; ++idx) {
        const int pixel = idx / vp, vc = idx % vp, off = table[pixel], c = c0 + vc * kVec;
        const bool real = off >= 0 && c < p.c;
        for (int e = 0; e < kVec; ++e) halo[pixel * kBK + vc * kVec + e] = real ? x_img[off + c + e] : 0.f;
      }
      if (pre_relu)
        for (float& v : halo) v = v < 0.f ? 0.f : v;
    } else {
      for (int idx = 0; idx < pixels * kBK; ++idx) {
        const int pixel = idx / kBK, ch = idx % kBK, off = table[pixel], c = c0 + ch;
        float v = off >= 0 && c < p.c ? x_img[off + c] : 0.f;
        if (pre_relu) v = v < 0.f ? 0.f : v;
        halo[idx] = v;
      }
    }
    for (int tid = 0; tid < kThreads; ++tid) {
      if (!dw_active(tid, p.bm, eb)) continue;
      const int cv = dw_cv(tid, eb);
      int base[kPos];
      for (int q = 0; q < kPos; ++q) base[q] = halo_base_pixel(p, t, b, dw_row(tid, q, eb));
      float acc[kPos][kVec] = {};
      depthwise_rows<KH, KW, kPos, kVec>(
          p, b, base,
          [&](int pixel, float(&xv)[kVec]) {
            for (int e = 0; e < kVec; ++e) xv[e] = halo.at(static_cast<size_t>(pixel) * kBK + cv * kVec + e);
          },
          [&](int tap, float(&wv)[kVec]) {
            for (int e = 0; e < kVec; ++e) wv[e] = dwp.at(packed_dw_offset(p, tap, c0 + cv * kVec + e));
          },
          acc);
      for (int q = 0; q < kPos; ++q)
        for (int e = 0; e < kVec; ++e) d[dw_row(tid, q, eb) * p.kp + c0 + cv * kVec + e] = acc[q][e];
    }
  }
}

template <int KH, int KW, int kPos, int kVec>
static void check_depthwise(const Plan& p, bool pre_relu, bool vectors) {
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(p.n) * p.h * p.w * p.c);
  for (float& v : x) v = normal(rng);
  if (!x.empty()) x[rng() % x.size()] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> dw(static_cast<size_t>(p.c) * p.kh * p.kw);  // [C][kh][kw] as torch
  for (float& v : dw) v = normal(rng);
  std::vector<float> dwp(packed_dw_elems(p), 0.f);
  for (int tap = 0; tap < p.kh * p.kw; ++tap)
    for (int ci = 0; ci < p.c; ++ci) dwp[packed_dw_offset(p, tap, ci)] = dw[ci * p.kh * p.kw + tap];

  std::vector<float> d(static_cast<size_t>(p.bm) * p.kp);
  for (int tile = 0; tile < num_tiles(p); ++tile) {
    std::fill(d.begin(), d.end(), std::numeric_limits<float>::quiet_NaN());
    depthwise_tile<KH, KW, kPos, kVec>(p, x, dwp, tile, pre_relu, vectors, d);
    const TileRange t = tile_range(p, tile);
    for (int r = 0; r < t.count; ++r) {
      const int q = t.q0 + r, ho = q / p.w_out, wo = q % p.w_out;
      for (int ci = 0; ci < p.kp; ++ci) {
        float want = 0.f;  // the direct loop: taps in row-major order, padding skipped
        if (ci < p.c) {
          for (int i = 0; i < p.kh; ++i)
            for (int j = 0; j < p.kw; ++j) {
              const int hi = ho * p.stride_h - p.pad_h + i * p.dil_h, wi = wo * p.stride_w - p.pad_w + j * p.dil_w;
              if (hi < 0 || hi >= p.h || wi < 0 || wi >= p.w) continue;
              float v = x[((static_cast<size_t>(t.img) * p.h + hi) * p.w + wi) * p.c + ci];
              if (pre_relu) v = v < 0.f ? 0.f : v;
              want = std::fma(v, dw[ci * p.kh * p.kw + i * p.kw + j], want);
            }
        }
        const float got = d[r * p.kp + ci];
        EXPECT((std::isnan(want) && std::isnan(got)) || got == want);
      }
    }
  }
}

// --- driver ---------------------------------------------------------------------------------------

template <int kPos, int kVec>
static void check_depthwise_all(const Plan& p) {
  const bool k33 = p.kh == 3 && p.kw == 3;
  for (int pre = 0; pre < 2; ++pre) {
    if (k33) check_depthwise<3, 3, kPos, kVec>(p, pre, false);
    check_depthwise<0, 0, kPos, kVec>(p, pre, false);  // the run-time kernel size, any shape
    if (p.c % kVec == 0) check_depthwise<0, 0, kPos, kVec>(p, pre, true);
  }
}

int main() {
  // (n, c, h, w, c_out, kh, kw, stride h/w, pad h/w, dil h/w)
  const std::vector<Geometry> geometries = {
      {2, 728, 19, 19, 728, 3, 3, 1, 1, 1, 1, 1, 1},    // Xception middle flow
      {1, 64, 147, 147, 128, 3, 3, 1, 1, 1, 1, 1, 1},   // entry flow: output rows wider than a tile
      {2, 1024, 10, 10, 1536, 3, 3, 1, 1, 1, 1, 1, 1},  // exit flow
      {1, 1536, 10, 10, 2048, 3, 3, 1, 1, 1, 1, 1, 1},  // exit flow, conv4 (32-row tiles in 16-bit)
      {2, 5, 7, 9, 7, 3, 3, 1, 1, 1, 1, 1, 1},
      {1, 19, 11, 10, 19, 3, 3, 2, 1, 1, 2, 1, 2},
      {2, 33, 9, 8, 19, 5, 5, 2, 2, 3, 3, 2, 2},
      {2, 19, 5, 6, 33, 2, 4, 1, 1, 0, 1, 1, 1},
      {3, 70, 13, 11, 130, 3, 3, 1, 1, 1, 1, 1, 1},
      {2, 1, 7, 7, 5, 1, 1, 2, 2, 0, 0, 1, 1},
      {1, 16, 3, 300, 9, 3, 3, 1, 1, 1, 1, 1, 1},       // several row segments per output row
      {1, 8, 2, 3000, 8, 3, 3, 1, 1, 1, 1, 1, 1},       // full-width boxes too large: row segments
      {1, 8, 4, 127, 8, 3, 3, 1, 1, 1, 1, 1, 1},        // w_out just below and at the tile widths
      {1, 8, 4, 128, 8, 3, 3, 1, 1, 1, 1, 1, 1},
      {1, 8, 3, 129, 8, 3, 3, 1, 2, 1, 1, 1, 1},
      {2, 24, 6, 70, 40, 3, 3, 2, 2, 1, 1, 1, 1},
      {1, 8, 1, 1, 3, 3, 3, 1, 1, 1, 1, 1, 1},          // a 1 x 1 image with padding
      {1, 40, 9, 9, 20, 7, 3, 1, 3, 3, 1, 1, 2},
      {0, 8, 5, 5, 8, 3, 3, 1, 1, 1, 1, 1, 1},          // empty batch
      {1, 0, 5, 5, 4, 3, 3, 1, 1, 1, 1, 1, 1},          // no input channels
      {2, 8, 5, 5, 0, 3, 3, 1, 1, 1, 1, 1, 1},          // no output channels
      // 1x1 windows (no halo) over many channels.
      {2, 728, 19, 19, 728, 1, 1, 1, 1, 0, 0, 1, 1},
      {3, 130, 13, 11, 70, 1, 1, 1, 1, 0, 0, 1, 1},
  };
  int checked = 0;
  for (const Geometry& g : geometries) {
    for (int eb : {2, 4}) {
      for (int i = 0; tile_candidate(i, eb).bm > 0; ++i) {
        const int bm = tile_candidate(i, eb).bm, segments = tile_candidate(i, eb).row_segments;
        const Plan p =
            make_plan(g.n, g.c, g.h, g.w, g.c_out, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, bm, segments);
        EXPECT(p.row_segments == (segments && p.w_out >= bm));
        where = "n" + std::to_string(g.n) + " c" + std::to_string(g.c) + " " + std::to_string(g.h) + "x" +
                std::to_string(g.w) + " cout" + std::to_string(g.c_out) + " k" + std::to_string(g.kh) + "x" +
                std::to_string(g.kw) + " bm" + std::to_string(bm) + (p.row_segments ? " segments " : " ranges ") +
                std::to_string(eb) + "B";
        check_tiles(p);
        check_smem(p, eb);
        check_thread_maps(p, eb);
        // The depthwise emulation is the slow check: the wide-channel layers once (middle flow at 128 rows).
        const bool depthwise = static_cast<long>(p.n) * p.h * p.w * p.c <= 600'000 && (p.c <= 128 || bm == 128);
        if (eb == 2) {
          if (depthwise && bm == 128) check_depthwise_all<dw_rows_per_thread(128, 2), 8>(p);
          if (depthwise && bm != 128) check_depthwise_all<dw_rows_per_thread(64, 2), 8>(p);  // 64, 32: one row
        } else {
          if (depthwise) check_depthwise_all<dw_rows_per_thread(32, 4), 4>(p);
        }
        ++checked;
      }
    }
  }
  // The launcher's tile choice for Xception's units (bf16 and fp32; batch 256 at 299 x 299) with the
  // opt-in shared memory of an H100 (227 KB) and an A100 (163 KB): 0 = routed to the int64 kernel.
  struct Unit {
    int c, hw, c_out, h100_bf16, a100_bf16, h100_fp32;
  };
  const Unit units[] = {{64, 147, 128, 128, 128, 32},   {128, 147, 128, 128, 128, 32}, {128, 74, 256, 128, 128, 32},
                        {256, 74, 256, 128, 128, 32},   {256, 37, 728, 128, 128, 32},  {728, 37, 728, 128, 64, 32},
                        {728, 19, 728, 128, 64, 32},    {728, 19, 1024, 128, 64, 32},  {1024, 10, 1536, 64, 64, 32},
                        {1536, 10, 2048, 64, 32, 0}};
  for (const Unit& u : units) {
    for (int eb : {2, 4}) {
      for (int smem : {227 * 1024, 163 * 1024}) {
        if (eb == 4 && smem != 227 * 1024) continue;
        {
          int bm = 0, segments = 0;
          for (int i = 0; tile_candidate(i, eb).bm > 0 && bm == 0; ++i) {
            Plan p = make_plan(256, u.c, u.hw, u.hw, u.c_out, 3, 3, 1, 1, 1, 1, 1, 1, tile_candidate(i, eb).bm,
                               tile_candidate(i, eb).row_segments);
            if (fits_smem(p, eb, smem)) bm = p.bm, segments = p.row_segments;
          }
          EXPECT(segments == 0);  // Xception's widest rows (147) still fit full-width halo boxes
          where = "tile choice c" + std::to_string(u.c) + " " + std::to_string(u.hw) + " " + std::to_string(eb) +
                  "B smem " + std::to_string(smem);
          EXPECT(bm == (eb == 4 ? u.h100_fp32 : smem == 227 * 1024 ? u.h100_bf16 : u.a100_bf16));
        }
      }
    }
  }
  const Plan middle = make_plan(256, 728, 19, 19, 728, 3, 3, 1, 1, 1, 1, 1, 1, 128, 0);
  std::printf("middle flow, bf16, bm 128: %d tiles, %d bytes of shared memory, halo box <= %d x %d\n",
              num_tiles(middle), smem_layout(middle, 2).total, middle.halo_rows, middle.halo_cols);
  return report(checked);
}
