"""The tiling of the CUDA provider's tiled kernels, as their launchers compute it.

A transcription of csrc/sepconv_infer_tiling.h (make_plan, tile_range, halo_box, the shared-memory
layouts, the tile candidates) and of the launchers' choices in csrc/sepconv_infer.cu and
sepconv_tiled_backward.cuh, so that the static model's plans launch what the host would:
the d store, the forwards' first step and the backward's d for cuBLAS (`ds_choose`: ds_smem_layout,
ds_tile_candidate), and grad_x / grad_dw (`dx_choose`: dx_plan, dx_grad_smem_layout, dx_tile_cost, gp_choose_splits).
tests/test_static_model.py checks them against the header compiled with a host compiler where one
is present. `choose` / `TiledPlan.smem_bytes` transcribe the removed fused forward's tile choice
(smem_layout, fits_smem, tile_candidate, still in the header): no launcher uses it now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

THREADS, BN, BK, STAGES = 256, 128, 32, 3  # kThreads, kBN, kBK, kStages
DS_RUN = 3  # kDsRun: adjacent output columns per thread of the d store
INT32_MAX = 0x7FFFFFFF


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


@dataclass(frozen=True)
class TiledPlan:
    n: int
    c: int
    h: int
    w: int
    c_out: int
    h_out: int
    w_out: int
    kh: int
    kw: int
    stride: int
    pad: int
    dil: int
    bm: int
    row_segments: int
    segs_per_row: int
    tiles_per_image: int
    kp: int
    cout_tiles: int
    cout_pad: int
    halo_rows: int
    halo_cols: int
    elem: int  # bytes per element

    @property
    def tiles(self) -> int:
        return self.n * self.tiles_per_image

    @property
    def k_chunks(self) -> int:
        return self.kp // BK

    @property
    def stages(self) -> int:
        return self.cout_tiles * self.k_chunks

    def tile(self, rem: int) -> tuple[int, int]:
        """(q0, count) of tile `rem` of an image (tile_range)."""
        if self.row_segments:
            ho, seg = divmod(rem, self.segs_per_row)
            wo0 = seg * self.bm
            return ho * self.w_out + wo0, min(self.bm, self.w_out - wo0)
        q0 = rem * self.bm
        return q0, min(self.bm, self.h_out * self.w_out - q0)

    def box_pixels(self, q0: int, count: int) -> int:
        """Pixels of the tile's halo box (halo_box: rows x cols)."""
        first, last = q0 // self.w_out, (q0 + count - 1) // self.w_out
        rows = (last - first) * self.stride + (self.kh - 1) * self.dil + 1
        if first == last:
            cols = (count - 1) * self.stride + (self.kw - 1) * self.dil + 1
        else:
            cols = (self.w_out - 1) * self.stride + (self.kw - 1) * self.dil + 1
        return rows * cols

    def _phase1_offsets(self, base: int, slack: int = 0, rows: Optional[int] = None) -> tuple[int, int]:
        """(table offset, end of the pixel table) of the depthwise staging laid out from `base` for boxes
        of `rows` rows (halo_rows where None), each halo buffer `slack` pixels longer."""
        pixels = (self.halo_rows if rows is None else rows) * self.halo_cols
        halo_elems = (pixels + slack) * BK
        wts = self.kh * self.kw * BK * 4
        halo1 = align_up(base + halo_elems * self.elem, 128)
        wts0 = align_up(halo1 + halo_elems * self.elem, 128)
        wts1 = align_up(wts0 + wts, 128)
        table = align_up(wts1 + wts, 128)
        return table, table + pixels * 4

    def smem_bytes(self) -> int:
        """smem_layout(...).total: the dynamic shared memory of one CTA of the removed fused forward."""
        v = 16 // self.elem
        d_ld = self.kp + v
        region = align_up(self.bm * d_ld * self.elem, 128)
        phase1 = self._phase1_offsets(region)[1]
        ring_tile = BN * (BK + v) if self.elem == 2 else BK * BN
        phase2 = region + STAGES * ring_tile * self.elem
        return align_up(max(phase1, phase2), 128)

    def fits(self, max_smem: int) -> bool:
        if 2 * self.halo_rows * self.halo_cols * BK * self.elem > max_smem:
            return False
        return self.smem_bytes() <= max_smem

    def ds_halo_rows(self) -> int:
        """ds_halo_rows: box rows of the d store's tiles (whole output rows span bm / w_out exactly)."""
        w = max(self.w_out, 1)
        if self.row_segments or self.bm % w:
            return self.halo_rows
        return min(self.halo_rows, (max(min(self.bm // w, self.h_out), 1) - 1) * self.stride + (self.kh - 1) * self.dil + 1)

    def ds_smem_bytes(self) -> int:
        """ds_smem_layout(...).total: the depthwise staging from 0 for boxes of ds_halo_rows rows, each halo
        buffer ds_halo_slack pixels longer, nothing else."""
        return align_up(self._phase1_offsets(0, (DS_RUN - 1) * self.stride, self.ds_halo_rows())[1], 128)

    def ds_fits(self, max_smem: int) -> bool:
        """ds_fits_smem."""
        return 2 * self.ds_halo_rows() * self.halo_cols * BK * self.elem <= max_smem and self.ds_smem_bytes() <= max_smem

    def ds_row_runs(self) -> int:
        """ds_row_runs: runs of DS_RUN outputs per tile row (a segment's, or a whole output row's)."""
        return cdiv(self.bm if self.row_segments else self.w_out, DS_RUN)

    def ds_runs(self, q0: int, count: int) -> int:
        """Slots with a run in the tile (q0, count) (ds_run: whole rows, or one segment)."""
        if self.row_segments:
            return cdiv(count, DS_RUN)
        return (count // self.w_out) * self.ds_row_runs()

    def dx_box_pixels(self, q0: int, count: int) -> int:
        """Pixels of the box dw_backward_tiled_kernel stages for a tile (dx_box: halo_box's rows, the
        plan's full width)."""
        first, last = q0 // self.w_out, (q0 + count - 1) // self.w_out
        return ((last - first) * self.stride + (self.kh - 1) * self.dil + 1) * self.halo_cols

    def dx_smem_bytes(self) -> int:
        """dx_grad_smem_layout(...).total: one halo box and the chunk's fp32 weights; the warps' grad_dw
        partials over them after the last tile."""
        wts = align_up(self.halo_rows * self.halo_cols * BK * self.elem, 128)
        red = (THREADS // 32) * self.kh * self.kw * BK * 4
        return align_up(max(wts + self.kh * self.kw * BK * 4, red), 128)

    def dx_cost(self) -> int:
        """dx_tile_cost: the kernel's issue work per image in instructions of its busiest thread (a
        model that ranks the tile candidates, its constants from the compiled kernel)."""
        slots = THREADS // (BK // (16 // self.elem))
        row = DX_ROW[self.elem]
        cost = 0
        for rem in range(self.tiles_per_image):
            q0, count = self.tile(rem)
            cost += (DX_TILE_FIXED + DX_STAGE_PIXEL * cdiv(self.dx_box_pixels(q0, count), slots)
                     + row * cdiv(count, slots))
        return cost

    def fits_with(self, smem: int, max_smem: int) -> bool:
        return 2 * self.halo_rows * self.halo_cols * BK * self.elem <= max_smem and smem <= max_smem



GP_MAX_SPLITS, GP_MAX_SMS = 16, 512  # kGpMaxSplits, kGpMaxSms (CTA slots: SMs x resident CTAs)
DX_TILE_FIXED, DX_STAGE_PIXEL, DX_ROW = 260, 16, {2: 290, 4: 160}  # dx_tile_cost's constants


def make_plan(n, c, h, w, c_out, k, stride, pad, dil, bm, row_segments, elem) -> TiledPlan:
    h_out = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    segments = 1 if row_segments and w_out >= bm else 0
    window = (k - 1) * dil + 1
    if segments:
        segs = cdiv(w_out, bm)
        tiles, rows, cols = h_out * segs, window, (bm - 1) * stride + window
    else:
        segs, tiles = 1, cdiv(h_out * w_out, bm)
        span = min(h_out, (w_out - 1 + bm - 1) // w_out + 1)
        rows, cols = (span - 1) * stride + window, (w_out - 1) * stride + window
    kp = align_up(max(c, 1), BK)
    return TiledPlan(n=n, c=c, h=h, w=w, c_out=c_out, h_out=h_out, w_out=w_out, kh=k, kw=k, stride=stride, pad=pad,
                     dil=dil, bm=bm, row_segments=segments, segs_per_row=segs, tiles_per_image=tiles, kp=kp,
                     cout_tiles=cdiv(c_out, BN), cout_pad=cdiv(c_out, BN) * BN, halo_rows=rows, halo_cols=cols,
                     elem=elem)


def tile_candidates(elem: int) -> list[tuple[int, int]]:
    """(bm, row_segments) in the launcher's order: 16-bit 128, 64, 32 rows; fp32 32 rows; ranges of
    an image before row segments."""
    rows = [128, 64, 32] if elem == 2 else [32]
    return [(bm, seg) for bm in rows for seg in (0, 1)]


def fits_int32(n, c, h, w, c_out, k, h_out, w_out, pad) -> bool:
    kp, cout_pad = (c + BK) // BK * BK, (c_out + BN) // BN * BN
    return (n <= INT32_MAX and h * w * c < INT32_MAX and h_out * w_out < INT32_MAX and n * h_out * w_out < INT32_MAX
            and kp * cout_pad + (k * k + 2) * kp + 2 * cout_pad < INT32_MAX and 256 * c_out < INT32_MAX
            and h + 2 * pad < INT32_MAX and w + 2 * pad < INT32_MAX)


def choose(n, c, h, w, c_out, k, stride, pad, dil, elem, max_smem) -> Optional[TiledPlan]:
    """The plan the launcher runs, or None where it declines (the int64 kernel runs instead)."""
    for bm, seg in tile_candidates(elem):
        p = make_plan(n, c, h, w, c_out, k, stride, pad, dil, bm, seg, elem)
        if not fits_int32(n, c, h, w, c_out, k, p.h_out, p.w_out, pad):
            return None
        if p.fits(max_smem):
            return p
    return None


def ds_image_warps(h: int, k: int, runs: int, elem: int) -> int:
    """ds_image_warps: warps with runs over an image of h rows in tiles of k rows."""
    per_warp = 32 // (BK // (16 // elem))
    return h // k * cdiv(k * runs, per_warp) + cdiv(h % k * runs, per_warp)


def ds_tile_candidate(i: int, h_out: int, w_out: int, elem: int) -> tuple[int, int]:
    """(bm, row_segments) of the d store's candidate i (ds_tile_candidate): at most slots >> i runs of
    DS_RUN outputs per CTA; tiles of k whole output rows (the k the budget holds with the fewest warps
    with runs per image, the largest on ties), or even row segments where a row has more runs; (0, 0):
    none left."""
    budget = (THREADS // (BK // (16 // elem))) >> i
    if budget < 1:
        return 0, 0
    h, w = max(h_out, 1), max(w_out, 1)
    runs = cdiv(w, DS_RUN)
    if runs <= budget:
        best = 1
        for k in range(2, min(budget // runs, h) + 1):
            if ds_image_warps(h, k, runs, elem) <= ds_image_warps(h, best, runs, elem):
                best = k
        return best * w, 0
    return align_up(cdiv(w, cdiv(runs, budget)), DS_RUN), 1


def ds_choose(n, c, h, w, k, stride, pad, dil, elem, max_smem) -> Optional[TiledPlan]:
    """The backward's d store plan (run_d_store: the depthwise alone, c_out 0; the first of
    ds_tile_candidate's tiles whose staging fits), or None where d_store_fallback_kernel runs instead."""
    h_out = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    i = 0
    while True:
        bm, seg = ds_tile_candidate(i, h_out, w_out, elem)
        if bm == 0:
            return None
        p = make_plan(n, c, h, w, 0, k, stride, pad, dil, bm, seg, elem)
        if not fits_int32(n, c, h, w, 0, k, p.h_out, p.w_out, pad):
            return None
        if p.ds_fits(max_smem):
            return p
        i += 1


def gp_split_limit(units: int, sms: int) -> int:
    """gp_split_limit: kGpMaxSplits, or as many splits as one full wave needs where that cannot fill one."""
    return max(GP_MAX_SPLITS, cdiv(sms, max(units, 1)))


def gp_max_splits(units: int) -> int:
    """gp_max_splits: the partials the workspace makes room for (the limit on kGpMaxSms CTA slots)."""
    return gp_split_limit(units, GP_MAX_SMS)


def gp_choose_splits(units: int, tiles: int, sms: int, max_splits: Optional[int] = None) -> int:
    """gp_choose_splits: the split count whose last wave is fullest (the smallest on ties), up to
    gp_split_limit, the workspace's room (gp_max_splits unless given) and one per tile."""
    room = gp_max_splits(units) if max_splits is None else max_splits
    best, best_eff = 1, -1.0
    for s in range(1, min(room, gp_split_limit(units, sms), max(tiles, 1)) + 1):
        ctas = units * s
        eff = ctas / (cdiv(ctas, sms) * sms)
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def dx_tile_candidates() -> list[tuple[int, int]]:
    """dx_tile_candidate: (bm, row_segments), 512, 256, 128, 64 rows, row segments before ranges."""
    return [(bm, seg) for bm in (512, 256, 128, 64) for seg in (1, 0)]


def dx_choose(n, c, h_out, w_out, k, stride, pad, dil, elem, max_smem) -> Optional[TiledPlan]:
    """The grad_x / grad_dw kernel's plan (dx_choose_tile: dx_plan, the transposed depthwise, stride 1,
    3x3, on the grad_d grid h_out x w_out; of the candidates whose shared memory fits, the cheapest by
    dx_tile_cost, the first on ties), or None where grad_x_kernel and grad_dw_partial_kernel run."""
    if k != 3 or stride != 1 or pad > 2 * dil:
        return None
    best, best_cost = None, 0
    for bm, seg in dx_tile_candidates():
        p = make_plan(n, c, h_out, w_out, c, k, 1, 2 * dil - pad, dil, bm, seg, elem)
        if p.halo_rows * p.halo_cols * BK * elem > max_smem or p.dx_smem_bytes() > max_smem:
            continue
        cost = p.dx_cost()
        if best is None or cost < best_cost:
            best, best_cost = p, cost
    return best
