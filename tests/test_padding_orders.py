"""Paddings read in the right order and kept per module: F.pad and ZeroPad2d say [left, right, top, bottom], the ops
take [top, bottom, left, right]; every pad here differs on all four sides, so reading one order for the other (or
any two sides swapped) changes the output's shape and values and the proof refuses the swap. Two TensorFlow 'SAME'
convs of one configuration at different image sizes pad differently (their ZeroPad2d children say how), and a
stride-1 'SAME' conv pads the same at every size, so it has a fixed padding (a block takes it)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels.nn import InvertedResidual
from conftest import assert_close_to_reference, random_x



def efficientnet_utils():
    return pytest.importorskip("efficientnet_pytorch.utils")


def dw(channels, stride=1):
    return nn.Conv2d(channels, channels, 3, stride, 0, groups=channels, bias=False)


class PaddingConv(nn.Conv2d):
    """A Conv2d subclass that pads with a ZeroPad2d child before convolving (as efficientnet_pytorch's)."""

    def __init__(self, *args, pad, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(pad)

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FourSidedPads(nn.Module):
    """Pads [left, right, top, bottom], each with four different sides: F.pad and a ZeroPad2d in forward before
    depthwise convs, a padding Conv2d subclass, F.pad before a dense conv."""

    def __init__(self, c=8):
        super().__init__()
        self.conv1, self.bn1 = dw(c), nn.BatchNorm2d(c)
        self.pad2 = nn.ZeroPad2d((2, 0, 3, 1))
        self.conv2, self.bn2 = dw(c, 2), nn.BatchNorm2d(c)
        self.conv3 = PaddingConv(c, c, 3, groups=c, bias=False, pad=(0, 3, 1, 2))
        self.bn3 = nn.BatchNorm2d(c)
        self.conv4, self.bn4 = nn.Conv2d(c, c, 3, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(F.pad(x, [1, 0, 2, 3]))))
        x = F.silu(self.bn2(self.conv2(self.pad2(x))))
        x = F.hardswish(self.bn3(self.conv3(x)))
        return F.relu(self.bn4(self.conv4(F.pad(x, [3, 1, 0, 2]))))


class PaddedBlock(nn.Module):
    """An inverted-residual block whose forward pads before its depthwise conv, four different sides."""

    def __init__(self, c=8, e=16):
        super().__init__()
        self.expand, self.bn0 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.depthwise, self.bn1 = dw(e), nn.BatchNorm2d(e)
        self.project, self.bn2 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.relu6(self.bn0(self.expand(x)))
        x = F.relu6(self.bn1(self.depthwise(F.pad(x, [0, 2, 3, 1]))))
        return self.bn2(self.project(x))


def _with_random_statistics(module: nn.Module) -> nn.Module:
    return randomize_batchnorm(module.eval(), torch.Generator().manual_seed(0))


def _assert_patched_like_stock64(stock: nn.Module, patched: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = copy.deepcopy(stock).double()(x.double())
        assert_close_to_reference(patched(x), want, torch.float32)


def test_four_sided_pads_are_read_left_right_top_bottom(op_calls):
    stock = _with_random_statistics(FourSidedPads())
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", convs=True)
    report = mbkernels.patch_report(patched)
    assert report.skipped == [] and (report.count("dwconv_bn_act"), report.count("conv_bn_act")) == (3, 1), report
    op_calls.clear()
    _assert_patched_like_stock64(stock, patched, random_x((2, 8, 11, 14)))
    assert [list(values[4]) for op, values in op_calls if op == "dwconv_bn_act"] == [
        [2, 3, 1, 0], [3, 1, 2, 0], [1, 2, 0, 3]]


def test_a_pad_before_a_blocks_depthwise_conv_is_read_left_right_top_bottom():
    stock = _with_random_statistics(PaddedBlock())
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks="all")
    assert any(isinstance(m, InvertedResidual) for m in patched.modules()), mbkernels.patch_report(patched)
    _assert_patched_like_stock64(stock, patched, random_x((2, 8, 9, 12)))


class TwoImageSizes(nn.Module):
    """efficientnet_pytorch's Conv2dStaticSamePadding twice, one configuration built for two image sizes: 34 pads
    [0, 1, 0, 1] ([left, right, top, bottom]), the 17 x 17 map after it [1, 1, 1, 1]."""

    def __init__(self, c=8):
        super().__init__()
        same = efficientnet_utils().Conv2dStaticSamePadding
        self.conv1, self.bn1 = same(c, c, 3, stride=2, groups=c, bias=False, image_size=34), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = same(c, c, 3, stride=2, groups=c, bias=False, image_size=17), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.silu(self.bn2(self.conv2(F.silu(self.bn1(self.conv1(x))))))


def test_same_convs_built_for_two_image_sizes_keep_their_own_padding():
    stock = _with_random_statistics(TwoImageSizes())
    assert stock.conv1.static_padding.padding != stock.conv2.static_padding.padding
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    report = mbkernels.patch_report(patched)
    assert report.skipped == [] and report.count("dwconv_bn_act") == 2, report
    _assert_patched_like_stock64(stock, patched, random_x((2, 8, 34, 34)))


class DynamicSameBlock(nn.Module):
    """A block whose depthwise conv is efficientnet_pytorch's Conv2dDynamicSamePadding at stride 1: TensorFlow
    'SAME', the same padding at every size."""

    def __init__(self, c=8, e=16, kernel=3):
        super().__init__()
        same = efficientnet_utils().Conv2dDynamicSamePadding
        self.expand, self.bn0, self.act0 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6()
        self.depthwise = same(e, e, kernel, stride=1, groups=e, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(e), nn.ReLU6()
        self.project, self.bn2 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.act0(self.bn0(self.expand(x)))
        x = self.act1(self.bn1(self.depthwise(x)))
        return self.bn2(self.project(x))


def test_stride_1_tensorflow_same_is_a_fixed_padding_a_block_takes():
    stock = _with_random_statistics(DynamicSameBlock())
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks="all")
    assert any(isinstance(m, InvertedResidual) for m in patched.modules()), mbkernels.patch_report(patched)
    _assert_patched_like_stock64(stock, patched, random_x((2, 8, 9, 12)))


def test_stride_1_tensorflow_same_of_an_even_kernel_puts_its_odd_pixel_bottom_right(op_calls):
    """Kernel (2, 6): 'SAME' pads [0, 1, 2, 3] ([top, bottom, left, right]) at every size."""
    conv = efficientnet_utils().Conv2dDynamicSamePadding(8, 8, (2, 6), stride=1, groups=8, bias=False)
    stock = _with_random_statistics(nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU()))
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    op_calls.clear()
    for plane in ((7, 9), (8, 10)):
        _assert_patched_like_stock64(stock, patched, random_x((1, 8, *plane)))
    assert [list(values[4]) for _, values in op_calls] == [[0, 1, 2, 3]] * 2
