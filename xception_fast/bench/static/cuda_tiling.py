"""The tiling of the CUDA provider's tiled inference kernel, as its launcher computes it.

A transcription of csrc/sepconv_infer_tiling.h (make_plan, tile_range, halo_box, smem_layout,
fits_smem, tile_candidate) and of the launcher's choice in csrc/sepconv_infer.cu (`run`: the first
tile candidate whose shared memory fits; `fits_int32`; otherwise the int64 kernel), so that the
static model's plan launches what the host would. tests/test_static_model.py checks it against the
header compiled with a host compiler where one is present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

THREADS, BN, BK, STAGES = 256, 128, 32, 3  # kThreads, kBN, kBK, kStages
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

    def smem_bytes(self) -> int:
        """smem_layout(...).total: the dynamic shared memory of one CTA."""
        v = 16 // self.elem
        d_ld = self.kp + v
        region = align_up(self.bm * d_ld * self.elem, 128)
        halo_elems = self.halo_rows * self.halo_cols * BK
        wts = self.kh * self.kw * BK * 4
        halo1 = align_up(region + halo_elems * self.elem, 128)
        wts0 = align_up(halo1 + halo_elems * self.elem, 128)
        wts1 = align_up(wts0 + wts, 128)
        table = align_up(wts1 + wts, 128)
        phase1 = table + self.halo_rows * self.halo_cols * 4
        ring_tile = BN * (BK + v) if self.elem == 2 else BK * BN
        phase2 = region + STAGES * ring_tile * self.elem
        return align_up(max(phase1, phase2), 128)

    def fits(self, max_smem: int) -> bool:
        if 2 * self.halo_rows * self.halo_cols * BK * self.elem > max_smem:
            return False
        return self.smem_bytes() <= max_smem


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
