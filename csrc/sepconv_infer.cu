// The tiled depthwise machinery of the CUDA provider: the depthwise phase (a position tile's halo
// staged per channel chunk, the depthwise computed from shared memory) and the kernels built on it,
// d_store_kernel (d = dw(pre(x)) [P, C] in T: the forwards' first step and the backwards' d, the A
// operand of cuBLAS) and dw_backward_tiled_kernel (the backward's grad_x and grad_dw), in
// sepconv_tiled_backward.cuh, included at the end. All the index math is in sepconv_infer_tiling.h
// (checked on the CPU by tests/cpp/test_infer_tiling.cpp, test_d_store_tiling.cpp,
// test_dw_backward_tiling.cpp); this file holds the device code that moves data (cp.async) and the
// weight pack. (The fused forward that ran its mma.sync GEMM after the depthwise in the same CTA was
// replaced by d store + cuBLAS + an element-wise epilogue: sepconv_forward.cu.)
//
// STATUS: compiled for sm_80 and sm_90a with nvcc 13.0; NOT YET RUN ON A GPU in this form
// (tests/test_providers.py and `python -m xception_fast verify --full` are the check, on a GPU).
//
// The depthwise phase, per CTA (kThreads = 256, one tile of bm output positions): the pixel table of
// the tile's halo box (source offsets, -1 for padding), then for each chunk of kBK channels,
// double-buffered: the halo box staged with 16-byte cp.async (zero-filled where it is padding or past
// C), the pre-ReLU applied once per staged element by the thread that copied it, a barrier, and the
// depthwise of the tile's rows for that chunk (fp32 accumulation, rounded to T as the unfused
// depthwise conv stores it). A pack kernel first writes the depthwise weights zero-padded in fp32
// into the workspace, so the main kernels need no masks.
//
// Cases left to the int64 kernels of sepconv_backward.cu (the launchers return *launched = false /
// *splits = -1): a halo box that does not fit in shared memory at the smallest tile, and tensors
// whose per-image or per-tile offsets do not fit in int32.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "sepconv_device.cuh"
#include "sepconv_infer.h"
#include "sepconv_infer_tiling.h"
#include "sepconv_params.h"

namespace xception_fast {
namespace infer {
namespace {

// ---------------------------------------------------------------------------------------------------
// Inline PTX (all sm_80+): cp.async

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(uint32_t dst_addr, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---------------------------------------------------------------------------------------------------
// Element pairs (one 32-bit word of a 16-bit type) and 16-byte vectors

template <typename T>
struct Pair;

template <>
struct Pair<__nv_bfloat16> {
  using Raw = uint32_t;
  // bf16 -> fp32 is a shift or a mask: one instruction per element.
  static __device__ __forceinline__ float2 unpack(Raw w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ Raw pack(float a, float b) {  // round to nearest even, both at once
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    Raw w;
    memcpy(&w, &v, 4);
    return w;
  }
  static __device__ __forceinline__ Raw relu(Raw w) {  // packed max that keeps NaN (as torch.relu)
    __nv_bfloat162 v;
    memcpy(&v, &w, 4);
    v = __hmax2_nan(v, __floats2bfloat162_rn(0.f, 0.f));
    memcpy(&w, &v, 4);
    return w;
  }
};

template <>
struct Pair<__half> {
  using Raw = uint32_t;
  static __device__ __forceinline__ float2 unpack(Raw w) {
    __half2 v;
    memcpy(&v, &w, 4);
    return __half22float2(v);
  }
  static __device__ __forceinline__ Raw pack(float a, float b) {
    const __half2 v = __floats2half2_rn(a, b);
    Raw w;
    memcpy(&w, &v, 4);
    return w;
  }
  static __device__ __forceinline__ Raw relu(Raw w) {
    __half2 v;
    memcpy(&v, &w, 4);
    v = __hmax2_nan(v, __floats2half2_rn(0.f, 0.f));
    memcpy(&w, &v, 4);
    return w;
  }
};


// A 16-byte vector of T as kVec floats and back: 4 pairs of a 16-bit type or 4 floats.
template <typename T>
struct Vec16 {
  static constexpr int kVec = 16 / sizeof(T);
  static __device__ __forceinline__ void unpack(const uint4& u, float (&f)[kVec]) {
    if constexpr (sizeof(T) == 2) {
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 v = Pair<T>::unpack(w[i]);
        f[2 * i] = v.x, f[2 * i + 1] = v.y;
      }
    } else {
      f[0] = __uint_as_float(u.x), f[1] = __uint_as_float(u.y);
      f[2] = __uint_as_float(u.z), f[3] = __uint_as_float(u.w);
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&f)[kVec]) {
    if constexpr (sizeof(T) == 2) {
      return make_uint4(Pair<T>::pack(f[0], f[1]), Pair<T>::pack(f[2], f[3]), Pair<T>::pack(f[4], f[5]),
                        Pair<T>::pack(f[6], f[7]));
    } else {
      return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
    }
  }
  static __device__ __forceinline__ uint4 relu(uint4 u) {
    if constexpr (sizeof(T) == 2) {
      return make_uint4(Pair<T>::relu(u.x), Pair<T>::relu(u.y), Pair<T>::relu(u.z), Pair<T>::relu(u.w));
    } else {
      float f[4];
      unpack(u, f);
#pragma unroll
      for (int e = 0; e < 4; ++e) f[e] = f[e] < 0.f ? 0.f : f[e];
      return pack(f);
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// Kernel arguments besides the plan

template <typename T>
struct Args {
  const T* x;            // [N, H, W, C]
  const float* dw;       // packed [taps][kp]
  T* y;                  // the d store's d [P, C]
  bool pre_relu;
  bool x_vectors;        // C % vec == 0 and x 16-byte aligned: the halo moves as 16-byte cp.async
  bool pairs;            // the d store: C % vec == 0 and d 16-byte aligned (whole 16-byte vector stores)
};
// What the pack kernel packs. kFlipped (the backward's grad_x): the depthwise taps reversed
// (dx_forward_tap).
enum class PackMode { kForward, kFlipped };

// Weights and the affine vectors, padded into the workspace (see packed_pw_offset).
template <typename T>
__global__ void __launch_bounds__(256)
    pack_weights_kernel(const Plan p, const T* __restrict__ dw, const T* __restrict__ pw, Vec scale, Vec shift,
                        PackMode mode, float* __restrict__ dwp, T* __restrict__ pwp, float* __restrict__ scalep,
                        float* __restrict__ shiftp) {
  const int pw_elems = packed_pw_elems(p), dw_elems = packed_dw_elems(p);
  const int total = pw_elems + dw_elems + p.cout_pad;
  const int taps = p.kh * p.kw;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int idx = static_cast<int>(i);
    if (idx < pw_elems) {
      const int co = idx / p.kp, ci = idx - co * p.kp;
      const bool real = co < p.c_out && ci < p.c && pw != nullptr;  // no pw (grad_x): zeros
      pwp[packed_pw_offset(p, co, ci, sizeof(T))] = real ? pw[co * p.c + ci] : from_float<T>(0.f);
    } else if (idx < pw_elems + dw_elems) {
      const int j = idx - pw_elems, tap = j / p.kp, ci = j - tap * p.kp;
      const int src_tap = mode == PackMode::kFlipped ? dx_forward_tap(p, tap) : tap;
      dwp[packed_dw_offset(p, tap, ci)] = ci < p.c ? to_float(dw[ci * taps + src_tap]) : 0.f;
    } else {
      const int co = idx - pw_elems - dw_elems;
      const bool real = co < p.c_out;
      scalep[co] = real && scale.ptr != nullptr ? load_vec(scale, co) : 1.f;
      shiftp[co] = real && shift.ptr != nullptr ? load_vec(shift, co) : -0.f;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Phase 1: the d tile

// The staging of chunks ck_begin .. ck_end - 1 of the tile's halo box (and their depthwise weights),
// each handed to chunk_fn(staged channel vector, its weights, c0, base) on the threads that have rows.
// Ends with a barrier. The forward and the backward's d store compute all chunks, the depthwise
// backward (on grad_d) one per CTA.
template <typename T, int BM, int KH, int KW, class ChunkFn>
__device__ __forceinline__ void depthwise_phase(const Plan& p, const Args<T>& a, const SmemLayout& L,
                                                unsigned char* smem, const TileRange& t, const HaloBox& b,
                                                int ck_begin, int ck_end, ChunkFn&& chunk_fn) {
  using V = Vec16<T>;
  constexpr int kVec = V::kVec, kVP = kBK / kVec, kSlots = kThreads / kVP;
  constexpr int kPos = dw_rows_per_thread(BM, sizeof(T));
  static_assert(BM >= kSlots ? kPos * kSlots == BM : kSlots % BM == 0, "tile rows must split evenly");
  const int tid = threadIdx.x;
  int* table = reinterpret_cast<int*>(smem + L.table);
  // Selected, not indexed: an indexed pointer array would live in local memory.
  const auto halo = [&](int buf) { return reinterpret_cast<T*>(smem + (buf ? L.halo[1] : L.halo[0])); };
  const auto wts = [&](int buf) { return reinterpret_cast<float*>(smem + (buf ? L.wts[1] : L.wts[0])); };
  const T* x_img = a.x + static_cast<int64_t>(t.img) * p.h * p.w * p.c;
  const int pixels = b.rows * b.cols;

  // The data-dependent loops of this phase are kept rolled (unroll 1): they issue copies, not math.
#pragma unroll 1
  for (int q = tid; q < pixels; q += kThreads) table[q] = halo_source_offset(p, b, q);
  const int cv = dw_cv(tid, sizeof(T)), slot0 = dw_row(tid, 0, sizeof(T));
  const bool active = dw_active(tid, BM, sizeof(T));
  int base[kPos];
#pragma unroll
  for (int q = 0; q < kPos; ++q) base[q] = halo_base_pixel(p, t, b, dw_row(tid, q, sizeof(T)));
  __syncthreads();  // the table

  // Chunk `ck` of channels into buffer `buf`: the halo with 16-byte cp.async (the ReLU follows once it
  // has landed), or element by element with the ReLU applied here when x does not allow 16-byte
  // loads; the chunk's depthwise weights with cp.async.
  auto stage = [&](int ck, int buf) {
    const int c0 = ck * kBK;
    if (a.x_vectors) {
      const int c = c0 + cv * kVec;
      const bool channels = c < p.c;  // whole vectors: C is a multiple of kVec here
      const char* x_bytes = reinterpret_cast<const char*>(x_img);
      uint32_t dst = smem_addr(halo(buf) + slot0 * kBK + cv * kVec);
      const int* src_off = table + slot0;
      // Pointers advance by one slot stride per pixel: no index arithmetic in the loop.
#pragma unroll 1
      for (int pixel = slot0; pixel < pixels; pixel += kSlots) {
        const int off = *src_off;
        const bool real = channels && off >= 0;
        // Padding: 16 zero bytes, nothing read (the image's first element stands in as the address).
        const uint32_t bytes = real ? static_cast<uint32_t>(off + c) * sizeof(T) : 0u;
        cp_async16(dst, x_bytes + bytes, real ? 16 : 0);
        src_off += kSlots;
        dst += kSlots * kBK * sizeof(T);
      }
    } else {
      T* dst = halo(buf);
      for (int idx = tid; idx < pixels * kBK; idx += kThreads) {
        const int pixel = idx / kBK, ch = idx - pixel * kBK;
        const int off = table[pixel], c = c0 + ch;
        float v = off >= 0 && c < p.c ? to_float(x_img[off + c]) : 0.f;
        if (a.pre_relu) v = relu(v);
        dst[idx] = from_float<T>(v);
      }
    }
    float* w = wts(buf);
#pragma unroll 1
    for (int u = tid; u < wts_vectors(p); u += kThreads) {
      const int tap = static_cast<unsigned>(u) / (kBK / 4), part = static_cast<unsigned>(u) % (kBK / 4);
      cp_async16(w + tap * kBK + part * 4, a.dw + packed_dw_offset(p, tap, c0 + part * 4), 16);
    }
  };

  stage(ck_begin, 0);
  cp_async_commit();
  for (int ck = ck_begin; ck < ck_end; ++ck) {
    const int buf = (ck - ck_begin) & 1, c0 = ck * kBK;
    if (ck + 1 < ck_end) stage(ck + 1, buf ^ 1);  // that buffer was last read before the previous barrier
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of chunk ck have landed
    if (a.x_vectors && a.pre_relu) {
      uint4* own = reinterpret_cast<uint4*>(halo(buf) + cv * kVec);
#pragma unroll 1
      for (int pixel = slot0; pixel < pixels; pixel += kSlots) {
        own[pixel * kVP] = V::relu(own[pixel * kVP]);
      }
    }
    __syncthreads();  // chunk ck staged (and ReLU'd) by every thread

    if (active) chunk_fn(halo(buf) + cv * kVec, wts(buf) + cv * kVec, c0, base);
    __syncthreads();  // buffer `buf` free for chunk ck + 2; after the last chunk, d complete
  }
}

// ---------------------------------------------------------------------------------------------------
// Launcher

constexpr int64_t kInt32Max = 0x7fffffff;

// Whether the plan's int32 offsets cannot overflow (the kernel uses int32 inside an image, a tile,
// the packed weights and shared memory; image and tile bases are int64).
bool fits_int32(const ConvGeometry& g) {
  const int64_t kp = (g.c + kBK) / kBK * kBK, cout_pad = (g.c_out + kBN) / kBN * kBN;
  return g.n <= kInt32Max && g.h * g.w * g.c < kInt32Max && g.h_out * g.w_out < kInt32Max &&
         g.n * g.h_out * g.w_out < kInt32Max && kp * cout_pad + (g.kh * g.kw + 2) * kp + 2 * cout_pad < kInt32Max &&
         256 * g.c_out < kInt32Max && g.h + 2 * g.pad_h < kInt32Max && g.w + 2 * g.pad_w < kInt32Max;
}

Plan plan_for(const ConvGeometry& g, TileChoice choice) {
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  return make_plan(i(g.n), i(g.c), i(g.h), i(g.w), i(g.c_out), i(g.kh), i(g.kw), i(g.stride_h), i(g.stride_w),
                   i(g.pad_h), i(g.pad_w), i(g.dil_h), i(g.dil_w), choice.bm, choice.row_segments);
}

// Packed weights in the workspace (the layout depends on the geometry only).
template <typename T>
struct Packed {
  T* pw;
  float *dw, *scale, *shift;
};

template <typename T>
Packed<T> carve(const Plan& p, Workspace& ws) {
  Packed<T> r;
  r.pw = ws.take<T>(packed_pw_elems(p));
  r.dw = ws.take<float>(packed_dw_elems(p));
  r.scale = ws.take<float>(p.cout_pad);
  r.shift = ws.take<float>(p.cout_pad);
  return r;
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// ---------------------------------------------------------------------------------------------------
// The backward's d store and grad_x / grad_dw kernels and launchers

#include "sepconv_tiled_backward.cuh"

// The workspace bytes carve<T> takes for `p`'s packed weights: fp32, or 2-byte elements for both 16-bit
// types (bfloat16 packs as __half does).
size_t packed_bytes(const Plan& p, DType dtype) {
  Workspace ws(nullptr);
  if (dtype == DType::kFloat32) {
    carve<float>(p, ws);
  } else {
    carve<__half>(p, ws);
  }
  return ws.bytes();
}

}  // namespace
}  // namespace infer

bool dw_backward_tiled_covers(const ConvGeometry& g) {
  // The kernel's row offsets run up to a row step (kThreads rows of C) past the image's end.
  return infer::fits_int32(g) && g.h * g.w * g.c + infer::kThreads * g.c < infer::kInt32Max &&
         infer::dx_supported(static_cast<int>(g.kh), static_cast<int>(g.kw), static_cast<int>(g.stride_h),
                             static_cast<int>(g.stride_w), static_cast<int>(g.pad_h), static_cast<int>(g.pad_w),
                             static_cast<int>(g.dil_h), static_cast<int>(g.dil_w));
}

size_t dw_backward_tiled_workspace_size(const ConvGeometry& g, DType dtype) {
  if (!dw_backward_tiled_covers(g)) return 0;
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  const infer::Plan plan = infer::dx_plan(i(g.n), i(g.c), i(g.h), i(g.w), i(g.kh), i(g.kw), i(g.pad_h), i(g.pad_w),
                                          i(g.dil_h), i(g.dil_w), 64, 0);
  return infer::packed_bytes(plan, dtype);
}

cudaError_t run_dw_backward_tiled(const DwBackwardParams& params, cudaStream_t stream, int* splits) {
  *splits = -1;
  if (!dw_backward_tiled_covers(params.g) || params.max_splits < 1) return cudaSuccess;
  return XF_DTYPE_SWITCH(params.dtype, T, [&] { return infer::run_dw_backward<T>(params, stream, splits); });
}

size_t d_store_tiled_workspace_size(const ConvGeometry& g, DType dtype) {
  if (!infer::fits_int32(g)) return 0;
  return infer::packed_bytes(infer::ds_plan(g, {32, 0}), dtype);  // the sizes do not depend on the tile
}

cudaError_t run_d_store_tiled(const DStoreParams& params, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (!infer::fits_int32(params.g)) return cudaSuccess;
  return XF_DTYPE_SWITCH(params.dtype, T, [&] { return infer::run_d_store<T>(params, stream, launched); });
}

}  // namespace xception_fast
