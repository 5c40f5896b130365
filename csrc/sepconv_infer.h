// The tiled kernel (sepconv_infer.cu), inference and training forward: entry points used by
// sepconv_forward.cu.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "sepconv_params.h"

namespace xception_fast {

// Bytes of workspace the tiled kernel needs (its packed weights); 0 when it never takes `params`.
size_t infer_tiled_workspace_size(const SepConvInferParams& params);

// Launches the tiled kernel when it covers `params` and sets *launched; otherwise leaves *launched
// false and returns cudaSuccess, and the caller runs the int64 kernel (sepconv_forward.cu).
cudaError_t run_sepconv_bn_infer_tiled(const SepConvInferParams& params, cudaStream_t stream, bool* launched);

// The training forward's first part on the tiled kernel: z, then the batch mean and var (into params)
// and invstd (the workspace's first float buffer, [Cout], where bn_apply_kernel reads it). The same
// contract as the int64 path: *launched false when the tiled kernel does not cover `params`.
size_t train_tiled_workspace_size(const SepConvTrainParams& params);
cudaError_t run_sepconv_bn_train_tiled(const SepConvTrainParams& params, cudaStream_t stream, bool* launched);

// The backward's d = dw(pre(x)) [P, C] in `dtype` (the A operand of cuBLAS's grad_pw = grad_z^T d) on
// the tiled kernel's depthwise phase: one pass that reads x once and writes d once. *launched false
// when the tiled machinery does not cover `params` (the caller's int64 kernel runs instead).
struct DStoreParams {
  ConvGeometry g;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;          // [N, H, W, C]
  const void* dw_weight = nullptr;  // [C, kh, kw]
  bool pre_relu = false;
  void* d = nullptr;                // [N, Ho, Wo, C]
  void* workspace = nullptr;        // d_store_tiled_workspace_size bytes (the packed depthwise weights)
  size_t workspace_bytes = 0;
};
size_t d_store_tiled_workspace_size(const ConvGeometry& g, DType dtype);
cudaError_t run_d_store_tiled(const DStoreParams& params, cudaStream_t stream, bool* launched);

// The backward's grad_x and grad_dw on the tiled machinery (stride 1, 3x3, padding at most the
// window's reach; every dtype): grad_d's halo staged once per tile and chunk, x read once, grad_x
// stored, grad_dw as fp32 partials [splits][C][taps] for the caller's column sums. *splits: the number
// of partials written (0: none, the sums are zeros), or -1 when the tiled kernel does not cover
// `params` (the caller's kernels run instead).
struct DwBackwardParams {
  ConvGeometry g;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;          // [N, H, W, C]
  const void* dw_weight = nullptr;  // [C, kh, kw]
  bool pre_relu = false;
  const void* grad_d = nullptr;     // [N, Ho, Wo, C]
  void* grad_x = nullptr;           // [N, H, W, C]
  float* partial = nullptr;         // room for max_splits partials
  int max_splits = 0;
  void* workspace = nullptr;        // dw_backward_tiled_workspace_size bytes
  size_t workspace_bytes = 0;
};
bool dw_backward_tiled_covers(const ConvGeometry& g);
size_t dw_backward_tiled_workspace_size(const ConvGeometry& g, DType dtype);
cudaError_t run_dw_backward_tiled(const DwBackwardParams& params, cudaStream_t stream, int* splits);

}  // namespace xception_fast
