"""BatchNorm pieces of the Triton provider: statistics merge, normalisation, backward reductions.

Every reduction is deterministic: programs write partial rows ([S, M] buffers, S fixed by the shape
on the host) and a second kernel sums or merges them in a fixed order. No atomics.

Formulas follow `xception_fast.reference` in float32: x_hat = (z - mean) * invstd,
y = post(x_hat * weight + bias) + residual, the post-ReLU's mask taken on the fp32 value before
it is rounded, dy reductions sum_dy = sum(g), sum_dy_xhat = sum(g * x_hat) with g the masked grad.
Absent weight/bias are passed as 1/0 vectors (exact: x * 1.0 and x + 0.0 change no bit).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .autotune import INTERPRET, SUM_BLOCK_M, SUM_BLOCK_S, elementwise_configs, position_split
from .utils import channel_align, check_dtype, empty_nhwc, new_empty, nhwc, vector_f32

# `_merge_stats_kernel`'s blocks: narrow channel blocks, so that the few hundred partial rows of a
# layer's 728 channels spread over 23 CTAs rather than 6 (one wave either way: its time is the
# latency of one CTA's walk over the rows).
MERGE_BLOCK_S, MERGE_BLOCK_C = (4, 16) if INTERPRET else (32, 32)
# `_stats_partial_kernel`'s blocks (fixed: the split, and so the merge order, does not depend on them).
STATS_BLOCK_P, STATS_BLOCK_C, STATS_WARPS = (16, 16, 4) if INTERPRET else (32, 64, 4)


# --- device helpers -------------------------------------------------------------------------------------

@triton.jit
def _tile(P, C, C_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The elementwise passes' [BLOCK_P, BLOCK_C] tile of a channels-last [P, C] matrix (grid: position
    tiles x channel tiles): (channels, their mask, int64 element offsets, element mask)."""
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    return c, c_mask, p.to(tl.int64)[:, None] * C + c[None, :], (p < P)[:, None] & c_mask[None, :]


@triton.jit
def _affine(z_ptr, offs, mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, c, c_mask):
    """(x_hat, x_hat * weight + bias, invstd, weight) in fp32 for the tile of z at offs: the normalised
    value, the pre-ReLU output (its sign is the post-ReLU's mask) and the two channel vectors."""
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0)
    xhat = (z - mean[None, :]) * invstd[None, :]
    return xhat, xhat * w[None, :] + b[None, :], invstd, w


# --- kernels --------------------------------------------------------------------------------------------

@triton.jit
def _stats_partial_kernel(
    z_ptr,  # [P, C] pre-BN output (channels_last)
    stats_ptr,  # [3, S, C] fp32 out per split: reference value, mean minus it, M2
    P, C, chunk,
    C_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (s, channel tile): split s's positions [s * chunk, (s + 1) * chunk), in tiles of BLOCK_P
    # rows. Each element slot of the tile (row r, channel c) sums the deviations of the values it
    # sees (rows r, r + BLOCK_P, ...) from the first of them, its pivot: plain FMAs, no cross-thread
    # reduction until the end, where the slots' (count, mean, M2) are merged by Chan's formula about
    # the split's first row (the reference value, `_merge_stats_kernel`'s contract).
    # Precision: z - pivot is exact where they are within 2x (Sterbenz: a mean of 1e4, a std of 1e-2 in
    # fp32), so the shift costs nothing there. A slot's M2 = t2 - t1^2 / n cancels by the distance of
    # its pivot from its mean, (pivot - mean)^2 <= (n - 1) var (Samuelson): at most n x the sums' own
    # rounding, n = chunk / BLOCK_P values per slot, for an outlier pivot (about 2x for a typical one);
    # the merge across slots and splits adds deviations of means and cancels nothing.
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    s = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_P)
    p_begin = s * chunk
    n = tl.minimum(p_begin + chunk, P) - p_begin  # > 0: no split is empty
    first = p_begin.to(tl.int64) * C
    pivot = tl.load(z_ptr + first + (r.to(tl.int64) * C)[:, None] + c[None, :],
                    mask=(r < n)[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    t1 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for r0 in range(BLOCK_P, n, BLOCK_P):  # the first tile is the pivots: deviation 0
        rows = r0 + r
        mask = (rows < n)[:, None] & c_mask[None, :]
        z = tl.load(z_ptr + first + (rows.to(tl.int64) * C)[:, None] + c[None, :], mask=mask, other=0.0)
        e = tl.where(mask, z.to(tl.float32) - pivot, 0.0)
        t1 += e
        t2 += e * e
    # Slot r holds ceil((n - r) / BLOCK_P) values (0 past n).
    cnt = tl.maximum((n - r + BLOCK_P - 1) // BLOCK_P, 0).to(tl.float32)[:, None]
    ref = tl.load(z_ptr + first + c, mask=c_mask, other=0.0).to(tl.float32)
    mu = tl.where(cnt > 0, (pivot - ref[None, :]) + t1 / tl.maximum(cnt, 1.0), 0.0)  # slot mean - ref
    m2 = t2 - t1 * (t1 / tl.maximum(cnt, 1.0))
    off = tl.sum(cnt * mu, axis=0) / n
    dev = tl.where(cnt > 0, mu - off[None, :], 0.0)
    out = stats_ptr + s * C + c
    tl.store(out, ref, mask=c_mask)
    tl.store(out + tl.num_programs(0) * C, off, mask=c_mask)
    tl.store(out + 2 * tl.num_programs(0) * C, tl.sum(m2 + cnt * dev * dev, axis=0), mask=c_mask)


@triton.jit
def _merge_stats_kernel(
    stats_ptr,  # [3, S, C] fp32 per split: reference value, mean minus it, M2
    mean_ptr,  # [C] fp32 out
    var_ptr,  # [C] fp32 out: biased variance
    S, C, P, chunk,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Chan et al.'s parallel merge, BLOCK_S splits at a time, all means taken about split 0's
    # reference value so that a large common mean costs no precision.
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    ref0 = tl.load(stats_ptr + c, mask=c_mask, other=0.0)
    count = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_mask = s < S
        # Split s holds min(chunk, P - s * chunk) positions (0 past the end).
        n_s = tl.minimum(tl.maximum(P - s.to(tl.int64) * chunk, 0), chunk).to(tl.float32)
        mask = s_mask[:, None] & c_mask[None, :]
        offs = s[:, None] * C + c[None, :]
        ref = tl.load(stats_ptr + offs, mask=mask, other=0.0)
        m = tl.load(stats_ptr + S * C + offs, mask=mask, other=0.0)
        q = tl.load(stats_ptr + 2 * S * C + offs, mask=mask, other=0.0)
        m = tl.where(mask, (ref - ref0[None, :]) + m, 0.0)
        nb = tl.sum(n_s, axis=0)  # > 0: split s0 is never empty
        mb = tl.sum(n_s[:, None] * m, axis=0) / nb
        dev = tl.where(mask, m - mb[None, :], 0.0)
        qb = tl.sum(q + n_s[:, None] * dev * dev, axis=0)
        new_count = count + nb
        delta = mb - mean
        mean += delta * (nb / new_count)
        m2 += qb + delta * delta * (count * nb / new_count)
        count = new_count
    tl.store(mean_ptr + c, ref0 + mean, mask=c_mask)
    tl.store(var_ptr + c, tl.maximum(m2 / count, 0.0), mask=c_mask)


@triton.autotune(configs=elementwise_configs(), key=["C"])
@triton.jit
def _bn_apply_kernel(
    z_ptr,  # [P, C] pre-BN output (channels_last)
    mean_ptr,  # [C] fp32
    invstd_ptr,  # [C] fp32
    w_ptr,  # [C] fp32 (1 where absent)
    b_ptr,  # [C] fp32 (0 where absent)
    res_ptr,  # [P, C] residual (read only if HAS_RESIDUAL)
    y_ptr,  # [P, C] out
    P, C,
    POST_RELU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, C_ALIGN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c, c_mask, offs, mask = _tile(P, C, C_ALIGN, BLOCK_P, BLOCK_C)
    _, y, _, _ = _affine(z_ptr, offs, mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, c, c_mask)
    if POST_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # not tl.maximum: NaN must pass, as in torch.relu
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=elementwise_configs(), key=["C"])
@triton.jit
def _bn_grad_z_kernel(
    gy_ptr,  # [P, C] grad of y (channels_last)
    z_ptr,  # [P, C] pre-BN output (channels_last)
    mean_ptr, invstd_ptr, w_ptr, b_ptr, mdy_ptr, mdyx_ptr,  # [C] fp32 each
    gz_ptr,  # [P, C] out: grad of z, in z's dtype
    P, C,
    POST_RELU: tl.constexpr, C_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BatchNorm backward with batch statistics, g masked by the post-ReLU recomputed from z:
    # g_z = (g - mean_dy - x_hat * mean_dy_xhat) * invstd * weight. Stored once, in the input dtype
    # (where the unfused path rounds it), for both pointwise products of the backward to read.
    c, c_mask, offs, mask = _tile(P, C, C_ALIGN, BLOCK_P, BLOCK_C)
    g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, y, invstd, w = _affine(z_ptr, offs, mask, mean_ptr, invstd_ptr, w_ptr, b_ptr, c, c_mask)
    if POST_RELU:
        g = tl.where(y > 0, g, 0.0)
    mdy = tl.load(mdy_ptr + c, mask=c_mask, other=0.0)
    mdyx = tl.load(mdyx_ptr + c, mask=c_mask, other=0.0)
    gz = (g - mdy[None, :] - xhat * mdyx[None, :]) * (invstd * w)[None, :]
    tl.store(gz_ptr + offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=elementwise_configs(), key=["C"])
@triton.jit
def _bn_backward_reduce_kernel(
    gy_ptr,  # [P, C] grad of y (channels_last)
    z_ptr,  # [P, C] pre-BN output (channels_last)
    mean_ptr,  # [C] fp32 (0 for a plain sum)
    invstd_ptr,  # [C] fp32 (1 for a plain sum)
    w_ptr,  # [C] fp32
    b_ptr,  # [C] fp32
    part_ptr,  # [S, 2, C] fp32 out: per split, sum of g and sum of g * x_hat
    P, C, chunk,
    POST_RELU: tl.constexpr, C_ALIGN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    C = C // C_ALIGN * C_ALIGN  # a no-op (the host checked C % C_ALIGN == 0) that lets rows vectorise
    c_tiles = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    s, pid_c = pid // c_tiles, pid % c_tiles
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0)
    p_end = tl.minimum(s * chunk + chunk, P)
    sum_dy = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(s * chunk, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < p_end)[:, None] & c_mask[None, :]
        offs = p.to(tl.int64)[:, None] * C + c[None, :]
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 where masked
        xhat = (tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) * invstd[None, :]
        if POST_RELU:
            g = tl.where(xhat * w[None, :] + b[None, :] > 0, g, 0.0)
        sum_dy += g
        sum_dy_xhat += g * xhat
    out = part_ptr + s * 2 * C + c
    tl.store(out, tl.sum(sum_dy, axis=0), mask=c_mask)
    tl.store(out + C, tl.sum(sum_dy_xhat, axis=0), mask=c_mask)


@triton.jit
def _sum_rows_kernel(
    part_ptr,  # [S, M] fp32 partial sums
    out_ptr,  # [M] out, any float dtype
    S, M,
    BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    acc = tl.zeros((BLOCK_S, BLOCK_M), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & m_mask[None, :]
        acc += tl.load(part_ptr + s.to(tl.int64)[:, None] * M + m[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + m, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=m_mask)


# --- host side ------------------------------------------------------------------------------------------

def _tile_grid(positions: int, channels: int):
    """The grid of the `_tile` kernels for a [positions, channels] matrix."""
    return lambda meta: (triton.cdiv(positions, meta["BLOCK_P"]), triton.cdiv(channels, meta["BLOCK_C"]))


def sum_rows(part: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """part [S, M] fp32 (contiguous) summed over S in a fixed order -> [M] in `dtype`."""
    s, m = part.shape
    out = new_empty((m,), dtype, part.device)
    if m == 0:
        return out
    if s == 0:
        return out.zero_()
    _sum_rows_kernel[(triton.cdiv(m, SUM_BLOCK_M),)](part, out, s, m, BLOCK_S=SUM_BLOCK_S, BLOCK_M=SUM_BLOCK_M)
    return out


def statistics(z: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var) per channel, fp32, of z [P, C] (contiguous rows, P > 0): per-split partial
    statistics (`_stats_partial_kernel`), then their merge in a fixed order."""
    p, c = z.shape
    splits, chunk = position_split(p, triton.cdiv(c, STATS_BLOCK_C), z.device)
    stats = new_empty((3, splits, c), torch.float32, z.device)
    _stats_partial_kernel[(splits, triton.cdiv(c, STATS_BLOCK_C))](z, stats, p, c, chunk, C_ALIGN=channel_align(c),
                                                                   BLOCK_P=STATS_BLOCK_P, BLOCK_C=STATS_BLOCK_C,
                                                                   num_warps=STATS_WARPS)
    return merge_statistics(stats, p, chunk)


def merge_statistics(stats: Tensor, positions: int, chunk: int) -> tuple[Tensor, Tensor]:
    """stats [3, S, C] (`_stats_partial_kernel`) -> (mean, biased var), fp32 [C]."""
    _, s, c = stats.shape
    mean = new_empty((c,), torch.float32, stats.device)
    var = new_empty((c,), torch.float32, stats.device)
    _merge_stats_kernel[(triton.cdiv(c, MERGE_BLOCK_C),)](stats, mean, var, s, c, positions, chunk,
                                                          BLOCK_S=MERGE_BLOCK_S, BLOCK_C=MERGE_BLOCK_C)
    return mean, var


def normalize(z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
              residual: Optional[Tensor], post_relu: bool) -> Tensor:
    """y = post(((z - mean) * invstd) * weight + bias) + residual; z channels_last [N, C, H, W]."""
    n, c, h, w = z.shape
    y = empty_nhwc(z.shape, z.dtype, z.device)
    p = n * h * w
    if y.numel() == 0:
        return y
    weight = vector_f32(bn_weight, c, 1.0, z.device)
    bias = vector_f32(bn_bias, c, 0.0, z.device)
    res = nhwc(residual.to(z.dtype)) if residual is not None else y

    _bn_apply_kernel[_tile_grid(p, c)](z, mean, invstd, weight, bias, res, y, p, c,
                           POST_RELU=bool(post_relu), HAS_RESIDUAL=residual is not None, C_ALIGN=channel_align(c))
    return y


def grad_z(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, mean_dy: Tensor,
           mean_dy_xhat: Tensor, post_relu: bool) -> Tensor:
    """g_z [N, C, H, W] channels_last in z's dtype; grad_y and z channels_last, the vectors fp32 [C]."""
    n, c, h, w = z.shape
    p = n * h * w
    out = empty_nhwc(z.shape, z.dtype, z.device)
    if out.numel() == 0:
        return out

    _bn_grad_z_kernel[_tile_grid(p, c)](grad_y, z, mean, invstd, weight, bias, mean_dy, mean_dy_xhat, out, p, c,
                            POST_RELU=bool(post_relu), C_ALIGN=channel_align(c))
    return out


def dy_sums(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
            post_relu: bool) -> tuple[Tensor, Tensor]:
    """(sum g, sum g * x_hat) per channel, fp32; grad_y and z channels_last [N, C, H, W], vectors fp32."""
    n, c, h, w = z.shape
    p = n * h * w
    if p == 0 or c == 0:
        zeros = torch.zeros((c,), dtype=torch.float32, device=z.device)
        return zeros, zeros.clone()
    splits, chunk = position_split(p, triton.cdiv(c, 64), z.device)
    part = new_empty((splits, 2, c), torch.float32, z.device)

    def grid(meta):
        return (splits * triton.cdiv(c, meta["BLOCK_C"]),)

    _bn_backward_reduce_kernel[grid](grad_y, z, mean, invstd, weight, bias, part, p, c, chunk,
                                     POST_RELU=bool(post_relu), C_ALIGN=channel_align(c))
    sums = sum_rows(part.view(splits, 2 * c)).view(2, c)
    return sums[0].clone(), sums[1].clone()  # two separate tensors: op outputs must not alias


def bn_backward_reduce(grad_y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                       bn_bias: Optional[Tensor], post_relu: bool) -> tuple[Tensor, Tensor]:
    """(sum_dy, sum_dy_xhat) per channel in fp32, dy masked by the post-ReLU recomputed from z."""
    check_dtype(z)
    c = z.shape[1]
    return dy_sums(nhwc(grad_y), nhwc(z), vector_f32(mean, c, 0.0, z.device), vector_f32(invstd, c, 1.0, z.device),
                   vector_f32(bn_weight, c, 1.0, z.device), vector_f32(bn_bias, c, 0.0, z.device), post_relu)
