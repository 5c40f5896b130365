// Device side of the xception_fast CUDA provider: kernels and their launchers.
//
// No kernel exists yet. Each launcher below is where one goes: pick the tile configuration for the
// arch and dtype, turn pre_relu/post_relu/residual into template parameters, compute the grid from
// params.g (64-bit), and launch on `stream`. When an op gets a real kernel, set its entry in
// kHasKernel to true; until then the host side (xception_fast_ops.cpp) raises "not implemented"
// before allocating anything, and xception_fast.implemented_ops() leaves the op out.
//
// This file includes no torch headers on purpose (see sepconv_params.h).

#include <cuda_runtime.h>

#include "sepconv_params.h"

#define XF_STRINGIFY_(...) #__VA_ARGS__
#define XF_STRINGIFY(...) XF_STRINGIFY_(__VA_ARGS__)

namespace xception_fast {

namespace {

constexpr bool kHasKernel[static_cast<int>(Op::kCount)] = {
    false,  // sepconv_bn_infer
    false,  // sepconv_bn_infer_backward
    false,  // sepconv_bn_train
    false,  // bn_backward_reduce
    false,  // sepconv_bn_train_backward
};

}  // namespace

bool has_kernel(Op op) {
  const int i = static_cast<int>(op);
  return i >= 0 && i < static_cast<int>(Op::kCount) && kHasKernel[i];
}

const char* compiled_cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return XF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

cudaError_t run_sepconv_bn_infer(const SepConvInferParams& params, cudaStream_t stream) {
  (void)params;
  (void)stream;
  // Launch of the fused inference kernel goes here.
  return cudaErrorNotSupported;
}

cudaError_t run_sepconv_bn_infer_backward(const SepConvInferBackwardParams& params, cudaStream_t stream) {
  (void)params;
  (void)stream;
  // Launch of the inference-mode backward goes here.
  return cudaErrorNotSupported;
}

cudaError_t run_sepconv_bn_train(const SepConvTrainParams& params, cudaStream_t stream) {
  (void)params;
  (void)stream;
  // Launch of the training forward (main loop + statistics epilogue, then normalisation) goes here.
  return cudaErrorNotSupported;
}

cudaError_t run_bn_backward_reduce(const BnBackwardReduceParams& params, cudaStream_t stream) {
  (void)params;
  (void)stream;
  // Launch of the BatchNorm backward reductions goes here.
  return cudaErrorNotSupported;
}

cudaError_t run_sepconv_bn_train_backward(const SepConvTrainBackwardParams& params, cudaStream_t stream) {
  (void)params;
  (void)stream;
  // Launch of the training backward (pointwise and depthwise gradients) goes here.
  return cudaErrorNotSupported;
}

}  // namespace xception_fast
