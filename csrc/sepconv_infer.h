// Entry points of the tiled depthwise machinery (sepconv_infer.cu) and of the shared d store
// (sepconv_backward.cu), used by sepconv_forward.cu and sepconv_backward.cu.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "sepconv_params.h"

namespace xception_fast {

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

// d = dw(pre(x)) [P, C] of the unit `u` into d: the tiled d store, or its int64 fallback
// (d_store_fallback_kernel, sepconv_backward.cu) where the tiled one declines. ds: its packed weights,
// d_store_tiled_workspace_size(u.g, u.dtype) bytes. The forwards' first step and the backwards' d.
cudaError_t run_d_store(const UnitParams& u, void* d, void* ds, size_t ds_bytes, cudaStream_t stream);

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
