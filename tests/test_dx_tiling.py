"""The static model's transcription of the backward's grad_x / grad_dw tile choice against the header.

cuda_tiling.dx_choose (which tile, how many tiles, the shared memory) must be what
dw_backward_tiled_kernel's launcher picks (dx_choose_tile in csrc/sepconv_infer_tiling.h: the
cheapest candidate by dx_tile_cost that fits); the header is compiled here with the host C++ compiler.
No GPU needed.
"""

from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_infer_tiling import header_program_lines, shape_rows  # noqa: E402

_DX = r"""
#include <cstdio>
#include "sepconv_infer_tiling.h"
using namespace xception_fast::infer;
int main() {
  // n, c, h, w, pad, dil, elem, max_smem: the launcher's choice (run_dw_backward)
  int shapes[][8] = {SHAPES};
  for (auto& s : shapes) {
    const Plan p = dx_choose_tile(s[0], s[1], s[2], s[3], s[4], s[4], s[5], s[5], s[6], s[7]);
    std::printf("%d %d %d %d %lld\n", p.bm, p.bm ? p.row_segments : 0, p.bm ? num_tiles(p) : 0,
                p.bm ? dx_grad_smem_layout(p, s[6]).total : 0, p.bm ? (long long)dx_tile_cost(p, s[6]) : 0LL);
  }
}
"""


def test_the_grad_x_plan_picks_the_launchers_tiles(tmp_path):
    """Every Xception unit (stride 1 at its input size) in 16-bit and fp32 on the H100 and A100 limits,
    wide rows (row segments), dilation 2, valid padding, and a limit that nothing fits."""
    from xception_fast.bench.shapes import unit_shapes
    from xception_fast.bench.static import cuda_tiling
    from xception_fast.bench.static.machine import A100_SXM, H100_SXM

    shapes = [(4, s.in_channels, s.height, s.width, 1, 1, e, m.smem_per_block)
              for s in unit_shapes(299) for e in (2, 4) for m in (H100_SXM, A100_SXM)]
    shapes += [(2, 64, 9, 700, 1, 1, 2, H100_SXM.smem_per_block), (2, 96, 33, 35, 2, 2, 2, H100_SXM.smem_per_block),
               (1, 8, 5, 300, 0, 1, 4, A100_SXM.smem_per_block), (1, 8, 5, 3000, 1, 1, 2, 20000), (1, 8, 5, 3000, 1, 1, 2, 4000)]
    lines = header_program_lines(tmp_path, "dx", _DX.replace("SHAPES", shape_rows(shapes)))
    kinds = set()
    for (n, c, h, w, pad, dil, e, smem), line in zip(shapes, lines, strict=True):
        # dx_choose takes the forward's output grid (stride 1: h + 2 pad - 2 dil).
        p = cuda_tiling.dx_choose(n, c, h + 2 * pad - 2 * dil, w + 2 * pad - 2 * dil, 3, 1, pad, dil, e, smem)
        got = (0, 0, 0, 0, 0) if p is None else (p.bm, p.row_segments, p.tiles, p.dx_smem_bytes(), p.dx_cost())
        assert got == tuple(map(int, line.split())), ((n, c, h, w, pad, dil, e, smem), got, line)
        kinds.add(None if p is None else ("segments" if p.row_segments else "ranges", p.bm))
    assert None in kinds and len(kinds) >= 4, kinds
