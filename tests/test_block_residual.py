"""Whether a fused block adds its input back is what the stock block's forward does, never what its shapes allow.

Every block here has as many output as input channels and stride 1, so a residual would fit: a block that adds its
input must get one, a block that does not (timm's noskip=True, a hand-written forward) must not, both alone
(InvertedResidual.from_module) and through mbkernels.patch(blocks="all"). Forwards that compute something else (a
scaled residual, a BatchNorm left out, which fresh statistics would hide) are refused. Float64 references are the
stock blocks themselves, with random BatchNorm statistics.
"""
import copy
from functools import partial

import pytest
import torch
from torch import nn

import mbkernels
from conftest import ALL_BACKENDS, DEVICE, assert_close_to_reference, random_x
from mbkernels.nn import InvertedResidual
from mbkernels.match import randomize_batchnorm

timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")

BLOCK_BACKENDS = [p for p in ALL_BACKENDS if p.id != "cuda"]  # the cuda backend has no block kernel


class HandBlock(nn.Module):
    """expand 1x1 -> depthwise 3x3 -> [SE] -> project 1x1, C -> C at stride 1; its forward adds `shortcut` * x
    (0: no residual) and may leave the project BatchNorm out."""

    def __init__(self, channels: int, hidden: int, shortcut: float, se: bool = False, project_norm: bool = True):
        super().__init__()
        self.shortcut, self.project_norm = shortcut, project_norm
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.Hardswish())
        self.se = timm_blocks.SqueezeExcite(hidden, rd_ratio=0.25) if se else None
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        d = self.depthwise(self.expand(x))
        if self.se is not None:
            d = self.se(d)
        y = self.project(d)
        if self.project_norm:
            y = self.project_bn(y)
        return y + self.shortcut * x if self.shortcut else y


# name: (build, whether the stock forward adds its input). Every one maps 16 channels to 16 at stride 1.
BLOCKS = {
    "hand-adds": (partial(HandBlock, 16, 40, 1.0), True),
    "hand-no-skip": (partial(HandBlock, 16, 40, 0.0), False),
    "hand-se-adds": (partial(HandBlock, 16, 40, 1.0, se=True), True),
    "hand-se-no-skip": (partial(HandBlock, 16, 40, 0.0, se=True), False),
    "timm-ir-skip": (lambda: timm_blocks.InvertedResidual(16, 16, 3, 1, exp_ratio=2.5), True),
    "timm-ir-noskip": (lambda: timm_blocks.InvertedResidual(16, 16, 3, 1, exp_ratio=2.5, noskip=True), False),
    "timm-dsconv-skip": (lambda: timm_blocks.DepthwiseSeparableConv(16, 16, 5, 1), True),
    "timm-dsconv-noskip": (lambda: timm_blocks.DepthwiseSeparableConv(16, 16, 5, 1, noskip=True), False),
}


def _stock(name: str, seed: int = 0) -> nn.Module:
    build, _ = BLOCKS[name]
    return randomize_batchnorm(build().eval(), torch.Generator().manual_seed(seed)).to(DEVICE)


def _stock64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).cpu().double().eval()(x.detach().cpu().double())


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("name", BLOCKS)
def test_the_residual_is_the_forwards_not_the_shapes(name, backend, poisoned_outputs):
    stock = _stock(name)
    fused = InvertedResidual.from_module(stock, backend=backend)
    assert fused.parts.residual is BLOCKS[name][1]
    x = random_x((2, 16, 9, 7), layout="channels_last" if "se" in name else "nchw")
    with torch.no_grad():
        assert_close_to_reference(fused(x), _stock64(stock, x), torch.float32)


def test_patch_fuses_blocks_with_and_without_a_residual():
    stock = nn.Sequential(*(_stock(name, seed) for seed, name in enumerate(("hand-no-skip", "timm-ir-skip",
                                                                           "timm-dsconv-noskip", "hand-adds"))))
    patched = mbkernels.patch(copy.deepcopy(stock), blocks="all")
    fused = [m for m in patched if isinstance(m, InvertedResidual)]
    assert len(fused) == 4, mbkernels.patch_report(patched)
    assert [m.parts.residual for m in fused] == [False, True, False, True]
    x = random_x((2, 16, 8, 11))
    with torch.no_grad():
        assert_close_to_reference(patched(x), _stock64(stock, x), torch.float32)


# name: (a block whose forward the fused formula does not compute, with or without a residual)
NOT_BLOCKS = {
    "half-shortcut": lambda: HandBlock(16, 40, 0.5),
    "double-shortcut": lambda: HandBlock(16, 40, 2.0),
    # Fresh statistics make the left-out BatchNorm nearly an identity (1 / sqrt(1 + eps)): the match must not rest
    # on them.
    "project-norm-left-out": lambda: HandBlock(16, 40, 1.0, project_norm=False),
    "project-norm-left-out-no-skip": lambda: HandBlock(16, 40, 0.0, project_norm=False),
}


@pytest.mark.parametrize("name", NOT_BLOCKS)
def test_a_forward_that_is_no_block_is_refused_and_left_alone(name):
    stock = NOT_BLOCKS[name]().eval().to(DEVICE)  # freshly initialised BatchNorms
    with pytest.raises(ValueError, match="does not compute one"):
        InvertedResidual.from_module(stock)
    patched = mbkernels.patch(nn.Sequential(copy.deepcopy(stock)), blocks="all")
    assert not any(isinstance(m, InvertedResidual) for m in patched.modules())
    # Whatever the layers it fused inside, the model computes what the stock block does, with any statistics.
    randomize_batchnorm(stock, torch.Generator().manual_seed(1))
    patched.load_state_dict(nn.Sequential(stock).state_dict())
    x = random_x((2, 16, 7, 9))
    with torch.no_grad():
        assert_close_to_reference(patched(x), _stock64(stock, x), torch.float32)
