"""UnitSpec: the one description of a fused unit, and the one output-size formula."""

import pytest
import torch
from torch import nn

from xception_fast.spec import UnitSpec, output_size


CONVS = [(3, 1, 1, 1), (3, 2, 0, 1), (5, 2, 3, 2), ((2, 4), 1, (0, 1), 1), (1, 2, 0, 1)]


@pytest.mark.parametrize("k, stride, padding, dilation", CONVS)
@pytest.mark.parametrize("h, w", [(7, 9), (1, 12), (13, 13)])
def test_output_shape_is_nn_conv2d_s(k, stride, padding, dilation, h, w):
    conv = nn.Conv2d(4, 4, k, stride, padding, dilation, groups=4, bias=False)
    spec = UnitSpec.of(conv.weight, conv.stride, conv.padding, conv.dilation, False, False)
    x = torch.randn(2, 4, h, w)
    expected = conv(x).shape if all(s > 0 for s in spec.output_hw(h, w)) else None
    if expected is not None:
        assert spec.output_shape(x, 6) == [2, 6, *expected[2:]]
    first = (spec.kernel_size[0], spec.stride[0], spec.padding[0], spec.dilation[0])
    assert output_size(h, *first) == spec.output_hw(h, w)[0]


def test_op_args_and_variants():
    spec = UnitSpec.of(torch.empty(3, 1, 3, 3), [2, 1], [1, 1], [1, 2], True, False, residual=True)
    assert spec == UnitSpec((3, 3), (2, 1), (1, 1), (1, 2), pre_relu=True, residual=True)
    assert spec.op_args() == ([2, 1], [1, 1], [1, 2], True, False)
    assert spec.variants() == {"pre_relu", "residual"}
    assert UnitSpec((3, 3)).variants() == frozenset()
    with pytest.raises(AttributeError):
        spec.stride = (1, 1)  # frozen: a spec is shared by every layer it passes through
