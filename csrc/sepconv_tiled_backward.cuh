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
// One CTA per (channel chunk, split of pixel tiles); per tile the depthwise phase stages grad_d's halo
// box for the chunk (no ReLU) with the flipped weights, and each thread reads x for its rows, gathers
// each tap once for both gradients, stores grad_x, and keeps grad_dw in registers until the end.

template <typename T>
struct DxArgs {
  const T* x;        // [N, H, W, C]: the ReLU mask and pre(x)
  T* grad_x;         // [N, H, W, C]
  float* partial;    // [splits][C][taps] (dx_partial_offset)
  int splits;
  bool pre_relu;
  bool vectors;      // C % vec == 0, x and grad_x 16-byte aligned: 16-byte loads and stores
};

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, 1) dw_backward_tiled_kernel(const Plan p, const Args<T> a, const DxArgs<T> g) {
  extern __shared__ __align__(128) unsigned char smem[];
  using V = Vec16<T>;
  constexpr int kVec = V::kVec, kVP = kBK / kVec, kTaps = 9;
  constexpr int kPos = dw_rows_per_thread(BM, sizeof(T));
  const SmemLayout L = dx_smem_layout(p, sizeof(T));
  const int chunk = blockIdx.x % gp_chunks(p), split = blockIdx.x / gp_chunks(p);
  const TileSpan span = gp_split_tiles(p, split, g.splits);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, cv = dw_cv(tid, sizeof(T));
  const int c = chunk * kBK + cv * kVec;  // this thread's first channel

  float gw[kTaps][kVec];
#pragma unroll
  for (int k = 0; k < kTaps; ++k)
#pragma unroll
    for (int e = 0; e < kVec; ++e) gw[k][e] = 0.f;

  for (int tile = span.begin; tile < span.end; ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = halo_box(p, t);
    const int64_t first = (static_cast<int64_t>(t.img) * p.h_out * p.w_out + t.q0) * p.c;  // the tile's pixel 0
    depthwise_phase<T, BM, 3, 3>(p, a, L, smem, t, b, chunk, chunk + 1,
                                 [&](const T* src, const float* wsrc, int, const int(&base)[kPos]) {
      float xv[kPos][kVec], xr[kPos][kVec], gx[kPos][kVec];
#pragma unroll
      for (int q = 0; q < kPos; ++q) {
        const int r = dw_row(tid, q, sizeof(T));
        const bool real = r < t.count;
        const int64_t off = first + static_cast<int64_t>(r) * p.c + c;
        if (g.vectors) {
          const uint4 u = real && c < p.c ? *reinterpret_cast<const uint4*>(g.x + off) : make_uint4(0, 0, 0, 0);
          V::unpack(u, xv[q]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) xv[q][e] = real && c + e < p.c ? to_float(g.x[off + e]) : 0.f;
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          xr[q][e] = g.pre_relu ? relu(xv[q][e]) : xv[q][e];  // 0 on rows that are not pixels
          gx[q][e] = 0.f;
        }
      }
      depthwise_backward_rows<3, 3, kPos, kVec>(
          p, b, base,
          [&](int pixel, float(&gv)[kVec]) { V::unpack(*reinterpret_cast<const uint4*>(src + pixel * kBK), gv); },
          [&](int tap, float(&wv)[kVec]) {
#pragma unroll
            for (int e = 0; e < kVec / 4; ++e) {
              const float4 w = *reinterpret_cast<const float4*>(wsrc + tap * kBK + 4 * e);
              wv[4 * e] = w.x, wv[4 * e + 1] = w.y, wv[4 * e + 2] = w.z, wv[4 * e + 3] = w.w;
            }
          },
          xr, gx, gw);
#pragma unroll
      for (int q = 0; q < kPos; ++q) {
        const int r = dw_row(tid, q, sizeof(T));
        if (r >= t.count || c >= p.c) continue;
#pragma unroll
        for (int e = 0; e < kVec; ++e)
          if (g.pre_relu && !(xv[q][e] > 0.f)) gx[q][e] = 0.f;  // relu's gradient; NaN gives 0
        const int64_t off = first + static_cast<int64_t>(r) * p.c + c;
        if (g.vectors) {
          *reinterpret_cast<uint4*>(g.grad_x + off) = V::pack(gx[q]);
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            if (c + e < p.c) g.grad_x[off + e] = from_float<T>(gx[q][e]);
        }
      }
    });
  }

  // grad_dw: over the lanes of this channel vector, then over the warps in order.
#pragma unroll
  for (int m = dx_lane_xor_first(sizeof(T)); m < 32; m *= 2)
#pragma unroll
    for (int k = 0; k < kTaps; ++k)
#pragma unroll
      for (int e = 0; e < kVec; ++e) gw[k][e] += __shfl_xor_sync(0xffffffffu, gw[k][e], m);
  float* red = reinterpret_cast<float*>(smem + L.stats);
  if (lane < kVP) {
#pragma unroll
    for (int k = 0; k < kTaps; ++k)
#pragma unroll
      for (int e = 0; e < kVec; ++e) red[dx_red_index(p, warp, k, cv * kVec + e)] = gw[k][e];
  }
  __syncthreads();
  for (int idx = tid; idx < kTaps * kBK; idx += kThreads) {
    const int tap = idx / kBK, ch = idx % kBK, cc = chunk * kBK + ch;
    float sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) sum += red[dx_red_index(p, w, tap, ch)];
    if (cc < p.c) g.partial[dx_partial_offset(p, split, cc, dx_forward_tap(p, tap))] = sum;
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
  Plan plan{};
  for (int k = 0; tile_candidate(k, sizeof(T)).bm > 0 && plan.bm == 0; ++k) {
    const Plan candidate = dx_plan(i(g.n), i(g.c), i(g.h), i(g.w), i(g.kh), i(g.kw), i(g.pad_h), i(g.pad_w),
                                   i(g.dil_h), i(g.dil_w), tile_candidate(k, sizeof(T)).bm,
                                   tile_candidate(k, sizeof(T)).row_segments);
    if (dx_fits_smem(candidate, sizeof(T), max_smem)) plan = candidate;
  }
  if (plan.bm == 0) return cudaSuccess;
  Workspace ws(prm.workspace);
  const Packed<T> packed = carve<T>(plan, ws);
  if (ws.bytes() > prm.workspace_bytes) return cudaErrorInvalidValue;
  const int tiles = num_tiles(plan);
  *splits = gp_choose_splits(gp_chunks(plan), tiles, sms, prm.max_splits);
  if (tiles == 0 || g.c == 0) {
    *splits = 0;  // nothing to write: grad_x is empty and the column sums write zeros
    return cudaSuccess;
  }
  const int pack_total = packed_pw_elems(plan) + packed_dw_elems(plan) + plan.cout_pad;
  pack_weights_kernel<T><<<elementwise_blocks(pack_total), 256, 0, stream>>>(
      plan, static_cast<const T*>(prm.dw_weight), nullptr, Vec{}, Vec{}, PackMode::kFlipped, packed.dw, packed.pw,
      packed.scale, packed.shift);
  Args<T> args{};
  args.x = static_cast<const T*>(prm.grad_d);
  args.dw = packed.dw;
  args.pre_relu = false;
  const bool whole = g.c % vec_elems(sizeof(T)) == 0;
  args.x_vectors = whole && aligned(args.x, 16);
  const DxArgs<T> dx{static_cast<const T*>(prm.x), static_cast<T*>(prm.grad_x), prm.partial, *splits, prm.pre_relu,
                     whole && aligned(prm.x, 16) && aligned(prm.grad_x, 16)};
  const int smem_bytes = dx_smem_layout(plan, sizeof(T)).total;
  const auto launch_dx = [&](auto kernel) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
    kernel<<<gp_chunks(plan) * *splits, kThreads, smem_bytes, stream>>>(plan, args, dx);
    return cudaGetLastError();
  };
  if constexpr (sizeof(T) == 2) {
    if (plan.bm == 128) return launch_dx(dw_backward_tiled_kernel<T, 128>);
    if (plan.bm == 64) return launch_dx(dw_backward_tiled_kernel<T, 64>);
  }
  return launch_dx(dw_backward_tiled_kernel<T, 32>);
}
