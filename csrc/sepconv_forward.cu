// Forward kernels of the xception_fast CUDA provider (inference and training) and their launchers.
//
// STATUS: compiled for sm_80 and sm_90a with nvcc 13.0; NOT YET RUN ON A GPU in this form:
// tests/test_providers.py and `python -m xception_fast verify --full` are the check, on a GPU.
//
// Both forward ops run in three steps on the current stream (xception_fast_ops.cpp), each a pass that
// can run near its roofline, where the earlier single fused kernel ran its depthwise and its GEMM in
// sequence at one CTA per SM (benchmarks/NOTES.md, "CUDA forward in three steps"):
// 1. d = dw(pre(x)) [P, C] in T, rounded where the unfused depthwise conv stores it: the backward's d
//    store (run_d_store, sepconv_backward.cu: d_store_kernel on the tiled depthwise phase of
//    sepconv_infer.cu, its int64 fallback where that declines). run_sepconv_bn_*_d.
// 2. z = d pw^T [P, Cout] in T on cuBLAS (the host, under ExactMatmulGuard), written into y's buffer
//    (inference) or the z output (training): cuBLAS stores z in T from fp32 accumulators, which is
//    the contract's rounding of z (the unfused 1x1 conv stores it in T).
// 3. Inference: infer_epilogue_kernel, y = post(round(z * scale + shift)) + residual in place over z
//    (run_sepconv_bn_infer_epilogue). Training (run_sepconv_bn_train_stats_apply):
//    z_stats_partial_kernel (per-row-block moments of the stored z), bn_stats_merge_kernel's passes
//    (mean, var, invstd), the BatchNorm affine in fp32, bn_apply_kernel.
// The element-wise kernels take 16-byte vectors of T (and 16-byte loads of the fp32 per-channel
// vectors) where Cout is a multiple of the vector and every pointer is aligned, one element per step
// otherwise; their index math is in sepconv_elementwise.h (host-tested by
// tests/cpp/test_forward_elementwise.cpp). All flat offsets are int64: every size the host accepts.
// Deterministic: no atomics; every reduction has a fixed order.

#include <cstdint>
#include <type_traits>

#include "sepconv_device.cuh"
#include "sepconv_elementwise.h"
#include "sepconv_infer.h"
#include "sepconv_params.h"

namespace xception_fast {

namespace {

int64_t positions_out(const ConvGeometry& g) { return g.n * g.h_out * g.w_out; }

// ---------------------------------------------------------------------------------------------------
// Inference epilogue

// y = post(round_T(z * scale + shift)) + residual with the rounding points of the unfused modules: z
// as stored in T, the affine as two separately rounded fp32 ops (no fused multiply-add, as the
// reference's mul and add), rounded to T, post-ReLU, the residual added in fp32 and rounded once (T + T).
// scale / shift: fp32 [Cout] (1 and -0 where absent: exact). y may be z (each element is read, then
// written, by the same thread): no __restrict__ on them. The residual and the post-ReLU are template
// flags: a loop body without branches (a run-time residual test left two copies of the math in it).
template <typename T, int kV, bool kResidual, bool kPostRelu>
__global__ void __launch_bounds__(256)
    infer_epilogue_kernel(const T* z, const float* __restrict__ scale, const float* __restrict__ shift,
                          const T* __restrict__ residual, T* y, int64_t c_out, int64_t total) {
  using E = Elems<T, kV>;
  const int64_t steps = infer::elem_steps(total, kV);
  for (int64_t step = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; step < steps;
       step += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const infer::ElemStep s = infer::elem_step(step, kV, c_out);
    const E zv = E::load(z + s.first);
    E rv, out;
    if constexpr (kResidual) rv = E::load(residual + s.first);
    float sc[kV], sh[kV];
    load_channels<kV>(scale, s.co, sc);
    load_channels<kV>(shift, s.co, sh);
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      float v = round_to<T>(__fadd_rn(__fmul_rn(to_float(zv.v[e]), sc[e]), sh[e]));
      if constexpr (kPostRelu) v = relu(v);
      if constexpr (kResidual) v = v + to_float(rv.v[e]);
      out.v[e] = from_float<T>(v);
    }
    out.store(y + s.first);
  }
}

// ---------------------------------------------------------------------------------------------------
// Training: the statistics of the stored z, the normalisation

// Per (row block, channel) moments of z [rows, c_out] (the order: sepconv_elementwise.h). Each thread
// streams its lane's rows for kV channels (one 16-byte vector, or one element, per row; 4 rows' loads
// in flight) into the shifted sums s1, s2 about the lane's first row, two adds and an fma per element;
// the lane's moments go to shared memory, one barrier, then each thread merges one channel's kLanes
// lanes (merge_tree<kLanes>'s merges, depth first) and writes
// its partial[(block * 3 + k) * c_out + co], k = 0 pivot, 1 mu, 2 M2 (merge_offset), for
// bn_stats_merge_kernel. 4 CTAs per SM (64 registers): the stream needs 3 kV accumulators and the loads
// in flight, where the former two-pass groups of 8 rows held 8 rows of 8 channels (167 registers, one
// CTA per SM, about 25 instructions per element against 5 now).
template <typename T, int kV, int kCols>
__global__ void __launch_bounds__(infer::kStatsThreads, 4)
    z_stats_partial_kernel(const T* __restrict__ z, int64_t rows, int64_t c_out, float* __restrict__ partial) {
  using infer::Moments;
  using E = Elems<T, kV>;
  constexpr int kLanes = infer::kStatsThreads / kCols, kChannels = kCols * kV;
  __shared__ __align__(16) float lane_pivot[kLanes][kChannels];
  __shared__ __align__(16) float lane_mu[kLanes][kChannels];
  __shared__ __align__(16) float lane_m2[kLanes][kChannels];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t block = blockIdx.x;
  const int64_t ch0 = static_cast<int64_t>(blockIdx.y) * kChannels;  // the block's first channel
  const int64_t co0 = ch0 + tx * kV;                                  // the thread's first channel
  // The whole vector or nothing: kV divides c_out on the vector path.
  const int count = co0 < c_out ? infer::stats_lane_count(block, ty, rows, kLanes) : 0;

  float pivot[kV], s1[kV], s2[kV];
#pragma unroll
  for (int e = 0; e < kV; ++e) pivot[e] = 0.f, s1[e] = 0.f, s2[e] = 0.f;
  if (count > 0) {
    const T* src = z + infer::stats_row(block, ty, 0, kLanes) * c_out + co0;
    const int64_t step = static_cast<int64_t>(kLanes) * c_out;  // one lane row to the next
    const E first = E::load(src);
#pragma unroll
    for (int e = 0; e < kV; ++e) pivot[e] = to_float(first.v[e]);  // row 0 adds 0 to both sums: skipped
#pragma unroll 4
    for (int k = 1; k < count; ++k) {
      src += step;
      const E zv = E::load(src);
#pragma unroll
      for (int e = 0; e < kV; ++e) {
        const float d = to_float(zv.v[e]) - pivot[e];
        s1[e] += d;
        s2[e] = fmaf(d, d, s2[e]);
      }
    }
  }
  // The lane's moments (its count is every channel's), as 16-byte stores where kV allows.
  float mu[kV], m2[kV];
#pragma unroll
  for (int e = 0; e < kV; ++e) {
    const Moments m = infer::stats_lane_moments(count, pivot[e], s1[e], s2[e]);
    mu[e] = m.mu, m2[e] = m.m2;
  }
  if constexpr (kV % 4 == 0) {
#pragma unroll
    for (int e = 0; e < kV; e += 4) {
      *reinterpret_cast<float4*>(&lane_pivot[ty][tx * kV + e]) = make_float4(pivot[e], pivot[e + 1], pivot[e + 2], pivot[e + 3]);
      *reinterpret_cast<float4*>(&lane_mu[ty][tx * kV + e]) = make_float4(mu[e], mu[e + 1], mu[e + 2], mu[e + 3]);
      *reinterpret_cast<float4*>(&lane_m2[ty][tx * kV + e]) = make_float4(m2[e], m2[e + 1], m2[e + 2], m2[e + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < kV; ++e) {
      lane_pivot[ty][tx * kV + e] = pivot[e];
      lane_mu[ty][tx * kV + e] = mu[e];
      lane_m2[ty][tx * kV + e] = m2[e];
    }
  }
  __syncthreads();

  // One channel per thread: its lanes merged as a binary tree.
  const int ch = ty * kCols + tx;
  const int64_t co = ch0 + ch;
  if (ch >= kChannels || co >= c_out) return;
  const Moments m = infer::merge_tree_depth_first<kLanes>([&](int lane) {
    return Moments{infer::stats_lane_count(block, lane, rows, kLanes), lane_pivot[lane][ch], lane_mu[lane][ch],
                   lane_m2[lane][ch]};
  });
  partial[infer::merge_offset(block, 0, c_out, co)] = m.pivot;
  partial[infer::merge_offset(block, 1, c_out, co)] = m.mu;
  partial[infer::merge_offset(block, 2, c_out, co)] = m.m2;
}

// Row block t's count, for the merge's first pass.
struct StatsCounts {
  int64_t rows;
  int lanes;
  __device__ int64_t operator()(int64_t t) const { return infer::stats_block_count(t, rows, lanes); }
};

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
  const int64_t steps = infer::elem_steps(total, kV);
  for (int64_t step = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; step < steps;
       step += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const infer::ElemStep s = infer::elem_step(step, kV, c_out);
    const E zv = E::load(z + s.first);
    E rv, out;
    if (residual != nullptr) rv = E::load(residual + s.first);
    float mean[kV], inv[kV], w[kV], b[kV];
    load_channels<kV>(p.mean, s.co, mean);
    load_channels<kV>(invstd, s.co, inv);
    load_channels<kV>(weight, s.co, w);
    load_channels<kV>(bias, s.co, b);
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
    out.store(y + s.first);
  }
}

// ---------------------------------------------------------------------------------------------------
// Workspaces (the layout depends on the geometry and dtype only)

// Inference: the scale and shift in fp32 [2][Cout], then the d store's packed weights.
struct InferPlan {
  float* affine;
  void* ds;
  size_t ds_bytes;
};

InferPlan plan_infer(const ConvGeometry& g, DType dtype, Workspace& ws) {
  InferPlan plan;
  plan.affine = ws.take<float>(2 * g.c_out);
  plan.ds_bytes = d_store_tiled_workspace_size(g, dtype);
  plan.ds = ws.take<char>(static_cast<int64_t>(plan.ds_bytes));
  return plan;
}

// Training: invstd [Cout], the BatchNorm affine in fp32 [2][Cout], the row blocks' moments and the merge
// passes' scratch, then the d store's packed weights.
struct TrainPlan {
  float* invstd;
  float* affine;
  int64_t max_row_blocks;  // at the smallest row blocks (the launch may take fewer, larger ones)
  float* partial;          // [row blocks][3][Cout]
  MergeScratch merge;      // the merge passes' partials (take_merge_scratch)
  void* ds;
  size_t ds_bytes;
};

TrainPlan plan_train(const ConvGeometry& g, DType dtype, Workspace& ws) {
  TrainPlan plan;
  plan.invstd = ws.take<float>(g.c_out);
  plan.affine = ws.take<float>(2 * g.c_out);
  plan.max_row_blocks = infer::stats_row_blocks(positions_out(g), infer::kStatsMinLanes);
  plan.partial = ws.take<float>(plan.max_row_blocks * 3 * g.c_out);
  plan.merge = take_merge_scratch(ws, plan.max_row_blocks, g.c_out);
  plan.ds_bytes = d_store_tiled_workspace_size(g, dtype);
  plan.ds = ws.take<char>(static_cast<int64_t>(plan.ds_bytes));
  return plan;
}

bool infer_layout_ok(const SepConvInferParams& p) {
  const ConvGeometry& g = p.g;
  return is_nhwc(p.x, g.n, g.c, g.h, g.w) && is_nhwc(p.y, g.n, g.c_out, g.h_out, g.w_out) &&
         (p.residual.ptr == nullptr || is_nhwc(p.residual, g.n, g.c_out, g.h_out, g.w_out));
}

bool train_layout_ok(const SepConvTrainParams& p) {
  const ConvGeometry& g = p.g;
  return is_nhwc(p.x, g.n, g.c, g.h, g.w) && is_nhwc(p.y, g.n, g.c_out, g.h_out, g.w_out) &&
         is_nhwc(p.z, g.n, g.c_out, g.h_out, g.w_out) &&
         (p.residual.ptr == nullptr || is_nhwc(p.residual, g.n, g.c_out, g.h_out, g.w_out));
}

// ---------------------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t launch_infer_epilogue(const SepConvInferParams& p, const InferPlan& plan, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  const int64_t total = positions_out(g) * g.c_out;
  if (total == 0) return cudaSuccess;
  float* scale = plan.affine;
  float* shift = plan.affine + g.c_out;
  vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.scale, 1.f, g.c_out, scale);
  vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.shift, -0.f, g.c_out, shift);
  T* y = static_cast<T*>(p.y.ptr);
  const T* residual = static_cast<const T*>(p.residual.ptr);
  // The workspace's buffers are 256-byte aligned; shift starts c_out floats in, a multiple of kV here.
  const bool vectors = vector_path<T>(g.c_out, {y, residual, scale, shift});
  const auto launch = [&](auto kv, auto res, auto relu) {
    constexpr int kV = decltype(kv)::value;
    infer_epilogue_kernel<T, kV, decltype(res)::value, decltype(relu)::value>
        <<<elementwise_blocks(total / kV), 256, 0, stream>>>(y, scale, shift, residual, y, g.c_out, total);
  };
  const auto with_flags = [&](auto kv) {
    using Yes = std::true_type;
    using No = std::false_type;
    if (residual != nullptr) {
      p.post_relu ? launch(kv, Yes{}, Yes{}) : launch(kv, Yes{}, No{});
    } else {
      p.post_relu ? launch(kv, No{}, Yes{}) : launch(kv, No{}, No{});
    }
  };
  if (vectors) {
    with_flags(std::integral_constant<int, 16 / sizeof(T)>{});
  } else {
    with_flags(std::integral_constant<int, 1>{});
  }
  return cudaGetLastError();
}

// The statistics' partials with kV channels per thread: the block shape for Cout (stats_cols), its row
// blocks; returns their count in *blocks.
template <typename T, int kV, int kCols>
cudaError_t launch_z_stats_cols(const SepConvTrainParams& p, const TrainPlan& plan, int64_t blocks, cudaStream_t stream) {
  const int64_t col_blocks = ceil_div(ceil_div(p.g.c_out, kV), kCols);
  if (!fits_grid_x(blocks) || col_blocks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(blocks), static_cast<unsigned int>(col_blocks));
  z_stats_partial_kernel<T, kV, kCols><<<grid, dim3(kCols, infer::kStatsThreads / kCols), 0, stream>>>(
      static_cast<const T*>(p.z.ptr), positions_out(p.g), p.g.c_out, plan.partial);
  return cudaGetLastError();
}

template <typename T, int kV>
cudaError_t launch_z_stats(const SepConvTrainParams& p, const TrainPlan& plan, int* lanes, int64_t* blocks,
                           cudaStream_t stream) {
  const int cols = infer::stats_cols(ceil_div(p.g.c_out, kV));
  *lanes = infer::stats_lanes(cols);
  *blocks = infer::stats_row_blocks(positions_out(p.g), *lanes);
  if (*blocks == 0) return cudaSuccess;
  if (cols == 32) return launch_z_stats_cols<T, kV, 32>(p, plan, *blocks, stream);
  if (cols == 16) return launch_z_stats_cols<T, kV, 16>(p, plan, *blocks, stream);
  return launch_z_stats_cols<T, kV, 8>(p, plan, *blocks, stream);
}

template <typename T>
cudaError_t launch_train_stats_apply(const SepConvTrainParams& p, const TrainPlan& plan, cudaStream_t stream) {
  const ConvGeometry& g = p.g;
  if (g.c_out == 0) return cudaSuccess;
  const int64_t positions = positions_out(g);
  constexpr int kV = 16 / sizeof(T);
  int lanes = 0;
  int64_t blocks = 0;  // at most plan.max_row_blocks: lanes >= kStatsMinLanes
  cudaError_t err = vector_path<T>(g.c_out, {p.z.ptr}) ? launch_z_stats<T, kV>(p, plan, &lanes, &blocks, stream)
                                                        : launch_z_stats<T, 1>(p, plan, &lanes, &blocks, stream);
  if (err != cudaSuccess) return err;
  // No row blocks (an empty batch): the final pass over none writes mean 0, var 1.
  err = launch_bn_stats_merge(plan.partial, blocks, StatsCounts{positions, lanes}, g.c_out,
                              static_cast<float>(p.eps), plan.merge, p.mean, p.var, plan.invstd, stream);
  if (err != cudaSuccess) return err;
  const int64_t total = positions * g.c_out;
  if (total > 0) {
    float* weight = plan.affine;
    float* bias = plan.affine + g.c_out;
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_weight, 1.f, g.c_out, weight);
    vec_to_float_kernel<<<elementwise_blocks(g.c_out), 256, 0, stream>>>(p.bn_bias, -0.f, g.c_out, bias);
    // The per-channel vectors: mean (the op's output), invstd and the affine (the workspace's buffers,
    // 256-byte aligned; bias at c_out floats, a multiple of the vector on this path).
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

size_t workspace_size(const SepConvInferParams& params) {
  Workspace ws(nullptr);
  plan_infer(params.g, params.dtype, ws);
  return ws.bytes();
}

size_t workspace_size(const SepConvTrainParams& params) {
  Workspace ws(nullptr);
  plan_train(params.g, params.dtype, ws);
  return ws.bytes();
}

// Each step of a forward launches from its params alone: the layout checked, the plan (the same every
// step, a few host integer ops) re-derived over the caller's workspace and checked to fit it.
template <typename Params, typename PlanOf, typename Run>
cudaError_t with_plan(const Params& p, bool layout_ok, PlanOf plan_of, Run run) {
  if (!layout_ok) return cudaErrorInvalidValue;
  Workspace ws(p.workspace);
  const auto plan = plan_of(p.g, p.dtype, ws);
  if (ws.bytes() > p.workspace_bytes) return cudaErrorInvalidValue;
  return run(plan);
}

cudaError_t run_sepconv_bn_infer_d(const SepConvInferParams& p, cudaStream_t stream) {
  return with_plan(p, infer_layout_ok(p), plan_infer,
                   [&](const InferPlan& plan) { return run_d_store(p, p.d, plan.ds, plan.ds_bytes, stream); });
}

cudaError_t run_sepconv_bn_infer_epilogue(const SepConvInferParams& p, cudaStream_t stream) {
  return with_plan(p, infer_layout_ok(p), plan_infer, [&](const InferPlan& plan) {
    return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_infer_epilogue<T>(p, plan, stream); });
  });
}

cudaError_t run_sepconv_bn_train_d(const SepConvTrainParams& p, cudaStream_t stream) {
  return with_plan(p, train_layout_ok(p), plan_train,
                   [&](const TrainPlan& plan) { return run_d_store(p, p.d, plan.ds, plan.ds_bytes, stream); });
}

cudaError_t run_sepconv_bn_train_stats_apply(const SepConvTrainParams& p, cudaStream_t stream) {
  return with_plan(p, train_layout_ok(p), plan_train, [&](const TrainPlan& plan) {
    return XF_DTYPE_SWITCH(p.dtype, T, [&] { return launch_train_stats_apply<T>(p, plan, stream); });
  });
}

}  // namespace xception_fast
