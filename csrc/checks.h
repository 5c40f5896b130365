// Input checks of the xception_fast CUDA provider (host side only).
//
// Every message names the argument and says what was expected and what was given. The macros take
// the argument itself, flash-attention style: CHECK_DEVICE(x), CHECK_SHAPE(dw_weight, c, 1, kh, kw).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "sepconv_params.h"

namespace xception_fast {

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

inline void check_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "xception_fast: ", name, " must be a CUDA tensor, got a tensor on ", t.device());
}

// All tensors of one call on x's device.
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_device(t, name);
  TORCH_CHECK(t.device() == x.device(), "xception_fast: ", name, " is on ", t.device(), " but x is on ",
              x.device(), ": all tensors must be on one device");
}

inline void check_rank(const at::Tensor& t, const char* name, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, "xception_fast: ", name, " must be a ", rank, "-D ", layout, " tensor, got ",
              t.dim(), "-D with shape ", shape_str(t.sizes()));
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, "xception_fast: ", name, " must have shape ", shape_str(expected), " (",
              meaning, "), got ", shape_str(t.sizes()));
}

inline bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), "xception_fast: ", name,
              " must be float32, float16 or bfloat16 on the cuda provider, got ", t.scalar_type());
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected, const char* whose) {
  TORCH_CHECK(t.scalar_type() == expected, "xception_fast: ", name, " must have ", whose, " dtype ", expected,
              ", got ", t.scalar_type());
}

inline DType to_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "xception_fast: unsupported dtype ", dtype);
  }
  return DType::kFloat32;  // unreachable
}

// stride / padding / dilation: two integers >= minimum.
inline void check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2 && v[0] >= minimum && v[1] >= minimum, "xception_fast: ", name,
              " must be two integers >= ", minimum, ", got ", shape_str(v));
}

// A per-channel vector [c_out] on x's device: the statistics (float32 only), or the BN affine /
// folded scale and shift (float32 or the activations' dtype).
inline void check_vector(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t c_out,
                         bool float32_only, at::ScalarType act_dtype) {
  check_same_device(t, name, x);
  check_shape(t, name, {c_out}, "[Cout]");
  if (float32_only) {
    check_dtype(t, name, at::kFloat, "the statistics'");
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == act_dtype, "xception_fast: ", name,
                " must be float32 or x's dtype ", act_dtype, ", got ", t.scalar_type());
  }
}

inline void check_optional_vector(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x,
                                  int64_t c_out, at::ScalarType act_dtype) {
  if (t.has_value() && t->defined()) check_vector(*t, name, x, c_out, /*float32_only=*/false, act_dtype);
}

// An output-shaped activation [N, Cout, Ho, Wo] in x's dtype on x's device (residual, grad_y, z).
inline void check_output_like(const at::Tensor& t, const char* name, const at::Tensor& x,
                              const ConvGeometry& g) {
  check_same_device(t, name, x);
  check_rank(t, name, 4, "[N, Cout, Ho, Wo]");
  check_shape(t, name, {g.n, g.c_out, g.h_out, g.w_out}, "the output's [N, Cout, Ho, Wo]");
  check_dtype(t, name, x.scalar_type(), "x's");
}

// x, dw_weight, pw_weight, stride, padding, dilation: the part every unit op shares.
inline ConvGeometry check_unit(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_device(x, "x");
  check_rank(x, "x", 4, "[N, C, H, W]");
  check_float_dtype(x, "x");
  check_same_device(dw_weight, "dw_weight", x);
  check_same_device(pw_weight, "pw_weight", x);
  check_rank(dw_weight, "dw_weight", 4, "[C, 1, kh, kw] (depthwise conv weight)");
  check_rank(pw_weight, "pw_weight", 4, "[Cout, C, 1, 1] (1x1 conv weight)");
  check_dtype(dw_weight, "dw_weight", x.scalar_type(), "x's");
  check_dtype(pw_weight, "pw_weight", x.scalar_type(), "x's");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);

  ConvGeometry g;
  g.n = x.size(0);
  g.c = x.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.kh = dw_weight.size(2);
  g.kw = dw_weight.size(3);
  check_shape(dw_weight, "dw_weight", {g.c, 1, g.kh, g.kw}, "[C, 1, kh, kw] with C = x.size(1)");
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1, "xception_fast: dw_weight must have a non-empty kernel, got ",
              shape_str(dw_weight.sizes()));
  g.c_out = pw_weight.size(0);
  check_shape(pw_weight, "pw_weight", {g.c_out, g.c, 1, 1}, "[Cout, C, 1, 1] with C = x.size(1)");
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.h_out = (g.h + 2 * g.pad_h - g.dil_h * (g.kh - 1) - 1) / g.stride_h + 1;
  g.w_out = (g.w + 2 * g.pad_w - g.dil_w * (g.kw - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.h + 2 * g.pad_h >= g.dil_h * (g.kh - 1) + 1 && g.w + 2 * g.pad_w >= g.dil_w * (g.kw - 1) + 1,
              "xception_fast: x of spatial size [", g.h, ", ", g.w, "] is too small for a [", g.kh, ", ", g.kw,
              "] kernel with padding ", shape_str(padding), " and dilation ", shape_str(dilation));
  return g;
}

}  // namespace xception_fast

#define CHECK_DEVICE(x) ::xception_fast::check_device(x, #x)
#define CHECK_SAME_DEVICE(t, x) ::xception_fast::check_same_device(t, #t, x)
#define CHECK_SHAPE(x, ...) ::xception_fast::check_shape(x, #x, {__VA_ARGS__}, "[" #__VA_ARGS__ "]")
#define CHECK_STATISTIC(t, x, c_out) \
  ::xception_fast::check_vector(t, #t, x, c_out, /*float32_only=*/true, (x).scalar_type())
