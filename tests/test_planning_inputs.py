"""What the planner plans from when it is given nothing but the model: the input channels a module sees in the
model's forward (a channel-split unit gets twice the channels its convs take), and, without example inputs, the
block cost model (nothing is left for timing that will never run)."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels.nn import ConvBNAct, DWConvBNAct, InvertedResidual
from mbkernels.planner import cost
from conftest import assert_close_to_reference, random_x
from models.forwards import ChannelSplitUnit
from test_inverted_residual import stock_block


class FunctionalSplitUnit(nn.Module):
    """ShuffleNetV2's unit with its activations applied as functions only (no activation modules): what follows
    each BatchNorm is seen in the forward's dataflow alone."""

    def __init__(self, c=32):
        super().__init__()
        half = c // 2
        self.conv1, self.bn1 = nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half)
        self.dw, self.bn2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False), nn.BatchNorm2d(half)
        self.conv2, self.bn3 = nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half)

    def forward(self, x):
        passed, y = x.chunk(2, dim=1)
        y = F.hardswish(self.bn1(self.conv1(y)))
        y = F.silu(self.bn3(self.conv2(self.bn2(self.dw(y)))))
        n, c, h, w = x.shape
        return torch.cat([passed, y], 1).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def _units(unit) -> nn.Module:
    """Channel-split units in a plain Sequential: each unit is planned on its own, with its own input (32
    channels), not the model's (3) nor its convs' (16)."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), unit(), unit())
    return randomize_batchnorm(model.eval(), torch.Generator().manual_seed(0))


def _assert_patched_like_stock64(stock: nn.Module, patched: nn.Module) -> None:
    x = random_x((2, 3, 16, 18))
    with torch.no_grad():
        assert_close_to_reference(patched(x), copy.deepcopy(stock).double()(x.double()), torch.float32)


def test_a_channel_split_unit_is_proven_on_the_channels_it_gets_and_swapped_in_its_slots():
    """The structural swaps cover the unit's modules (its forward applies them in order): proven on a probe of the
    unit's own 32 channels, they are made in the unit's slots and its forward is not rewritten."""
    stock = _units(ChannelSplitUnit)
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    for unit in (patched[3], patched[4]):
        assert isinstance(unit.dw, DWConvBNAct) and isinstance(unit.conv1, ConvBNAct), unit
    _assert_patched_like_stock64(stock, patched)


def test_a_channel_split_units_rewritten_forward_is_proven_on_the_channels_it_gets():
    """Activations applied as functions: the unit's forward is rewritten, proven on a probe of its 32 channels,
    and every conv takes its activation."""
    stock = _units(FunctionalSplitUnit)
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    report = mbkernels.patch_report(patched)
    assert report.skipped == [], report
    activations = {entry.path: entry.activation for entry in report.fused}
    for unit in ("3", "4"):
        assert (activations[f"{unit}.conv1"], activations[f"{unit}.conv2"]) == ("hardswish", "silu"), report
    _assert_patched_like_stock64(stock, patched)


def test_without_example_inputs_the_gpu_cost_model_installs_the_block(monkeypatch):
    """No example inputs: nothing is timed, so a block the cost model prefers is fused whole at once (a tuned
    patch would time it against its layers)."""
    monkeypatch.setattr(cost, "on_gpu", lambda fused: True)  # the GPU's cost model, here too
    model = mbkernels.patch(nn.Sequential(stock_block("timm-ir-k3s1-res")), backend="reference")
    assert isinstance(model[0], InvertedResidual), mbkernels.patch_report(model)
