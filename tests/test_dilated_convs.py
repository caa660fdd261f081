"""Dilated convs are fused by mbkernels.patch and compute what the stock modules do.

Dilated mixed depthwise convs (timm's MixedConv2d with dilation > 1, and a hand-written one with a different
dilation per axis) are fused by mbkernels.patch into one depthwise op call and compute what the stock module does.

A group's kernel, centred in the largest, starts (kmax - k) / 2 taps further in, which at dilation d is
(kmax - k) / 2 * d pixels: its padding grows by that much, and its taps sit (kmax - k) / 2 slots in. Static and
TensorFlow 'SAME' paddings (stride 2: timm's Conv2dSame in each group, padded per call from the input's size, at
odd and even sizes); every backend of the depthwise op; float64 references from the stock modules.
"""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from conftest import ALL_BACKENDS, DEVICE, assert_close_to_reference, random_x
from mbkernels.nn import ConvBNAct, DWConvBNAct, MixedDWConvBNAct
from mbkernels.match import randomize_batchnorm

timm_layers = pytest.importorskip("timm.layers")


class HandMixedConv(nn.Module):
    """A hand-written mixed depthwise conv: one conv per channel group, each padded to keep the plane's size
    unless paddings say otherwise."""

    def __init__(self, splits, kernels, dilation, paddings=None):
        super().__init__()
        self.splits = list(splits)
        for i, (channels, kernel) in enumerate(zip(splits, kernels)):
            padding = paddings[i] if paddings else tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
            self.add_module(str(i), nn.Conv2d(channels, channels, kernel, padding=padding, dilation=dilation,
                                              groups=channels, bias=True))

    def forward(self, x):
        return torch.cat([conv(part) for conv, part in zip(self.children(), torch.split(x, self.splits, 1))], 1)


# name: (the mixed conv of 12 channels, input planes). timm's padding '' and 'same' at stride 1 are static; 'same'
# at stride 2 is TensorFlow's, computed per call (odd and even planes differ).
MIXED = {
    "k3-5-7-d2-s1": (lambda: timm_layers.MixedConv2d(12, 12, [3, 5, 7], dilation=2, depthwise=True), [(15, 16)]),
    "k3-5-7-d2-s2": (lambda: timm_layers.MixedConv2d(12, 12, [3, 5, 7], stride=2, dilation=2, depthwise=True),
                     [(15, 16)]),
    "k3-5-d3-s1-same": (lambda: timm_layers.MixedConv2d(12, 12, [3, 5], padding="same", dilation=3,
                                                        depthwise=True), [(14, 15)]),
    "k3-5-7-d2-s2-tf-same": (lambda: timm_layers.MixedConv2d(12, 12, [3, 5, 7], stride=2, padding="same",
                                                             dilation=2, depthwise=True), [(15, 16), (16, 15)]),
    "hand-k3-5-d2x1": (lambda: HandMixedConv([5, 7], [(3, 3), (5, 5)], (2, 1)), [(11, 10)]),
    "hand-k3x5-5x3-d1x3": (lambda: HandMixedConv([6, 6], [(3, 5), (5, 3)], (1, 3)), [(9, 16)]),
    # Padded as little as lines the groups up: the plane shrinks by 8, and a probe sized for the kernels without
    # their dilation (7 pixels) would give no output at all.
    "hand-k3-5-d4-shrinking": (lambda: HandMixedConv([6, 6], [(3, 3), (5, 5)], (4, 4), [(0, 0), (4, 4)]),
                               [(21, 19)]),
}


def _stock(name: str) -> nn.Module:
    mixed = MIXED[name][0]()
    stock = nn.Sequential(mixed, nn.BatchNorm2d(12), nn.Hardswish())
    return randomize_batchnorm(stock, torch.Generator().manual_seed(len(name))).eval().to(DEVICE)


def _stock64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).cpu().double().eval()(x.detach().cpu().double())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", MIXED)
def test_patch_fuses_a_dilated_mixed_conv_into_one_op(name, backend, op_calls, poisoned_outputs):
    stock = _stock(name)
    patched = mbkernels.patch(copy.deepcopy(stock), backend=backend)
    report = mbkernels.patch_report(patched)
    assert isinstance(patched[0], MixedDWConvBNAct), report
    assert not report.skipped, report
    for plane in MIXED[name][1]:
        op_calls.clear()
        x = random_x((2, 12, *plane), layout="channels_last" if plane[0] % 2 else "nchw")
        with torch.no_grad():
            out = patched(x)
        assert [op for op, _ in op_calls] == ["dwconv_bn_act"], "the mixed conv runs as one depthwise op call"
        assert_close_to_reference(out, _stock64(stock, x), torch.float32)


@pytest.mark.parametrize("name", MIXED)
def test_the_fused_module_built_by_hand_matches_too(name):
    stock = _stock(name)
    fused = MixedDWConvBNAct(*stock, backend="reference")
    for plane in MIXED[name][1]:
        x = random_x((3, 12, *plane))
        with torch.no_grad():
            assert_close_to_reference(fused(x), _stock64(stock, x), torch.float32)


# name: (a conv of 8 input channels padded less than its dilated reach, input plane): the plane shrinks, so the
# probe that proves the swap must be sized by the dilated kernel (3 + 8 pixels here), not by the kernel alone.
SHRINKING = {
    "depthwise-k3-d4": (lambda: nn.Conv2d(8, 8, 3, dilation=4, groups=8), DWConvBNAct, (13, 12)),
    "depthwise-k3x5-d4x2-p1x0": (lambda: nn.Conv2d(8, 16, (3, 5), padding=(1, 0), dilation=(4, 2), groups=8),
                                 DWConvBNAct, (12, 13)),
    "dense-k3-d4": (lambda: nn.Conv2d(8, 12, 3, dilation=4), ConvBNAct, (11, 14)),
}


@pytest.mark.parametrize("name", SHRINKING)
def test_patch_fuses_a_dilated_conv_that_shrinks_the_plane(name):
    build, fused_type, plane = SHRINKING[name]
    conv = build()
    stock = randomize_batchnorm(nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU()),
                                torch.Generator().manual_seed(2)).eval().to(DEVICE)
    patched = mbkernels.patch(copy.deepcopy(stock))
    assert type(patched[0]) is fused_type, mbkernels.patch_report(patched)
    x = random_x((2, 8, *plane))
    with torch.no_grad():
        assert_close_to_reference(patched(x), _stock64(stock, x), torch.float32)
