// Parameters of the fused separable-conv + BatchNorm kernels, and the launch entry points.
//
// Plain C++ (no torch headers): the host side (xception_fast_ops.cpp) checks the tensors and fills
// these structs; the device side (sepconv_forward.cu, sepconv_backward.cu) reads them. Keeping torch
// out of the .cu files keeps nvcc's compile short. All sizes, strides and offsets are 64-bit:
// activations of a large batch can exceed 2^31 elements.
//
// Scratch memory: each op may need a device workspace (partial reductions, packed weights, ...). The
// host asks `workspace_size(params)` for its size in bytes, allocates it with PyTorch's caching
// allocator on the current stream and sets `workspace` / `workspace_bytes`;
// the launcher carves it up the same way (the layout depends on the geometry only).
//
// Shapes: x [N, C, H, W], dw_weight [C, 1, kh, kw], pw_weight [Cout, C, 1, 1], per-channel vectors
// [Cout], residual / grad_y / z / y [N, Cout, Ho, Wo]. Activations are passed with their element
// strides in NCHW order; the host makes them channels_last (stride_c == 1), the native layout.
// Weights and vectors are contiguous. Element dtype: `dtype` (float32, float16 or bfloat16) for
// activations and weights; accumulation and all statistics in float32.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

// A macro's value as a string literal (the build's architecture lists).
#define XF_STRINGIFY_(...) #__VA_ARGS__
#define XF_STRINGIFY(...) XF_STRINGIFY_(__VA_ARGS__)

namespace xception_fast {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A 4-D activation tensor: pointer plus element strides in NCHW order.
struct Tensor4 {
  void* ptr = nullptr;  // nullptr: absent (optional inputs)
  int64_t stride_n = 0, stride_c = 0, stride_h = 0, stride_w = 0;
};

// A contiguous per-channel vector [Cout].
struct Vec {
  void* ptr = nullptr;                // nullptr: absent (optional inputs)
  DType dtype = DType::kFloat32;      // float32, or the activations' dtype (scale/shift, BN affine)
};

// Geometry of one unit: x [n, c, h, w] -> depthwise (kh x kw, stride, padding, dilation) ->
// pointwise c -> c_out, output [n, c_out, h_out, w_out].
struct ConvGeometry {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t c_out = 0, h_out = 0, w_out = 0;
  int64_t kh = 0, kw = 0;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dil_h = 1, dil_w = 1;
};

// What every op on one unit reads: the unit itself (xception_fast.spec.UnitSpec on the Python side),
// its input and weights, and the scratch memory. The host fills it in one place (unit_params).
struct UnitParams {
  ConvGeometry g;
  DType dtype = DType::kFloat32;
  Tensor4 x;
  void* dw_weight = nullptr;  // [C, kh, kw]
  void* pw_weight = nullptr;  // [Cout, C]
  bool pre_relu = false, post_relu = false;
  void* workspace = nullptr;  // scratch, workspace_size(*this) bytes (see the top of this file)
  size_t workspace_bytes = 0;
};

// y = post(pw(dw(pre(x))) * scale + shift) + residual. The forward runs in three steps on one stream
// (sepconv_forward.cu): run_sepconv_bn_infer_d writes d; the host's cuBLAS product writes
// z = d pw^T into y's buffer; run_sepconv_bn_infer_epilogue turns z into y in place.
struct SepConvInferParams : UnitParams {
  Vec scale, shift;  // optional
  Tensor4 residual;  // optional, output-shaped
  Tensor4 y;         // out: output-shaped, channels_last (z between the steps)
  void* d = nullptr;  // [P, C] in the activations' dtype, contiguous, allocated by the host
};

// The backward's [positions, channels] intermediates in the activations' dtype, contiguous, allocated by
// the host. A backward runs in three steps on one stream: the first launch (run_*_backward_grad_z)
// writes grad_z and d; the host's two cuBLAS products (xception_fast_ops.cpp) form
// grad_d = grad_z pw and grad_pw = grad_z^T d; the second launch (run_*_backward_dw) reads grad_d.
struct BackwardIntermediates {
  void* grad_z = nullptr;  // [P, Cout]: the gradient of the pointwise output, rounded to T
  void* d = nullptr;       // [P, C]: the depthwise output dw(pre(x)), rounded to T as the forward stores it
  void* grad_d = nullptr;  // [P, C]: the gradient of d (grad_z pw), rounded to T
};

// Gradients of SepConvInferParams' unit; the depthwise output is recomputed from x.
struct SepConvInferBackwardParams : UnitParams {
  Tensor4 grad_y;
  Vec scale, shift;                // optional
  Tensor4 grad_x;                  // out: x-shaped, channels_last
  void* grad_dw_weight = nullptr;  // out: [C, kh, kw]
  Vec grad_scale, grad_shift;      // out: ptr nullptr when scale/shift are absent (then empty tensors)
  BackwardIntermediates mid;
};

// Training forward: z = pw(dw(pre(x))), batch mean and biased var of z per channel, and
// y = post((z - mean) * rsqrt(var + eps) * bn_weight + bn_bias) + residual.
// An empty batch gives mean 0 and var 1 (as xception_fast.reference). Three steps, as the inference
// forward: run_sepconv_bn_train_d writes d, the host's cuBLAS product z = d pw^T,
// run_sepconv_bn_train_stats_apply the statistics and y.
struct SepConvTrainParams : UnitParams {
  Vec bn_weight, bn_bias;  // optional
  Tensor4 residual;        // optional
  Tensor4 y;               // out
  Tensor4 z;               // out: the pre-BN output, kept for backward
  float* mean = nullptr;   // out: [Cout]
  float* var = nullptr;    // out: [Cout], biased
  double eps = 1e-5;
  void* d = nullptr;      // [P, C] in the activations' dtype, contiguous, allocated by the host
};

// What both BatchNorm-backward ops read: grad_y and z [N, Cout, Ho, Wo], the batch statistics and
// the affine parameters (filled in one place on the host: bn_backward_inputs).
struct BnBackwardInputs {
  Tensor4 grad_y;
  Tensor4 z;
  const float* mean = nullptr;    // [Cout]
  const float* invstd = nullptr;  // [Cout]
  Vec bn_weight, bn_bias;         // optional
};

// Per-channel reductions of the BatchNorm backward over z [n, c, h, w] (c = Cout of the unit):
// sum_dy = sum(g), sum_dy_xhat = sum(g * xhat), g = grad_y masked by the post-ReLU.
struct BnBackwardReduceParams : BnBackwardInputs {
  int64_t n = 0, c = 0, h = 0, w = 0;
  DType dtype = DType::kFloat32;
  float* sum_dy = nullptr;       // out: [c]
  float* sum_dy_xhat = nullptr;  // out: [c]
  bool post_relu = false;
  void* workspace = nullptr;  // scratch, workspace_size(*this) bytes
  size_t workspace_bytes = 0;
};

// Gradients of x and the weights through the BatchNorm (batch statistics), given the reductions of
// BnBackwardReduceParams divided by the count per channel (mean_dy, mean_dy_xhat).
struct SepConvTrainBackwardParams : UnitParams, BnBackwardInputs {
  const float* mean_dy = nullptr;
  const float* mean_dy_xhat = nullptr;
  Tensor4 grad_x;                  // out
  void* grad_dw_weight = nullptr;  // out
  BackwardIntermediates mid;
};

// Defined in sepconv_forward.cu: the virtual architectures nvcc compiled it for (__CUDA_ARCH_LIST__),
// or "".
const char* compiled_cuda_arch_list();
// Bytes of device scratch memory each launcher needs (0 allowed). sepconv_forward.cu: the first two;
// sepconv_backward.cu: the rest.
size_t workspace_size(const SepConvInferParams& params);
size_t workspace_size(const SepConvTrainParams& params);
size_t workspace_size(const SepConvInferBackwardParams& params);
size_t workspace_size(const BnBackwardReduceParams& params);
size_t workspace_size(const SepConvTrainBackwardParams& params);
// Launchers: enqueue the op's kernels on `stream` and return cudaGetLastError(). They handle empty
// tensors (n == 0). cudaErrorInvalidValue: a layout or workspace the kernels do not accept.
// The forwards' steps (see SepConvInferParams, SepConvTrainParams), with the same params and workspace.
cudaError_t run_sepconv_bn_infer_d(const SepConvInferParams& params, cudaStream_t stream);
cudaError_t run_sepconv_bn_infer_epilogue(const SepConvInferParams& params, cudaStream_t stream);
cudaError_t run_sepconv_bn_train_d(const SepConvTrainParams& params, cudaStream_t stream);
cudaError_t run_sepconv_bn_train_stats_apply(const SepConvTrainParams& params, cudaStream_t stream);
cudaError_t run_bn_backward_reduce(const BnBackwardReduceParams& params, cudaStream_t stream);
// The backwards' two launches (see BackwardIntermediates), with the same params and workspace:
// grad_z (inference: and grad_scale / grad_shift) and d; then grad_x and grad_dw from mid.grad_d.
cudaError_t run_sepconv_bn_infer_backward_grad_z(const SepConvInferBackwardParams& params, cudaStream_t stream);
cudaError_t run_sepconv_bn_infer_backward_dw(const SepConvInferBackwardParams& params, cudaStream_t stream);
cudaError_t run_sepconv_bn_train_backward_grad_z(const SepConvTrainBackwardParams& params, cudaStream_t stream);
cudaError_t run_sepconv_bn_train_backward_dw(const SepConvTrainBackwardParams& params, cudaStream_t stream);

}  // namespace xception_fast
