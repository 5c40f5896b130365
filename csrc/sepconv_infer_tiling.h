// Index and tiling math of the CUDA provider's tiled depthwise machinery (sepconv_infer.cu and
// sepconv_tiled_backward.cuh: the d store, the forwards' first step and the backward's d; the
// backward's grad_x / grad_dw) and the BatchNorm moments the training statistics merge, as plain C++
// functions.
//
// Everything here is `__host__ __device__` under nvcc and ordinary inline C++ under a host compiler:
// tests/cpp/test_infer_tiling.cpp, test_d_store_tiling.cpp, test_dw_backward_tiling.cpp and
// test_train_stats.cpp compile this header with g++ and check it against brute force (tile coverage,
// halo boxes, staging layout, the depthwise of a tile bit-exact against a direct loop, every element
// written exactly once, the moments against double precision). The kernels' index arithmetic is these
// functions and their direct composition (base + row * pitch + column), which the tests repeat, so
// those checks cover what cannot run without a GPU. No CUDA headers are included here on purpose.
//
// The depthwise phase, in one paragraph: one CTA of kThreads threads owns a tile of `bm` consecutive
// output positions of one image (a "position tile": `bm` consecutive positions of the image, spanning
// several output rows, with a 2-D halo box of full-width input rows; or a segment of one output row
// with a small box). It computes the depthwise output d of the tile, chunk by chunk (kBK channels:
// the halo box of the tile staged in shared memory, pre-ReLU applied once per staged element), each
// thread for its rows and channel vector. All offsets inside an image, a tile or shared memory are
// int32; the launchers route geometries where they would overflow to the int64 kernels
// (sepconv_backward.cu). The fused forward that kept d resident and ran an mma.sync GEMM over every
// Cout tile is gone (sepconv_forward.cu); its shared-memory layout and tile choice (smem_layout,
// fits_smem, tile_candidate, the packed pointwise layout the weight pack still fills) remain here,
// host-tested, with no launcher using the first three.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define XF_HD __host__ __device__ __forceinline__
#else
#define XF_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define XF_UNROLL _Pragma("unroll")
#else
#define XF_UNROLL
#endif

namespace xception_fast {
namespace infer {

constexpr int kThreads = 256;  // 8 warps
constexpr int kBN = 128;       // Cout tile (columns of one accumulator tile)
constexpr int kBK = 32;        // channels per depthwise chunk
constexpr int kStages = 3;     // depth of the weight ring

XF_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }
XF_HD int round_up(int a, int b) { return ceil_div(a, b) * b; }
XF_HD int imin(int a, int b) { return a < b ? a : b; }
XF_HD int imax(int a, int b) { return a > b ? a : b; }
XF_HD int align_up(int bytes, int alignment) { return round_up(bytes, alignment); }

// Elements of one 16-byte vector (one cp.async, one LDS.128): 8 for 16-bit types, 4 for fp32.
XF_HD int vec_elems(int elem_bytes) { return 16 / elem_bytes; }

// ---------------------------------------------------------------------------------------------------
// The plan of one launch: geometry, tile size, padded sizes. Built on the host (make_plan), passed to
// the kernel by value.

struct Plan {
  int n, c, h, w, c_out, h_out, w_out;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int bm;               // output positions per tile (rows of the MMA tile)
  int row_segments;     // 1: a tile is a segment of one output row; 0: a range of an image
  int segs_per_row;     // row_segments: tiles per output row
  int tiles_per_image;
  int kp;               // C rounded up to kBK (at least kBK): K of the d tile and the packed weights
  int cout_tiles;       // ceil(c_out / kBN)
  int cout_pad;         // cout_tiles * kBN: rows (16-bit) or columns (fp32) of the packed pw weight
  int halo_rows, halo_cols;  // upper bounds of every tile's halo box (shared-memory sizing)
};

// row_segments: 1 asks for row-segment tiles (a small halo box on wide images), 0 for ranges of an
// image (every tile full but the last of each image; full-width boxes). Rows narrower than bm always
// get ranges: a segment would then be a partial row.
XF_HD Plan make_plan(int n, int c, int h, int w, int c_out, int kh, int kw, int stride_h, int stride_w, int pad_h,
                     int pad_w, int dil_h, int dil_w, int bm, int row_segments) {
  Plan p{};
  p.n = n, p.c = c, p.h = h, p.w = w, p.c_out = c_out;
  p.kh = kh, p.kw = kw, p.stride_h = stride_h, p.stride_w = stride_w;
  p.pad_h = pad_h, p.pad_w = pad_w, p.dil_h = dil_h, p.dil_w = dil_w;
  p.h_out = (h + 2 * pad_h - dil_h * (kh - 1) - 1) / stride_h + 1;
  p.w_out = (w + 2 * pad_w - dil_w * (kw - 1) - 1) / stride_w + 1;
  p.bm = bm;
  p.row_segments = row_segments && p.w_out >= bm ? 1 : 0;
  const int window_rows = (kh - 1) * dil_h + 1, window_cols = (kw - 1) * dil_w + 1;
  if (p.row_segments) {
    p.segs_per_row = ceil_div(p.w_out, bm);
    p.tiles_per_image = p.h_out * p.segs_per_row;
    p.halo_rows = window_rows;
    p.halo_cols = (bm - 1) * stride_w + window_cols;
  } else {
    p.segs_per_row = 1;
    p.tiles_per_image = ceil_div(p.h_out * p.w_out, bm);
    // bm consecutive positions starting anywhere in a row span at most this many output rows.
    const int span = imin(p.h_out, (p.w_out - 1 + bm - 1) / p.w_out + 1);
    p.halo_rows = (span - 1) * stride_h + window_rows;
    p.halo_cols = (p.w_out - 1) * stride_w + window_cols;
  }
  p.kp = round_up(imax(c, 1), kBK);
  p.cout_tiles = ceil_div(c_out, kBN);
  p.cout_pad = p.cout_tiles * kBN;
  return p;
}

XF_HD int num_tiles(const Plan& p) { return p.n * p.tiles_per_image; }

// ---------------------------------------------------------------------------------------------------
// Position tiles. Output positions of one image are numbered q = ho * w_out + wo; a tile is the
// range [q0, q0 + count) of image `img`, so its rows are consecutive in the NHWC output too:
// global position (img * h_out * w_out + q0 + r) for tile row r.

struct TileRange {
  int img, q0, count;
};

XF_HD TileRange tile_range(const Plan& p, int tile) {
  TileRange t;
  t.img = tile / p.tiles_per_image;
  const int rem = tile - t.img * p.tiles_per_image;
  if (p.row_segments) {
    const int ho = rem / p.segs_per_row;
    const int wo0 = (rem - ho * p.segs_per_row) * p.bm;
    t.q0 = ho * p.w_out + wo0;
    t.count = imin(p.bm, p.w_out - wo0);
  } else {
    t.q0 = rem * p.bm;
    t.count = imin(p.bm, p.h_out * p.w_out - t.q0);
  }
  return t;
}

// The input box read by a tile's windows: rows h0 .. h0 + rows - 1, columns w0 .. w0 + cols - 1
// (may reach into the zero padding). A tile inside one output row reads a partial-width box; a tile
// spanning several rows reads full rows.
struct HaloBox {
  int h0, w0, rows, cols;
};

XF_HD HaloBox halo_box(const Plan& p, const TileRange& t) {
  const int ho_first = t.q0 / p.w_out, ho_last = (t.q0 + t.count - 1) / p.w_out;
  HaloBox b;
  b.h0 = ho_first * p.stride_h - p.pad_h;
  b.rows = (ho_last - ho_first) * p.stride_h + (p.kh - 1) * p.dil_h + 1;
  if (ho_first == ho_last) {
    const int wo_first = t.q0 - ho_first * p.w_out;
    b.w0 = wo_first * p.stride_w - p.pad_w;
    b.cols = (t.count - 1) * p.stride_w + (p.kw - 1) * p.dil_w + 1;
  } else {
    b.w0 = -p.pad_w;
    b.cols = (p.w_out - 1) * p.stride_w + (p.kw - 1) * p.dil_w + 1;
  }
  return b;
}

// Halo pixel (index into the box, row-major) of tap (0, 0) of tile row r. Rows past the tile's count
// (padding rows of the MMA tile) reuse the last position: their results are never stored.
XF_HD int halo_base_pixel(const Plan& p, const TileRange& t, const HaloBox& b, int r) {
  const int q = t.q0 + imin(r, t.count - 1);
  const int ho = q / p.w_out, wo = q - ho * p.w_out;
  return (ho * p.stride_h - p.pad_h - b.h0) * b.cols + (wo * p.stride_w - p.pad_w - b.w0);
}

// Offset in halo pixels of tap (i, j) from tap (0, 0).
XF_HD int halo_tap_offset(const Plan& p, const HaloBox& b, int i, int j) {
  return i * p.dil_h * b.cols + j * p.dil_w;
}

// Element offset in the image (NHWC, channel 0) of halo pixel `pixel`, or -1 where it is padding.
XF_HD int halo_source_offset(const Plan& p, const HaloBox& b, int pixel) {
  const int hr = pixel / b.cols;
  const int hi = b.h0 + hr, wi = b.w0 + (pixel - hr * b.cols);
  if (hi < 0 || hi >= p.h || wi < 0 || wi >= p.w) return -1;
  return (hi * p.w + wi) * p.c;
}

// ---------------------------------------------------------------------------------------------------
// Training statistics (the training forward: the moments of the stored z, as the reference's batch
// statistics are those of the stored z).
//
// Moments of a set of values: count, a pivot K (one of the values), mu = mean(z - K) and
// M2 = sum((z - K - mu)^2). Taking deviations from a data value keeps mu small, so the sums stay exact
// enough for a large mean with a small spread (mean 1e4, std 1e-2 in fp32). Sets merge with Chan et
// al.'s formula (merge_moments), in a fixed order: no atomics, deterministic.
//
// Two kernels, both in a fixed order: z_stats_partial_kernel (sepconv_forward.cu; its index math in
// sepconv_elementwise.h) writes one partial per (row block, channel); bn_stats_merge_kernel merges the
// row blocks of each channel as binary trees of 64 in parallel, pass after pass
// (sepconv_stats_merge.h).

struct Moments {
  int64_t count;
  float pivot, mu, m2;
};

// b merged into a. The difference of the two means is formed as (pivot_b - pivot_a) + (mu_b - mu_a):
// the pivots are exact data values and the mu's are small, so no large rounded means are subtracted.
XF_HD void merge_moments(Moments& a, const Moments& b) {
  if (b.count == 0) return;
  if (a.count == 0) {
    a = b;
    return;
  }
  const int64_t total = a.count + b.count;
  const float delta = (b.pivot - a.pivot) + (b.mu - a.mu);
  const float frac_b = static_cast<float>(static_cast<double>(b.count) / static_cast<double>(total));
  a.mu = a.mu + delta * frac_b;
  a.m2 = a.m2 + b.m2 + delta * delta * (static_cast<float>(a.count) * frac_b);
  a.count = total;
}

// mean, biased var and 1 / sqrt(var + eps) of merged moments; an empty batch gives mean 0, var 1 (as
// the reference).
XF_HD void finalize_moments(const Moments& m, float eps, float& mean, float& var, float& invstd) {
  mean = m.count > 0 ? m.pivot + m.mu : 0.f;
  var = m.count > 0 ? m.m2 / static_cast<float>(m.count) : 1.f;
  invstd = 1.f / sqrtf(var + eps);  // correctly rounded sqrt and division (no fast-math)
}

// ---------------------------------------------------------------------------------------------------
// Shared memory. The d tile is resident for the whole CTA; the halo buffers (phase 1) and the weight
// ring (phase 2) share one region, since the phases never overlap (a barrier separates them).
//
// - d tile: bm rows x d_ld elements, d(r, k) at r * d_ld + k. d_ld = kp + one 16-byte vector of
//   padding: the row pitch in 16-byte units is then odd, so the 8 row addresses of an ldmatrix land
//   in 8 different bank groups (no conflicts).
// - halo buffers (2, double-buffered by channel chunk): [box pixels][kBK] elements; element (pixel,
//   ch) at pixel * kBK + ch; sized for the largest box (halo_rows x halo_cols).
// - depthwise weight buffers (2, staged with their chunk): fp32 [taps][kBK].
// - pixel table: the halo_source_offset of every box pixel of the current tile (int32).
// - weight ring, kStages tiles. 16-bit (mma.sync): B tile [kBN][kBK + 8] (n rows, k contiguous; odd
//   16-byte pitch again). fp32 (FFMA): [kBK][kBN] (k rows, n contiguous).
struct SmemLayout {
  int d_ld, d_bytes;
  int region;                       // byte offset of the shared phase region
  int halo_elems;                   // elements of one halo buffer
  int halo[2], wts[2], table;       // byte offsets (phase 1)
  int ring_ld, ring_tile_elems;     // ring tile pitch and size in elements
  int ring;                         // byte offset (phase 2)
  int stats;                        // byte offset of a reduction area (dx_smem_layout), else == total
  int total;                        // bytes of dynamic shared memory
};

XF_HD SmemLayout smem_layout(const Plan& p, int elem_bytes) {
  SmemLayout s;
  const int v = vec_elems(elem_bytes);
  s.d_ld = p.kp + v;
  s.d_bytes = p.bm * s.d_ld * elem_bytes;
  s.region = align_up(s.d_bytes, 128);
  s.halo_elems = p.halo_rows * p.halo_cols * kBK;
  const int wts_bytes = p.kh * p.kw * kBK * 4;
  s.halo[0] = s.region;
  s.halo[1] = align_up(s.halo[0] + s.halo_elems * elem_bytes, 128);
  s.wts[0] = align_up(s.halo[1] + s.halo_elems * elem_bytes, 128);
  s.wts[1] = align_up(s.wts[0] + wts_bytes, 128);
  s.table = align_up(s.wts[1] + wts_bytes, 128);
  const int phase1_end = s.table + p.halo_rows * p.halo_cols * 4;
  if (elem_bytes == 2) {
    s.ring_ld = kBK + v;
    s.ring_tile_elems = kBN * s.ring_ld;
  } else {
    s.ring_ld = kBN;
    s.ring_tile_elems = kBK * kBN;
  }
  s.ring = s.region;
  const int phase2_end = s.ring + kStages * s.ring_tile_elems * elem_bytes;
  s.stats = align_up(imax(phase1_end, phase2_end), 128);
  s.total = s.stats;
  return s;
}

// Whether plan p's shared memory fits max_smem bytes. The halo bound is checked in 64-bit first: on
// huge images with big windows it would overflow the int32 layout arithmetic.
XF_HD bool fits_smem(const Plan& p, int elem_bytes, int max_smem) {
  if (2 * static_cast<int64_t>(p.halo_rows) * p.halo_cols * kBK * elem_bytes > max_smem) return false;
  return smem_layout(p, elem_bytes).total <= max_smem;
}

// Tile sizes the launcher tries, largest first (the first whose shared memory fits wins). fp32 has
// a d tile twice as large and an FFMA product: 32 rows only.
XF_HD int tile_rows_candidate(int i, int elem_bytes) {
  return elem_bytes == 2 ? (i < 3 ? 128 >> i : 0) : (i == 0 ? 32 : 0);
}

// Candidate i of the launcher's search: for each tile size (largest first), ranges of an image, then
// row segments. bm == 0: no candidates left.
struct TileChoice {
  int bm, row_segments;
};
XF_HD TileChoice tile_candidate(int i, int elem_bytes) { return {tile_rows_candidate(i / 2, elem_bytes), i % 2}; }

// ---------------------------------------------------------------------------------------------------
// Phase 1 thread mapping. A thread always handles the same channel vector cv = tid % (kBK / vec)
// (vec consecutive channels of the chunk) and the "slots" tid / (kBK / vec) + k * slots: when staging,
// the halo pixels of those indices; in the depthwise, the tile rows of those indices.

XF_HD int vectors_per_pixel(int elem_bytes) { return kBK / vec_elems(elem_bytes); }
XF_HD int dw_slots(int elem_bytes) { return kThreads / vectors_per_pixel(elem_bytes); }
XF_HD int dw_cv(int tid, int elem_bytes) { return tid % vectors_per_pixel(elem_bytes); }
XF_HD int dw_row(int tid, int q, int elem_bytes) {
  return tid / vectors_per_pixel(elem_bytes) + q * dw_slots(elem_bytes);
}
// Tile rows per thread in the depthwise; tiles with fewer rows than slots (bm = 32 in 16-bit) leave
// the threads whose first row is past the tile idle there (whole warps: slots are warp-contiguous).
XF_HD constexpr int dw_rows_per_thread(int bm, int elem_bytes) {
  return bm >= kThreads / (kBK / (16 / elem_bytes)) ? bm / (kThreads / (kBK / (16 / elem_bytes))) : 1;
}
XF_HD bool dw_active(int tid, int bm, int elem_bytes) { return dw_row(tid, 0, elem_bytes) < bm; }

// The depthwise weights of a chunk: 16-byte vector u of the [taps][kBK] fp32 buffer comes from the
// packed weight at packed_dw_offset(tap, c0 + part * 4): tap = u / (kBK / 4), part = u % (kBK / 4).
XF_HD int wts_vectors(const Plan& p) { return p.kh * p.kw * (kBK / 4); }

// The depthwise of kPos tile rows for one channel vector, accumulated in fp32 over the taps in
// row-major tap order (i outer, j inner) with one fma per element-tap:
//   acc[q][e] = fma(x(base[q] + tap(i, j), e), w(i, j, e), acc[q][e]).
// KH, KW > 0: compile-time kernel size (fully unrolled); 0: the run-time size in p.
// load_x(pixel, float[vec]) reads a staged (pre-ReLU'd) vector; load_w(tap, float[vec]) the weights.
template <int KH, int KW, int kPos, int kVec, class LoadX, class LoadW>
XF_HD void depthwise_rows(const Plan& p, const HaloBox& b, const int (&base)[kPos], LoadX&& load_x,
                          LoadW&& load_w, float (&acc)[kPos][kVec]) {
  const int kh = KH > 0 ? KH : p.kh, kw = KW > 0 ? KW : p.kw;
  const int row_step = p.dil_h * b.cols;
  XF_UNROLL
  for (int i = 0; i < kh; ++i) {
    XF_UNROLL
    for (int j = 0; j < kw; ++j) {
      float wv[kVec];
      load_w(i * kw + j, wv);
      const int off = i * row_step + j * p.dil_w;  // == halo_tap_offset(p, b, i, j)
      XF_UNROLL
      for (int q = 0; q < kPos; ++q) {
        float xv[kVec];
        load_x(base[q] + off, xv);
        XF_UNROLL
        for (int e = 0; e < kVec; ++e) acc[q][e] = fmaf(xv[e], wv[e], acc[q][e]);
      }
    }
  }
}

// Channel chunks of the depthwise phase.
XF_HD int k_chunks(const Plan& p) { return p.kp / kBK; }

// Packed weights (workspace, written by the launcher's pack kernel, zero outside the real ones, so
// the kernel needs no masks). pw: stage-major, stage it = (co / kBN) * k_chunks + ci / kBK holding
// its kBN x kBK block as the ring tile wants it: [n][k] for 16-bit types (the mma B operand, k
// contiguous), [k][n] for fp32 (n contiguous for the FFMA tile). dw: fp32 [taps][kp]. scale and
// shift: fp32 [cout_pad], 1 and -0 where absent (x * 1 and x + -0 are exact for every x).
XF_HD int packed_pw_offset(const Plan& p, int co, int ci, int elem_bytes) {
  const int it = (co / kBN) * k_chunks(p) + ci / kBK;
  const int n = co % kBN, k = ci % kBK;
  return it * kBN * kBK + (elem_bytes == 2 ? n * kBK + k : k * kBN + n);
}
XF_HD int packed_pw_elems(const Plan& p) { return p.cout_pad * p.kp; }
XF_HD int packed_dw_offset(const Plan& p, int tap, int ci) { return tap * p.kp + ci; }
XF_HD int packed_dw_elems(const Plan& p) { return p.kh * p.kw * p.kp; }

// ---------------------------------------------------------------------------------------------------
// Splits of the backward's tiled kernels over position tiles (dw_backward_tiled_kernel): a grid of
// `units` CTAs per split (one per channel chunk), each split a contiguous range of position tiles;
// each split writes its fp32 partial and the column sums add the splits in order.

constexpr int kGpMaxSplits = 16;  // splits tried on any grid (enough for the middle flow's 23 chunks)
constexpr int kGpMaxSms = 512;    // the most CTA slots (SMs x resident CTAs) the workspace leaves room to fill
                                  // (H100: 132 SMs x 2 CTAs of dw_backward_tiled_kernel)

XF_HD int gp_chunks(const Plan& p) { return p.kp / kBK; }

// The position tiles of split s of `splits`: [begin, end), contiguous, as even as whole tiles allow.
struct TileSpan {
  int begin, end;
};
XF_HD TileSpan gp_split_tiles(const Plan& p, int s, int splits) {
  const int tiles = num_tiles(p);
  return {static_cast<int>(static_cast<int64_t>(tiles) * s / splits),
          static_cast<int>(static_cast<int64_t>(tiles) * (s + 1) / splits)};
}

// The most splits a grid of `units` CTAs per split may take on `sms` SMs: kGpMaxSplits, or as many as
// one full wave needs where kGpMaxSplits cannot fill one (the entry flow: 2 units x 16 splits left 100
// of 132 SMs idle). Beyond one wave, more splits only add partials for the column sums to add.
XF_HD int gp_split_limit(int units, int sms) { return imax(kGpMaxSplits, ceil_div(sms, imax(units, 1))); }

// The partials the workspace makes room for, for a grid of `units` CTAs per split (geometry only: the
// workspace is sized before the SM count is known): the limit on a GPU with kGpMaxSms CTA slots.
XF_HD int gp_max_splits(int units) { return gp_split_limit(units, kGpMaxSms); }

// Splits for `sms` multiprocessors, one CTA each: the count in 1..gp_split_limit (and at most
// max_splits, the workspace's room, and one per tile) whose last wave is fullest (CTAs / sms closest
// below a whole number of waves), the smallest such count on ties.
XF_HD int gp_choose_splits(int units, int tiles, int sms, int max_splits) {
  int best = 1;
  double best_eff = -1.0;
  const int limit = imin(imin(max_splits, gp_split_limit(units, sms)), imax(tiles, 1));
  for (int s = 1; s <= limit; ++s) {
    const int ctas = units * s;
    const double eff = static_cast<double>(ctas) / (static_cast<double>(ceil_div(ctas, sms)) * sms);
    if (eff > best_eff + 1e-9) best = s, best_eff = eff;
  }
  return best;
}

// ---------------------------------------------------------------------------------------------------
// The backward's grad_x and grad_dw (sepconv_tiled_backward.cuh, dw_backward_tiled_kernel; stride 1, 3x3).
// With stride 1 the depthwise's input gradient is a forward depthwise of grad_d with the taps flipped
// and padding (k - 1) * dil - pad (dx_plan): the tile and halo geometry of the forward, on grad_d
// [N, Ho, Wo, C] as the "image" and tiles of input pixels. A CTA owns one chunk of kBK channels (its
// flipped weights staged once) and a split of the pixel tiles; per tile it stages grad_d's halo box for
// the chunk, and each thread, for its channel vector and its rows r = slot, slot + kSlots, ... (one
// after the other), reads x once and gathers every tap's grad_d once for both
//   grad_x(pix) = [pre_relu: x > 0] * sum_taps grad_d(pix + pad - tap * dil) * w(tap) and
//   grad_dw(tap) += grad_d(pix + pad - tap * dil) * pre(x)(pix) (depthwise_backward_rows, one row).
// grad_dw stays in registers across the split's tiles, is summed over the lanes of the channel vector
// (xor shuffles from dx_lane_xor_first), then over the warps in shared memory, in order, into the
// split's partial [C][taps]; the column sums add the splits.
//
// One row at a time: only that row's x, pre(x) and grad_x vectors live beside the 9 x vec grad_dw
// accumulators, so the kernel fits 128 registers (two 8-warp CTAs per SM), and a tile of many rows per
// thread amortises its staging (the launcher picks the tile by dx_tile_cost). Halo pixels and tile
// rows are visited by walking their grids (GridWalk): no division per pixel or per row.

// The forward plan of the transposed depthwise: grad_d (ho x wo) in, the input grid (h x w) out. Valid
// when the padding is at most the window's reach ((k - 1) * dil - pad >= 0, checked by dx_supported).
XF_HD Plan dx_plan(int n, int c, int h, int w, int kh, int kw, int pad_h, int pad_w, int dil_h, int dil_w, int bm,
                   int row_segments) {
  const int h_out = h + 2 * pad_h - dil_h * (kh - 1), w_out = w + 2 * pad_w - dil_w * (kw - 1);
  return make_plan(n, c, h_out, w_out, c, kh, kw, 1, 1, (kh - 1) * dil_h - pad_h, (kw - 1) * dil_w - pad_w, dil_h,
                   dil_w, bm, row_segments);
}
XF_HD bool dx_supported(int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w) {
  return kh == 3 && kw == 3 && stride_h == 1 && stride_w == 1 && pad_h <= (kh - 1) * dil_h &&
         pad_w <= (kw - 1) * dil_w;
}
// The flipped weights: tap t of the transposed conv is tap taps - 1 - t of the forward's.
XF_HD int dx_forward_tap(const Plan& p, int tap) { return p.kh * p.kw - 1 - tap; }

// The box the kernel stages for tile t: halo_box, always p.halo_cols wide (a row segment shorter than
// bm stages the columns past its end too: padding or pixels no row reads). The width is then the
// plan's, a kernel parameter rather than a register through the rows.
XF_HD HaloBox dx_box(const Plan& p, const TileRange& t) {
  HaloBox b = halo_box(p, t);
  b.cols = p.halo_cols;
  return b;
}

// Walking a row-major grid `cols` wide from element `index` in steps of `step` elements: the row and
// column of each element without a division per step (the kernel's threads visit the halo pixels and
// the tile rows kSlots apart).
struct GridWalk {
  int row, col, step_row, step_col, cols;
};
XF_HD GridWalk grid_walk(int index, int cols, int step) {
  return {index / cols, index % cols, step / cols, step % cols, cols};
}
XF_HD void grid_advance(GridWalk& w) {
  w.row += w.step_row, w.col += w.step_col;
  if (w.col >= w.cols) w.col -= w.cols, ++w.row;
}

// Tile row r of tile t (stride 1), then the rows `step` positions apart: the column wo of the row's
// position and the halo pixel of its tap (0, 0) (== halo_base_pixel for the rows of the tile), advanced
// without a division: `step` positions are s.rows = step / w_out output rows (as many box rows) and
// s.cols = step % w_out columns, plus one row where the column wraps. The step is the kernel's
// (DxArgs, computed once on the host), the walk two registers.
struct RowWalk {
  int col, base;
};
struct RowStep {
  int rows, cols;
};
XF_HD RowStep dx_row_step(const Plan& p, int step) { return {step / p.w_out, step % p.w_out}; }
XF_HD RowWalk dx_row_walk(const Plan& p, const TileRange& t, const HaloBox& b, int r) {
  const int q = t.q0 + r, ho = q / p.w_out, wo = q - ho * p.w_out;
  return {wo, (ho - p.pad_h - b.h0) * b.cols + (wo - p.pad_w - b.w0)};
}
XF_HD void dx_row_advance(const Plan& p, const HaloBox& b, const RowStep& s, RowWalk& w) {
  w.col += s.cols, w.base += s.rows * b.cols + s.cols;
  if (w.col >= p.w_out) w.col -= p.w_out, w.base += b.cols - p.w_out;
}

// Halo pixel `pixel` of box b (walked with grid_walk(pixel, b.cols, .)): its element offset in the
// image (NHWC, channel 0), or -1 where it is padding (== halo_source_offset).
XF_HD int dx_source_offset(const Plan& p, const HaloBox& b, const GridWalk& w) {
  const int hi = b.h0 + w.row, wi = b.w0 + w.col;
  return hi < 0 || hi >= p.h || wi < 0 || wi >= p.w ? -1 : (hi * p.w + wi) * p.c;
}

// Tile candidates: 512, 256, 128, 64 rows (16-bit: up to 8, 4, 2, 1 per thread; fp32 twice that),
// each as row segments, then as ranges of an image (make_plan gives ranges where a row is narrower
// than the tile). bm == 0: no candidates left. The launcher takes the cheapest that fits
// (dx_choose_tile).
XF_HD TileChoice dx_tile_candidate(int i) { return {i < 8 ? 512 >> (i / 2) : 0, 1 - i % 2}; }

// A model of one CTA's issue work on a plan, per image, in SASS instructions of its busiest thread (the
// constants from the compiled kernel's per-iteration counts, sm_90): per tile a fixed part (tile and
// box geometry, the walks' divisions, barriers), the 16-byte staging (one copy per slot per pixel)
// and the rows (the 9 taps of one channel vector per row). Only its order matters: it ranks the
// candidates.
constexpr int kDxTileFixed = 260, kDxStagePixel = 16;
XF_HD int64_t dx_tile_cost(const Plan& p, int elem_bytes) {
  const int slots = dw_slots(elem_bytes), row = elem_bytes == 2 ? 290 : 160;
  int64_t cost = 0;
  for (int tile = 0; tile < p.tiles_per_image; ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = dx_box(p, t);
    cost += kDxTileFixed + kDxStagePixel * ceil_div(b.rows * b.cols, slots) +
            static_cast<int64_t>(row) * ceil_div(t.count, slots);
  }
  return cost;
}

// The depthwise staging of SmemLayout from 0 (no d tile), then the warps' grad_dw partials fp32
// [warps][taps][kBK] (dx_red_index): the d store's layout (ds_smem_layout) builds on it.
XF_HD SmemLayout dx_smem_layout(const Plan& p, int elem_bytes) {
  SmemLayout s = smem_layout(p, elem_bytes);
  const int shift = s.region;
  s.d_ld = 0, s.d_bytes = 0, s.region = 0;
  s.halo[0] -= shift, s.halo[1] -= shift, s.wts[0] -= shift, s.wts[1] -= shift, s.table -= shift;
  s.ring = 0, s.ring_tile_elems = 0;
  s.stats = align_up(s.table + p.halo_rows * p.halo_cols * 4, 128);  // the reduction area
  s.total = align_up(s.stats + (kThreads / 32) * p.kh * p.kw * kBK * 4, 128);
  return s;
}

// dw_backward_tiled_kernel's shared memory: the halo box of one tile and chunk ([pixels][kBK] in T,
// as the depthwise phase's) and the chunk's flipped weights (fp32 [taps][kBK], staged once per CTA: a
// CTA has one chunk); after the last tile the warps' grad_dw partials (dx_red_index) reuse the bytes
// from 0 (the last tile ends with a barrier, and the weights are read no more).
struct DxSmem {
  int halo, wts, red, total;  // byte offsets, bytes
};
XF_HD DxSmem dx_grad_smem_layout(const Plan& p, int elem_bytes) {
  DxSmem s;
  s.halo = 0;
  s.wts = align_up(p.halo_rows * p.halo_cols * kBK * elem_bytes, 128);
  s.red = 0;
  s.total = align_up(imax(s.wts + p.kh * p.kw * kBK * 4, (kThreads / 32) * p.kh * p.kw * kBK * 4), 128);
  return s;
}
XF_HD int dx_red_index(const Plan& p, int warp, int tap, int ch) { return (warp * p.kh * p.kw + tap) * kBK + ch; }
XF_HD bool dx_fits_smem(const Plan& p, int elem_bytes, int max_smem) {
  if (static_cast<int64_t>(p.halo_rows) * p.halo_cols * kBK * elem_bytes > max_smem) return false;
  return dx_grad_smem_layout(p, elem_bytes).total <= max_smem;
}

// The launcher's plan: of the candidates whose shared memory fits, the cheapest by dx_tile_cost (the
// first on ties); bm == 0 where none fits.
XF_HD Plan dx_choose_tile(int n, int c, int h, int w, int pad_h, int pad_w, int dil_h, int dil_w, int elem_bytes,
                          int max_smem) {
  Plan best{};
  int64_t best_cost = 0;
  for (int i = 0; dx_tile_candidate(i).bm > 0; ++i) {
    const TileChoice t = dx_tile_candidate(i);
    const Plan p = dx_plan(n, c, h, w, 3, 3, pad_h, pad_w, dil_h, dil_w, t.bm, t.row_segments);
    if (!dx_fits_smem(p, elem_bytes, max_smem)) continue;
    const int64_t cost = dx_tile_cost(p, elem_bytes);
    if (best.bm == 0 || cost < best_cost) best = p, best_cost = cost;
  }
  return best;
}

// Lanes of a warp with the same channel vector differ by multiples of vectors_per_pixel: the xor
// butterfly over them starts there and doubles up to 16.
XF_HD int dx_lane_xor_first(int elem_bytes) { return vectors_per_pixel(elem_bytes); }

// The split's grad_dw partial: float [splits][C][taps] (grad_dw's own layout per split).
XF_HD int64_t dx_partial_offset(const Plan& p, int split, int c, int forward_tap) {
  return (static_cast<int64_t>(split) * p.c + c) * (p.kh * p.kw) + forward_tap;
}

// Offsets inside one image of x and grad_x (NHWC, the transposed plan's output grid is the input's):
// tile row r, channel c. int32: the launcher runs the tiled kernel only where h * w * c fits
// (fits_int32).
XF_HD int dx_pixel_offset(const Plan& p, const TileRange& t, int r, int c) { return (t.q0 + r) * p.c + c; }
XF_HD int64_t dx_image_offset(const Plan& p, const TileRange& t) {
  return static_cast<int64_t>(t.img) * p.h_out * p.w_out * p.c;
}

// Both gradients of kPos tile rows for one channel vector (see above), taps in the transposed conv's
// row-major order, one gather per element-tap and two fma:
//   gx[q][e] = fma(g, w(tap, e), gx[q][e]);  gw[tap][e] = fma(g, xr[q][e], gw[tap][e]),
// g = grad_d(base[q] + tap offset, e). xr[q] must be 0 on rows that are not real pixels. kUnitDil: the
// plan's dilation is 1 (the caller checked): the column offsets are constants (immediate offsets of the
// shared-memory loads instead of an address per tap).
template <int KH, int KW, int kPos, int kVec, bool kUnitDil = false, class LoadG, class LoadW>
XF_HD void depthwise_backward_rows(const Plan& p, const HaloBox& b, const int (&base)[kPos], LoadG&& load_g,
                                   LoadW&& load_w, const float (&xr)[kPos][kVec], float (&gx)[kPos][kVec],
                                   float (&gw)[KH * KW][kVec]) {
  const int dil_w = kUnitDil ? 1 : p.dil_w, row_step = (kUnitDil ? 1 : p.dil_h) * b.cols;
  XF_UNROLL
  for (int i = 0; i < KH; ++i) {
    XF_UNROLL
    for (int j = 0; j < KW; ++j) {
      float wv[kVec];
      load_w(i * KW + j, wv);
      const int off = i * row_step + j * dil_w;  // == halo_tap_offset(p, b, i, j)
      XF_UNROLL
      for (int q = 0; q < kPos; ++q) {
        float g[kVec];
        load_g(base[q] + off, g);
        XF_UNROLL
        for (int e = 0; e < kVec; ++e) {
          gx[q][e] = fmaf(g[e], wv[e], gx[q][e]);
          gw[i * KW + j][e] = fmaf(g[e], xr[q][e], gw[i * KW + j][e]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The backward's d store (sepconv_infer.cu, d_store_kernel): d = dw(pre(x)) [P, C] in T for cuBLAS's
// grad_pw = grad_z^T d. One CTA per position tile runs the forward's depthwise phase over every chunk
// (the staging alone: no d tile, no weight ring) and each thread stores its outputs' channel vector
// straight from its accumulators: element (row r of tile t, channel c) goes to d_store_offset.
//
// A thread computes a "run" of kDsRun adjacent output columns of one output row (ds_run): one pass over
// the input columns their windows read, each staged column unpacked once and fed to every output of the
// run whose window covers it (ds_run_depthwise). Per element-tap that is one FMA and (kDsRun + kw - 1) /
// (kDsRun * kw) of an unpack instead of one, and one weight load per kDsRun outputs. So that a run never
// crosses an output row, a tile is whole output rows (ranges of an image with bm a multiple of w_out)
// or a segment of one row (row segments), and each slot of the depthwise phase (dw_row(tid, 0)) owns
// one run: ds_tile_candidate sizes tiles to at most dw_slots runs. A run's last outputs may lie past its
// row (the row's width not a multiple of kDsRun): they are computed and not stored, from the pixels their
// windows would read, which lie in the next row of the box or, for its last row, at most
// ds_halo_slack pixels past the box: each halo buffer has that many pixels more (read, never stored).
// The offsets stay compile-time immediates of one base address per row (a clamp per column held 18
// addresses in registers and cost the third CTA per SM).

constexpr int kDsRun = 3;

XF_HD int ds_halo_slack(const Plan& p) { return (kDsRun - 1) * p.stride_w; }

// Box rows of the d store's tiles: whole output rows span exactly bm / w_out of them (make_plan's bound
// allows one more, for ranges that start inside a row: the entry flow's 147-wide rows would then stage 4
// rows for 1 and fit 2 CTAs per SM instead of 3).
XF_HD int ds_halo_rows(const Plan& p) {
  const int w = imax(p.w_out, 1);
  if (p.row_segments || p.bm % w != 0) return p.halo_rows;
  return imin(p.halo_rows, (imax(imin(p.bm / w, p.h_out), 1) - 1) * p.stride_h + (p.kh - 1) * p.dil_h + 1);
}

// The depthwise staging of SmemLayout (no d tile, no weight ring, no reduction area) for boxes of
// ds_halo_rows rows, each halo buffer ds_halo_slack pixels longer.
XF_HD SmemLayout ds_smem_layout(const Plan& p, int elem_bytes) {
  SmemLayout s{};
  const int pixels = ds_halo_rows(p) * p.halo_cols;
  s.halo_elems = (pixels + ds_halo_slack(p)) * kBK;
  const int wts_bytes = p.kh * p.kw * kBK * 4;
  s.halo[0] = 0;
  s.halo[1] = align_up(s.halo_elems * elem_bytes, 128);
  s.wts[0] = align_up(s.halo[1] + s.halo_elems * elem_bytes, 128);
  s.wts[1] = align_up(s.wts[0] + wts_bytes, 128);
  s.table = align_up(s.wts[1] + wts_bytes, 128);
  s.stats = s.total = align_up(s.table + pixels * 4, 128);
  return s;
}
XF_HD bool ds_fits_smem(const Plan& p, int elem_bytes, int max_smem) {
  if (2 * static_cast<int64_t>(ds_halo_rows(p)) * p.halo_cols * kBK * elem_bytes > max_smem) return false;
  return ds_smem_layout(p, elem_bytes).total <= max_smem;
}

// Warps with runs over an image of h output rows of `runs` runs each, in tiles of k rows: a warp holds
// 32 / vectors_per_pixel consecutive slots, and only those with a run issue the math.
XF_HD int ds_image_warps(int h, int k, int runs, int elem_bytes) {
  const int per_warp = 32 / vectors_per_pixel(elem_bytes);
  return h / k * ceil_div(k * runs, per_warp) + ceil_div(h % k * runs, per_warp);
}

// Candidate i of the d store's tile (the launcher takes the first whose staging fits; bm 0: none left):
// at most dw_slots >> i runs per CTA. Rows of at most that many runs: ranges of k whole output rows, k
// the one the budget holds with the fewest warps with runs per image (the last one partly idle), the
// largest on ties (Xception's middle flow, 19 wide in 16-bit: 7 runs a row, 9 rows a tile at most; 9
// rows: tiles of 63, 63 and 7 runs, 17 warps, where tiles of 7, 7 and 5 rows take 19); wider rows: row
// segments of even width, a multiple of kDsRun (the entry flow's 147 in fp32: two segments of 75).
XF_HD TileChoice ds_tile_candidate(int i, int h_out, int w_out, int elem_bytes) {
  const int budget = dw_slots(elem_bytes) >> i;
  if (budget < 1) return {0, 0};
  const int h = imax(h_out, 1), w = imax(w_out, 1), runs = ceil_div(w, kDsRun);
  if (runs <= budget) {
    int best = 1;
    for (int k = 2; k <= imin(budget / runs, h); ++k)
      if (ds_image_warps(h, k, runs, elem_bytes) <= ds_image_warps(h, best, runs, elem_bytes)) best = k;
    return {best * w, 0};
  }
  return {round_up(ceil_div(w, ceil_div(runs, budget)), kDsRun), 1};
}

// Runs per tile row: a segment's (bm positions) or a whole output row's.
XF_HD int ds_row_runs(const Plan& p) { return ceil_div(p.row_segments ? p.bm : p.w_out, kDsRun); }
// Output rows of a full tile: k (ranges of whole rows), or 1 (a segment).
XF_HD int ds_tile_rows(const Plan& p) { return p.row_segments ? 1 : p.bm / imax(p.w_out, 1); }

// Tile `tile` of the d store's plan as tile_range and halo_box give it (t, b), from its first output
// row ho and column wo and its output rows, with one division (two for segments) where those take four:
// its rows start an output row. k: ds_tile_rows(p).
struct DsTile {
  TileRange t;
  HaloBox b;
  int ho, wo, rows;
};
XF_HD DsTile ds_tile(const Plan& p, int tile, int k) {
  DsTile d;
  d.t.img = tile / p.tiles_per_image;
  const int rem = tile - d.t.img * p.tiles_per_image;
  if (p.row_segments) {
    d.ho = rem / p.segs_per_row;
    d.wo = (rem - d.ho * p.segs_per_row) * p.bm;
    d.rows = 1;
    d.t.count = imin(p.bm, p.w_out - d.wo);
  } else {
    d.ho = rem * k;
    d.wo = 0;
    d.rows = imin(k, p.h_out - d.ho);
    d.t.count = d.rows * p.w_out;
  }
  d.t.q0 = d.ho * p.w_out + d.wo;
  d.b.h0 = d.ho * p.stride_h - p.pad_h;
  d.b.rows = (d.rows - 1) * p.stride_h + (p.kh - 1) * p.dil_h + 1;
  d.b.w0 = d.wo * p.stride_w - p.pad_w;
  d.b.cols = (d.rows == 1 ? d.t.count - 1 : p.w_out - 1) * p.stride_w + (p.kw - 1) * p.dil_w + 1;
  return d;
}

// The run of slot `slot` in tile d (runs: ds_row_runs): its first tile row r (outputs r .. r + outputs
// - 1, one output row), how many of its kDsRun outputs are positions of the tile (0: the slot has no
// run), and base, the halo pixel of its first output's tap (0, 0) (halo_base_pixel of r).
struct DsRun {
  int r, outputs, base;
};
XF_HD DsRun ds_run(const Plan& p, const DsTile& d, int runs, int slot) {
  const int row = slot / runs, first = (slot - row * runs) * kDsRun;
  const int width = p.row_segments ? d.t.count : p.w_out;
  if (row >= d.rows || first >= width) return {0, 0, 0};
  return {row * p.w_out + first, imin(kDsRun, width - first), row * p.stride_h * d.b.cols + first * p.stride_w};
}

// The depthwise of one run for one channel vector: acc[g] for outputs g = 0 .. kDsRun - 1, base the
// halo pixel of output 0's tap (0, 0), output g's tap (i, j) at base + i * dil_h * cols + g * stride_w +
// j * dil_w. Every output sums its taps in row-major order (i outer, j inner)
// in fp32 from zero, one fma each: depthwise_rows' order, so the same bits.
// kUnitW (KH, KW > 0, stride_w and dil_w 1): per row i the kDsRun + KW - 1 columns in order, column u
// feeding outputs g = u - j for the taps j its window holds (for one output, j ascending). Else the
// run-time size and steps: each (tap, output) loads its own pixel.
// load_x(pixel, float[vec]) reads a staged (pre-ReLU'd) vector; load_w(tap, float[vec]) the weights.
template <int KH, int KW, bool kUnitW, int kVec, class LoadX, class LoadW>
XF_HD void ds_run_depthwise(const Plan& p, const HaloBox& b, int base, LoadX&& load_x, LoadW&& load_w,
                            float (&acc)[kDsRun][kVec]) {
  XF_UNROLL
  for (int g = 0; g < kDsRun; ++g)
    XF_UNROLL
    for (int e = 0; e < kVec; ++e) acc[g][e] = 0.f;
  const int row_step = p.dil_h * b.cols;
  if constexpr (kUnitW) {
    static_assert(KH > 0 && KW > 0, "kUnitW: a compile-time kernel size");
    XF_UNROLL
    for (int i = 0; i < KH; ++i) {
      float wv[KW][kVec];
      XF_UNROLL
      for (int j = 0; j < KW; ++j) load_w(i * KW + j, wv[j]);
      const int row = base + i * row_step;
      XF_UNROLL
      for (int u = 0; u < kDsRun + KW - 1; ++u) {
        float xv[kVec];
        load_x(row + u, xv);
        XF_UNROLL
        for (int g = 0; g < kDsRun; ++g) {
          const int j = u - g;
          if (j < 0 || j >= KW) continue;
          XF_UNROLL
          for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(xv[e], wv[j][e], acc[g][e]);
        }
      }
    }
  } else {
    const int kh = KH > 0 ? KH : p.kh, kw = KW > 0 ? KW : p.kw;
    for (int i = 0; i < kh; ++i) {
      for (int j = 0; j < kw; ++j) {
        float wv[kVec];
        load_w(i * kw + j, wv);
        XF_UNROLL
        for (int g = 0; g < kDsRun; ++g) {
          float xv[kVec];
          load_x(base + i * row_step + g * p.stride_w + j * p.dil_w, xv);
          XF_UNROLL
          for (int e = 0; e < kVec; ++e) acc[g][e] = fmaf(xv[e], wv[e], acc[g][e]);
        }
      }
    }
  }
}

// The element offset in d [P, C] of tile t's row r, channel c: ds_position's row of d.
XF_HD int ds_position(const Plan& p, const TileRange& t, int r) { return t.img * p.h_out * p.w_out + t.q0 + r; }
XF_HD int64_t d_store_offset(const Plan& p, const TileRange& t, int r, int c) {
  return static_cast<int64_t>(ds_position(p, t, r)) * p.c + c;
}

}  // namespace infer
}  // namespace xception_fast
