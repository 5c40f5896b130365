// Backward kernels of the xception_fast CUDA provider and their launchers:
// run_sepconv_bn_infer_backward, run_bn_backward_reduce, run_sepconv_bn_train_backward.
//
// STATUS: compiled for sm_80 and sm_90a with nvcc 13.0; NOT YET RUN ON A GPU. Nothing here has been
// checked numerically: tests/test_providers.py and `python -m xception_fast verify --full` are the
// check, on a GPU; `auto` runs this provider only on a device where its self-check has passed.
//
// Notation: P = N * Ho * Wo output positions, grad_z [P, Cout] the gradient of the pointwise output,
// d [P, C] the depthwise output, grad_d [P, C] its gradient. No atomics anywhere: every reduction
// writes per-block partials that a second kernel (column_sum_kernel, sepconv_device.cuh) adds up in
// a fixed order, so results are bitwise reproducible.
//
// Kernels, in launch order:
// - infer_grad_z_kernel<T> (inference backward only): z is not saved, so the fused forward main loop
//   recomputes it (sepconv_device.cuh), and the epilogue forms g = grad_y masked by the post-ReLU of
//   z * scale + shift, writes grad_z = g * scale rounded to T into a workspace buffer and per-tile
//   partial sums of g * z and g (grad_scale, grad_shift).
// - train_grad_z_kernel<T> (training backward): grad_z = (g - mean_dy - xhat * mean_dy_xhat) * invstd * w,
//   g = grad_y masked by the post-ReLU recomputed from z, rounded to T as the unfused path stores it,
//   materialised once into the same buffer (both GEMMs below read it).
// - bn_backward_partial_kernel<T> (bn_backward_reduce): per row block and channel, sum of g and of
//   g * xhat, g = grad_y masked by the post-ReLU recomputed from z; then column sums.
// - grad_d = grad_z @ pw (M = P, N = C, K = Cout), rounded to T as the unfused convolution backward
//   stores it: the tiled forward kernel of sepconv_infer.cu on a 1x1 unit over the positions
//   (run_grad_d_tiled: cp.async weight ring, ldmatrix + mma.sync; fp32 with exact FFMA products);
//   grad_d_kernel<T> below is its int64 fallback.
// - grad_pw = grad_z^T @ d (M = Cout, N = C, K = P) in fp32 partials [splits][Cout][C], then column
//   sums into grad_pw (T). 16-bit types with Cout % 8 == 0: grad_pw_tiled_kernel
//   (sepconv_tiled_backward.cuh: d computed once per position and channel by the tiled depthwise
//   phase, ldmatrix.trans + mma.sync); otherwise grad_pw_kernel<T> below, d RECOMPUTED per Cout tile
//   from x (depthwise_tile, never saved), rounded to T as in the forward.
// - grad_x and grad_dw: stride 1, 3x3: dw_backward_tiled_kernel (sepconv_tiled_backward.cuh: grad_d's
//   halo staged once per tile and chunk, both gradients from one gather per element-tap); otherwise
//   grad_x_kernel<T> (the transposed depthwise conv of grad_d, a gather over the taps whose output
//   position exists) and grad_dw_partial_kernel<T> (per chunk of positions, grid.z = the tap). grad_x
//   is zeroed where x <= 0 when pre_relu and rounded to T; grad_dw's partials are summed in order.
// Tensor cores (wmma, fp32 accumulation) for fp16/bf16 in both GEMMs; fp32 uses FMA on CUDA cores.
//
// Not verified yet (check first on the GPU): the wmma layouts (col-major A in grad_pw_kernel), the
// transposed-conv index arithmetic of grad_x_kernel for stride 2 / dilation 2 / asymmetric padding,
// and the workspace sizes of large shapes.

#include <algorithm>
#include <cstdint>

#include "sepconv_device.cuh"
#include "sepconv_infer.h"
#include "sepconv_params.h"

namespace xception_fast {

namespace {

// Work sizes of the reductions over positions: enough blocks to fill a GPU, partial buffers bounded.
constexpr int64_t kTargetBlocks = 1024;                  // grad_pw: aim for this many blocks in all
constexpr int64_t kMinRowsPerChunk = 256;                // grad_dw and bn_backward_reduce row blocks
constexpr int64_t kMaxRowChunks = 1024;
constexpr int64_t kMaxPartialBytes = int64_t{256} << 20;  // per partial buffer

// ---------------------------------------------------------------------------------------------------
// grad_z: formed from grad_y and z (training: train_grad_z_kernel) or read from the buffer

template <typename T, bool kTrain>
struct GradZ {
  int64_t c_out = 0;
  // kTrain
  const T* grad_y = nullptr;
  const T* z = nullptr;
  const float* mean = nullptr;
  const float* invstd = nullptr;
  const float* weight = nullptr;  // fp32 [Cout]: 1 where the BatchNorm has no weight
  const float* bias = nullptr;    // fp32 [Cout]: -0 where it has no bias
  const float* mean_dy = nullptr;
  const float* mean_dy_xhat = nullptr;
  bool post_relu = false;
  // !kTrain
  const T* buffer = nullptr;

  // grad_z[pos, co] as float, already rounded to T.
  __device__ __forceinline__ float operator()(int64_t pos, int64_t co) const {
    const int64_t i = pos * c_out + co;
    if constexpr (kTrain) {
      return from(to_float(grad_y[i]), to_float(z[i]), co);
    } else {
      return to_float(buffer[i]);
    }
  }

  // kTrain: grad_z of channel co from grad_y = gy and z = zf.
  __device__ __forceinline__ float from(float gy, float zf, int64_t co) const {
    const float inv = invstd[co];
    const float xhat = (zf - mean[co]) * inv;
    float g = gy;
    const float gain = inv * weight[co];  // * 1 is exact
    if (post_relu && !(xhat * weight[co] + bias[co] > 0.f)) g = 0.f;
    return round_to<T>((g - mean_dy[co] - xhat * mean_dy_xhat[co]) * gain);
  }
};

// ---------------------------------------------------------------------------------------------------
// Inference backward: recompute z, form grad_z and the partial sums of grad_scale / grad_shift.

// part_scale[m_tile * Cout + co] = sum over the tile's positions of g * z; part_shift: of g.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    infer_grad_z_kernel(const SepConvInferBackwardParams p, int64_t n_tiles, T* __restrict__ grad_z,
                        float* __restrict__ part_scale, float* __restrict__ part_shift) {
  __shared__ ForwardSmem<T> s;
  const ConvGeometry& g = p.g;
  const auto [m_tile, m0, n0] = run_forward_tile<T>(p, n_tiles, s);

  const int64_t positions = g.n * g.h_out * g.w_out;
  const T* grad_y = static_cast<const T*>(p.grad_y.ptr);
  // kThreads == 2 * kBN: every thread keeps one channel n = tid % kBN over rows tid / kBN + 2 k.
  static_assert(kThreads == 2 * kBN, "the epilogue's channel-per-thread mapping");
  const int n = threadIdx.x % kBN;
  const int64_t co = n0 + n;
  float sum_gz = 0.f, sum_g = 0.f;
  if (co < g.c_out) {
    const float scale = p.scale.ptr != nullptr ? load_vec(p.scale, co) : 1.f;
    const float shift = p.shift.ptr != nullptr ? load_vec(p.shift, co) : 0.f;
    for (int m = threadIdx.x / kBN; m < kBM; m += kThreads / kBN) {
      const int64_t pos = m0 + m;
      if (pos >= positions) break;
      const float zf = round_to<T>(s.c[m * kLdC + n]);  // z as the forward stored it
      float v = zf;
      if (p.scale.ptr != nullptr) v = v * scale;
      if (p.shift.ptr != nullptr) v = v + shift;
      const int64_t i = pos * g.c_out + co;
      float gv = to_float(grad_y[i]);
      if (p.post_relu && !(v > 0.f)) gv = 0.f;
      sum_gz = fmaf(gv, zf, sum_gz);
      sum_g += gv;
      grad_z[i] = from_float<T>(p.scale.ptr != nullptr ? gv * scale : gv);
    }
  }
  s.red[0][threadIdx.x] = sum_gz;
  s.red[1][threadIdx.x] = sum_g;
  __syncthreads();
  if (threadIdx.x < kBN && co < g.c_out) {
    part_scale[m_tile * g.c_out + co] = s.red[0][threadIdx.x] + s.red[0][threadIdx.x + kBN];
    part_shift[m_tile * g.c_out + co] = s.red[1][threadIdx.x] + s.red[1][threadIdx.x + kBN];
  }
}

// ---------------------------------------------------------------------------------------------------
// bn_backward_reduce: per-block partial sums of g and g * xhat.

// Block: 32 channels x 8 lanes over rows [blockIdx.x * rows_per_block, +rows_per_block). Partials:
// part_dy[blockIdx.x * C + c], part_dyx[...].
template <typename T>
__global__ void __launch_bounds__(kRedCols* kRedLanes)
    bn_backward_partial_kernel(const BnBackwardReduceParams p, int64_t rows_per_block, float* __restrict__ part_dy,
                               float* __restrict__ part_dyx) {
  __shared__ float lane_dy[kRedLanes][kRedCols];
  __shared__ float lane_dyx[kRedLanes][kRedCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kRedCols + tx;
  const int64_t rows = p.n * p.h * p.w;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < rows ? r_begin + rows_per_block : rows;
  const T* z = static_cast<const T*>(p.z.ptr);
  const T* grad_y = static_cast<const T*>(p.grad_y.ptr);
  float sum_dy = 0.f, sum_dyx = 0.f;
  if (c < p.c) {
    const float mean = p.mean[c];
    const float invstd = p.invstd[c];
    const bool has_w = p.bn_weight.ptr != nullptr, has_b = p.bn_bias.ptr != nullptr;
    const float w = has_w ? load_vec(p.bn_weight, c) : 1.f;
    const float b = has_b ? load_vec(p.bn_bias, c) : 0.f;
    for (int64_t r = r_begin + ty; r < r_end; r += kRedLanes) {
      const int64_t i = r * p.c + c;
      const float xhat = (to_float(z[i]) - mean) * invstd;
      float g = to_float(grad_y[i]);
      if (p.post_relu) {
        float y = xhat;
        if (has_w) y = y * w;
        if (has_b) y = y + b;
        if (!(y > 0.f)) g = 0.f;
      }
      sum_dy += g;
      sum_dyx = fmaf(g, xhat, sum_dyx);
    }
  }
  lane_dy[ty][tx] = sum_dy;
  lane_dyx[ty][tx] = sum_dyx;
  __syncthreads();
  if (ty == 0 && c < p.c) {
    float total_dy = 0.f, total_dyx = 0.f;
#pragma unroll
    for (int l = 0; l < kRedLanes; ++l) {
      total_dy += lane_dy[l][tx];
      total_dyx += lane_dyx[l][tx];
    }
    part_dy[static_cast<int64_t>(blockIdx.x) * p.c + c] = total_dy;
    part_dyx[static_cast<int64_t>(blockIdx.x) * p.c + c] = total_dyx;
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_z materialised (training): from grad_y, z and the per-channel vectors, once, in T.

template <typename T, int kV>
__global__ void __launch_bounds__(256)
    train_grad_z_kernel(const GradZ<T, true> grad_z, T* __restrict__ out, int64_t total) {
  using E = Elems<T, kV>;
  for (int64_t step = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; step < total / kV;
       step += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = step * kV, co = idx % grad_z.c_out;  // kV consecutive channels (c_out % kV == 0)
    const E gy = E::load(grad_z.grad_y + idx), zv = E::load(grad_z.z + idx);
    E r;
#pragma unroll
    for (int e = 0; e < kV; ++e) r.v[e] = from_float<T>(grad_z.from(to_float(gy.v[e]), to_float(zv.v[e]), co + e));
    r.store(out + idx);
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_d = grad_z @ pw: [P, Cout] x [Cout, C], rounded to T. The int64 fallback of the tiled GEMM
// (run_grad_d_tiled, sepconv_infer.cu).

constexpr int kLdGdA = kBK + kPad;  // A [kBM][kLdGdA]: grad_z (positions x Cout chunk), row-major
constexpr int kLdGdB = kBN + kPad;  // B [kBK][kLdGdB]: pw rows (Cout chunk x channels), row-major

template <typename T>
struct GradDSmem {
  alignas(128) T a[kBM * kLdGdA];
  alignas(128) T b[kBK * kLdGdB];
  alignas(128) float c[kBM * kLdC];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_d_kernel(const GradZ<T, false> grad_z, const T* __restrict__ pw, int64_t positions, int64_t c_in,
                  int64_t c_out, int64_t c_tiles, T* __restrict__ grad_d) {
  __shared__ GradDSmem<T> s;
  const int64_t tile = blockIdx.x;
  const int64_t m0 = (tile / c_tiles) * kBM;  // positions
  const int64_t n0 = (tile % c_tiles) * kBN;  // input channels
  BlockMma<T, /*A row-major*/ true, kLdGdA, /*B row-major*/ true, kLdGdB> mma;
  for (int64_t k0 = 0; k0 < c_out; k0 += kBK) {
    for (int idx = threadIdx.x; idx < kBM * kBK; idx += kThreads) {
      const int k = idx % kBK;  // along Cout: coalesced
      const int m = idx / kBK;
      const int64_t pos = m0 + m, co = k0 + k;
      const float v = (pos < positions && co < c_out) ? grad_z(pos, co) : 0.f;
      s.a[m * kLdGdA + k] = from_float<T>(v);
    }
    for (int idx = threadIdx.x; idx < kBK * kBN; idx += kThreads) {
      const int n = idx % kBN;  // along C: coalesced
      const int k = idx / kBN;
      const int64_t co = k0 + k, c = n0 + n;
      s.b[k * kLdGdB + n] = (co < c_out && c < c_in) ? pw[co * c_in + c] : from_float<T>(0.f);
    }
    __syncthreads();
    mma.run(s.a, s.b);
    __syncthreads();
  }
  mma.store(s.c);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN;
    const int n = idx % kBN;
    const int64_t pos = m0 + m, c = n0 + n;
    if (pos < positions && c < c_in) grad_d[pos * c_in + c] = from_float<T>(s.c[m * kLdC + n]);
  }
}

// ---------------------------------------------------------------------------------------------------
// grad_pw = grad_z^T @ d: [Cout, P] x [P, C], split over P, fp32 partials.

constexpr int kLdGp = kBN + kPad;  // both tiles [kBK][kLdGp]
static_assert(kBM == kBN, "grad_pw_kernel's tiles share one leading dimension");

template <typename T>
struct GradPwSmem {
  alignas(128) T a[kBK * kLdGp];  // grad_z chunk: A(m = co, k = pos) at a[k * kLdGp + m]: col-major
  alignas(128) T b[kBK * kLdGp];  // d chunk: B(k = pos, n = c) at b[k * kLdGp + n]: row-major
  alignas(128) float c[kBM * kLdC];
  RowTable<kBK> rows;
};

// Block (split, co tile, c tile) adds positions [split * chunks_per_split * kBK, ...) and writes
// partial[(split * Cout + co) * C + c].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_pw_kernel(const GradZ<T, false> grad_z, const ConvGeometry g, const T* __restrict__ x,
                   const T* __restrict__ dw, bool pre_relu, int64_t co_tiles, int64_t c_tiles,
                   int64_t chunks_per_split, float* __restrict__ partial) {
  __shared__ GradPwSmem<T> s;
  const int64_t positions = g.n * g.h_out * g.w_out;
  const int64_t tile = blockIdx.x;
  const int64_t c0 = (tile % c_tiles) * kBN;
  const int64_t co0 = ((tile / c_tiles) % co_tiles) * kBM;
  const int64_t split = tile / (c_tiles * co_tiles);
  const int64_t p_begin = split * chunks_per_split * kBK;
  const int64_t p_end_split = p_begin + chunks_per_split * kBK;
  const int64_t p_end = p_end_split < positions ? p_end_split : positions;
  BlockMma<T, /*A row-major*/ false, kLdGp, /*B row-major*/ true, kLdGp> mma;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kBK) {
    // Chunks never straddle two splits (p_end_split is a multiple of kBK), so the table's own
    // "p < positions" test is the only bound needed.
    fill_rows<kBK>(g, p0, s.rows);
    for (int idx = threadIdx.x; idx < kBK * kBM; idx += kThreads) {
      const int m = idx % kBM;  // along Cout: coalesced
      const int k = idx / kBM;
      const int64_t pos = p0 + k, co = co0 + m;
      const float v = (pos < positions && co < g.c_out) ? grad_z(pos, co) : 0.f;
      s.a[k * kLdGp + m] = from_float<T>(v);
    }
    __syncthreads();  // the row table
    depthwise_tile<T, kBK, kBN>(g, x, dw, pre_relu, c0, s.rows, s.b, kLdGp);
    __syncthreads();
    mma.run(s.a, s.b);
    __syncthreads();
  }
  mma.store(s.c);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN;
    const int n = idx % kBN;
    const int64_t co = co0 + m, c = c0 + n;
    if (co < g.c_out && c < g.c) partial[(split * g.c_out + co) * g.c + c] = s.c[m * kLdC + n];
  }
}

// ---------------------------------------------------------------------------------------------------
// Depthwise backward

// grad_x[n, hi, wi, c] = mask * sum over taps (i, j) with an output position (ho, wo):
//   hi = ho * sh - ph + i * dh, wi = wo * sw - pw + j * dw  =>  ho = (hi + ph - i * dh) / sh (exact).
template <typename T>
__global__ void __launch_bounds__(256)
    grad_x_kernel(const ConvGeometry g, const T* __restrict__ grad_d, const T* __restrict__ x,
                  const T* __restrict__ dw, bool pre_relu, T* __restrict__ grad_x, int64_t total) {
  const int64_t taps = g.kh * g.kw;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % g.c;
    const int64_t pix = idx / g.c;
    const int64_t wi = pix % g.w;
    const int64_t hi = (pix / g.w) % g.h;
    const int64_t n = pix / (g.w * g.h);
    float acc = 0.f;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t hn = hi + g.pad_h - i * g.dil_h;
      if (hn < 0 || hn % g.stride_h != 0) continue;
      const int64_t ho = hn / g.stride_h;
      if (ho >= g.h_out) continue;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t wn = wi + g.pad_w - j * g.dil_w;
        if (wn < 0 || wn % g.stride_w != 0) continue;
        const int64_t wo = wn / g.stride_w;
        if (wo >= g.w_out) continue;
        const float gd = to_float(grad_d[((n * g.h_out + ho) * g.w_out + wo) * g.c + c]);
        acc = fmaf(gd, to_float(dw[c * taps + i * g.kw + j]), acc);
      }
    }
    if (pre_relu && !(to_float(x[idx]) > 0.f)) acc = 0.f;
    grad_x[idx] = from_float<T>(acc);
  }
}

// Block (chunk, channel block, tap = blockIdx.z): 32 channels x 8 lanes over the chunk's positions.
// partial[chunk * (C * taps) + c * taps + tap] = sum over positions of grad_d * pre(x) at the tap.
template <typename T>
__global__ void __launch_bounds__(kRedCols* kRedLanes)
    grad_dw_partial_kernel(const ConvGeometry g, const T* __restrict__ grad_d, const T* __restrict__ x,
                           bool pre_relu, int64_t rows_per_chunk, float* __restrict__ partial) {
  __shared__ float lane_sum[kRedLanes][kRedCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kRedCols + tx;
  const int64_t tap = blockIdx.z;
  const int64_t taps = g.kh * g.kw;
  const int64_t dh = (tap / g.kw) * g.dil_h;
  const int64_t dwd = (tap % g.kw) * g.dil_w;
  const int64_t hw_out = g.h_out * g.w_out;
  const int64_t positions = g.n * hw_out;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.x) * rows_per_chunk;
  const int64_t p_end = p_begin + rows_per_chunk < positions ? p_begin + rows_per_chunk : positions;
  float acc = 0.f;
  if (c < g.c) {
    for (int64_t pos = p_begin + ty; pos < p_end; pos += kRedLanes) {
      const int64_t n = pos / hw_out;
      const int64_t rem = pos - n * hw_out;
      const int64_t ho = rem / g.w_out;
      const int64_t wo = rem - ho * g.w_out;
      const int64_t hi = ho * g.stride_h - g.pad_h + dh;
      const int64_t wi = wo * g.stride_w - g.pad_w + dwd;
      if (hi < 0 || hi >= g.h || wi < 0 || wi >= g.w) continue;
      float xv = to_float(x[((n * g.h + hi) * g.w + wi) * g.c + c]);
      if (pre_relu) xv = relu(xv);
      acc = fmaf(to_float(grad_d[pos * g.c + c]), xv, acc);
    }
  }
  lane_sum[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < g.c) {
    float total = 0.f;
#pragma unroll
    for (int l = 0; l < kRedLanes; ++l) total += lane_sum[l][tx];
    partial[static_cast<int64_t>(blockIdx.x) * (g.c * taps) + c * taps + tap] = total;
  }
}

// ---------------------------------------------------------------------------------------------------
// Plans: work split and workspace layout (geometry only, so workspace_size and the launcher agree)

// Rows per block of a reduction over `rows` rows into `cols` fp32 partials per block.
int64_t rows_per_chunk(int64_t rows, int64_t cols) {
  int64_t per = ceil_div(rows, kMaxRowChunks);
  if (per < kMinRowsPerChunk) per = kMinRowsPerChunk;
  const int64_t max_chunks = cols > 0 ? kMaxPartialBytes / (cols * 4) : kMaxRowChunks;
  if (max_chunks >= 1 && ceil_div(rows, per) > max_chunks) per = ceil_div(rows, max_chunks);
  return per;
}

struct BackwardPlan {
  int64_t positions = 0;                                // P = N * Ho * Wo
  int64_t m_tiles = 0, c_tiles = 0, co_tiles = 0;       // 64-wide tiles of P, C, Cout
  int64_t splits = 0, chunks_per_split = 0;             // grad_pw: kBK-position chunks per split
  int64_t dw_rows_per_chunk = 0, dw_chunks = 0;         // grad_dw partials
  void* grad_z = nullptr;                               // [P, Cout] in T
  float* part_scale = nullptr;                          // inference: [m_tiles, Cout]
  float* part_shift = nullptr;                          // inference: [m_tiles, Cout]
  float* affine = nullptr;                              // training: the BatchNorm weight, bias in fp32 [2][Cout]
  void* grad_d = nullptr;                               // [P, C] in T
  void* gemm = nullptr;                                 // the tiled grad_d GEMM's packed weights
  size_t gemm_bytes = 0;
  int gp_max_splits = 0;                                // the tiled grad_pw: partials it may write
  void* gp = nullptr;                                   // the tiled grad_pw's packed weights
  size_t gp_bytes = 0;
  int dx_max_splits = 0;                                // the tiled grad_x / grad_dw: partials it may write
  void* dx = nullptr;                                   // its packed weights
  size_t dx_bytes = 0;
  float* pw_partial = nullptr;                          // [splits, Cout, C]
  float* dw_partial = nullptr;                          // [dw_chunks, C, kh * kw]
};

BackwardPlan plan_backward(const ConvGeometry& g, bool inference, DType dtype, Workspace& ws) {
  const int64_t elem_size = dtype == DType::kFloat32 ? 4 : 2;
  BackwardPlan plan;
  plan.positions = g.n * g.h_out * g.w_out;
  plan.m_tiles = ceil_div(plan.positions, kBM);
  plan.c_tiles = ceil_div(g.c, kBN);
  plan.co_tiles = ceil_div(g.c_out, kBM);
  const int64_t k_chunks = ceil_div(plan.positions, kBK);
  const int64_t tiles = plan.co_tiles * plan.c_tiles;
  if (k_chunks > 0 && tiles > 0) {
    int64_t splits = ceil_div(kTargetBlocks, tiles);
    if (splits > k_chunks) splits = k_chunks;
    const int64_t max_splits = kMaxPartialBytes / (g.c_out * g.c * 4);
    if (splits > max_splits) splits = max_splits > 1 ? max_splits : 1;
    plan.chunks_per_split = ceil_div(k_chunks, splits);
    plan.splits = ceil_div(k_chunks, plan.chunks_per_split);
  }
  const int64_t taps = g.kh * g.kw;
  plan.dw_rows_per_chunk = rows_per_chunk(plan.positions, g.c * taps);
  plan.dw_chunks = ceil_div(plan.positions, plan.dw_rows_per_chunk);
  plan.grad_z = ws.take<char>(plan.positions * g.c_out * elem_size);
  if (inference) {
    plan.part_scale = ws.take<float>(plan.m_tiles * g.c_out);
    plan.part_shift = ws.take<float>(plan.m_tiles * g.c_out);
  } else {
    plan.affine = ws.take<float>(2 * g.c_out);
  }
  plan.grad_d = ws.take<char>(plan.positions * g.c * elem_size);
  plan.gemm_bytes = grad_d_tiled_workspace_size(g, dtype);
  plan.gemm = ws.take<char>(static_cast<int64_t>(plan.gemm_bytes));
  const int64_t pw_elems = g.c_out * g.c;
  // The tiled kernels' grids: kBK-channel chunks (x Cout passes of kGpN for grad_pw) per split.
  const int64_t chunks = ceil_div(std::max<int64_t>(g.c, 1), infer::kBK);
  const int64_t gp_units = chunks * ceil_div(g.c_out, infer::kGpN);
  const int gp_room = infer::gp_max_splits(static_cast<int>(std::min<int64_t>(gp_units, INT32_MAX)));
  plan.gp_max_splits = static_cast<int>(
      pw_elems > 0 ? std::min<int64_t>(gp_room, std::max<int64_t>(1, kMaxPartialBytes / (pw_elems * 4))) : 1);
  plan.pw_partial = ws.take<float>(std::max<int64_t>(plan.splits, plan.gp_max_splits) * pw_elems);
  plan.gp_bytes = grad_pw_tiled_workspace_size(g, dtype);
  plan.gp = ws.take<char>(static_cast<int64_t>(plan.gp_bytes));
  plan.dx_max_splits = infer::gp_max_splits(static_cast<int>(std::min<int64_t>(chunks, INT32_MAX)));
  const int64_t dw_rows = dw_backward_tiled_covers(g) ? std::max<int64_t>(plan.dw_chunks, plan.dx_max_splits)
                                                      : plan.dw_chunks;
  plan.dw_partial = ws.take<float>(dw_rows * g.c * taps);
  plan.dx_bytes = dw_backward_tiled_workspace_size(g, dtype);
  plan.dx = ws.take<char>(static_cast<int64_t>(plan.dx_bytes));
  return plan;
}

struct ReducePlan {
  int64_t rows = 0, rows_per_block = 0, blocks = 0;
  float* part_dy = nullptr;   // [blocks, C]
  float* part_dyx = nullptr;  // [blocks, C]
};

ReducePlan plan_reduce(const BnBackwardReduceParams& p, Workspace& ws) {
  ReducePlan plan;
  plan.rows = p.n * p.h * p.w;
  plan.rows_per_block = rows_per_chunk(plan.rows, 2 * p.c);
  plan.blocks = ceil_div(plan.rows, plan.rows_per_block);
  plan.part_dy = ws.take<float>(plan.blocks * p.c);
  plan.part_dyx = ws.take<float>(plan.blocks * p.c);
  return plan;
}

// ---------------------------------------------------------------------------------------------------
// Launchers

// The part both backward ops share, after grad_z is in its buffer: grad_d, grad_pw, grad_x, grad_dw.
template <typename T>
cudaError_t launch_conv_grads(const ConvGeometry& g, const BackwardPlan& plan, const T* x, const T* dw, const T* pw,
                              bool pre_relu, T* grad_x, T* grad_dw, T* grad_pw, DType dtype, cudaStream_t stream) {
  GradZ<T, false> grad_z;
  grad_z.c_out = g.c_out;
  grad_z.buffer = static_cast<const T*>(plan.grad_z);
  T* grad_d = static_cast<T*>(plan.grad_d);
  const int64_t taps = g.kh * g.kw;
  const int64_t d_blocks = plan.m_tiles * plan.c_tiles;
  const int64_t pw_blocks = plan.splits * plan.co_tiles * plan.c_tiles;
  const int64_t x_total = g.n * g.h * g.w * g.c;
  const int64_t c_blocks = ceil_div(g.c, kRedCols);
  if (!fits_grid_x(d_blocks) || !fits_grid_x(pw_blocks) || !fits_grid_x(plan.dw_chunks) || c_blocks > 65535 ||
      taps > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  // grad_d: the tiled GEMM (sepconv_infer.cu) first; it declines what it cannot index.
  GradDParams gd;
  gd.g = g;
  gd.dtype = dtype;
  gd.grad_z = plan.grad_z;
  gd.pw_weight = pw;
  gd.grad_d = grad_d;
  gd.workspace = plan.gemm;
  gd.workspace_bytes = plan.gemm_bytes;
  bool launched = false;
  cudaError_t err = run_grad_d_tiled(gd, stream, &launched);
  if (err != cudaSuccess) return err;
  if (!launched && d_blocks > 0) {
    grad_d_kernel<T><<<static_cast<unsigned int>(d_blocks), kThreads, 0, stream>>>(
        grad_z, pw, plan.positions, g.c, g.c_out, plan.c_tiles, grad_d);
  }
  // grad_pw: the tiled kernel (16-bit types, sepconv_infer.cu) first, else grad_pw_kernel.
  GradPwParams gp;
  gp.g = g;
  gp.dtype = dtype;
  gp.x = x;
  gp.dw_weight = dw;
  gp.pre_relu = pre_relu;
  gp.grad_z = plan.grad_z;
  gp.partial = plan.pw_partial;
  gp.max_splits = plan.gp_max_splits;
  gp.workspace = plan.gp;
  gp.workspace_bytes = plan.gp_bytes;
  int pw_splits = -1;
  err = run_grad_pw_tiled(gp, stream, &pw_splits);
  if (err != cudaSuccess) return err;
  if (pw_splits < 0) {
    pw_splits = static_cast<int>(plan.splits);
    if (pw_blocks > 0) {
      grad_pw_kernel<T><<<static_cast<unsigned int>(pw_blocks), kThreads, 0, stream>>>(
          grad_z, g, x, dw, pre_relu, plan.co_tiles, plan.c_tiles, plan.chunks_per_split, plan.pw_partial);
    }
  }
  err = launch_column_sum(plan.pw_partial, pw_splits, g.c_out * g.c, grad_pw, dtype, stream);
  if (err != cudaSuccess) return err;
  // grad_x and grad_dw: the tiled kernel (stride 1, 3x3) first, else the two kernels above.
  DwBackwardParams dx;
  dx.g = g;
  dx.dtype = dtype;
  dx.x = x;
  dx.dw_weight = dw;
  dx.pre_relu = pre_relu;
  dx.grad_d = grad_d;
  dx.grad_x = grad_x;
  dx.partial = plan.dw_partial;
  dx.max_splits = plan.dx_max_splits;
  dx.workspace = plan.dx;
  dx.workspace_bytes = plan.dx_bytes;
  int dw_splits = -1;
  err = run_dw_backward_tiled(dx, stream, &dw_splits);
  if (err != cudaSuccess) return err;
  if (dw_splits < 0) {
    dw_splits = static_cast<int>(plan.dw_chunks);
    if (x_total > 0) {
      grad_x_kernel<T><<<elementwise_blocks(x_total), 256, 0, stream>>>(g, grad_d, x, dw, pre_relu, grad_x,
                                                                        x_total);
    }
    if (plan.dw_chunks > 0 && c_blocks > 0) {
      const dim3 grid(static_cast<unsigned int>(plan.dw_chunks), static_cast<unsigned int>(c_blocks),
                      static_cast<unsigned int>(taps));
      grad_dw_partial_kernel<T><<<grid, dim3(kRedCols, kRedLanes), 0, stream>>>(g, grad_d, x, pre_relu,
                                                                                plan.dw_rows_per_chunk,
                                                                                plan.dw_partial);
    }
  }
  err = launch_column_sum(plan.dw_partial, dw_splits, g.c * taps, grad_dw, dtype, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_infer_backward(const SepConvInferBackwardParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  Workspace ws(p.workspace);
  const BackwardPlan plan = plan_backward(g, /*inference=*/true, p.dtype, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;
  T* grad_z_buffer = static_cast<T*>(plan.grad_z);

  const int64_t n_tiles = plan.co_tiles;
  const int64_t z_blocks = plan.m_tiles * n_tiles;
  if (!fits_grid_x(z_blocks)) return cudaErrorInvalidConfiguration;
  if (z_blocks > 0) {
    infer_grad_z_kernel<T><<<static_cast<unsigned int>(z_blocks), kThreads, 0, stream>>>(
        p, n_tiles, grad_z_buffer, plan.part_scale, plan.part_shift);
  }
  cudaError_t err = cudaSuccess;
  if (p.grad_scale.ptr != nullptr) {
    err = launch_column_sum(plan.part_scale, plan.m_tiles, g.c_out, p.grad_scale.ptr, p.grad_scale.dtype, stream);
    if (err != cudaSuccess) return err;
  }
  if (p.grad_shift.ptr != nullptr) {
    err = launch_column_sum(plan.part_shift, plan.m_tiles, g.c_out, p.grad_shift.ptr, p.grad_shift.dtype, stream);
    if (err != cudaSuccess) return err;
  }

  return launch_conv_grads<T>(g, plan, static_cast<const T*>(p.x.ptr),
                                     static_cast<const T*>(p.dw_weight), static_cast<const T*>(p.pw_weight),
                                     p.pre_relu, static_cast<T*>(p.grad_x.ptr), static_cast<T*>(p.grad_dw_weight),
                                     static_cast<T*>(p.grad_pw_weight), p.dtype, stream);
}

template <typename T>
cudaError_t launch_train_backward(const SepConvTrainBackwardParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  Workspace ws(p.workspace);
  const BackwardPlan plan = plan_backward(g, /*inference=*/false, p.dtype, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;

  GradZ<T, true> grad_z;
  grad_z.c_out = g.c_out;
  grad_z.grad_y = static_cast<const T*>(p.grad_y.ptr);
  grad_z.z = static_cast<const T*>(p.z.ptr);
  grad_z.mean = p.mean;
  grad_z.invstd = p.invstd;
  grad_z.weight = plan.affine;
  grad_z.bias = plan.affine + g.c_out;
  if (g.c_out > 0) {
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_weight, 1.f, g.c_out, plan.affine);
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_bias, -0.f, g.c_out,
                                                                         plan.affine + g.c_out);
  }
  grad_z.mean_dy = p.mean_dy;
  grad_z.mean_dy_xhat = p.mean_dy_xhat;
  grad_z.post_relu = p.post_relu;
  const int64_t z_total = plan.positions * g.c_out;
  if (z_total > 0) {
    constexpr int kV = 16 / sizeof(T);
    T* out = static_cast<T*>(plan.grad_z);
    if (vector_path<T>(g.c_out, {grad_z.grad_y, grad_z.z, out})) {
      train_grad_z_kernel<T, kV><<<elementwise_blocks(z_total / kV), 256, 0, stream>>>(grad_z, out, z_total);
    } else {
      train_grad_z_kernel<T, 1><<<elementwise_blocks(z_total), 256, 0, stream>>>(grad_z, out, z_total);
    }
  }
  return launch_conv_grads<T>(g, plan, static_cast<const T*>(p.x.ptr),
                                    static_cast<const T*>(p.dw_weight), static_cast<const T*>(p.pw_weight),
                                    p.pre_relu, static_cast<T*>(p.grad_x.ptr), static_cast<T*>(p.grad_dw_weight),
                                    static_cast<T*>(p.grad_pw_weight), p.dtype, stream);
}

template <typename T>
cudaError_t launch_bn_backward_reduce(const BnBackwardReduceParams& p, cudaStream_t stream) {
  Workspace ws(p.workspace);
  const ReducePlan plan = plan_reduce(p, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;
  if (p.c == 0) return cudaSuccess;
  const int64_t c_blocks = ceil_div(p.c, kRedCols);
  if (!fits_grid_x(plan.blocks) || c_blocks > 65535) return cudaErrorInvalidConfiguration;
  if (plan.blocks > 0) {
    const dim3 grid(static_cast<unsigned int>(plan.blocks), static_cast<unsigned int>(c_blocks));
    bn_backward_partial_kernel<T><<<grid, dim3(kRedCols, kRedLanes), 0, stream>>>(p, plan.rows_per_block,
                                                                                  plan.part_dy, plan.part_dyx);
  }
  cudaError_t err = launch_column_sum(plan.part_dy, plan.blocks, p.c, p.sum_dy, DType::kFloat32, stream);
  if (err != cudaSuccess) return err;
  return launch_column_sum(plan.part_dyx, plan.blocks, p.c, p.sum_dy_xhat, DType::kFloat32, stream);
}

bool unit_layouts_ok(const ConvGeometry& g, const Tensor4& x, const Tensor4& grad_y, const Tensor4& grad_x) {
  return is_nhwc(x, g.n, g.c, g.h, g.w) && is_nhwc(grad_x, g.n, g.c, g.h, g.w) &&
         is_nhwc(grad_y, g.n, g.c_out, g.h_out, g.w_out);
}

}  // namespace

size_t workspace_size(const SepConvInferBackwardParams& params) {
  Workspace ws(nullptr);
  plan_backward(params.g, /*inference=*/true, params.dtype, ws);
  return ws.bytes();
}

size_t workspace_size(const BnBackwardReduceParams& params) {
  Workspace ws(nullptr);
  plan_reduce(params, ws);
  return ws.bytes();
}

size_t workspace_size(const SepConvTrainBackwardParams& params) {
  Workspace ws(nullptr);
  plan_backward(params.g, /*inference=*/false, params.dtype, ws);
  return ws.bytes();
}

cudaError_t run_sepconv_bn_infer_backward(const SepConvInferBackwardParams& p, cudaStream_t stream) {
  if (!unit_layouts_ok(p.g, p.x, p.grad_y, p.grad_x)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_infer_backward<T>(p, stream); });
}

cudaError_t run_bn_backward_reduce(const BnBackwardReduceParams& p, cudaStream_t stream) {
  if (!is_nhwc(p.z, p.n, p.c, p.h, p.w) || !is_nhwc(p.grad_y, p.n, p.c, p.h, p.w)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_bn_backward_reduce<T>(p, stream); });
}

cudaError_t run_sepconv_bn_train_backward(const SepConvTrainBackwardParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  if (!unit_layouts_ok(g, p.x, p.grad_y, p.grad_x) || !is_nhwc(p.z, g.n, g.c_out, g.h_out, g.w_out)) {
    return cudaErrorInvalidValue;
  }
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_train_backward<T>(p, stream); });
}

}  // namespace xception_fast
