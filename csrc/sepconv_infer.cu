// The tiled forward of the CUDA provider. Inference: y = post(pw(dw(pre(x))) * scale + shift) + residual,
// one kernel, the depthwise computed once per (position tile, channel chunk) and reused as the A
// operand of every Cout tile. The design and all its index math are in sepconv_infer_tiling.h
// (checked on the CPU by tests/cpp/test_infer_tiling.cpp); this file holds the device code that
// moves data (cp.async, ldmatrix, mma.sync) and the launcher.
//
// STATUS: compiled for sm_80 and sm_90a with nvcc 13.0; NOT YET RUN ON A GPU (tests/test_providers.py
// and `python -m xception_fast verify --full` are the check, on a GPU).
//
// Per CTA (kThreads = 256, one tile of bm output positions):
// 1. The pixel table of the tile's halo box (source offsets, -1 for padding), then for each chunk
//    of kBK channels, double-buffered: the halo box staged with 16-byte cp.async (zero-filled where
//    it is padding or past C), the pre-ReLU applied once per staged element by the thread that
//    copied it, a barrier, and the depthwise of the tile's rows for that chunk (fp32 accumulation,
//    rounded to T as the unfused depthwise conv stores it) into the resident d tile.
// 2. For every Cout tile and K chunk, the packed pointwise weights through a kStages-deep cp.async
//    ring (one barrier per stage, the ring running on across Cout tiles); fp16/bf16: ldmatrix +
//    mma.sync.m16n8k16 with fp32 accumulators (portable to sm_80; Hopper wgmma is later work);
//    fp32: FFMA on exact fp32 products (no TF32). After the last K chunk of a Cout tile, the
//    epilogue straight from the accumulators: z rounded to T, * scale, + shift (fp32, no fused
//    multiply-add, as the reference's two ops), rounded to T, post-ReLU, + residual, stored.
// A pack kernel first writes the weights zero-padded into the workspace (the pointwise stage by stage
// in the ring's layout, the depthwise and scale / shift in fp32), so the main kernel needs no masks.
//
// The training forward is the same kernel with kStats = true (run_train): the epilogue stores z
// (scale 1 and shift -0, exact for every value; no post-ReLU, no residual) and, before that, the
// BatchNorm moments of each (tile, Cout tile) from the accumulator registers (tile_stats_mma /
// tile_stats_ffma: per part in registers and shuffles, the parts merged through a small shared-memory
// area, one partial per tile and channel); bn_stats_merge_kernel's passes then merge the tiles per channel.
// The statistics math is in sepconv_infer_tiling.h and checked by tests/cpp/test_train_stats.cpp.
//
// Cases routed to the int64 kernel of sepconv_forward.cu (the launcher returns *launched = false):
// a d tile that does not fit in shared memory at the smallest tile (C above about 3,000 in 16-bit,
// 1,400 in fp32 on a Hopper GPU), and tensors whose per-image or per-tile offsets do not fit in int32.

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
// Inline PTX (all sm_80+)

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

// addr: a shared-memory byte address (smem_addr).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------------
// Element pairs (one 32-bit word of a 16-bit type, a float2 for fp32) and 16-byte vectors

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

template <>
struct Pair<float> {
  using Raw = float2;
  static __device__ __forceinline__ float2 unpack(Raw w) { return w; }
  static __device__ __forceinline__ Raw pack(float a, float b) { return make_float2(a, b); }
  static __device__ __forceinline__ Raw relu(Raw w) {  // NaN < 0 is false: NaN stays NaN
    return make_float2(w.x < 0.f ? 0.f : w.x, w.y < 0.f ? 0.f : w.y);
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
  const T* pw;           // packed, see packed_pw_offset
  const float* scale;    // packed [cout_pad] (1 where absent)
  const float* shift;    // packed [cout_pad] (-0 where absent)
  const T* residual;     // optional [N, Ho, Wo, Cout]
  T* y;                  // [N, Ho, Wo, Cout]
  bool pre_relu, post_relu;
  bool x_vectors;        // C % vec == 0 and x 16-byte aligned: the halo moves as 16-byte cp.async
  bool pairs;            // Cout even and y / residual aligned for whole-pair stores
  float* partial;        // training forward (kStats): the per-tile moments, see stats_partial_offset
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

// The depthwise of one chunk for this thread's rows (see depthwise_rows) into fp32 accumulators: src /
// wsrc point at the thread's channel vector in the staged halo / weights.
template <typename T, int KH, int KW, int kPos>
__device__ __forceinline__ void depthwise_acc(const Plan& p, const HaloBox& b, const int (&base)[kPos], const T* src,
                                              const float* wsrc, float (&acc)[kPos][Vec16<T>::kVec]) {
  using V = Vec16<T>;
  constexpr int kVec = V::kVec;
#pragma unroll
  for (int q = 0; q < kPos; ++q)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[q][e] = 0.f;
  depthwise_rows<KH, KW, kPos, kVec>(
      p, b, base,
      [&](int pixel, float(&xv)[kVec]) { V::unpack(*reinterpret_cast<const uint4*>(src + pixel * kBK), xv); },
      [&](int tap, float(&wv)[kVec]) {
#pragma unroll
        for (int e = 0; e < kVec / 4; ++e) {
          const float4 w = *reinterpret_cast<const float4*>(wsrc + tap * kBK + 4 * e);
          wv[4 * e] = w.x, wv[4 * e + 1] = w.y, wv[4 * e + 2] = w.z, wv[4 * e + 3] = w.w;
        }
      },
      acc);
}

// The same, rounded to T into the shared d tile: dst at the thread's first d element, rows dst_step apart.
template <typename T, int KH, int KW, int kPos>
__device__ __forceinline__ void depthwise_chunk(const Plan& p, const HaloBox& b, const int (&base)[kPos], const T* src,
                                                const float* wsrc, T* dst, int dst_step) {
  float acc[kPos][Vec16<T>::kVec];
  depthwise_acc<T, KH, KW, kPos>(p, b, base, src, wsrc, acc);
#pragma unroll
  for (int q = 0; q < kPos; ++q) *reinterpret_cast<uint4*>(dst + q * dst_step) = Vec16<T>::pack(acc[q]);
}

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

// The depthwise of chunks ck_begin .. ck_end - 1 into d (row pitch d_ld, chunk ck_begin at column 0).
template <typename T, int BM, int KH, int KW>
__device__ __forceinline__ void d_tile_phase(const Plan& p, const Args<T>& a, const SmemLayout& L, unsigned char* smem,
                                             const TileRange& t, const HaloBox& b, T* d, int d_ld, int ck_begin,
                                             int ck_end) {
  constexpr int kVec = Vec16<T>::kVec, kSlots = kThreads / (kBK / kVec);
  constexpr int kPos = dw_rows_per_thread(BM, sizeof(T));
  T* dst = d + dw_row(threadIdx.x, 0, sizeof(T)) * d_ld + dw_cv(threadIdx.x, sizeof(T)) * kVec - ck_begin * kBK;
  depthwise_phase<T, BM, KH, KW>(p, a, L, smem, t, b, ck_begin, ck_end,
                                 [&](const T* src, const float* wsrc, int c0, const int(&base)[kPos]) {
                                   depthwise_chunk<T, KH, KW, kPos>(p, b, base, src, wsrc, dst + c0, kSlots * d_ld);
                                 });
}

// ---------------------------------------------------------------------------------------------------
// Epilogue: the accumulators of one Cout tile to y, as element pairs (columns co, co + 1, co even)

template <typename T>
struct Epilogue {
  const Plan& p;
  const Args<T>& a;
  T* y;                // the tile's first output row
  const T* residual;   // the tile's first residual row, or null
  int count;           // valid rows

  __device__ __forceinline__ bool has_residual() const {
    return residual != nullptr;
  }

  // z rounded to T, * scale, + shift (two separately rounded fp32 ops, as the reference), rounded to
  // T, post-ReLU: the pair in T.
  __device__ __forceinline__ typename Pair<T>::Raw finish(float acc0, float acc1, float2 sc, float2 sh) const {
    const float2 z = Pair<T>::unpack(Pair<T>::pack(acc0, acc1));
    const typename Pair<T>::Raw v =
        Pair<T>::pack(__fadd_rn(__fmul_rn(z.x, sc.x), sh.x), __fadd_rn(__fmul_rn(z.y, sc.y), sh.y));
    return a.post_relu ? Pair<T>::relu(v) : v;
  }

  // Whole pair, no masks (full_tile and a.pairs): yp / rp point at the pair in y / the residual.
  __device__ __forceinline__ void store_full(T* yp, const T* rp, float acc0, float acc1, float2 sc, float2 sh) const {
    typename Pair<T>::Raw v = finish(acc0, acc1, sc, sh);
    if (has_residual()) {  // added in fp32, rounded once (as torch's T + T)
      const float2 f = Pair<T>::unpack(v);
      const float2 res = Pair<T>::unpack(*reinterpret_cast<const typename Pair<T>::Raw*>(rp));
      v = Pair<T>::pack(f.x + res.x, f.y + res.y);
    }
    *reinterpret_cast<typename Pair<T>::Raw*>(yp) = v;
  }

  // Masked, element by element: rows past count, columns past c_out, unaligned pairs.
  __device__ __forceinline__ void store_masked(int r, int co, float acc0, float acc1, float2 sc, float2 sh) const {
    if (r >= count) return;
    const float2 f = Pair<T>::unpack(finish(acc0, acc1, sc, sh));
    const int off = r * p.c_out + co;
    if (co < p.c_out) y[off] = from_float<T>(residual != nullptr ? f.x + to_float(residual[off]) : f.x);
    if (co + 1 < p.c_out) y[off + 1] = from_float<T>(residual != nullptr ? f.y + to_float(residual[off + 1]) : f.y);
  }
};

// ---------------------------------------------------------------------------------------------------
// Training statistics of one Cout tile, from the accumulator registers (the levels 1 and 2 of the
// statistics in sepconv_infer_tiling.h). Called by every thread at the end of each Cout tile, before
// the epilogue stores z; ends with a barrier. The shared moments area is next written one Cout tile
// later, after at least one more ring barrier, so one barrier per Cout tile suffices.

// Level 2: thread `col` merges the parts of its column in order into the tile's partial.
template <int BM>
__device__ __forceinline__ void stats_merge_parts(const Plan& p, float* partial, const float* st, const TileRange& t,
                                                  int nt, int elem_bytes) {
  __syncthreads();  // every part's moments in shared memory
  const int col = threadIdx.x, co = nt * kBN + col;
  if (col < kBN && co < p.c_out) {
    Moments m{0, 0.f, 0.f, 0.f};
    for (int part = 0; part < stats_parts(elem_bytes); ++part) {
      const Moments b{stats_part_rows(BM, t.count, part, elem_bytes), st[stats_smem_index(part, 0, col)],
                      st[stats_smem_index(part, 1, col)], st[stats_smem_index(part, 2, col)]};
      merge_moments(m, b);
    }
    partial[stats_partial_offset(p, blockIdx.x, 0, co)] = m.pivot;
    partial[stats_partial_offset(p, blockIdx.x, 1, co)] = m.mu;
    partial[stats_partial_offset(p, blockIdx.x, 2, co)] = m.m2;
  }
}

// The sum over the 8 lanes of an m16n8 column (lanes with the same lane % 4), in every one of them.
__device__ __forceinline__ float column_sum_mma(float v) {
#pragma unroll
  for (int m = 4; m < 32; m *= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Level 1, mma.sync: this lane holds rows row0 + 16 i + acc_row(lane, 2 h) (q = 2 i + h) of columns
// col0 + 8 j + acc_col(lane, e).
template <typename T, int BM>
__device__ __forceinline__ void tile_stats_mma(const Plan& p, float* partial, float* st, const TileRange& t, int nt,
                                               const float (&acc)[BM / 32][4][4]) {
  constexpr int kMF = BM / 32, kRows = 2 * kMF;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = warp_row0(warp, BM), col0 = warp_col0(warp);
  const int part = mma_stats_part(warp), count = stats_part_rows(BM, t.count, part, 2);
  __syncwarp();  // the warp is converged here (the epilogue is warp-uniform): plain shuffles below
  bool valid[kRows];
#pragma unroll
  for (int i = 0; i < kMF; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) valid[2 * i + h] = row0 + 16 * i + acc_row(lane, 2 * h) < t.count;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float z[2][kRows];  // z rounded to T, as stored: [e][q]
#pragma unroll
    for (int i = 0; i < kMF; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 v = Pair<T>::unpack(Pair<T>::pack(acc[i][j][2 * h], acc[i][j][2 * h + 1]));
        z[0][2 * i + h] = v.x, z[1][2 * i + h] = v.y;
      }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float pivot = __shfl_sync(0xffffffffu, z[e][0], lane % 4);  // row row0 (stats_pivot_row)
      const float mu = stats_mean(column_sum_mma(stats_lane_sum(z[e], valid, pivot)), count);
      const float m2 = column_sum_mma(stats_lane_m2(z[e], valid, pivot, mu));
      if (lane < 4) {
        const int col = col0 + 8 * j + acc_col(lane, e);
        st[stats_smem_index(part, 0, col)] = pivot;
        st[stats_smem_index(part, 1, col)] = mu;
        st[stats_smem_index(part, 2, col)] = m2;
      }
    }
  }
  stats_merge_parts<BM>(p, partial, st, t, nt, 2);
}

// Level 1, FFMA: this thread alone holds its part's rows ffma_row(tid, q) of columns ffma_col(tid, j).
template <int BM>
__device__ __forceinline__ void tile_stats_ffma(const Plan& p, float* partial, float* st, const TileRange& t, int nt,
                                                const float (&acc)[BM / 8][4]) {
  constexpr int kRows = BM / 8;
  const int tid = threadIdx.x, part = ffma_stats_part(tid), count = stats_part_rows(BM, t.count, part, 4);
  bool valid[kRows];
#pragma unroll
  for (int q = 0; q < kRows; ++q) valid[q] = ffma_row(tid, q) < t.count;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float z[kRows];
#pragma unroll
    for (int q = 0; q < kRows; ++q) z[q] = acc[q][j];
    const float pivot = z[0];  // row ffma_row(tid, 0) == stats_pivot_row
    const float mu = stats_mean(stats_lane_sum(z, valid, pivot), count);
    const float m2 = stats_lane_m2(z, valid, pivot, mu);
    const int col = ffma_col(tid, j);
    st[stats_smem_index(part, 0, col)] = pivot;
    st[stats_smem_index(part, 1, col)] = mu;
    st[stats_smem_index(part, 2, col)] = m2;
  }
  stats_merge_parts<BM>(p, partial, st, t, nt, 4);
}

// ---------------------------------------------------------------------------------------------------
// Phase 2: the pointwise over every Cout tile, the weights through a cp.async ring

// Stage `it` of the weights into ring slot `slot` (one commit group per call, empty past the end,
// so the wait_group counts stay fixed).
template <typename T>
__device__ __forceinline__ void load_ring_stage(const Args<T>& a, T* ring, int ring_tile_elems, int ring_ld,
                                                int it, int slot, int total) {
  if (it < total) {
    T* dst = ring + slot * ring_tile_elems;
#pragma unroll
    for (int k = 0; k < ring_vectors(sizeof(T)) / kThreads; ++k) {
      const int v = threadIdx.x + k * kThreads;
      cp_async16(dst + ring_vec_row(v, sizeof(T)) * ring_ld + ring_vec_col(v, sizeof(T)),
                 a.pw + ring_vec_source(v, it, sizeof(T)), 16);
    }
  }
  cp_async_commit();
}

__device__ __forceinline__ int next_slot(int slot) { return slot + 1 == kStages ? 0 : slot + 1; }

template <typename T, int BM, bool kStats>
__device__ __forceinline__ void pointwise_phase_mma(const Plan& p, const Args<T>& a, const SmemLayout& L,
                                                    unsigned char* smem, const TileRange& t,
                                                    const Epilogue<T>& ep) {
  constexpr int kMF = BM / 32;           // m16 fragments per warp
  constexpr int kRingLd = kBK + 8;       // == L.ring_ld, as a constant: B offsets become immediates
  constexpr int kTileBytes = kBN * kRingLd * 2;
  static_assert(kBN * kBK / 8 % kThreads == 0, "ring vectors must split evenly over the threads");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row0 = warp_row0(warp, BM), col0 = warp_col0(warp);
  T* ring = reinterpret_cast<T*>(smem + L.ring);
  const int kc_count = k_chunks(p), total = num_stages(p);

  int load_slot = 0;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_ring_stage(a, ring, kTileBytes / 2, kRingLd, s, load_slot, total);
    load_slot = next_slot(load_slot);
  }

  float acc[kMF][4][4];
#pragma unroll
  for (int i = 0; i < kMF; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Shared-memory byte addresses of this lane's ldmatrix rows, advanced by k in the loop.
  const uint32_t a_lane = smem_addr(smem) + ((row0 + ldsm_a_row(lane)) * L.d_ld + ldsm_a_col(lane)) * 2;
  const uint32_t a_frag_step = 16 * L.d_ld * 2;
  const uint32_t b_lane = smem_addr(ring) + ((col0 + ldsm_b_n(lane)) * kRingLd + ldsm_b_k(lane)) * 2;

  int kc = 0, nt = 0, slot = 0;
  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` visible to all; the slot read in iteration it - 1 free again
    load_ring_stage(a, ring, kTileBytes / 2, kRingLd, it + kStages - 1, load_slot, total);
    load_slot = next_slot(load_slot);
    const uint32_t a_k = a_lane + kc * kBK * 2;
    const uint32_t b_s = b_lane + slot * kTileBytes;
    // A warp whose 32 columns all lie past Cout (the last Cout tile of 728 channels: 736..767) skips
    // its products: warp-uniform, and its accumulators are never stored.
    const bool live = nt * kBN + col0 < p.c_out;
    if (live) {
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 16) {
        uint32_t af[kMF][4], bf[2][4];
#pragma unroll
        for (int i = 0; i < kMF; ++i) ldmatrix_x4(af[i], a_k + i * a_frag_step + ks * 2);
#pragma unroll
        for (int j = 0; j < 2; ++j) ldmatrix_x4(bf[j], b_s + (j * 16 * kRingLd + ks) * 2);
#pragma unroll
        for (int i = 0; i < kMF; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            mma_16816<T>(acc[i][j], af[i], bf[j / 2][(j % 2) * 2], bf[j / 2][(j % 2) * 2 + 1]);
      }
    }
    slot = next_slot(slot);
    if (++kc == kc_count) {  // the Cout tile is complete: epilogue from the registers
      if constexpr (kStats) tile_stats_mma<T, BM>(p, a.partial, reinterpret_cast<float*>(smem + L.stats), t, nt, acc);
      const bool full = full_tile(p, t, nt) && a.pairs;
      const int co0 = nt * kBN + col0 + acc_col(lane, 0);  // column of pair j: co0 + 8 j
      float2 sc[4], sh[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sc[j] = *reinterpret_cast<const float2*>(a.scale + co0 + 8 * j);
        sh[j] = *reinterpret_cast<const float2*>(a.shift + co0 + 8 * j);
      }
#pragma unroll
      for (int i = 0; i < kMF; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = row0 + i * 16 + acc_row(lane, 2 * h);
          if (full) {  // one row pointer, the 4 pairs at immediate offsets
            T* yr = ep.y + r * p.c_out + co0;
            const T* rr = ep.has_residual() ? ep.residual + r * p.c_out + co0 : yr;  // yr: never read
#pragma unroll
            for (int j = 0; j < 4; ++j)
              ep.store_full(yr + 8 * j, rr + 8 * j, acc[i][j][2 * h], acc[i][j][2 * h + 1], sc[j], sh[j]);
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j)
              ep.store_masked(r, co0 + 8 * j, acc[i][j][2 * h], acc[i][j][2 * h + 1], sc[j], sh[j]);
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j][2 * h] = acc[i][j][2 * h + 1] = 0.f;
        }
      kc = 0;
      ++nt;
    }
  }
}

template <int BM, bool kStats>
__device__ __forceinline__ void pointwise_phase_ffma(const Plan& p, const Args<float>& a, const SmemLayout& L,
                                                     unsigned char* smem, const TileRange& t,
                                                     const Epilogue<float>& ep) {
  constexpr int kRows = BM / 8;
  constexpr int kTileElems = kBK * kBN;  // == L.ring_tile_elems, ring_ld == kBN
  static_assert(kBN * kBK / 4 % kThreads == 0, "ring vectors must split evenly over the threads");
  const int tid = threadIdx.x;
  const float* d = reinterpret_cast<const float*>(smem);
  float* ring = reinterpret_cast<float*>(smem + L.ring);
  const int kc_count = k_chunks(p), total = num_stages(p);

  int load_slot = 0;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_ring_stage(a, ring, kTileElems, kBN, s, load_slot, total);
    load_slot = next_slot(load_slot);
  }

  float acc[kRows][4];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  const float* a_row = d + ffma_row(tid, 0) * L.d_ld;
  const int a_step = 8 * L.d_ld;  // ffma_row(tid, i + 1) - ffma_row(tid, i)
  int kc = 0, nt = 0, slot = 0;
  for (int it = 0; it < total; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    load_ring_stage(a, ring, kTileElems, kBN, it + kStages - 1, load_slot, total);
    load_slot = next_slot(load_slot);
    const float* a_k = a_row + kc * kBK;
    const float* b_s = ring + slot * kTileElems + ffma_col(tid, 0);
#pragma unroll
    for (int k = 0; k < kBK; k += 4) {
      float4 av[kRows], bv[4];
#pragma unroll
      for (int i = 0; i < kRows; ++i) av[i] = *reinterpret_cast<const float4*>(a_k + i * a_step + k);  // broadcast
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) bv[kk] = *reinterpret_cast<const float4*>(b_s + (k + kk) * kBN);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const float ak[4] = {av[i].x, av[i].y, av[i].z, av[i].w};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          acc[i][0] = fmaf(ak[kk], bv[kk].x, acc[i][0]);
          acc[i][1] = fmaf(ak[kk], bv[kk].y, acc[i][1]);
          acc[i][2] = fmaf(ak[kk], bv[kk].z, acc[i][2]);
          acc[i][3] = fmaf(ak[kk], bv[kk].w, acc[i][3]);
        }
      }
    }
    slot = next_slot(slot);
    if (++kc == kc_count) {
      if constexpr (kStats) tile_stats_ffma<BM>(p, a.partial, reinterpret_cast<float*>(smem + L.stats), t, nt, acc);
      const bool full = full_tile(p, t, nt) && a.pairs;
      const int co0 = nt * kBN + ffma_col(tid, 0);  // columns co0 .. co0 + 3: pairs at co0 and co0 + 2
      const float4 sc = *reinterpret_cast<const float4*>(a.scale + co0);
      const float4 sh = *reinterpret_cast<const float4*>(a.shift + co0);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int r = ffma_row(tid, i);
        if (full) {
          float* yr = ep.y + r * p.c_out + co0;
          const float* rr = ep.has_residual() ? ep.residual + r * p.c_out + co0 : yr;  // yr: never read
          ep.store_full(yr, rr, acc[i][0], acc[i][1], make_float2(sc.x, sc.y), make_float2(sh.x, sh.y));
          ep.store_full(yr + 2, rr + 2, acc[i][2], acc[i][3], make_float2(sc.z, sc.w), make_float2(sh.z, sh.w));
        } else {
          ep.store_masked(r, co0, acc[i][0], acc[i][1], make_float2(sc.x, sc.y), make_float2(sh.x, sh.y));
          ep.store_masked(r, co0 + 2, acc[i][2], acc[i][3], make_float2(sc.z, sc.w), make_float2(sh.z, sh.w));
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
      }
      kc = 0;
      ++nt;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The kernel: one CTA per position tile

template <typename T, int BM, int KH, int KW, bool kStats>
__global__ void __launch_bounds__(kThreads, 1) sepconv_infer_tiled_kernel(const Plan p, const Args<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemLayout L = smem_layout(p, sizeof(T));
  const TileRange t = tile_range(p, blockIdx.x);
  const HaloBox b = halo_box(p, t);
  d_tile_phase<T, BM, KH, KW>(p, a, L, smem, t, b, reinterpret_cast<T*>(smem), L.d_ld, 0, k_chunks(p));

  const int64_t first = static_cast<int64_t>(t.img) * p.h_out * p.w_out + t.q0;  // the tile's first position
  const Epilogue<T> ep{p, a, a.y + first * p.c_out, a.residual != nullptr ? a.residual + first * p.c_out : nullptr,
                       t.count};
  if constexpr (sizeof(T) == 2) {
    pointwise_phase_mma<T, BM, kStats>(p, a, L, smem, t, ep);
  } else {
    pointwise_phase_ffma<BM, kStats>(p, a, L, smem, t, ep);
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

template <typename T, int BM, int KH, int KW, bool kStats>
cudaError_t launch(const Plan& plan, const Args<T>& args, int smem_bytes, cudaStream_t stream) {
  const auto kernel = sepconv_infer_tiled_kernel<T, BM, KH, KW, kStats>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<num_tiles(plan), kThreads, smem_bytes, stream>>>(plan, args);
  return cudaGetLastError();
}

template <typename T, int BM, bool kStats>
cudaError_t launch_k(const Plan& plan, const Args<T>& args, int smem_bytes, cudaStream_t stream) {
  // 3x3 (every Xception unit) with the taps unrolled at compile time; any other size at run time.
  if (plan.kh == 3 && plan.kw == 3) return launch<T, BM, 3, 3, kStats>(plan, args, smem_bytes, stream);
  return launch<T, BM, 0, 0, kStats>(plan, args, smem_bytes, stream);
}

template <typename T, bool kStats>
cudaError_t launch_bm(const Plan& plan, const Args<T>& args, int smem_bytes, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (plan.bm == 128) return launch_k<T, 128, kStats>(plan, args, smem_bytes, stream);
    if (plan.bm == 64) return launch_k<T, 64, kStats>(plan, args, smem_bytes, stream);
  }
  return launch_k<T, 32, kStats>(plan, args, smem_bytes, stream);
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The first tile candidate whose shared memory fits (16-bit on a Hopper GPU: 128 rows for C up to about
// 750, 64 up to about 1,500, 32 beyond; image ranges unless the full-width halo is too large); bm 0 when
// none does (the int64 kernel takes it).
cudaError_t choose_plan(const ConvGeometry& g, int elem_bytes, int stats, Plan* plan) {
  int device = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  *plan = Plan{};
  for (int i = 0; tile_candidate(i, elem_bytes).bm > 0; ++i) {
    Plan candidate = plan_for(g, tile_candidate(i, elem_bytes));
    candidate.stats = stats;
    if (fits_smem(candidate, elem_bytes, max_smem)) {
      *plan = candidate;
      break;
    }
  }
  return cudaSuccess;
}

// What differs between the inference and the training forward; the rest comes from the unit.
template <typename T>
struct Outputs {
  Vec scale, shift;    // inference: the folded BatchNorm; training: absent (z is stored)
  const T* residual;   // inference only
  T* y;                // y, or z in training
  bool post_relu;      // inference only
  float* partial;      // training only: the per-tile moments
};

// Packs the weights and launches the tiled kernel for `plan` (bm > 0).
template <typename T, bool kStats>
cudaError_t run_plan(const UnitParams& prm, const Plan& plan, const Packed<T>& packed, const Outputs<T>& out,
                     cudaStream_t stream) {
  const ConvGeometry& g = prm.g;
  const int pack_total = packed_pw_elems(plan) + packed_dw_elems(plan) + plan.cout_pad;
  pack_weights_kernel<T><<<elementwise_blocks(pack_total), 256, 0, stream>>>(
      plan, static_cast<const T*>(prm.dw_weight), static_cast<const T*>(prm.pw_weight), out.scale, out.shift,
      PackMode::kForward, packed.dw, packed.pw, packed.scale, packed.shift);

  Args<T> args;
  args.x = static_cast<const T*>(prm.x.ptr);
  args.dw = packed.dw;
  args.pw = packed.pw;
  args.scale = packed.scale;
  args.shift = packed.shift;
  args.residual = out.residual;
  args.y = out.y;
  args.pre_relu = prm.pre_relu;
  args.post_relu = out.post_relu;
  args.x_vectors = g.c > 0 && g.c % vec_elems(sizeof(T)) == 0 && aligned(args.x, 16);  // C = 0: no x to read
  args.pairs = g.c_out % 2 == 0 && aligned(args.y, 2 * sizeof(T)) &&
               (args.residual == nullptr || aligned(args.residual, 2 * sizeof(T)));
  args.partial = out.partial;
  return launch_bm<T, kStats>(plan, args, smem_layout(plan, sizeof(T)).total, stream);
}

template <typename T>
cudaError_t run_infer(const SepConvInferParams& prm, cudaStream_t stream, bool* launched) {
  Plan plan;
  cudaError_t err = choose_plan(prm.g, sizeof(T), 0, &plan);
  if (err != cudaSuccess || plan.bm == 0) return err;  // *launched stays false: the int64 kernel takes it
  Workspace ws(prm.workspace);
  const Packed<T> packed = carve<T>(plan, ws);
  if (ws.bytes() > prm.workspace_bytes) return cudaErrorInvalidValue;
  *launched = true;
  if (num_tiles(plan) == 0 || prm.g.c_out == 0) return cudaSuccess;
  const Outputs<T> out{prm.scale, prm.shift, static_cast<const T*>(prm.residual.ptr), static_cast<T*>(prm.y.ptr),
                       prm.post_relu, nullptr};
  return run_plan<T, false>(prm, plan, packed, out, stream);
}

// ---------------------------------------------------------------------------------------------------
// The training forward: z and the batch statistics

// Tile t's count of positions, for the merge kernel (level 3 of the statistics).
struct TileCounts {
  Plan p;
  __device__ int64_t operator()(int64_t t) const { return tile_range(p, static_cast<int>(t)).count; }
};

// The most tiles any candidate can give (the workspace is sized before the device picks a tile).
int64_t max_tiles(const ConvGeometry& g) {
  int64_t tiles = 0;
  for (int i = 0; tile_candidate(i, 2).bm > 0 || tile_candidate(i, 4).bm > 0; ++i)
    for (int eb : {2, 4})
      if (tile_candidate(i, eb).bm > 0) tiles = std::max<int64_t>(tiles, num_tiles(plan_for(g, tile_candidate(i, eb))));
  return tiles;
}

// Training workspace: invstd [Cout] and the fp32 BatchNorm affine [2][Cout] first (as the int64 path's
// plan_train: bn_apply_kernel reads them there), then the packed weights, then the partials
// [max_tiles][3][Cout] and the merge passes' scratch.
struct TrainCarve {
  float* invstd;
  float* partial;
  MergeScratch merge;  // the merge passes' partials, for max_tiles(g)
};
template <typename T>
TrainCarve carve_train(const ConvGeometry& g, const Plan& plan, Workspace& ws, Packed<T>* packed) {
  TrainCarve r;
  r.invstd = ws.take<float>(g.c_out);
  ws.take<float>(2 * g.c_out);
  *packed = carve<T>(plan, ws);
  r.partial = ws.take<float>(max_tiles(g) * 3 * g.c_out);
  r.merge = take_merge_scratch(ws, max_tiles(g), g.c_out);
  return r;
}

template <typename T>
cudaError_t run_train(const SepConvTrainParams& prm, cudaStream_t stream, bool* launched) {
  const ConvGeometry& g = prm.g;
  Plan plan;
  cudaError_t err = choose_plan(g, sizeof(T), 1, &plan);
  if (err != cudaSuccess || plan.bm == 0) return err;
  Workspace ws(prm.workspace);
  Packed<T> packed;
  const TrainCarve c = carve_train<T>(g, plan, ws, &packed);
  if (ws.bytes() > prm.workspace_bytes) return cudaErrorInvalidValue;
  *launched = true;
  if (g.c_out == 0) return cudaSuccess;
  const int64_t tiles = num_tiles(plan);
  if (tiles > 0) {
    const Outputs<T> out{Vec{}, Vec{}, nullptr, static_cast<T*>(prm.z.ptr), false, c.partial};
    err = run_plan<T, true>(prm, plan, packed, out, stream);
    if (err != cudaSuccess) return err;
  }
  return launch_bn_stats_merge(c.partial, tiles, TileCounts{plan}, g.c_out, static_cast<float>(prm.eps), c.merge,
                               prm.mean, prm.var, c.invstd, stream);
}

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
  return infer::fits_int32(g) && infer::dx_supported(static_cast<int>(g.kh), static_cast<int>(g.kw),
                                                     static_cast<int>(g.stride_h), static_cast<int>(g.stride_w),
                                                     static_cast<int>(g.pad_h), static_cast<int>(g.pad_w),
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

size_t infer_tiled_workspace_size(const SepConvInferParams& params) {
  if (!infer::fits_int32(params.g)) return 0;
  // The packed sizes do not depend on the tiles.
  return infer::packed_bytes(infer::plan_for(params.g, {64, 0}), params.dtype);
}

size_t train_tiled_workspace_size(const SepConvTrainParams& params) {
  if (!infer::fits_int32(params.g)) return 0;
  const infer::Plan plan = infer::plan_for(params.g, {64, 0});
  Workspace ws(nullptr);
  infer::Packed<float> f;
  infer::Packed<__half> h;
  switch (params.dtype) {
    case DType::kFloat32: infer::carve_train<float>(params.g, plan, ws, &f); break;
    default: infer::carve_train<__half>(params.g, plan, ws, &h); break;
  }
  return ws.bytes();
}

cudaError_t run_sepconv_bn_infer_tiled(const SepConvInferParams& params, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (!infer::fits_int32(params.g)) return cudaSuccess;
  return XF_DTYPE_SWITCH(params.dtype, T, [&] { return infer::run_infer<T>(params, stream, launched); });
}

cudaError_t run_sepconv_bn_train_tiled(const SepConvTrainParams& params, cudaStream_t stream, bool* launched) {
  *launched = false;
  if (!infer::fits_int32(params.g)) return cudaSuccess;
  return XF_DTYPE_SWITCH(params.dtype, T, [&] { return infer::run_train<T>(params, stream, launched); });
}

}  // namespace xception_fast
