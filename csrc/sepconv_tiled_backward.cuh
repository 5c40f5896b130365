// The backward's tiled grad_pw and grad_x / grad_dw kernels and their launchers: part of
// sepconv_infer.cu's translation unit, included there inside its namespaces after the forward's
// launcher (they use its device pieces: the depthwise phase, the weight pack, the tile choice). Not a
// standalone header. Index math: the "grad_pw" and "grad_x and grad_dw" sections of
// sepconv_infer_tiling.h, host-tested by tests/cpp/test_grad_pw_tiling.cpp and
// tests/cpp/test_dw_backward_tiling.cpp.
#pragma once

// ---------------------------------------------------------------------------------------------------
// The backward's grad_pw = grad_z^T d (16-bit types): see "grad_pw" in sepconv_infer_tiling.h. One CTA
// per work unit (channel chunk, Cout pass, split); per position tile of the split: the tile's grad_z
// rows with cp.async (one group, landing while the depthwise phase stages the halo), the depthwise of
// the chunk into the d tile, a barrier, the MMA over the tile's positions, a barrier. The phases of one
// tile do not overlap (a later step: a grad_z ring running ahead across tiles).

template <typename T>
struct GpArgs {
  const T* grad_z;   // [P, Cout]
  float* partial;    // [splits][Cout][C] (gp_partial_offset)
  int splits;
};

template <typename T, int BM, int KH, int KW>
__global__ void __launch_bounds__(kThreads, 1) grad_pw_tiled_kernel(const Plan p, const Args<T> a, const GpArgs<T> g) {
  extern __shared__ __align__(128) unsigned char smem[];
  static_assert(sizeof(T) == 2, "16-bit types: fp32 keeps the FFMA kernel of sepconv_backward.cu");
  constexpr int kNF = kGpWarpCols / 8;  // n8 fragments per warp
  const SmemLayout L = gp_smem_layout(p, sizeof(T));
  const GpUnit u = gp_unit(p, blockIdx.x);
  const TileSpan span = gp_split_tiles(p, u.split, g.splits);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int co_warp = u.pass * kGpN + warp * kGpWarpCols;  // this warp's first output channel
  const bool live = co_warp < p.c_out;                     // warp-uniform: columns past Cout skip the MMA
  T* d = reinterpret_cast<T*>(smem);
  T* gz = reinterpret_cast<T*>(smem + L.ring);
  const uint32_t a_lane = smem_addr(d) + (gp_a_k(lane) * gp_ld_d() + gp_a_m(lane)) * 2;
  const uint32_t b_lane = smem_addr(gz) + (gp_b_k(lane) * gp_ld_gz() + warp * kGpWarpCols + gp_b_n(lane)) * 2;

  float acc[2][kNF][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kNF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  for (int tile = span.begin; tile < span.end; ++tile) {
    const TileRange t = tile_range(p, tile);
    const HaloBox b = halo_box(p, t);
    // grad_z rows of the tile; zeros past its positions and past Cout (Cout % 8 == 0: whole vectors).
    const T* gz_tile = g.grad_z + (static_cast<int64_t>(t.img) * p.h_out * p.w_out + t.q0) * p.c_out;
    if (threadIdx.x < kGpGzThreads) {
      const int col = gp_gz_col(threadIdx.x), co = u.pass * kGpN + col, r0 = gp_gz_row0(threadIdx.x);
      const bool column = co < p.c_out;
      const T* src = gz_tile + r0 * p.c_out + co;
      uint32_t dst = smem_addr(gz + r0 * gp_ld_gz() + col);
#pragma unroll 4
      for (int r = r0; r < BM; r += kGpGzRowStep) {
        const bool real = column && r < t.count;
        cp_async16(dst, real ? src : g.grad_z, real ? 16 : 0);
        src += kGpGzRowStep * p.c_out;
        dst += kGpGzRowStep * gp_ld_gz() * sizeof(T);
      }
    }
    cp_async_commit();
    // The chunk's d; its waits also land the grad_z group (committed before its own), and it ends
    // with a barrier.
    d_tile_phase<T, BM, KH, KW>(p, a, L, smem, t, b, d, gp_ld_d(), u.chunk, u.chunk + 1);
    if (live) {
#pragma unroll
      for (int ks = 0; ks < BM / 16; ++ks) {
        uint32_t af[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) ldmatrix_x4_trans(af[i], a_lane + (ks * 16 * gp_ld_d() + i * 16) * 2);
#pragma unroll
        for (int jj = 0; jj < kNF / 2; ++jj) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, b_lane + (ks * 16 * gp_ld_gz() + jj * 16) * 2);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            mma_16816<T>(acc[i][2 * jj], af[i], bf[0], bf[1]);
            mma_16816<T>(acc[i][2 * jj + 1], af[i], bf[2], bf[3]);
          }
        }
      }
    }
    __syncthreads();  // d and the grad_z tile free for the next tile
  }

  // The split's partial: row (input channel) 16 i + acc_row, column (output channel) 8 j + acc_col.
  if (!live) return;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < kNF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = u.chunk * kBK + 16 * i + acc_row(lane, e), co = co_warp + 8 * j + acc_col(lane, e);
        if (c < p.c && co < p.c_out) g.partial[gp_partial_offset(p, u.split, co, c)] = acc[i][j][e];
      }
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

template <typename T, int BM, int KH, int KW>
cudaError_t launch_gp(const Plan& plan, const Args<T>& args, const GpArgs<T>& g, cudaStream_t stream) {
  const auto kernel = grad_pw_tiled_kernel<T, BM, KH, KW>;
  const int smem_bytes = gp_smem_layout(plan, sizeof(T)).total;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<gp_units(plan) * g.splits, kThreads, smem_bytes, stream>>>(plan, args, g);
  return cudaGetLastError();
}

template <typename T, int BM>
cudaError_t launch_gp_k(const Plan& plan, const Args<T>& args, const GpArgs<T>& g, cudaStream_t stream) {
  if (plan.kh == 3 && plan.kw == 3) return launch_gp<T, BM, 3, 3>(plan, args, g, stream);
  return launch_gp<T, BM, 0, 0>(plan, args, g, stream);
}

template <typename T>
cudaError_t run_grad_pw(const GradPwParams& prm, cudaStream_t stream, int* splits) {
  if constexpr (sizeof(T) != 2) {
    return cudaSuccess;  // fp32: the FFMA kernel of sepconv_backward.cu (exact fp32 products)
  } else {
    const ConvGeometry& g = prm.g;
    if (g.c_out % 8 != 0 || !aligned(prm.grad_z, 16)) return cudaSuccess;
    int device = 0, max_smem = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    Plan plan{};
    for (int i = 0; gp_tile_candidate(i).bm > 0 && plan.bm == 0; ++i) {
      const Plan candidate = plan_for(g, gp_tile_candidate(i));
      if (gp_fits_smem(candidate, sizeof(T), max_smem)) plan = candidate;
    }
    if (plan.bm == 0) return cudaSuccess;
    Workspace ws(prm.workspace);
    const Packed<T> packed = carve<T>(plan, ws);
    if (ws.bytes() > prm.workspace_bytes) return cudaErrorInvalidValue;
    const int tiles = num_tiles(plan);
    *splits = gp_choose_splits(gp_units(plan), tiles, sms, prm.max_splits);
    if (tiles == 0 || g.c == 0 || g.c_out == 0) {
      *splits = 0;  // no partials: the column sums write zeros
      return cudaSuccess;
    }
    const int pack_total = packed_pw_elems(plan) + packed_dw_elems(plan) + plan.cout_pad;
    pack_weights_kernel<T><<<elementwise_blocks(pack_total), 256, 0, stream>>>(
        plan, static_cast<const T*>(prm.dw_weight), nullptr, Vec{}, Vec{}, PackMode::kForward, packed.dw,
        packed.pw, packed.scale, packed.shift);
    Args<T> args{};
    args.x = static_cast<const T*>(prm.x);
    args.dw = packed.dw;
    args.pre_relu = prm.pre_relu;
    args.x_vectors = g.c % vec_elems(sizeof(T)) == 0 && aligned(args.x, 16);
    const GpArgs<T> gp{static_cast<const T*>(prm.grad_z), prm.partial, *splits};
    if (plan.bm == 64) return launch_gp_k<T, 64>(plan, args, gp, stream);
    return launch_gp_k<T, 32>(plan, args, gp, stream);
  }
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
