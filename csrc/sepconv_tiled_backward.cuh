// The backward's tiled d store and grad_x / grad_dw kernels and their launchers: part of
// sepconv_infer.cu's translation unit, included there inside its namespaces after the forward's
// launcher (they use its device pieces: the depthwise phase, the weight pack, the tile choice). Not a
// standalone header. Index math: the "d store" and "grad_x and grad_dw" sections of
// sepconv_infer_tiling.h, host-tested by tests/cpp/test_d_store_tiling.cpp and
// tests/cpp/test_dw_backward_tiling.cpp.
#pragma once

// ---------------------------------------------------------------------------------------------------
// The backward's d = dw(pre(x)) [P, C] in T: see "d store" in sepconv_infer_tiling.h. One CTA per position
// tile (whole output rows or a row segment): the forward's depthwise phase over every chunk, each slot's
// threads computing its run of kDsRun adjacent outputs (ds_run_depthwise: one pass over the staged
// columns) and storing the valid ones from the accumulators (16-byte stores where C is a multiple of the
// vector and d is aligned), rounded to T as the forward's d tile is. kUnitW: 3x3 with stride and
// dilation 1 along W (Xception's units), the columns shared between the run's outputs; else the
// run-time kernel size and steps.

// CTAs per SM the registers must allow: 3 (80 registers) for 16-bit types on sm_90; the sm_80 build and
// fp32 (4 channels a thread, its loads hoisted further) spill at that bound and keep 2.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define XF_DS_MIN_CTAS(T) 2
#else
#define XF_DS_MIN_CTAS(T) (sizeof(T) == 2 ? 3 : 2)
#endif

template <typename T, int KH, int KW, bool kUnitW>
__global__ void __launch_bounds__(kThreads, XF_DS_MIN_CTAS(T))
    d_store_kernel(const Plan p, const SmemLayout L, const Args<T> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  using V = Vec16<T>;
  constexpr int kVec = V::kVec, kSlots = kThreads / (kBK / kVec);  // one run per slot
  const DsTile tile = ds_tile(p, blockIdx.x, ds_tile_rows(p));
  const TileRange& t = tile.t;
  const HaloBox& b = tile.b;
  const int tid = threadIdx.x, cv = dw_cv(tid, sizeof(T));
  const DsRun run = ds_run(p, tile, ds_row_runs(p), dw_row(tid, 0, sizeof(T)));
  const int base = run.base;
  // The run's first output position in d: int32 (fits_int32: P does); its offset in int64 per chunk.
  const int pos = ds_position(p, t, run.r);
  depthwise_phase<T, kSlots, KH, KW>(p, a, L, smem, t, b, 0, k_chunks(p),
                                     [&](const T* src, const float* wsrc, int c0, const int(&)[1]) {
    if (run.outputs == 0) return;  // whole warps but the last one with runs
    float acc[kDsRun][kVec];
    ds_run_depthwise<KH, KW, kUnitW, kVec>(
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
    const int c = c0 + cv * kVec;  // this thread's first channel
    if (c >= p.c) return;
    T* dst = a.y + (static_cast<int64_t>(pos) * p.c + c);
#pragma unroll
    for (int g = 0; g < kDsRun; ++g) {
      if (g >= run.outputs) break;
      if (a.pairs) {  // whole vectors: C % kVec == 0 and d 16-byte aligned
        *reinterpret_cast<uint4*>(dst + g * p.c) = V::pack(acc[g]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (c + e < p.c) dst[g * p.c + e] = from_float<T>(acc[g][e]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The backward's grad_x and grad_dw (stride 1, 3x3): see "grad_x and grad_dw" in sepconv_infer_tiling.h.
// One CTA per (channel chunk, split of pixel tiles): the chunk's flipped weights staged once; per tile
// grad_d's halo box for the chunk staged with 16-byte cp.async (zero-filled where it is padding or
// past C), then each thread, one row at a time, reads x for the row, gathers each tap once for both
// gradients, stores grad_x, and keeps grad_dw in registers until the end. At most 128 registers (two
// CTAs per SM): only one row's vectors live beside grad_dw.

template <typename T>
struct DxArgs {
  const T* grad_d;      // [N, Ho, Wo, C]: the transposed plan's "image" (p.h x p.w)
  const float* dw;      // packed flipped weights [taps][kp] (PackMode::kFlipped)
  const T* x;           // [N, H, W, C]: the ReLU mask and pre(x)
  T* grad_x;            // [N, H, W, C]
  float* partial;       // [splits][C][taps] (dx_partial_offset)
  int splits;
  RowStep row_step;  // dx_row_step(p, kSlots): a thread's rows are kSlots apart
  int row_stride;    // kSlots * C: their offsets' step (a parameter, not a register)
  bool pre_relu;
};

// threadIdx.x (0) or blockIdx.x (1) read again from its special register: volatile, so the compiler
// neither keeps the first read live across a long loop nor spills it (what nvcc did with the plain
// variables at 128 registers).
template <int kWhich>
__device__ __forceinline__ int fresh_index() {
  int v;
  if constexpr (kWhich == 0) {
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(v));
  } else {
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(v));
  }
  return v;
}

// kVectors: 16-byte copies, loads and stores, two CTAs per SM (at most 128 registers, none spilled); the
// element-wise instance (C not a multiple of the vector, or a misaligned tensor: no Xception layer)
// keeps one CTA per SM, where its predicated element accesses fit without spills. kUnitDil: dilation 1
// (Xception's), the taps' column offsets constants (depthwise_backward_rows).
template <typename T, bool kVectors, bool kUnitDil>
__global__ void __launch_bounds__(kThreads, kVectors ? 2 : 1) dw_backward_tiled_kernel(const Plan p, const DxArgs<T> g) {
  extern __shared__ __align__(128) unsigned char smem[];
  using V = Vec16<T>;
  constexpr int kVec = V::kVec, kVP = kBK / kVec, kSlots = kThreads / kVP, kTaps = 9;
  const DxSmem L = dx_grad_smem_layout(p, sizeof(T));
  T* halo = reinterpret_cast<T*>(smem + L.halo);
  float* wts = reinterpret_cast<float*>(smem + L.wts);
  const int chunk = blockIdx.x % gp_chunks(p), split = blockIdx.x / gp_chunks(p);
  const TileSpan span = gp_split_tiles(p, split, g.splits);
  const int tid = threadIdx.x;
  const int cv = dw_cv(tid, sizeof(T)), slot = dw_row(tid, 0, sizeof(T));
  const int c = chunk * kBK + cv * kVec;  // this thread's first channel
  const bool channels = c < p.c;          // whole vectors on the vector paths (C % kVec == 0)

  // The chunk's weights, once: with the first tile's copies (a CTA without tiles never reads them).
#pragma unroll 1
  for (int u = tid; u < kTaps * kVP * (kVec / 4); u += kThreads) {
    const int tap = u / (kBK / 4), part = u % (kBK / 4);
    cp_async16(wts + tap * kBK + part * 4, g.dw + packed_dw_offset(p, tap, chunk * kBK + part * 4), 16);
  }

  float gw[kTaps][kVec];
#pragma unroll
  for (int k = 0; k < kTaps; ++k)
#pragma unroll
    for (int e = 0; e < kVec; ++e) gw[k][e] = 0.f;

#pragma unroll 1
  for (int tile = span.begin; tile < span.end; ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = dx_box(p, t);
    const int pixels = b.rows * b.cols;
    const T* gd_img = g.grad_d + static_cast<int64_t>(t.img) * p.h * p.w * p.c;

    // Staging: this thread's channel vector of the box pixels slot, slot + kSlots, ...
    if constexpr (kVectors) {
      const char* gd_bytes = reinterpret_cast<const char*>(gd_img);
      uint32_t dst = smem_addr(halo + slot * kBK + cv * kVec);
      GridWalk w = grid_walk(slot, b.cols, kSlots);
#pragma unroll 1
      for (int pixel = slot; pixel < pixels; pixel += kSlots) {
        const int off = dx_source_offset(p, b, w);
        const bool real = channels && off >= 0;
        // Padding: 16 zero bytes, nothing read (the image's first element stands in as the address).
        cp_async16(dst, gd_bytes + (real ? static_cast<uint32_t>(off + c) * sizeof(T) : 0u), real ? 16 : 0);
        grid_advance(w);
        dst += kSlots * kBK * sizeof(T);
      }
    } else {
#pragma unroll 1
      for (int idx = tid; idx < pixels * kBK; idx += kThreads) {
        const int pixel = idx / kBK, ch = idx - pixel * kBK, cc = chunk * kBK + ch;
        const int off = halo_source_offset(p, b, pixel);
        halo[idx] = off >= 0 && cc < p.c ? gd_img[off + cc] : from_float<T>(0.f);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();  // the box (and, on the first tile, the weights) staged by every thread

    const T* src = halo + cv * kVec;
    const float* wsrc = wts + cv * kVec;
    const auto load_g = [&](int pixel, float(&gv)[kVec]) {
      V::unpack(*reinterpret_cast<const uint4*>(src + pixel * kBK), gv);
    };
    const auto load_w = [&](int tap, float(&wv)[kVec]) {
#pragma unroll
      for (int e = 0; e < kVec / 4; ++e) {
        const float4 w4 = *reinterpret_cast<const float4*>(wsrc + tap * kBK + 4 * e);
        wv[4 * e] = w4.x, wv[4 * e + 1] = w4.y, wv[4 * e + 2] = w4.z, wv[4 * e + 3] = w4.w;
      }
    };
    RowWalk rw = dx_row_walk(p, t, b, slot);
    // The rows' offsets in the image (dx_pixel_offset of rows slot, slot + kSlots, ...); the image's
    // pointers are rebuilt per row from the parameters: fewer registers live across the loop.
    const int end = dx_pixel_offset(p, t, t.count, c);
#pragma unroll 1
    for (int off = dx_pixel_offset(p, t, slot, c); off < end; off += g.row_stride) {
      const T* x_img = g.x + dx_image_offset(p, t);
      T* gx_img = g.grad_x + dx_image_offset(p, t);
      const int base[1] = {rw.base};
      dx_row_advance(p, b, g.row_step, rw);
      float xr[1][kVec], gx[1][kVec];
      if constexpr (kVectors) {
        const uint4 xu = channels ? *reinterpret_cast<const uint4*>(x_img + off) : make_uint4(0, 0, 0, 0);
        V::unpack(g.pre_relu ? V::relu(xu) : xu, xr[0]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float xv = c + e < p.c ? to_float(x_img[off + e]) : 0.f;
          xr[0][e] = g.pre_relu ? relu(xv) : xv;
        }
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) gx[0][e] = 0.f;
      depthwise_backward_rows<3, 3, 1, kVec, kUnitDil>(p, b, base, load_g, load_w, xr, gx, gw);
      // relu's gradient from pre(x): relu(x) > 0 exactly where x > 0 (NaN gives 0), so x need not stay
      // live across the taps.
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (g.pre_relu && !(xr[0][e] > 0.f)) gx[0][e] = 0.f;
      if constexpr (kVectors) {
        if (channels) *reinterpret_cast<uint4*>(gx_img + off) = V::pack(gx[0]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (c + e < p.c) gx_img[off + e] = from_float<T>(gx[0][e]);
      }
    }
    __syncthreads();  // the box is read: the next tile's staging may overwrite it
  }

  // grad_dw: over the lanes of this channel vector, then over the warps in order (over the box's bytes:
  // every thread is past the last tile's barrier). The indices are read afresh (fresh_index): kept from
  // the start, they were spilled around the tile loop.
#pragma unroll
  for (int m = dx_lane_xor_first(sizeof(T)); m < 32; m *= 2)
#pragma unroll
    for (int k = 0; k < kTaps; ++k)
#pragma unroll
      for (int e = 0; e < kVec; ++e) gw[k][e] += __shfl_xor_sync(0xffffffffu, gw[k][e], m);
  cp_async_commit();  // a CTA without tiles: its weight copies land before the area is reused
  cp_async_wait<0>();
  __syncthreads();
  const int tid2 = fresh_index<0>(), block2 = fresh_index<1>();
  float* red = reinterpret_cast<float*>(smem + dx_grad_smem_layout(p, sizeof(T)).red);
  if (tid2 % 32 < kVP) {
    const int cv2 = dw_cv(tid2, sizeof(T));
#pragma unroll
    for (int k = 0; k < kTaps; ++k)
#pragma unroll
      for (int e = 0; e < kVec; ++e) red[dx_red_index(p, tid2 / 32, k, cv2 * kVec + e)] = gw[k][e];
  }
  __syncthreads();
  const int chunk2 = block2 % gp_chunks(p), split2 = block2 / gp_chunks(p);
  for (int idx = tid2; idx < kTaps * kBK; idx += kThreads) {
    const int tap = idx / kBK, ch = idx % kBK, cc = chunk2 * kBK + ch;
    float sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) sum += red[dx_red_index(p, w, tap, ch)];
    if (cc < p.c) g.partial[dx_partial_offset(p, split2, cc, dx_forward_tap(p, tap))] = sum;
  }
}

// ---------------------------------------------------------------------------------------------------
// Their launchers

// The d store's plan: the unit's depthwise with no pointwise (c_out 0: nothing packed for it).
Plan ds_plan(const ConvGeometry& g, TileChoice choice) {
  ConvGeometry m = g;
  m.c_out = 0;
  return plan_for(m, choice);
}

template <typename T>
cudaError_t run_d_store(const DStoreParams& prm, cudaStream_t stream, bool* launched) {
  const ConvGeometry& g = prm.g;
  int device = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  Plan plan{};
  for (int i = 0; plan.bm == 0; ++i) {
    const TileChoice choice = ds_tile_candidate(i, static_cast<int>(g.h_out), static_cast<int>(g.w_out), sizeof(T));
    if (choice.bm == 0) break;
    const Plan candidate = ds_plan(g, choice);
    if (ds_fits_smem(candidate, sizeof(T), max_smem)) plan = candidate;
  }
  if (plan.bm == 0) return cudaSuccess;  // *launched stays false: the int64 kernel takes it
  Workspace ws(prm.workspace);
  const Packed<T> packed = carve<T>(plan, ws);
  if (ws.bytes() > prm.workspace_bytes) return cudaErrorInvalidValue;
  *launched = true;
  if (num_tiles(plan) == 0 || g.c == 0) return cudaSuccess;
  const int pack_total = packed_pw_elems(plan) + packed_dw_elems(plan) + plan.cout_pad;
  pack_weights_kernel<T><<<elementwise_blocks(pack_total), 256, 0, stream>>>(
      plan, static_cast<const T*>(prm.dw_weight), nullptr, Vec{}, Vec{}, PackMode::kForward, packed.dw, packed.pw,
      packed.scale, packed.shift);
  Args<T> args{};
  args.x = static_cast<const T*>(prm.x);
  args.dw = packed.dw;
  args.pre_relu = prm.pre_relu;
  args.x_vectors = g.c % vec_elems(sizeof(T)) == 0 && aligned(args.x, 16);
  args.y = static_cast<T*>(prm.d);
  args.pairs = g.c % vec_elems(sizeof(T)) == 0 && aligned(args.y, 16);  // whole 16-byte vectors of d
  // The layout goes in as a parameter: computed in the kernel, its offsets took registers (spills at 3
  // CTAs per SM); as a parameter they are constant-bank operands.
  const SmemLayout layout = ds_smem_layout(plan, sizeof(T));
  const int smem_bytes = layout.total;
  const auto launch_ds = [&](auto kernel) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
    kernel<<<num_tiles(plan), kThreads, smem_bytes, stream>>>(plan, layout, args);
    return cudaGetLastError();
  };
  const bool unit_w = plan.kh == 3 && plan.kw == 3 && plan.stride_w == 1 && plan.dil_w == 1;
  return unit_w ? launch_ds(d_store_kernel<T, 3, 3, true>) : launch_ds(d_store_kernel<T, 0, 0, false>);
}

template <typename T>
cudaError_t run_dw_backward(const DwBackwardParams& prm, cudaStream_t stream, int* splits) {
  const ConvGeometry& g = prm.g;
  int device = 0, max_smem = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const auto i = [](int64_t v) { return static_cast<int>(v); };
  const Plan plan = dx_choose_tile(i(g.n), i(g.c), i(g.h), i(g.w), i(g.pad_h), i(g.pad_w), i(g.dil_h), i(g.dil_w),
                                   sizeof(T), max_smem);
  if (plan.bm == 0) return cudaSuccess;
  Workspace ws(prm.workspace);
  const Packed<T> packed = carve<T>(plan, ws);
  if (ws.bytes() > prm.workspace_bytes) return cudaErrorInvalidValue;
  const int tiles = num_tiles(plan);
  const bool vectors = g.c % vec_elems(sizeof(T)) == 0 && aligned(prm.grad_d, 16) && aligned(prm.x, 16) &&
                       aligned(prm.grad_x, 16);
  // 16-byte copies, loads and stores where every tensor allows them; element by element otherwise.
  const auto kernel = !vectors                              ? dw_backward_tiled_kernel<T, false, false>
                      : plan.dil_h == 1 && plan.dil_w == 1 ? dw_backward_tiled_kernel<T, true, true>
                                                            : dw_backward_tiled_kernel<T, true, false>;
  const int smem_bytes = dx_grad_smem_layout(plan, sizeof(T)).total;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  int per_sm = 0;  // the splits fill the resident CTA slots (two per SM where registers and shared memory allow)
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem_bytes);
  if (err != cudaSuccess) return err;
  *splits = gp_choose_splits(gp_chunks(plan), tiles, sms * imax(per_sm, 1), prm.max_splits);
  if (tiles == 0 || g.c == 0) {
    *splits = 0;  // nothing to write: grad_x is empty and the column sums write zeros
    return cudaSuccess;
  }
  const int pack_total = packed_pw_elems(plan) + packed_dw_elems(plan) + plan.cout_pad;
  pack_weights_kernel<T><<<elementwise_blocks(pack_total), 256, 0, stream>>>(
      plan, static_cast<const T*>(prm.dw_weight), nullptr, Vec{}, Vec{}, PackMode::kFlipped, packed.dw, packed.pw,
      packed.scale, packed.shift);
  const DxArgs<T> dx{static_cast<const T*>(prm.grad_d),
                     packed.dw,
                     static_cast<const T*>(prm.x),
                     static_cast<T*>(prm.grad_x),
                     prm.partial,
                     *splits,
                     dx_row_step(plan, dw_slots(sizeof(T))),
                     dw_slots(sizeof(T)) * plan.c,
                     prm.pre_relu};
  kernel<<<gp_chunks(plan) * *splits, kThreads, smem_bytes, stream>>>(plan, dx);
  return cudaGetLastError();
}
