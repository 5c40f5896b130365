// Backward kernels of the xception_fast CUDA provider and their launchers: the backward ops' first launch
// (run_sepconv_bn_{infer,train}_backward_grad_z: grad_z and d), their second (..._backward_dw: grad_x and
// grad_dw from grad_d), and run_bn_backward_reduce. Between the two, the host (xception_fast_ops.cpp)
// runs the two pointwise products on cuBLAS: grad_d = grad_z pw and grad_pw = grad_z^T d.
//
// STATUS: compiled for sm_80 and sm_90a with nvcc 13.0. The kernels before the cuBLAS change passed
// the GPU conformance run; the d store and the three-step split have NOT YET RUN ON A GPU
// (tests/test_providers.py and `python -m xception_fast verify --full` are the check, on a GPU).
//
// Notation: P = N * Ho * Wo output positions, grad_z [P, Cout] the gradient of the pointwise output,
// d [P, C] the depthwise output, grad_d [P, C] its gradient; all three in T, in the host's buffers
// (BackwardIntermediates). No atomics anywhere: every reduction writes per-block partials that a
// second kernel (column_sum_kernel, sepconv_device.cuh) adds up in a fixed order, so results are
// bitwise reproducible (cuBLAS with a fixed algorithm is too, on one GPU and library version).
//
// Kernels, in launch order:
// - infer_grad_z_kernel<T> (inference backward only): z is not saved, so the fused forward main loop
//   recomputes it (sepconv_device.cuh), and the epilogue forms g = grad_y masked by the post-ReLU of
//   z * scale + shift, writes grad_z = g * scale rounded to T and per-tile partial sums of g * z and g
//   (grad_scale, grad_shift).
// - train_grad_z_kernel<T> (training backward): grad_z = (g - mean_dy - xhat * mean_dy_xhat) * invstd * w,
//   g = grad_y masked by the post-ReLU recomputed from z, rounded to T as the unfused path stores it.
// - bn_backward_partial_kernel<T> (bn_backward_reduce): per row block and channel, sum of g and of
//   g * xhat, g = grad_y masked by the post-ReLU recomputed from z; then column sums.
// - d = dw(pre(x)) rounded to T as the forward stores it: d_store_kernel (sepconv_tiled_backward.cuh,
//   the tiled forward's depthwise phase, x read once) where it covers the unit; otherwise
//   d_store_fallback_kernel<T> below (one element per thread).
// - grad_x and grad_dw: stride 1, 3x3: dw_backward_tiled_kernel (sepconv_tiled_backward.cuh: grad_d's
//   halo staged once per tile and chunk, both gradients from one gather per element-tap); otherwise
//   grad_x_kernel<T> (the transposed depthwise conv of grad_d, a gather over the taps whose output
//   position exists) and grad_dw_partial_kernel<T> (per chunk of positions, grid.z = the tap). grad_x
//   is zeroed where x <= 0 when pre_relu and rounded to T; grad_dw's partials are summed in order.

#include <algorithm>
#include <cstdint>

#include "sepconv_device.cuh"
#include "sepconv_infer.h"
#include "sepconv_params.h"

namespace xception_fast {

namespace {

// Work sizes of the reductions over positions: enough blocks to fill a GPU, partial buffers bounded.
constexpr int64_t kMinRowsPerChunk = 256;                // grad_dw and bn_backward_reduce row blocks
constexpr int64_t kMaxRowChunks = 1024;
constexpr int64_t kMaxPartialBytes = int64_t{256} << 20;  // per partial buffer

// ---------------------------------------------------------------------------------------------------
// grad_z (training): from grad_y, z and the per-channel vectors

// The per-channel inputs of the training grad_z, all fp32 [Cout].
struct GradZChannels {
  const float* mean = nullptr;
  const float* invstd = nullptr;
  const float* weight = nullptr;  // 1 where the BatchNorm has no weight
  const float* bias = nullptr;    // -0 where it has no bias
  const float* mean_dy = nullptr;
  const float* mean_dy_xhat = nullptr;
};

// grad_z of one element from grad_y = gy, z = zf and its channel's values, rounded to T.
template <typename T>
__device__ __forceinline__ float train_grad_z(float gy, float zf, float mean, float inv, float w, float b, float mdy,
                                              float mdyx, bool post_relu) {
  const float xhat = (zf - mean) * inv;
  float g = gy;
  const float gain = inv * w;  // * 1 is exact
  if (post_relu && !(xhat * w + b > 0.f)) g = 0.f;
  return round_to<T>((g - mdy - xhat * mdyx) * gain);
}

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
// grad_z materialised (training): from grad_y, z and the per-channel vectors, once, in T. kV consecutive
// channels per step (c_out % kV == 0); the six per-channel vectors as 16-byte loads where kV allows;
// the post-ReLU a template flag (each instance's loop holds only its own arithmetic).

template <typename T, int kV, bool kPostRelu>
__global__ void __launch_bounds__(256)
    train_grad_z_kernel(const T* __restrict__ grad_y, const T* __restrict__ z, const GradZChannels ch, int64_t c_out,
                        T* __restrict__ out, int64_t total) {
  using E = Elems<T, kV>;
  for (int64_t step = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; step < total / kV;
       step += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = step * kV, co = idx % c_out;
    const E gy = E::load(grad_y + idx), zv = E::load(z + idx);
    float mean[kV], inv[kV], w[kV], b[kV], mdy[kV], mdyx[kV];
    load_channels<kV>(ch.mean, co, mean);
    load_channels<kV>(ch.invstd, co, inv);
    load_channels<kV>(ch.weight, co, w);
    load_channels<kV>(ch.bias, co, b);
    load_channels<kV>(ch.mean_dy, co, mdy);
    load_channels<kV>(ch.mean_dy_xhat, co, mdyx);
    E r;
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      r.v[e] = from_float<T>(train_grad_z<T>(to_float(gy.v[e]), to_float(zv.v[e]), mean[e], inv[e], w[e], b[e],
                                             mdy[e], mdyx[e], kPostRelu));
    }
    r.store(out + idx);
  }
}

// ---------------------------------------------------------------------------------------------------
// d = dw(pre(x)) [P, C] in T: the int64 fallback of the tiled d store (sepconv_tiled_backward.cuh), for
// what it declines (offsets past int32, a halo box larger than shared memory). One element per thread
// and step, along C (coalesced): the taps in row-major order with one fma each, as the tiled kernels
// and depthwise_tile accumulate, rounded to T once.
template <typename T>
__global__ void __launch_bounds__(256)
    d_store_fallback_kernel(const ConvGeometry g, const T* __restrict__ x, const T* __restrict__ dw, bool pre_relu,
                            T* __restrict__ d, int64_t total) {
  const int64_t taps = g.kh * g.kw;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % g.c, pos = idx / g.c;
    const int64_t wo = pos % g.w_out, ho = (pos / g.w_out) % g.h_out, n = pos / (g.w_out * g.h_out);
    const T* x_img = x + n * g.h * g.w * g.c;
    float acc = 0.f;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t hi = ho * g.stride_h - g.pad_h + i * g.dil_h;
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t wi = wo * g.stride_w - g.pad_w + j * g.dil_w;
        if (hi < 0 || hi >= g.h || wi < 0 || wi >= g.w) continue;  // zero padding: adds nothing
        float v = to_float(x_img[(hi * g.w + wi) * g.c + c]);
        if (pre_relu) v = relu(v);
        acc = fmaf(v, to_float(dw[c * taps + i * g.kw + j]), acc);
      }
    }
    d[idx] = from_float<T>(acc);
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
  int64_t m_tiles = 0, co_tiles = 0;                    // 64-wide tiles of P and Cout (infer_grad_z_kernel)
  int64_t dw_rows_per_chunk = 0, dw_chunks = 0;         // grad_dw partials (the int64 kernels)
  float* part_scale = nullptr;                          // inference: [m_tiles, Cout]
  float* part_shift = nullptr;                          // inference: [m_tiles, Cout]
  float* affine = nullptr;                              // training: the BatchNorm weight, bias in fp32 [2][Cout]
  void* ds = nullptr;                                   // the tiled d store's packed weights
  size_t ds_bytes = 0;
  int dx_max_splits = 0;                                // the tiled grad_x / grad_dw: partials it may write
  void* dx = nullptr;                                   // its packed weights
  size_t dx_bytes = 0;
  float* dw_partial = nullptr;                          // [max(dw_chunks, dx_max_splits), C, kh * kw]
};

BackwardPlan plan_backward(const ConvGeometry& g, bool inference, DType dtype, Workspace& ws) {
  BackwardPlan plan;
  plan.positions = g.n * g.h_out * g.w_out;
  plan.m_tiles = ceil_div(plan.positions, kBM);
  plan.co_tiles = ceil_div(g.c_out, kBM);
  const int64_t taps = g.kh * g.kw;
  plan.dw_rows_per_chunk = rows_per_chunk(plan.positions, g.c * taps);
  plan.dw_chunks = ceil_div(plan.positions, plan.dw_rows_per_chunk);
  if (inference) {
    plan.part_scale = ws.take<float>(plan.m_tiles * g.c_out);
    plan.part_shift = ws.take<float>(plan.m_tiles * g.c_out);
  } else {
    plan.affine = ws.take<float>(2 * g.c_out);
  }
  plan.ds_bytes = d_store_tiled_workspace_size(g, dtype);
  plan.ds = ws.take<char>(static_cast<int64_t>(plan.ds_bytes));
  const int64_t chunks = ceil_div(std::max<int64_t>(g.c, 1), infer::kBK);
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

// d = dw(pre(x)) into mid.d: the tiled d store first; it declines what it cannot index or stage.
template <typename T>
cudaError_t launch_d_store(const UnitParams& u, void* d, void* ds_workspace, size_t ds_bytes, cudaStream_t stream) {
  const ConvGeometry& g = u.g;
  DStoreParams ds;
  ds.g = g;
  ds.dtype = u.dtype;
  ds.x = u.x.ptr;
  ds.dw_weight = u.dw_weight;
  ds.pre_relu = u.pre_relu;
  ds.d = d;
  ds.workspace = ds_workspace;
  ds.workspace_bytes = ds_bytes;
  bool launched = false;
  cudaError_t err = run_d_store_tiled(ds, stream, &launched);
  if (err != cudaSuccess || launched) return err;
  const int64_t total = g.n * g.h_out * g.w_out * g.c;
  if (total > 0) {
    d_store_fallback_kernel<T><<<elementwise_blocks(total), 256, 0, stream>>>(
        g, static_cast<const T*>(u.x.ptr), static_cast<const T*>(u.dw_weight), u.pre_relu, static_cast<T*>(d), total);
  }
  return cudaGetLastError();
}

// The second launch of both backward ops, after the host's products wrote grad_d: grad_x and grad_dw.
template <typename T>
cudaError_t launch_dw_grads(const UnitParams& u, const BackwardPlan& plan, const T* grad_d, T* grad_x, T* grad_dw,
                            cudaStream_t stream) {
  const ConvGeometry& g = u.g;
  const T* x = static_cast<const T*>(u.x.ptr);
  const T* dw = static_cast<const T*>(u.dw_weight);
  const int64_t taps = g.kh * g.kw;
  const int64_t x_total = g.n * g.h * g.w * g.c;
  const int64_t c_blocks = ceil_div(g.c, kRedCols);
  if (!fits_grid_x(plan.dw_chunks) || c_blocks > 65535 || taps > 65535) return cudaErrorInvalidConfiguration;
  // The tiled kernel (stride 1, 3x3) first, else the two int64 kernels.
  DwBackwardParams dx;
  dx.g = g;
  dx.dtype = u.dtype;
  dx.x = x;
  dx.dw_weight = dw;
  dx.pre_relu = u.pre_relu;
  dx.grad_d = grad_d;
  dx.grad_x = grad_x;
  dx.partial = plan.dw_partial;
  dx.max_splits = plan.dx_max_splits;
  dx.workspace = plan.dx;
  dx.workspace_bytes = plan.dx_bytes;
  int dw_splits = -1;
  cudaError_t err = run_dw_backward_tiled(dx, stream, &dw_splits);
  if (err != cudaSuccess) return err;
  if (dw_splits < 0) {
    dw_splits = static_cast<int>(plan.dw_chunks);
    if (x_total > 0) {
      grad_x_kernel<T><<<elementwise_blocks(x_total), 256, 0, stream>>>(g, grad_d, x, dw, u.pre_relu, grad_x,
                                                                        x_total);
    }
    if (plan.dw_chunks > 0 && c_blocks > 0) {
      const dim3 grid(static_cast<unsigned int>(plan.dw_chunks), static_cast<unsigned int>(c_blocks),
                      static_cast<unsigned int>(taps));
      grad_dw_partial_kernel<T><<<grid, dim3(kRedCols, kRedLanes), 0, stream>>>(g, grad_d, x, u.pre_relu,
                                                                                plan.dw_rows_per_chunk,
                                                                                plan.dw_partial);
    }
  }
  err = launch_column_sum(plan.dw_partial, dw_splits, g.c * taps, grad_dw, u.dtype, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_infer_backward_grad_z(const SepConvInferBackwardParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  Workspace ws(p.workspace);
  const BackwardPlan plan = plan_backward(g, /*inference=*/true, p.dtype, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;

  const int64_t z_blocks = plan.m_tiles * plan.co_tiles;
  if (!fits_grid_x(z_blocks)) return cudaErrorInvalidConfiguration;
  if (z_blocks > 0) {
    infer_grad_z_kernel<T><<<static_cast<unsigned int>(z_blocks), kThreads, 0, stream>>>(
        p, plan.co_tiles, static_cast<T*>(p.mid.grad_z), plan.part_scale, plan.part_shift);
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
  return launch_d_store<T>(p, p.mid.d, plan.ds, plan.ds_bytes, stream);
}

template <typename T>
cudaError_t launch_train_backward_grad_z(const SepConvTrainBackwardParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  Workspace ws(p.workspace);
  const BackwardPlan plan = plan_backward(g, /*inference=*/false, p.dtype, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;

  GradZChannels ch;
  ch.mean = p.mean;
  ch.invstd = p.invstd;
  ch.weight = plan.affine;
  ch.bias = plan.affine + g.c_out;
  ch.mean_dy = p.mean_dy;
  ch.mean_dy_xhat = p.mean_dy_xhat;
  if (g.c_out > 0) {
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_weight, 1.f, g.c_out, plan.affine);
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_bias, -0.f, g.c_out,
                                                                         plan.affine + g.c_out);
  }
  const int64_t z_total = plan.positions * g.c_out;
  if (z_total > 0) {
    constexpr int kV = 16 / sizeof(T);
    const T* grad_y = static_cast<const T*>(p.grad_y.ptr);
    const T* z = static_cast<const T*>(p.z.ptr);
    T* out = static_cast<T*>(p.mid.grad_z);
    // The per-channel vectors too: 16-byte loads need them aligned (bias at c_out floats, a multiple
    // of the vector on this path).
    const bool vectors = vector_path<T>(g.c_out, {grad_y, z, out, ch.mean, ch.invstd, ch.weight, ch.bias, ch.mean_dy,
                                                  ch.mean_dy_xhat});
    // The post-ReLU as a template flag: each loop holds only its own arithmetic.
    const auto launch = [&](auto kernel, int64_t steps) {
      kernel<<<elementwise_blocks(steps), 256, 0, stream>>>(grad_y, z, ch, g.c_out, out, z_total);
    };
    if (vectors && p.post_relu) {
      launch(train_grad_z_kernel<T, kV, true>, z_total / kV);
    } else if (vectors) {
      launch(train_grad_z_kernel<T, kV, false>, z_total / kV);
    } else if (p.post_relu) {
      launch(train_grad_z_kernel<T, 1, true>, z_total);
    } else {
      launch(train_grad_z_kernel<T, 1, false>, z_total);
    }
  }
  return launch_d_store<T>(p, p.mid.d, plan.ds, plan.ds_bytes, stream);
}

template <typename T, typename Params>
cudaError_t launch_backward_dw(const Params& p, bool inference, cudaStream_t stream) {
  Workspace ws(p.workspace);
  const BackwardPlan plan = plan_backward(p.g, inference, p.dtype, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;
  return launch_dw_grads<T>(p, plan, static_cast<const T*>(p.mid.grad_d), static_cast<T*>(p.grad_x.ptr),
                            static_cast<T*>(p.grad_dw_weight), stream);
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

bool train_layouts_ok(const SepConvTrainBackwardParams& p) {
  const ConvGeometry& g = p.g;
  return unit_layouts_ok(g, p.x, p.grad_y, p.grad_x) && is_nhwc(p.z, g.n, g.c_out, g.h_out, g.w_out);
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

cudaError_t run_d_store(const UnitParams& u, void* d, void* ds, size_t ds_bytes, cudaStream_t stream) {
  return XF_DTYPE_SWITCH(u.dtype, T, [&] { return launch_d_store<T>(u, d, ds, ds_bytes, stream); });
}

cudaError_t run_sepconv_bn_infer_backward_grad_z(const SepConvInferBackwardParams& p, cudaStream_t stream) {
  if (!unit_layouts_ok(p.g, p.x, p.grad_y, p.grad_x)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_infer_backward_grad_z<T>(p, stream); });
}

cudaError_t run_sepconv_bn_infer_backward_dw(const SepConvInferBackwardParams& p, cudaStream_t stream) {
  if (!unit_layouts_ok(p.g, p.x, p.grad_y, p.grad_x)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_backward_dw<T>(p, /*inference=*/true, stream); });
}

cudaError_t run_bn_backward_reduce(const BnBackwardReduceParams& p, cudaStream_t stream) {
  if (!is_nhwc(p.z, p.n, p.c, p.h, p.w) || !is_nhwc(p.grad_y, p.n, p.c, p.h, p.w)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_bn_backward_reduce<T>(p, stream); });
}

cudaError_t run_sepconv_bn_train_backward_grad_z(const SepConvTrainBackwardParams& p, cudaStream_t stream) {
  if (!train_layouts_ok(p)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_train_backward_grad_z<T>(p, stream); });
}

cudaError_t run_sepconv_bn_train_backward_dw(const SepConvTrainBackwardParams& p, cudaStream_t stream) {
  if (!train_layouts_ok(p)) return cudaErrorInvalidValue;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_backward_dw<T>(p, /*inference=*/false, stream); });
}

}  // namespace xception_fast
