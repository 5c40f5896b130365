// Op registration of the xception_fast CUDA provider: library xception_fast_cuda.
//
// Loaded from Python with torch.ops.load_library(<path of xception_fast/_C*.so>) by
// xception_fast/_extension.py (no PYBIND11_MODULE). The ops have the signatures of
// xception_fast.reference; xception_fast.ops wraps them with fake kernels and autograd.
//
// Each CUDA implementation: checks its inputs (checks.h), guards x's device, makes the inputs
// channels_last / contiguous, allocates the outputs and the kernels' scratch workspace, fills the
// params struct (sepconv_params.h; the unit's part in unit_params) and calls the launchers
// (sepconv_forward.cu, sepconv_backward.cu) on the current stream. The two forward ops run in three
// steps on that stream: a launch that writes d = dw(pre(x)), the pointwise product z = d pw^T on
// cuBLAS (pointwise_forward, under ExactMatmulGuard), a launch that forms y (inference: in place over
// z; training: the batch statistics of z, then y). The two backward ops too: a launch that writes
// grad_z and d, the two pointwise products on cuBLAS (pointwise_grads), a launch that forms grad_x
// and grad_dw from grad_d.
// The CPU registrations only raise a clear error instead of PyTorch's "Could not run ... 'CPU'".
//
// Debugging: XCEPTION_FAST_POISON_OUTPUTS=1 (read at every call) fills freshly allocated outputs
// with NaN and the workspace with 0xFF bytes (NaN in every float type) before the kernels run, so an
// element a kernel forgets to write shows up as NaN. The tests set it.

#include <cstdlib>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>
#include <torch/version.h>

#include "checks.h"
#include "sepconv_params.h"

#ifndef XCEPTION_FAST_CUDA_ARCHS
#define XCEPTION_FAST_CUDA_ARCHS unknown
#endif

namespace xception_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "xception_fast: launching '", op, "' failed: ", cudaGetErrorString(err));
}

// --- params from tensors -----------------------------------------------------------------------------

Tensor channels_last(const Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

Tensor4 tensor4(const Tensor& t) {
  Tensor4 r;
  r.ptr = t.data_ptr();
  r.stride_n = t.stride(0);
  r.stride_c = t.stride(1);
  r.stride_h = t.stride(2);
  r.stride_w = t.stride(3);
  return r;
}

// Optional activations and vectors: the contiguous copy (kept alive by the caller) and its view.
Tensor optional_channels_last(const OptTensor& t) {
  return t.has_value() && t->defined() ? channels_last(*t) : Tensor();
}

Tensor optional_contiguous(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

Tensor4 optional_tensor4(const Tensor& t) { return t.defined() ? tensor4(t) : Tensor4{}; }

Vec vec(const Tensor& t) {
  Vec v;
  if (t.defined()) {
    v.ptr = t.data_ptr();
    v.dtype = to_dtype(t.scalar_type());
  }
  return v;
}

Tensor empty_channels_last(at::IntArrayRef sizes, const Tensor& like) {
  return at::empty(sizes, like.options(), at::MemoryFormat::ChannelsLast);
}

Tensor empty_vector(int64_t n, const Tensor& like, at::ScalarType dtype) {
  return at::empty({n}, like.options().dtype(dtype));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

bool poison_outputs() {
  const char* value = std::getenv("XCEPTION_FAST_POISON_OUTPUTS");
  return value != nullptr && value[0] != '\0' && std::string(value) != "0";
}

// A freshly allocated output, NaN-filled under XCEPTION_FAST_POISON_OUTPUTS.
Tensor fresh(Tensor t) {
  if (poison_outputs() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// The kernels' scratch memory (workspace_size(p) bytes), from PyTorch's caching allocator, set in p:
// stream-ordered, so it may be released when the caller returns, before the kernels have run.
template <typename Params>
Tensor attach_workspace(Params& p, const Tensor& like) {
  const size_t bytes = workspace_size(p);
  Tensor w = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  if (poison_outputs() && bytes > 0) w.fill_(255);
  p.workspace = w.data_ptr();
  p.workspace_bytes = bytes;
  return w;
}

// The unit's part of every op's params, from the checked geometry and the laid-out x and weights
// (the workspace is attached last, by attach_workspace). Each op's params struct is then one
// aggregate: this, then its own members in declaration order (sepconv_params.h).
UnitParams unit_params(const ConvGeometry& g, const Tensor& xc, const Tensor& dwc, const Tensor& pwc, bool pre_relu,
                       bool post_relu) {
  UnitParams p;
  p.g = g;
  p.dtype = to_dtype(xc.scalar_type());
  p.x = tensor4(xc);
  p.dw_weight = dwc.data_ptr();
  p.pw_weight = pwc.data_ptr();
  p.pre_relu = pre_relu;
  p.post_relu = post_relu;
  return p;
}

// The BatchNorm backward's part of its two ops' params, from the laid-out tensors.
BnBackwardInputs bn_backward_inputs(const Tensor& gyc, const Tensor& zc, const Tensor& mean_c,
                                    const Tensor& invstd_c, const Tensor& weight_c, const Tensor& bias_c) {
  return {tensor4(gyc), tensor4(zc), mean_c.data_ptr<float>(), invstd_c.data_ptr<float>(), vec(weight_c),
          vec(bias_c)};
}

// --- the backward's pointwise products on cuBLAS -------------------------------------------------------

// The contract's arithmetic for torch.matmul inside its scope (triton_kernels.backward.exact_matmul is
// the Python twin): fp32 with exact fp32 products, no TF32; fp16 / bf16 accumulated in fp32 with no
// reduced-precision split-K reduction and no fp16 accumulation. The global flags are switched only
// where they were set otherwise, and restored on the way out. fp32: at::NoTF32Guard, the thread-local
// override the cuBLAS handle's math mode honours (every torch this builds against), plus, where the
// build's torch is known to have it (the enum API, checked against 2.14), the global matmul precision,
// which torch's cuBLASLt path reads instead; older torch takes the guard alone, which covers the
// default cuBLAS path (a build against an older torch must not fail on an API it lacks: the GPU
// machines ran 2.11). The reduction getters return a bool in older torch and a CuBLASReductionOption in
// newer; the setters' split-K argument defaults to true in both, so set(false) / set(true) mean the
// same in each.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14)
#define XCEPTION_FAST_FP32_PRECISION_ENUM 1
#endif

class ExactMatmulGuard {
 public:
  explicit ExactMatmulGuard(at::ScalarType dtype) {
    at::Context& ctx = at::globalContext();
    if (dtype == at::kFloat) {
#ifdef XCEPTION_FAST_FP32_PRECISION_ENUM
      fp32_tf32_ = ctx.float32Precision(kCuda, kMatmul) == at::Float32Precision::TF32;
      if (fp32_tf32_) ctx.setFloat32Precision(kCuda, kMatmul, at::Float32Precision::IEEE);
#endif
    } else if (dtype == at::kHalf) {
      fp16_reduction_ = allows_reduced(ctx.allowFP16ReductionCuBLAS());
      if (fp16_reduction_) ctx.setAllowFP16ReductionCuBLAS(false);
      fp16_accumulation_ = ctx.allowFP16AccumulationCuBLAS();
      if (fp16_accumulation_) ctx.setAllowFP16AccumulationCuBLAS(false);
    } else if (dtype == at::kBFloat16) {
      bf16_reduction_ = allows_reduced(ctx.allowBF16ReductionCuBLAS());
      if (bf16_reduction_) ctx.setAllowBF16ReductionCuBLAS(false);
    }
  }
  ~ExactMatmulGuard() {
    at::Context& ctx = at::globalContext();
#ifdef XCEPTION_FAST_FP32_PRECISION_ENUM
    if (fp32_tf32_) ctx.setFloat32Precision(kCuda, kMatmul, at::Float32Precision::TF32);
#endif
    if (fp16_reduction_) ctx.setAllowFP16ReductionCuBLAS(true);
    if (fp16_accumulation_) ctx.setAllowFP16AccumulationCuBLAS(true);
    if (bf16_reduction_) ctx.setAllowBF16ReductionCuBLAS(true);
  }
  ExactMatmulGuard(const ExactMatmulGuard&) = delete;
  ExactMatmulGuard& operator=(const ExactMatmulGuard&) = delete;

 private:
#ifdef XCEPTION_FAST_FP32_PRECISION_ENUM
  static constexpr at::Float32Backend kCuda = at::Float32Backend::CUDA;
  static constexpr at::Float32Op kMatmul = at::Float32Op::MATMUL;
#endif

  template <typename Option>
  static bool allows_reduced(Option option) {
    if constexpr (std::is_same_v<Option, bool>) {
      return option;
    } else {  // anything but the default keeps the reduction in fp32 already
      return option == Option::AllowReducedPrecisionWithSplitK;
    }
  }

  at::NoTF32Guard no_tf32_;
  bool fp32_tf32_ = false, fp16_reduction_ = false, fp16_accumulation_ = false, bf16_reduction_ = false;
};

// The backward's [positions, channels] buffers (sepconv_params.h, BackwardIntermediates), in x's dtype.
struct Intermediates {
  Tensor grad_z, d, grad_d;
  BackwardIntermediates pointers() const { return {grad_z.data_ptr(), d.data_ptr(), grad_d.data_ptr()}; }
};

Intermediates backward_intermediates(const ConvGeometry& g, const Tensor& x) {
  const int64_t positions = g.n * g.h_out * g.w_out;
  return {fresh(at::empty({positions, g.c_out}, x.options())), fresh(at::empty({positions, g.c}, x.options())),
          fresh(at::empty({positions, g.c}, x.options()))};
}

// grad_d = grad_z pw ([P, Cout] x [Cout, C]) and grad_pw = grad_z^T d ([Cout, P] x [P, C]) on cuBLAS,
// both in x's dtype from fp32 accumulators (as the reference's convolution_backward stores them), on the
// current stream: after the first launch, before the second.
void pointwise_grads(Intermediates& m, const Tensor& pwc, Tensor& grad_pw) {
  const ExactMatmulGuard exact(m.grad_z.scalar_type());
  at::mm_out(m.grad_d, m.grad_z, pwc.view({pwc.size(0), pwc.size(1)}));
  Tensor grad_pw_2d = grad_pw.view({grad_pw.size(0), grad_pw.size(1)});
  at::mm_out(grad_pw_2d, m.grad_z.t(), m.d);
}

// The forwards' d [P, C] in x's dtype: the A operand of pointwise_forward.
Tensor forward_d(const ConvGeometry& g, const Tensor& x) {
  return fresh(at::empty({g.n * g.h_out * g.w_out, g.c}, x.options()));
}

// z = d pw^T ([P, C] x [C, Cout]) on cuBLAS into out, an output-shaped channels_last tensor (its memory
// is [P, Cout] row-major), in x's dtype from fp32 accumulators: the contract's z (the unfused 1x1
// conv stores it in T). On the current stream, between the forward's two launches.
void pointwise_forward(const Tensor& d, const Tensor& pwc, Tensor& out) {
  const ExactMatmulGuard exact(d.scalar_type());
  Tensor out_2d = out.permute({0, 2, 3, 1}).view({d.size(0), pwc.size(0)});
  at::mm_out(out_2d, d, pwc.view({pwc.size(0), pwc.size(1)}).t());
}

// --- CUDA implementations ----------------------------------------------------------------------------

Tensor sepconv_bn_infer_cuda(const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
                             const OptTensor& scale, const OptTensor& shift, const OptTensor& residual,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                             bool pre_relu, bool post_relu) {
  const ConvGeometry g = check_unit(x, dw_weight, pw_weight, stride, padding, dilation);
  check_optional_vector(scale, "scale", x, g.c_out, x.scalar_type());
  check_optional_vector(shift, "shift", x, g.c_out, x.scalar_type());
  if (residual.has_value() && residual->defined()) check_output_like(*residual, "residual", x, g);
  c10::cuda::CUDAGuard device_guard(x.device());

  const Tensor xc = channels_last(x), dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const Tensor scale_c = optional_contiguous(scale), shift_c = optional_contiguous(shift);
  const Tensor residual_c = optional_channels_last(residual);
  Tensor y = fresh(empty_channels_last({g.n, g.c_out, g.h_out, g.w_out}, x));
  const Tensor d = forward_d(g, x);

  SepConvInferParams p{unit_params(g, xc, dwc, pwc, pre_relu, post_relu), vec(scale_c), vec(shift_c),
                       optional_tensor4(residual_c), tensor4(y), d.data_ptr()};
  const Tensor ws = attach_workspace(p, x);
  check_launch(run_sepconv_bn_infer_d(p, current_stream()), "sepconv_bn_infer (d)");
  pointwise_forward(d, pwc, y);  // z, in y's buffer
  check_launch(run_sepconv_bn_infer_epilogue(p, current_stream()), "sepconv_bn_infer (epilogue)");
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> sepconv_bn_infer_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight,
    const OptTensor& scale, const OptTensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool pre_relu, bool post_relu) {
  const ConvGeometry g = check_unit(x, dw_weight, pw_weight, stride, padding, dilation);
  check_output_like(grad_y, "grad_y", x, g);
  check_optional_vector(scale, "scale", x, g.c_out, x.scalar_type());
  check_optional_vector(shift, "shift", x, g.c_out, x.scalar_type());
  c10::cuda::CUDAGuard device_guard(x.device());

  const Tensor gyc = channels_last(grad_y), xc = channels_last(x);
  const Tensor dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const Tensor scale_c = optional_contiguous(scale), shift_c = optional_contiguous(shift);
  Tensor grad_x = fresh(empty_channels_last(x.sizes(), x));
  Tensor grad_dw = fresh(at::empty(dw_weight.sizes(), dw_weight.options()));
  Tensor grad_pw = fresh(at::empty(pw_weight.sizes(), pw_weight.options()));
  // Absent scale/shift: empty gradients in x's dtype (as xception_fast.reference).
  Tensor grad_scale = fresh(scale_c.defined() ? at::empty_like(scale_c) : empty_vector(0, x, x.scalar_type()));
  Tensor grad_shift = fresh(shift_c.defined() ? at::empty_like(shift_c) : empty_vector(0, x, x.scalar_type()));

  // Absent scale/shift: no gradient to write (the empty tensors above are returned).
  Intermediates mid = backward_intermediates(g, x);
  SepConvInferBackwardParams p{unit_params(g, xc, dwc, pwc, pre_relu, post_relu), tensor4(gyc), vec(scale_c),
                               vec(shift_c), tensor4(grad_x), grad_dw.data_ptr(),
                               scale_c.defined() ? vec(grad_scale) : Vec{},
                               shift_c.defined() ? vec(grad_shift) : Vec{}, mid.pointers()};
  const Tensor ws = attach_workspace(p, x);
  check_launch(run_sepconv_bn_infer_backward_grad_z(p, current_stream()), "sepconv_bn_infer_backward (grad_z, d)");
  pointwise_grads(mid, pwc, grad_pw);
  check_launch(run_sepconv_bn_infer_backward_dw(p, current_stream()), "sepconv_bn_infer_backward (grad_x, grad_dw)");
  return {grad_x, grad_dw, grad_pw, grad_scale, grad_shift};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sepconv_bn_train_cuda(
    const Tensor& x, const Tensor& dw_weight, const Tensor& pw_weight, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool pre_relu, bool post_relu, double eps) {
  const ConvGeometry g = check_unit(x, dw_weight, pw_weight, stride, padding, dilation);
  check_optional_vector(bn_weight, "bn_weight", x, g.c_out, x.scalar_type());
  check_optional_vector(bn_bias, "bn_bias", x, g.c_out, x.scalar_type());
  if (residual.has_value() && residual->defined()) check_output_like(*residual, "residual", x, g);
  TORCH_CHECK(eps >= 0, "xception_fast: eps must be >= 0, got ", eps);
  c10::cuda::CUDAGuard device_guard(x.device());

  const Tensor xc = channels_last(x), dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const Tensor weight_c = optional_contiguous(bn_weight), bias_c = optional_contiguous(bn_bias);
  const Tensor residual_c = optional_channels_last(residual);
  Tensor y = fresh(empty_channels_last({g.n, g.c_out, g.h_out, g.w_out}, x));
  Tensor z = fresh(empty_channels_last({g.n, g.c_out, g.h_out, g.w_out}, x));
  Tensor mean = fresh(empty_vector(g.c_out, x, at::kFloat));
  Tensor var = fresh(empty_vector(g.c_out, x, at::kFloat));

  const Tensor d = forward_d(g, x);

  SepConvTrainParams p{unit_params(g, xc, dwc, pwc, pre_relu, post_relu), vec(weight_c), vec(bias_c),
                       optional_tensor4(residual_c), tensor4(y), tensor4(z), mean.data_ptr<float>(),
                       var.data_ptr<float>(), eps, d.data_ptr()};
  const Tensor ws = attach_workspace(p, x);
  check_launch(run_sepconv_bn_train_d(p, current_stream()), "sepconv_bn_train (d)");
  pointwise_forward(d, pwc, z);
  check_launch(run_sepconv_bn_train_stats_apply(p, current_stream()), "sepconv_bn_train (statistics, y)");
  return {y, z, mean, var};
}

std::tuple<Tensor, Tensor> bn_backward_reduce_cuda(const Tensor& grad_y, const Tensor& z, const Tensor& mean,
                                                   const Tensor& invstd, const OptTensor& bn_weight,
                                                   const OptTensor& bn_bias, bool post_relu) {
  // z plays x's part here: it fixes the device, the dtype and the shape [N, Cout, Ho, Wo].
  check_device(z, "z");
  check_rank(z, "z", 4, "[N, Cout, Ho, Wo]");
  check_float_dtype(z, "z");
  check_same_device(grad_y, "grad_y", z);
  check_rank(grad_y, "grad_y", 4, "[N, Cout, Ho, Wo]");
  check_shape(grad_y, "grad_y", z.sizes(), "z's shape");
  check_dtype(grad_y, "grad_y", z.scalar_type(), "z's");
  const int64_t c = z.size(1);
  CHECK_STATISTIC(mean, z, c);
  CHECK_STATISTIC(invstd, z, c);
  check_optional_vector(bn_weight, "bn_weight", z, c, z.scalar_type());
  check_optional_vector(bn_bias, "bn_bias", z, c, z.scalar_type());
  c10::cuda::CUDAGuard device_guard(z.device());

  const Tensor gyc = channels_last(grad_y), zc = channels_last(z);
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const Tensor weight_c = optional_contiguous(bn_weight), bias_c = optional_contiguous(bn_bias);
  Tensor sum_dy = fresh(empty_vector(c, z, at::kFloat));
  Tensor sum_dy_xhat = fresh(empty_vector(c, z, at::kFloat));

  BnBackwardReduceParams p{bn_backward_inputs(gyc, zc, mean_c, invstd_c, weight_c, bias_c), z.size(0), c, z.size(2),
                           z.size(3), to_dtype(z.scalar_type()), sum_dy.data_ptr<float>(),
                           sum_dy_xhat.data_ptr<float>(), post_relu};
  const Tensor ws = attach_workspace(p, z);
  check_launch(run_bn_backward_reduce(p, current_stream()), "bn_backward_reduce");
  return {sum_dy, sum_dy_xhat};
}

std::tuple<Tensor, Tensor, Tensor> sepconv_bn_train_backward_cuda(
    const Tensor& grad_y, const Tensor& x, const Tensor& z, const Tensor& dw_weight, const Tensor& pw_weight,
    const Tensor& mean, const Tensor& invstd, const OptTensor& bn_weight, const OptTensor& bn_bias,
    const Tensor& mean_dy, const Tensor& mean_dy_xhat, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool pre_relu, bool post_relu) {
  const ConvGeometry g = check_unit(x, dw_weight, pw_weight, stride, padding, dilation);
  check_output_like(grad_y, "grad_y", x, g);
  check_output_like(z, "z", x, g);
  CHECK_STATISTIC(mean, x, g.c_out);
  CHECK_STATISTIC(invstd, x, g.c_out);
  CHECK_STATISTIC(mean_dy, x, g.c_out);
  CHECK_STATISTIC(mean_dy_xhat, x, g.c_out);
  check_optional_vector(bn_weight, "bn_weight", x, g.c_out, x.scalar_type());
  check_optional_vector(bn_bias, "bn_bias", x, g.c_out, x.scalar_type());
  c10::cuda::CUDAGuard device_guard(x.device());

  const Tensor gyc = channels_last(grad_y), xc = channels_last(x), zc = channels_last(z);
  const Tensor dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const Tensor mean_dy_c = mean_dy.contiguous(), mean_dy_xhat_c = mean_dy_xhat.contiguous();
  const Tensor weight_c = optional_contiguous(bn_weight), bias_c = optional_contiguous(bn_bias);
  Tensor grad_x = fresh(empty_channels_last(x.sizes(), x));
  Tensor grad_dw = fresh(at::empty(dw_weight.sizes(), dw_weight.options()));
  Tensor grad_pw = fresh(at::empty(pw_weight.sizes(), pw_weight.options()));

  Intermediates mid = backward_intermediates(g, x);
  SepConvTrainBackwardParams p{unit_params(g, xc, dwc, pwc, pre_relu, post_relu),
                               bn_backward_inputs(gyc, zc, mean_c, invstd_c, weight_c, bias_c),
                               mean_dy_c.data_ptr<float>(), mean_dy_xhat_c.data_ptr<float>(), tensor4(grad_x),
                               grad_dw.data_ptr(), mid.pointers()};
  const Tensor ws = attach_workspace(p, x);
  check_launch(run_sepconv_bn_train_backward_grad_z(p, current_stream()), "sepconv_bn_train_backward (grad_z, d)");
  pointwise_grads(mid, pwc, grad_pw);
  check_launch(run_sepconv_bn_train_backward_dw(p, current_stream()), "sepconv_bn_train_backward (grad_x, grad_dw)");
  return {grad_x, grad_dw, grad_pw};
}

// --- CPU: a clear error instead of "Could not run ... from the 'CPU' backend" -------------------------

// One boxed kernel for the five tensor ops: names the first tensor argument that is not on CUDA.
void cpu_error(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const auto& arguments = schema.arguments();
  const size_t n = arguments.size();
  std::string name = "x";
  std::string device = "cpu";
  if (stack->size() >= n) {
    for (size_t i = 0; i < n; ++i) {
      const c10::IValue& value = (*stack)[stack->size() - n + i];
      if (value.isTensor() && value.toTensor().defined() && !value.toTensor().is_cuda()) {
        name = arguments[i].name();
        device = value.toTensor().device().str();
        break;
      }
    }
  }
  TORCH_CHECK(false, "xception_fast cuda provider: ", name, " must be a CUDA tensor, got a tensor on ", device,
              "; use backend='reference' for CPU tensors (or backend='triton' with TRITON_INTERPRET=1) [",
              schema.name(), "]");
}

// --- ops without tensors --------------------------------------------------------------------------

std::string build_info() {
  int runtime = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  std::ostringstream s;
  s << "{\"torch_version\": \"" << TORCH_VERSION << "\""
    << ", \"cuda_version\": \"" << CUDART_VERSION / 1000 << "." << (CUDART_VERSION % 1000) / 10 << "\""
    << ", \"cuda_runtime_version\": \"" << runtime / 1000 << "." << (runtime % 1000) / 10 << "\""
    << ", \"cuda_archs\": \"" << XF_STRINGIFY(XCEPTION_FAST_CUDA_ARCHS) << "\""
    << ", \"cuda_arch_list\": \"" << compiled_cuda_arch_list() << "\"}";
  return s.str();
}

}  // namespace
}  // namespace xception_fast

TORCH_LIBRARY(xception_fast_cuda, m) {
  m.def("sepconv_bn_infer(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? scale, Tensor? shift, "
        "Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, bool post_relu) -> Tensor");
  m.def("sepconv_bn_infer_backward(Tensor grad_y, Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? scale, "
        "Tensor? shift, int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, bool post_relu) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sepconv_bn_train(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? bn_weight, Tensor? bn_bias, "
        "Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, bool post_relu, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_backward_reduce(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, Tensor? bn_weight, "
        "Tensor? bn_bias, bool post_relu) -> (Tensor, Tensor)");
  m.def("sepconv_bn_train_backward(Tensor grad_y, Tensor x, Tensor z, Tensor dw_weight, Tensor pw_weight, "
        "Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, Tensor mean_dy, Tensor mean_dy_xhat, "
        "int[2] stride, int[2] padding, int[2] dilation, bool pre_relu, bool post_relu) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &xception_fast::build_info);
}

TORCH_LIBRARY_IMPL(xception_fast_cuda, CUDA, m) {
  m.impl("sepconv_bn_infer", &xception_fast::sepconv_bn_infer_cuda);
  m.impl("sepconv_bn_infer_backward", &xception_fast::sepconv_bn_infer_backward_cuda);
  m.impl("sepconv_bn_train", &xception_fast::sepconv_bn_train_cuda);
  m.impl("bn_backward_reduce", &xception_fast::bn_backward_reduce_cuda);
  m.impl("sepconv_bn_train_backward", &xception_fast::sepconv_bn_train_backward_cuda);
}

TORCH_LIBRARY_IMPL(xception_fast_cuda, CPU, m) {
  for (const char* name : {"sepconv_bn_infer", "sepconv_bn_infer_backward", "sepconv_bn_train",
                           "bn_backward_reduce", "sepconv_bn_train_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&xception_fast::cpu_error>());
  }
}
