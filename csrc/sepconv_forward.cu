// Forward kernels of the xception_fast CUDA provider (inference and training) and the launchers
// run_sepconv_bn_infer / run_sepconv_bn_train.
//
// STATUS: compiled for sm_80 and sm_90a with nvcc 13.0; NOT YET RUN ON A GPU. Nothing here has been
// checked numerically: tests/test_providers.py and `python -m xception_fast verify --full` are the
// check, on a GPU; `auto` runs this provider only on a device where its self-check has passed.
//
// Design (sepconv_device.cuh holds the shared pieces):
// - Inference runs the tiled kernel of sepconv_infer.cu; sepconv_infer_kernel<T> below is its
//   int64 fallback for what that kernel declines (a d tile too large for shared memory, offsets past
//   int32): one block per (64 output positions) x (64 output channels) tile, 128
//   threads. For each chunk of 32 input channels: the depthwise result (pre-ReLU, fp32 accumulation,
//   rounded to T as the unfused depthwise conv stores it) for 64 positions x 32 channels goes to
//   shared memory as the A tile, the pointwise weight tile (32 x 64) as the B tile, and the block
//   multiplies them (fp16/bf16: tensor cores via nvcuda::wmma, fp32 accumulators; fp32: FMA on CUDA
//   cores). The epilogue goes through shared memory: z rounded to T, * scale + shift (each optional,
//   fp32), rounded to T, post-ReLU, + residual (in T, after the ReLU), coalesced stores along Cout.
//   The depthwise output never touches device memory; it is recomputed once per 64-channel output
//   tile (Cout / 64 times in all), which costs CUDA-core FLOPs but no memory traffic.
// - Training: z and the batch statistics come from the tiled kernel (run_sepconv_bn_train_tiled in
//   sepconv_infer.cu: z stored from the accumulators, per-tile moments (pivot, mu, M2) merged per
//   channel by bn_stats_merge_kernel's passes, sepconv_device.cuh). sepconv_train_kernel<T> below is its int64
//   fallback, on the old main loop: its epilogue stores z (rounded to T) and per-block moments of the
//   rounded z with the block's first z as pivot, merged by the same kernel. bn_apply_kernel<T> then
//   computes y = post(((z - mean) * invstd) * w + b) + residual.
// - Deterministic: no atomics; every reduction has a fixed order.
// - Grid: a 1-D grid of m_tiles * n_tiles blocks, the n tiles of one m tile adjacent (they read the
//   same input rows, which then come from L2).
//
// Not verified yet (check first on the GPU): the wmma fragment layouts (col-major B here), the
// bank-conflict-free-ness and speed of anything, and the statistics merge's numerics.

#include <cstdint>

#include "sepconv_device.cuh"
#include "sepconv_infer.h"
#include "sepconv_params.h"

namespace xception_fast {

namespace {

// ---------------------------------------------------------------------------------------------------
// Inference

template <typename T>
__global__ void __launch_bounds__(kThreads) sepconv_infer_kernel(const SepConvInferParams p, int64_t n_tiles) {
  __shared__ ForwardSmem<T> s;
  const ConvGeometry& g = p.g;
  [[maybe_unused]] const auto [m_tile, m0, n0] = run_forward_tile<T>(p, n_tiles, s);

  const int64_t positions = g.n * g.h_out * g.w_out;
  const T* residual = static_cast<const T*>(p.residual.ptr);
  T* y = static_cast<T*>(p.y.ptr);
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN;
    const int n = idx % kBN;  // consecutive threads: consecutive channels of one position
    const int64_t pos = m0 + m;
    const int64_t co = n0 + n;
    if (pos >= positions || co >= g.c_out) continue;
    float v = round_to<T>(s.c[m * kLdC + n]);  // z as the unfused pointwise conv stores it
    if (p.scale.ptr != nullptr) v = v * load_vec(p.scale, co);
    if (p.shift.ptr != nullptr) v = v + load_vec(p.shift, co);
    v = round_to<T>(v);
    if (p.post_relu) v = relu(v);
    const int64_t out = pos * g.c_out + co;
    if (residual != nullptr) v = v + to_float(residual[out]);  // added in T: rounded once, below
    y[out] = from_float<T>(v);
  }
}

// ---------------------------------------------------------------------------------------------------
// Training: main loop + statistics epilogue, merge, normalisation

// Partial statistics layout: partial[(m_tile * 3 + k) * Cout + co], k = 0: pivot, 1: mu, 2: M2.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sepconv_train_kernel(const SepConvTrainParams p, int64_t n_tiles, float* __restrict__ partial) {
  __shared__ ForwardSmem<T> s;
  const ConvGeometry& g = p.g;
  const auto [m_tile, m0, n0] = run_forward_tile<T>(p, n_tiles, s);

  const int64_t positions = g.n * g.h_out * g.w_out;
  T* z = static_cast<T*>(p.z.ptr);
  // z rounded to T: stored, and kept in s.c for the statistics (which are those of the stored z).
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kThreads) {
    const int m = idx / kBN;
    const int n = idx % kBN;
    const int64_t pos = m0 + m;
    const int64_t co = n0 + n;
    const float v = round_to<T>(s.c[m * kLdC + n]);
    s.c[m * kLdC + n] = v;
    if (pos < positions && co < g.c_out) z[pos * g.c_out + co] = from_float<T>(v);
  }
  __syncthreads();

  // One thread per channel of the tile, two passes over the tile's valid rows (row 0 always is).
  const int rows = static_cast<int>(positions - m0 < kBM ? positions - m0 : kBM);
  const int n = threadIdx.x;
  const int64_t co = n0 + n;
  if (n < kBN && co < g.c_out) {
    const float pivot = s.c[n];
    float sum = 0.f;
    for (int m = 0; m < rows; ++m) sum += s.c[m * kLdC + n] - pivot;
    const float mu = sum / static_cast<float>(rows);
    float m2 = 0.f;
    for (int m = 0; m < rows; ++m) {
      const float d = (s.c[m * kLdC + n] - pivot) - mu;
      m2 = fmaf(d, d, m2);
    }
    partial[(m_tile * 3 + 0) * g.c_out + co] = pivot;
    partial[(m_tile * 3 + 1) * g.c_out + co] = mu;
    partial[(m_tile * 3 + 2) * g.c_out + co] = m2;
  }
}

// y = post(((z - mean) * invstd) * w + b) + residual, kV elements (consecutive channels) per step:
// 16-byte vectors where vector_path allows (the per-channel vectors then as 16-byte loads too), else
// one element.
template <typename T, int kV>
__global__ void __launch_bounds__(256)
    bn_apply_kernel(const SepConvTrainParams p, const float* __restrict__ invstd, const float* __restrict__ weight,
                    const float* __restrict__ bias, int64_t total) {
  using E = Elems<T, kV>;
  const int64_t c_out = p.g.c_out;
  const T* z = static_cast<const T*>(p.z.ptr);
  const T* residual = static_cast<const T*>(p.residual.ptr);
  T* y = static_cast<T*>(p.y.ptr);
  for (int64_t step = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; step < total / kV;
       step += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = step * kV, co = idx % c_out;  // co + kV - 1 < c_out: c_out % kV == 0
    const E zv = E::load(z + idx);
    E rv, out;
    if (residual != nullptr) rv = E::load(residual + idx);
    float mean[kV], inv[kV], w[kV], b[kV];
    load_channels<kV>(p.mean, co, mean);
    load_channels<kV>(invstd, co, inv);
    load_channels<kV>(weight, co, w);
    load_channels<kV>(bias, co, b);
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      float v = (to_float(zv.v[e]) - mean[e]) * inv[e];
      v = v * w[e];  // 1 where there is no weight, -0 where there is no bias: exact
      v = v + b[e];
      v = round_to<T>(v);
      if (p.post_relu) v = relu(v);
      if (residual != nullptr) v = v + to_float(rv.v[e]);
      out.v[e] = from_float<T>(v);
    }
    out.store(y + idx);
  }
}

// ---------------------------------------------------------------------------------------------------
// Launchers

int64_t positions_out(const ConvGeometry& g) { return g.n * g.h_out * g.w_out; }

// The int64 training path's workspace: invstd first, as the tiled path's (run_sepconv_bn_train_tiled).
struct TrainPlan {
  int64_t m_tiles, n_tiles;
  float* invstd;   // [Cout]
  float* affine;   // [2][Cout]: the BatchNorm weight and bias in fp32 (vec_to_float_kernel)
  float* partial;  // [m_tiles][3][Cout]
  MergeScratch merge;  // the merge passes' partials (take_merge_scratch)
};

TrainPlan plan_train(const ConvGeometry& g, Workspace& ws) {
  TrainPlan plan;
  plan.invstd = ws.take<float>(g.c_out);
  plan.affine = ws.take<float>(2 * g.c_out);
  plan.m_tiles = ceil_div(positions_out(g), kBM);
  plan.n_tiles = ceil_div(g.c_out, kBN);
  plan.partial = ws.take<float>(plan.m_tiles * 3 * g.c_out);
  plan.merge = take_merge_scratch(ws, plan.m_tiles, g.c_out);
  return plan;
}

// Positions of the int64 path's tile t (kBM rows, the last one partial), for the merge kernel.
struct FixedCounts {
  int64_t positions;
  __device__ int64_t operator()(int64_t t) const { return positions - t * kBM < kBM ? positions - t * kBM : kBM; }
};

template <typename T>
cudaError_t launch_infer(const SepConvInferParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  const int64_t m_tiles = ceil_div(positions_out(g), kBM);
  const int64_t n_tiles = ceil_div(g.c_out, kBN);
  const int64_t blocks = m_tiles * n_tiles;
  if (blocks == 0) return cudaSuccess;
  if (!fits_grid_x(blocks)) return cudaErrorInvalidConfiguration;
  sepconv_infer_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p, n_tiles);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_train(const SepConvTrainParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  Workspace ws(p.workspace);
  const TrainPlan plan = plan_train(g, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;
  if (g.c_out == 0) return cudaSuccess;
  const int64_t positions = positions_out(g);
  // z and the statistics: the tiled kernel (sepconv_infer.cu) first; it declines what it does not cover.
  bool launched = false;
  cudaError_t err = run_sepconv_bn_train_tiled(p, stream, &launched);
  if (err != cudaSuccess) return err;
  if (!launched) {
    const int64_t blocks = plan.m_tiles * plan.n_tiles;
    if (!fits_grid_x(blocks)) return cudaErrorInvalidConfiguration;
    if (blocks > 0) {
      sepconv_train_kernel<T><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p, plan.n_tiles,
                                                                                         plan.partial);
    }
    err = launch_bn_stats_merge(plan.partial, plan.m_tiles, FixedCounts{positions}, g.c_out, static_cast<float>(p.eps),
                                plan.merge, p.mean, p.var, plan.invstd, stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t total = positions * g.c_out;
  if (total > 0) {
    float* weight = plan.affine;
    float* bias = plan.affine + g.c_out;
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_weight, 1.f, g.c_out, weight);
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_bias, -0.f, g.c_out, bias);
    constexpr int kV = 16 / sizeof(T);
    // The per-channel vectors: mean (the op's output), invstd and the affine (the workspace's first
    // buffers, 256-byte aligned; bias at c_out floats, a multiple of the vector on this path).
    if (vector_path<T>(g.c_out, {p.z.ptr, p.y.ptr, p.residual.ptr, p.mean, plan.invstd, weight, bias})) {
      bn_apply_kernel<T, kV><<<elementwise_blocks(total / kV), 256, 0, stream>>>(p, plan.invstd, weight, bias, total);
    } else {
      bn_apply_kernel<T, 1><<<elementwise_blocks(total), 256, 0, stream>>>(p, plan.invstd, weight, bias, total);
    }
  }
  return cudaGetLastError();
}

}  // namespace

const char* compiled_cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return XF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

size_t workspace_size(const SepConvInferParams& params) { return infer_tiled_workspace_size(params); }

size_t workspace_size(const SepConvTrainParams& params) {
  Workspace ws(nullptr);
  plan_train(params.g, ws);
  const size_t tiled = train_tiled_workspace_size(params);
  return ws.bytes() > tiled ? ws.bytes() : tiled;
}

cudaError_t run_sepconv_bn_infer(const SepConvInferParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  if (!is_nhwc(p.x, g.n, g.c, g.h, g.w) || !is_nhwc(p.y, g.n, g.c_out, g.h_out, g.w_out) ||
      (p.residual.ptr != nullptr && !is_nhwc(p.residual, g.n, g.c_out, g.h_out, g.w_out))) {
    return cudaErrorInvalidValue;
  }
  // The tiled kernel (sepconv_infer.cu) first; it declines what it does not cover (see there).
  bool launched = false;
  const cudaError_t err = run_sepconv_bn_infer_tiled(p, stream, &launched);
  if (launched || err != cudaSuccess) return err;
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_infer<T>(p, stream); });
}

cudaError_t run_sepconv_bn_train(const SepConvTrainParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  if (!is_nhwc(p.x, g.n, g.c, g.h, g.w) || !is_nhwc(p.y, g.n, g.c_out, g.h_out, g.w_out) ||
      !is_nhwc(p.z, g.n, g.c_out, g.h_out, g.w_out) ||
      (p.residual.ptr != nullptr && !is_nhwc(p.residual, g.n, g.c_out, g.h_out, g.w_out))) {
    return cudaErrorInvalidValue;
  }
  return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_train<T>(p, stream); });
}

}  // namespace xception_fast
