// Device building blocks shared by sepconv_forward.cu and sepconv_backward.cu.
//
// Everything here has internal linkage (an anonymous namespace): each .cu gets its own copy, so the
// two translation units never define the same kernel symbol twice.
//
// Conventions used by every kernel of the extension:
// - Activations are NHWC with canonical strides: element (n, c, h, w) of a [N, C, H, W] tensor is
//   at ((n * H + h) * W + w) * C + c. An activation is therefore a row-major [positions, channels]
//   matrix, with position p = (n * H + h) * W + w. The launchers check this (is_nhwc) before launching.
// - Weights: dw [C, kh * kw], pw [Cout, C], both row-major. Per-channel vectors are contiguous.
// - T is the activation dtype (float, __half, __nv_bfloat16); all arithmetic is fp32 and a value is
//   rounded to T exactly where the unfused PyTorch modules would store it (see reference.py).
// - All flattened offsets are int64_t.
// - Blocks have kThreads = 128 threads (4 warps) unless a kernel says otherwise; a GEMM block owns a
//   kBM x kBN = 64 x 64 fp32 accumulator tile and consumes K in chunks of kBK = 32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "sepconv_infer_tiling.h"
#include "sepconv_params.h"
#include "sepconv_stats_merge.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "xception_fast: the CUDA kernels need sm_80 or newer (bf16 wmma); set XCEPTION_FAST_CUDA_ARCHS to 80 or above"
#endif

// flash-attention's static_switch style: turn the runtime dtype into a type alias T for the body.
//   return XF_DTYPE_SWITCH(params.dtype, T, [&] { return launch<T>(params, stream); });
#define XF_DTYPE_SWITCH(DTYPE, T, ...)                                   \
  [&]() -> cudaError_t {                                                 \
    switch (DTYPE) {                                                     \
      case ::xception_fast::DType::kFloat32: {                           \
        using T = float;                                                 \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case ::xception_fast::DType::kFloat16: {                           \
        using T = __half;                                                \
        return __VA_ARGS__();                                            \
      }                                                                  \
      case ::xception_fast::DType::kBFloat16: {                          \
        using T = __nv_bfloat16;                                         \
        return __VA_ARGS__();                                            \
      }                                                                  \
    }                                                                    \
    return cudaErrorInvalidValue;                                        \
  }()

namespace xception_fast {
namespace {

constexpr int kThreads = 128;  // threads of a GEMM block (4 warps)
constexpr int kBM = 64;        // GEMM tile rows
constexpr int kBN = 64;        // GEMM tile columns
constexpr int kBK = 32;        // GEMM reduction chunk
constexpr int kPad = 8;        // shared-memory row padding in elements (wmma: ldm % 8 == 0 for 16-bit types)
constexpr int kLdC = kBN + 4;  // fp32 accumulator tile [kBM][kLdC] in shared memory (wmma: ldm % 4 == 0)

// Reduction blocks (statistics, column sums): 32 channels x 8 lanes.
constexpr int kRedCols = 32;
constexpr int kRedLanes = 8;

// ---------------------------------------------------------------------------------------------------
// dtype helpers

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v as it reads back after being stored in T (round to nearest even, as PyTorch's .to(dtype)).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// torch.relu: negative values to 0, NaN stays NaN.
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// Element i of an optional per-channel vector (float32 or the activations' dtype) as float.
__device__ __forceinline__ float load_vec(const Vec& v, int64_t i) {
  switch (v.dtype) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(v.ptr)[i]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(v.ptr)[i]);
    default: return static_cast<const float*>(v.ptr)[i];
  }
}

__device__ __forceinline__ void store_as(void* out, DType dtype, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<__half*>(out)[i] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(out)[i] = v; break;
  }
}

// kV consecutive elements of T, as one 16-byte access when kV * sizeof(T) == 16 (the element-wise
// kernels' vector path: the pointer must then be 16-byte aligned).
template <typename T, int kV>
struct alignas(kV * sizeof(T) == 16 ? 16 : alignof(T)) Elems {
  T v[kV];
  static __device__ __forceinline__ Elems load(const T* p) {
    Elems e;
    if constexpr (kV * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(e.v) = *reinterpret_cast<const uint4*>(p);
    } else {
#pragma unroll
      for (int i = 0; i < kV; ++i) e.v[i] = p[i];
    }
    return e;
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kV * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
      for (int i = 0; i < kV; ++i) p[i] = v[i];
    }
  }
};

// kV consecutive fp32 per-channel values v[co .. co + kV - 1] of an element-wise kernel's step: 16-byte
// loads (kV / 4 of them) where kV is a multiple of 4 (the caller's vector_path then checked v's
// alignment, and co is a multiple of kV), else one load each. One vector load per 4 channels: scalar
// loads of 8 channels per element group cost 8 L1 wavefronts per warp-wide load, and left the
// element-wise kernels at a third to a half of the copy bandwidth (benchmarks/NOTES.md).
template <int kV>
__device__ __forceinline__ void load_channels(const float* __restrict__ v, int64_t co, float (&out)[kV]) {
  if constexpr (kV % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kV / 4; ++i) {
      const float4 f = *reinterpret_cast<const float4*>(v + co + 4 * i);
      out[4 * i] = f.x, out[4 * i + 1] = f.y, out[4 * i + 2] = f.z, out[4 * i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) out[i] = v[co + i];
  }
}

// An optional per-channel vector as fp32 [n], `absent` where it is null: the element-wise kernels then
// read plain floats (no dtype switch per element). absent = 1 for a scale (x * 1 == x), -0 for a shift
// (x + -0 == x, signed zeros included).
__global__ void __launch_bounds__(256) vec_to_float_kernel(Vec v, float absent, int64_t n, float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = v.ptr != nullptr ? load_vec(v, i) : absent;
  }
}

// Whether an element-wise kernel over [rows, c] may take 16-byte vectors: c a multiple of the vector
// and every pointer (null ones aside) 16-byte aligned.
template <typename T>
inline bool vector_path(int64_t c, std::initializer_list<const void*> ptrs) {
  if (c % (16 / static_cast<int64_t>(sizeof(T))) != 0) return false;
  for (const void* ptr : ptrs)
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Host helpers: layout checks, workspace carving, launch sizes

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Canonical NHWC strides for every dimension of size > 1 (size-1 dimensions are never indexed).
inline bool is_nhwc(const Tensor4& t, int64_t n, int64_t c, int64_t h, int64_t w) {
  if (n * c * h * w == 0) return true;
  if (t.ptr == nullptr) return false;
  return (c == 1 || t.stride_c == 1) && (w == 1 || t.stride_w == c) && (h == 1 || t.stride_h == w * c) &&
         (n == 1 || t.stride_n == h * w * c);
}

// Carves typed buffers out of one workspace allocation, each 256-byte aligned. With a null base it
// only counts bytes (workspace_size); pointers are then null.
class Workspace {
 public:
  explicit Workspace(void* base) : base_(static_cast<char*>(base)) {}

  template <typename U>
  U* take(int64_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    U* ptr = base_ != nullptr ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(count > 0 ? count : 0) * sizeof(U);
    return ptr;
  }
  size_t bytes() const { return offset_; }

 private:
  char* base_;
  size_t offset_ = 0;
};

// A 1-D grid of `blocks` blocks; false when it cannot be launched as one (never in practice).
inline bool fits_grid_x(int64_t blocks) { return blocks >= 0 && blocks <= 0x7fffffff; }

// Grid of a grid-stride elementwise kernel with 256-thread blocks.
inline unsigned int elementwise_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, 256);
  return static_cast<unsigned int>(blocks < (1 << 20) ? blocks : (1 << 20));
}

// ---------------------------------------------------------------------------------------------------
// Output positions of a tile: where their depthwise windows start in the input.

template <int kRows>
struct RowTable {
  int64_t img[kRows];  // offset of the position's image in x (n * H * W * C); -1: past the end (no position)
  int64_t hi0[kRows];  // ho * stride_h - pad_h: input row of the window's tap (0, .)
  int64_t wi0[kRows];  // wo * stride_w - pad_w
};

// Rows r = 0..kRows-1 of the table describe output positions p0 + r. Call with the whole block;
// __syncthreads() before reading the table.
template <int kRows>
__device__ void fill_rows(const ConvGeometry& g, int64_t p0, RowTable<kRows>& t) {
  const int64_t hw_out = g.h_out * g.w_out;
  const int64_t positions = g.n * hw_out;
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) {
    const int64_t p = p0 + r;
    if (p < positions) {
      const int64_t n = p / hw_out;
      const int64_t rem = p - n * hw_out;
      const int64_t ho = rem / g.w_out;
      const int64_t wo = rem - ho * g.w_out;
      t.img[r] = n * g.h * g.w * g.c;
      t.hi0[r] = ho * g.stride_h - g.pad_h;
      t.wi0[r] = wo * g.stride_w - g.pad_w;
    } else {
      t.img[r] = -1;
      t.hi0[r] = 0;
      t.wi0[r] = 0;
    }
  }
}

// The depthwise output d = dw(pre(x)) for the kRows positions of `rows` and the kCols channels
// c0 .. c0 + kCols - 1, accumulated in fp32 and rounded to T (as the unfused depthwise conv stores
// it), written to dst[r * ld + col]. Missing positions and channels >= C give 0.
// Thread mapping: channel col = tid % kCols (coalesced along C), rows tid / kCols + k * (kThreads / kCols).
// The taps are the outer loop so each thread loads each weight once.
template <typename T, int kRows, int kCols>
__device__ void depthwise_tile(const ConvGeometry& g, const T* __restrict__ x, const T* __restrict__ dw,
                               bool pre_relu, int64_t c0, const RowTable<kRows>& rows, T* dst, int ld) {
  static_assert(kThreads % kCols == 0, "kCols must divide the block");
  constexpr int kStep = kThreads / kCols;
  static_assert(kRows % kStep == 0, "rows must split evenly over the block");
  constexpr int kPerThread = kRows / kStep;
  const int col = threadIdx.x % kCols;
  const int r0 = threadIdx.x / kCols;
  const int64_t c = c0 + col;
  float acc[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) acc[k] = 0.f;
  if (c < g.c) {
    const int64_t taps = g.kh * g.kw;
    for (int64_t i = 0; i < g.kh; ++i) {
      for (int64_t j = 0; j < g.kw; ++j) {
        const float wv = to_float(dw[c * taps + i * g.kw + j]);
        const int64_t dh = i * g.dil_h;
        const int64_t dwd = j * g.dil_w;
#pragma unroll
        for (int k = 0; k < kPerThread; ++k) {
          const int r = r0 + k * kStep;
          const int64_t img = rows.img[r];
          if (img < 0) continue;
          const int64_t hi = rows.hi0[r] + dh;
          const int64_t wi = rows.wi0[r] + dwd;
          if (hi < 0 || hi >= g.h || wi < 0 || wi >= g.w) continue;  // zero padding
          float v = to_float(x[img + (hi * g.w + wi) * g.c + c]);
          if (pre_relu) v = relu(v);
          acc[k] = fmaf(v, wv, acc[k]);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) dst[(r0 + k * kStep) * ld + col] = from_float<T>(acc[k]);
}

// ---------------------------------------------------------------------------------------------------
// Block matrix product: acc[kBM x kBN] (fp32) += A[kBM x kBK] * B[kBK x kBN], A and B in shared memory.
//
// Layouts (element addresses): A row-major: A(m, k) = a[m * kLdA + k]; A col-major: a[k * kLdA + m].
// B row-major: B(k, n) = b[k * kLdB + n]; B col-major: b[n * kLdB + k].
//
// fp16 / bf16: tensor cores through nvcuda::wmma, 16x16x16 fragments with fp32 accumulators; the 4
// warps form a 2 x 2 grid, each warp owns a 32 x 32 sub-tile (2 x 2 fragments). Fragment pointers
// must be 32-byte aligned: the tiles are alignas(128), offsets are multiples of 16 elements along
// both dimensions and 16 * ld * sizeof(T) is a multiple of 32 since ld % 8 == 0.
// fp32: plain FMA on CUDA cores (no TF32: fp32 inputs keep full fp32 precision); each thread owns
// an 8 x 4 micro-tile: rows ty + 8 i, columns tx + 16 j (ty = tid / 16, tx = tid % 16).
template <typename T, bool kARowMajor, int kLdA, bool kBRowMajor, int kLdB>
struct BlockMma {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "wmma: 16-bit types");
  static_assert(kLdA % 8 == 0 && kLdB % 8 == 0, "wmma: ldm must be a multiple of 8 for 16-bit types");
  using ALayout = typename std::conditional<kARowMajor, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
  using BLayout = typename std::conditional<kBRowMajor, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  int warp_m, warp_n;  // this warp's 32 x 32 sub-tile

  __device__ BlockMma() {
    const int warp = threadIdx.x / 32;
    warp_m = warp / 2;
    warp_n = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  __device__ void run(const T* a, const T* b) {
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int m = warp_m * 32 + i * 16;
        nvcuda::wmma::load_matrix_sync(fa[i], kARowMajor ? a + m * kLdA + kk : a + kk * kLdA + m, kLdA);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = warp_n * 32 + j * 16;
        nvcuda::wmma::load_matrix_sync(fb[j], kBRowMajor ? b + kk * kLdB + n : b + n * kLdB + kk, kLdB);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  // The accumulator tile to c[m * kLdC + n] (shared memory).
  __device__ void store(float* c) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(c + (warp_m * 32 + i * 16) * kLdC + warp_n * 32 + j * 16, acc[i][j], kLdC,
                                        nvcuda::wmma::mem_row_major);
  }
};

template <bool kARowMajor, int kLdA, bool kBRowMajor, int kLdB>
struct BlockMma<float, kARowMajor, kLdA, kBRowMajor, kLdB> {
  float acc[8][4];
  int ty, tx;

  __device__ BlockMma() {
    ty = threadIdx.x / 16;
    tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }

  __device__ void run(const float* a, const float* b) {
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int m = ty + 8 * i;
        av[i] = kARowMajor ? a[m * kLdA + k] : a[k * kLdA + m];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = tx + 16 * j;
        bv[j] = kBRowMajor ? b[k * kLdB + n] : b[n * kLdB + k];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }

  __device__ void store(float* c) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[(ty + 8 * i) * kLdC + tx + 16 * j] = acc[i][j];
  }
};

// ---------------------------------------------------------------------------------------------------
// The fused main loop: z tile = pw(dw(pre(x))) for output positions m0 .. m0 + kBM - 1 and output
// channels n0 .. n0 + kBN - 1, left in s.c (fp32, unrounded) for the caller's epilogue.

constexpr int kLdFwd = kBK + kPad;  // A [kBM][kLdFwd] (positions x channels), B [kBN][kLdFwd] (pw rows)

template <typename T>
struct ForwardSmem {
  alignas(128) T a[kBM * kLdFwd];       // depthwise output, A(m, k) row-major
  alignas(128) T b[kBN * kLdFwd];       // pointwise weight, B(k, n) = pw[n0 + n][c0 + k]: col-major
  alignas(128) float c[kBM * kLdC];     // accumulators, then the epilogue's working tile
  RowTable<kBM> rows;
  float red[2][kThreads];               // per-thread partial sums of the epilogues
};

template <typename T>
__device__ void fused_forward_tile(const ConvGeometry& g, const T* __restrict__ x, const T* __restrict__ dw,
                                   const T* __restrict__ pw, bool pre_relu, int64_t m0, int64_t n0,
                                   ForwardSmem<T>& s) {
  fill_rows<kBM>(g, m0, s.rows);
  BlockMma<T, /*A row-major*/ true, kLdFwd, /*B row-major*/ false, kLdFwd> mma;
  __syncthreads();
  for (int64_t c0 = 0; c0 < g.c; c0 += kBK) {
    depthwise_tile<T, kBM, kBK>(g, x, dw, pre_relu, c0, s.rows, s.a, kLdFwd);
    for (int idx = threadIdx.x; idx < kBN * kBK; idx += kThreads) {
      const int k = idx % kBK;  // along C: coalesced reads of pw rows
      const int n = idx / kBK;
      const int64_t co = n0 + n;
      const int64_t c = c0 + k;
      s.b[n * kLdFwd + k] = (co < g.c_out && c < g.c) ? pw[co * g.c + c] : from_float<T>(0.f);
    }
    __syncthreads();
    mma.run(s.a, s.b);
    __syncthreads();
  }
  mma.store(s.c);
  __syncthreads();
}

// Which output tile block blockIdx.x computes, over n_tiles channel tiles: positions from m0 (tile
// row m_tile), channels from n0.
struct ForwardTile {
  int64_t m_tile, m0, n0;
};

// The prologue of every kernel built on the fused main loop: this block's tile, computed into s.
template <typename T>
__device__ ForwardTile run_forward_tile(const UnitParams& p, int64_t n_tiles, ForwardSmem<T>& s) {
  const int64_t tile = blockIdx.x;
  const ForwardTile t{tile / n_tiles, (tile / n_tiles) * kBM, (tile % n_tiles) * kBN};
  fused_forward_tile<T>(p.g, static_cast<const T*>(p.x.ptr), static_cast<const T*>(p.dw_weight),
                        static_cast<const T*>(p.pw_weight), p.pre_relu, t.m0, t.n0, s);
  return t;
}

// ---------------------------------------------------------------------------------------------------
// Deterministic column sums: out[j] = sum over r < rows of partial[r * cols + j], stored as `dtype`.
// Block: 32 columns x 8 lanes; lane l adds rows l, l + 8, ... in order, then lane 0 adds the 8 lane
// sums in order. rows == 0 gives zeros. Grid: ceil(cols / 32) blocks.
__global__ void __launch_bounds__(kRedCols* kRedLanes)
    column_sum_kernel(const float* __restrict__ partial, int64_t rows, int64_t cols, void* out, DType dtype) {
  __shared__ float lane_sum[kRedLanes][kRedCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kRedCols + tx;
  float sum = 0.f;
  if (col < cols) {
    for (int64_t r = ty; r < rows; r += kRedLanes) sum += partial[r * cols + col];
  }
  lane_sum[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int l = 0; l < kRedLanes; ++l) total += lane_sum[l][tx];
    store_as(out, dtype, col, total);
  }
}

inline cudaError_t launch_column_sum(const float* partial, int64_t rows, int64_t cols, void* out, DType dtype,
                                     cudaStream_t stream) {
  if (cols <= 0) return cudaSuccess;
  const int64_t blocks = ceil_div(cols, kRedCols);
  if (!fits_grid_x(blocks)) return cudaErrorInvalidConfiguration;
  column_sum_kernel<<<static_cast<unsigned int>(blocks), dim3(kRedCols, kRedLanes), 0, stream>>>(partial, rows, cols,
                                                                                                  out, dtype);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// The batch statistics from per-tile moments (level 3 of the statistics, sepconv_stats_merge.h):
// partial[(t * 3 + k) * c_out + co], k = 0 pivot, 1 mu, 2 M2 (stats_partial_offset), tile t holding
// counts(t) positions; writes mean, var (biased) and invstd; no tiles (an empty batch): mean 0, var 1.

// Where a pass writes: the next pass's partials [groups][3][c_out] and counts [groups] (a group's count
// is the same for every channel), or, in the final pass, the statistics [c_out].
struct MergeOut {
  float* partial;
  int64_t* counts;
  float *mean, *var, *invstd;
};

// The counts of a pass's own partials, for the pass after it.
struct ArrayCounts {
  const int64_t* counts;
  __device__ int64_t operator()(int64_t t) const { return counts[t]; }
};

// One pass over n partials (merge order: sepconv_stats_merge.h). Block: 32 channels x 8 lanes, one
// group of 32 channels at a time; grid: col_blocks x (groups, or as many as a grid holds), the channel
// blocks of one group adjacent (they read the same rows of partials), striding over the groups. kFinal:
// n <= kMergeGroup: one group (all of its leaves empty when n == 0: mean 0, var 1), the statistics written.
template <bool kFinal, class Counts>
__global__ void __launch_bounds__(kRedCols* kRedLanes)
    bn_stats_merge_kernel(const float* __restrict__ partial, int64_t n, Counts counts, int64_t c_out,
                          unsigned int col_blocks, float eps, MergeOut out) {
  using infer::Moments;
  static_assert(infer::kMergeLanes == kRedLanes, "one lane of the merge per row of the block");
  __shared__ Moments lane_moments[kRedLanes][kRedCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t co = static_cast<int64_t>(blockIdx.x % col_blocks) * kRedCols + tx;
  const int64_t groups = kFinal ? 1 : infer::merge_groups(n);
  const auto value = [=](int64_t t, int k) { return partial[infer::merge_offset(t, k, c_out, co)]; };
  for (int64_t g = blockIdx.x / col_blocks; g < groups; g += gridDim.x / col_blocks) {
    Moments lane{0, 0.f, 0.f, 0.f};
    if (co < c_out) lane = infer::merge_lane(counts, value, n, g, ty);
    lane_moments[ty][tx] = lane;
    __syncthreads();
    if (ty == 0 && co < c_out) {
      Moments lanes[kRedLanes];
#pragma unroll
      for (int l = 0; l < kRedLanes; ++l) lanes[l] = lane_moments[l][tx];
      infer::merge_tree(lanes);
      if constexpr (kFinal) {
        infer::finalize_moments(lanes[0], eps, out.mean[co], out.var[co], out.invstd[co]);
      } else {
        out.partial[infer::merge_offset(g, 0, c_out, co)] = lanes[0].pivot;
        out.partial[infer::merge_offset(g, 1, c_out, co)] = lanes[0].mu;
        out.partial[infer::merge_offset(g, 2, c_out, co)] = lanes[0].m2;
        if (co == 0) out.counts[g] = lanes[0].count;
      }
    }
    __syncthreads();  // lane_moments is rewritten for the next group
  }
}

// The workspace of the passes before the final one, for up to `tiles` tiles (merge_scratch_partials).
struct MergeScratch {
  float* partial;   // [merge_scratch_partials(tiles)][3][c_out], pass after pass
  int64_t* counts;  // [merge_scratch_partials(tiles)]
};

inline MergeScratch take_merge_scratch(Workspace& ws, int64_t tiles, int64_t c_out) {
  const int64_t partials = infer::merge_scratch_partials(tiles);
  MergeScratch s;
  s.partial = ws.take<float>(partials * 3 * c_out);
  s.counts = ws.take<int64_t>(partials);
  return s;
}

// The passes over n = tiles partials, each launch after the one it reads; c_out > 0.
template <class Counts>
cudaError_t launch_bn_stats_merge(const float* partial, int64_t n, Counts counts, int64_t c_out, float eps,
                                  MergeScratch scratch, float* mean, float* var, float* invstd, cudaStream_t stream) {
  const int64_t col_blocks = ceil_div(c_out, kRedCols);
  const int64_t max_grid = 0x7fffffff;
  if (col_blocks > max_grid) return cudaErrorInvalidConfiguration;
  const bool final = infer::merge_is_final(n);
  const int64_t groups = final ? 1 : infer::merge_groups(n);
  const int64_t grid = (groups < max_grid / col_blocks ? groups : max_grid / col_blocks) * col_blocks;
  const dim3 block(kRedCols, kRedLanes);
  const unsigned int cb = static_cast<unsigned int>(col_blocks);
  if (final) {
    bn_stats_merge_kernel<true, Counts><<<static_cast<unsigned int>(grid), block, 0, stream>>>(
        partial, n, counts, c_out, cb, eps, MergeOut{nullptr, nullptr, mean, var, invstd});
    return cudaGetLastError();
  }
  bn_stats_merge_kernel<false, Counts><<<static_cast<unsigned int>(grid), block, 0, stream>>>(
      partial, n, counts, c_out, cb, eps, MergeOut{scratch.partial, scratch.counts, nullptr, nullptr, nullptr});
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const MergeScratch rest{scratch.partial + groups * 3 * c_out, scratch.counts + groups};
  return launch_bn_stats_merge(scratch.partial, groups, ArrayCounts{scratch.counts}, c_out, eps, rest, mean, var,
                               invstd, stream);
}

}  // namespace
}  // namespace xception_fast
