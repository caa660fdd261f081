"""Patch coverage of real models (issue 13): every depthwise conv and squeeze-excite of timm's MobileNet-style and
ConvNeXt-style models is taken over, accounted for by patch_report, and computes what stock computes (layer
fusion: blocks=False; whole blocks are tested in test_inverted_residual.py).

Models are built with random weights and random BatchNorm statistics (no download). Depthwise convs and SE modules
are counted here by structure, independently of patch's matching.
"""
import copy
import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mbkernels
from mbkernels import activations
from mbkernels.nn import DWConvBNAct, FusedModule, MixedDWConvBNAct, SqueezeExcite
from mbkernels.match import randomize_batchnorm
from conftest import KERNEL_BACKENDS, TOLERANCE, assert_close_to_reference
from oracle import dwconv64
from models.timm_zoo import MODELS, build, is_depthwise, is_se_like, taken_over

timm = pytest.importorskip("timm")

@functools.lru_cache(maxsize=None)
def _stock(name: str) -> nn.Module:
    return build(name)


def stock_model(name: str) -> nn.Module:
    return copy.deepcopy(_stock(name))


def image(name: str, seed: int = 1) -> torch.Tensor:
    size = MODELS[name]
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.double() - want.double()).abs().max() / want.double().abs().max()).item()


def assert_matches_stock(patched: nn.Module, stock: nn.Module, x: torch.Tensor) -> None:
    """Patched float32 within float32 noise of float64 stock: no worse than stock float32 itself (random BN
    statistics make some models ill-conditioned), and within 1e-4 relative at worst."""
    with torch.no_grad():
        want = copy.deepcopy(stock).double()(x.double())
        stock_error = relative_error(stock(x), want)
        error = relative_error(patched(x), want)
    assert error <= max(4 * stock_error, 2 * TOLERANCE[torch.float32]) and error < 1e-4, (error, stock_error)


# ------------------------------------------------------------------------------------ every model, every item
@pytest.mark.parametrize("name", MODELS)
def test_every_depthwise_conv_and_se_is_taken_over_and_accounted_for(name):
    stock = stock_model(name)
    depthwise = [m for m in stock.modules() if is_depthwise(m)]
    se_like = [m for m in stock.modules() if is_se_like(m)]
    report = mbkernels.patch_report(stock, blocks=False)
    model = mbkernels.patch(stock_model(name), backend="reference", blocks=False)
    convs, ses = taken_over(model)
    assert len(convs) >= 0.98 * len(depthwise) and len(depthwise) > 0, (len(convs), len(depthwise))
    assert len(ses) == len(se_like), (len(ses), len(se_like))
    # The report accounts for each: a fused entry for each fused module, a skip entry (with a reason) for the rest.
    fused_modules = [m for m in model.modules() if isinstance(m, FusedModule)]
    assert len(report.fusable) == len(fused_modules)
    assert len(depthwise) - len(convs) + len(se_like) - len(ses) <= len(report.skipped)
    assert all(entry.reason for entry in report.skipped)
    assert_matches_stock(model, stock, image(name))
    # state_dict unchanged; unpatch gives back the very stock modules.
    assert list(model.state_dict()) == list(stock.state_dict())
    stock_modules = [type(m) for m in stock.modules()]
    assert [type(m) for m in mbkernels.unpatch(model).modules()] == stock_modules


# ----------------------------------------------------------------------------------------------- one per item
def test_mixnet_probes_use_the_parents_input_channels():
    """The probe of a non-Sequential parent takes the parent's input channels (a MixedConv2d's, before its
    splits), not the first split's: nothing in MixNet is refused for a failed probe."""
    report = mbkernels.patch_report(stock_model("mixnet_s"), blocks=False)
    assert not [e for e in report.skipped if "could not be checked" in e.reason]
    assert report.skipped == []


def test_rexnet_se_with_batchnorm_is_fused():
    model = mbkernels.patch(stock_model("rexnet_100"), backend="reference", blocks=False)
    fused = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(fused) == 13 and all(m.norm_path == "bn" for m in fused)
    block = stock_model("rexnet_100").features[3].se
    x = torch.randn(2, block.fc1.in_channels, 5, 7)
    with torch.no_grad():
        assert relative_error(SqueezeExcite.from_module(block, backend="reference")(x), block.double()(x.double())) \
            < 1e-5


@pytest.mark.parametrize("name, hardswish", [("mobilenetv3_rw", 5), ("fbnetv3_b", 18)])
def test_se_with_hardswish_is_fused(name, hardswish):
    model = mbkernels.patch(stock_model(name), backend="reference", blocks=False)
    hidden = [m.activation for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert hidden.count("hardswish") == hardswish


@pytest.mark.parametrize("size", [65, 66])
def test_conv2d_same_fused_at_odd_and_even_sizes(size):
    stock = stock_model("tf_mobilenetv3_small_100")
    model = mbkernels.patch(stock_model("tf_mobilenetv3_small_100"), backend="reference", blocks=False)
    same = [m for m in model.modules() if isinstance(m, DWConvBNAct) and m.op_padding is None]
    assert len(same) == 4  # the stride-2 Conv2dSame, padded per call
    x = torch.randn(1, 3, size, size + 1, generator=torch.Generator().manual_seed(size))
    assert_matches_stock(model, stock, x)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *KERNEL_BACKENDS])
@pytest.mark.parametrize("conv", [
    pytest.param(lambda: timm.layers.Conv2dSame(6, 6, 3, stride=2, groups=6), id="conv2d_same-3x3-s2"),
    pytest.param(lambda: timm.layers.Conv2dSame(6, 6, (5, 4), stride=(2, 3), groups=6), id="conv2d_same-5x4-s2x3"),
    pytest.param(lambda: nn.Conv2d(6, 6, 4, padding="same", groups=6), id="same-4x4"),
    pytest.param(lambda: nn.Conv2d(6, 6, (2, 3), padding="same", dilation=(3, 1), groups=6), id="same-2x3-d3"),
])
def test_asymmetric_padding_module(conv, backend, poisoned_outputs):
    torch.manual_seed(0)
    conv = conv()
    fused = DWConvBNAct(conv.eval(), backend=backend)
    for shape in [(2, 6, 9, 10), (1, 6, 8, 7)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want = copy.deepcopy(conv).double()(x.double())
            assert_close_to_reference(fused(x), want, torch.float32)


@pytest.mark.parametrize("name, activation", [("mobileone_s0", "relu"), ("repghostnet_050", "relu"),
                                              ("efficientvit_b0", "hardswish")])
def test_convs_without_a_batchnorm_fuse_their_activation(name, activation):
    model = mbkernels.patch(stock_model(name), backend="reference", blocks=False)
    fused = [m for m in model.modules() if isinstance(m, DWConvBNAct)]
    assert all(isinstance(m.bn, nn.Identity) for m in fused if m.conv.bias is not None)
    assert any(m.activation == activation and isinstance(m.bn, nn.Identity) for m in fused)


class ActAfterShortcut(nn.Module):
    """Registers conv, bn, act but applies act after adding the input: the act must not be fused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


def test_parent_activations_fused_when_proven_else_half_fused():
    # hgnetv2's ConvBNAct applies its ReLU right after the BN: the probe proves it, so it is fused.
    model = mbkernels.patch(stock_model("hgnetv2_b0"), backend="reference", blocks=False)
    fused = [m for m in model.modules() if isinstance(m, DWConvBNAct)]
    assert sum(m.activation == "relu" for m in fused) == 9 and not any(m.half_fused for m in fused)
    # Applied after a shortcut, the ReLU is not right after the BN: conv + BN fused, the entry says half-fused.
    block = randomize_batchnorm(ActAfterShortcut()).eval()
    stock = copy.deepcopy(block)
    report = mbkernels.patch_report(block, blocks=False)
    [entry] = report.fusable
    assert entry.activation == "identity" and entry.note.startswith("ReLU runs on its own (fusing it too:")
    assert "half-fused" in report.summary()
    mbkernels.patch(block, backend="reference", blocks=False)
    assert type(block.act) is nn.ReLU and block.conv.activation == "identity"
    x = torch.randn(2, 8, 7, 6)
    with torch.no_grad():
        assert relative_error(block(x), stock(x)) < 1e-5


def dw_bn(channels=8):
    return [nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.BatchNorm2d(channels)]


@pytest.mark.parametrize("make, activation, note", [
    (lambda: nn.Sequential(*dw_bn(), nn.GELU()), "gelu", ""),
    (lambda: nn.Sequential(*dw_bn(), nn.GELU(approximate="tanh")), "gelu_tanh", ""),
    (lambda: nn.Sequential(*dw_bn(), nn.LeakyReLU(0.2)), "leaky_relu:0.2", ""),
    (lambda: nn.Sequential(dw_bn()[0], timm.layers.BatchNormAct2d(8, act_layer=nn.GELU)), "gelu", ""),
    (lambda: nn.Sequential(dw_bn()[0], nn.Sequential(nn.BatchNorm2d(8), nn.SiLU())), "silu", ""),
    (lambda: nn.Sequential(*dw_bn(), nn.Mish()), "identity", "Mish after it has no fused kernel"),
])
def test_activations_gelu_leaky_relu_nested_and_without_a_kernel(make, activation, note):
    torch.manual_seed(0)
    stock = randomize_batchnorm(make()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    [entry] = mbkernels.patch_report(model, blocks=False).fused
    assert entry.activation == activation and entry.note.startswith(note)
    assert list(model.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        assert relative_error(model(x), stock.double()(x.double())) < 1e-5
    mbkernels.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]


@pytest.mark.parametrize("name", ["mixnet_s", "tf_mixnet_s"])
def test_mixed_conv_is_one_op_call(name, op_calls):
    stock_mixed = [m for m in _stock(name).modules() if isinstance(m, timm.layers.MixedConv2d)
                   and all(is_depthwise(c) for c in m.children())]
    model = mbkernels.patch(stock_model(name), backend="reference", blocks=False)
    mixed = [m for m in model.modules() if isinstance(m, MixedDWConvBNAct)]
    assert len(mixed) == len(stock_mixed) > 0  # every MixedConv2d of depthwise groups (3x3 ... 9x9)
    op_calls.clear()  # the probes' calls while patching
    with torch.no_grad():
        block = mixed[-1]
        block(torch.randn(1, block.conv.in_channels, 9, 8))
    kernels = [c.kernel_size for c in block.conv.children()]
    # one call, kernels padded to the largest
    assert [(op, values[1].shape) for op, values in op_calls] == [
        ("dwconv_bn_act", (block.conv.in_channels, 1, *max(kernels)))]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["mixnet_s", "tf_mixnet_s"])
def test_mixed_block_through_triton(name, backend, poisoned_outputs):
    stock = stock_model(name).blocks[2][0]  # stride-2 3x3/5x5/7x7 MixedConv2d (Conv2dSame in tf_mixnet_s)
    model = mbkernels.patch(copy.deepcopy(stock), backend=backend, blocks=False)
    assert any(isinstance(m, MixedDWConvBNAct) for m in model.modules())
    for size in (9, 10):
        x = torch.randn(1, stock.conv_pw.in_channels, size, size + 1)
        with torch.no_grad():
            assert_close_to_reference(model(x), copy.deepcopy(stock).double()(x.double()), torch.float32)


@pytest.mark.parametrize("name", ["convnext_atto", "edgenext_xx_small"])
def test_convnext_depthwise_taken_over_alone(name):
    model = mbkernels.patch(stock_model(name), backend="reference", blocks=False)
    fused = [m for m in model.modules() if isinstance(m, DWConvBNAct)]
    assert fused and all(m.activation == "identity" and isinstance(m.bn, nn.Identity) for m in fused)
    assert all(m.conv.kernel_size in ((7, 7), (3, 3), (5, 5), (9, 9)) for m in fused)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *KERNEL_BACKENDS])
def test_depth_multiplier(backend, poisoned_outputs):
    model = mbkernels.patch(stock_model("fastvit_t8"), backend="reference", blocks=False)
    multiplied = [m for m in model.modules() if isinstance(m, DWConvBNAct) and m.conv.out_channels > m.conv.in_channels]
    assert len(multiplied) == 4
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6), nn.BatchNorm2d(12)
    stock = randomize_batchnorm(nn.Sequential(conv, bn, nn.GELU())).eval()
    fused = DWConvBNAct(*copy.deepcopy(list(stock)), backend=backend)
    x = torch.randn(2, 6, 9, 8)
    with torch.no_grad():
        assert_close_to_reference(fused(x), stock.double()(x.double()), torch.float32)


def test_hand_built_modules_follow_the_stock_mode(op_calls):
    conv, bn = [m.eval() for m in dw_bn()]
    fused = DWConvBNAct(conv, bn, nn.ReLU(), backend="reference")
    assert not fused.training
    with torch.no_grad():
        fused(torch.randn(1, 8, 5, 5))
    assert [op for op, _ in op_calls] == ["dwconv_bn_act"]  # ran fused at once, no .eval() needed
    assert DWConvBNAct(*dw_bn()).training  # around training-mode modules it starts in training mode
    se = timm.layers.SEModule(8, rd_channels=4).eval()
    assert not SqueezeExcite.from_module(se).training and SqueezeExcite.from_module(se.train()).training


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *KERNEL_BACKENDS])
@pytest.mark.parametrize("make", [lambda: timm.models.hgnet.EseModule(16),
                                  lambda: timm.layers.EffectiveSEModule(16)], ids=["EseModule", "EffectiveSEModule"])
def test_effective_se_with_one_layer_is_fused(make, backend, poisoned_outputs):
    """An SE with one layer C -> C (hgnet's EseModule, vovnet's and rdnet's EffectiveSEModule) runs through the op
    with the identity as its expand layer."""
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Conv2d(3, 16, 1), make()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend=backend, blocks=False)
    [entry] = mbkernels.patch_report(model, blocks=False).fused
    assert entry.kind == "squeeze_excite" and entry.shape == "C=16 R=16 (one layer)"
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        assert_close_to_reference(model(x), stock.double()(x.double()), torch.float32)


def test_se_like_module_the_op_cannot_take_is_reported():
    """A gate and a 1x1 layer, but a forward that is no SE: refused by the numeric check, with the reason."""
    class GatedResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate = nn.Conv2d(16, 16, 1), nn.Sigmoid()

        def forward(self, x):
            return x + self.gate(self.fc(x))

    report = mbkernels.patch_report(nn.Sequential(nn.Conv2d(3, 16, 1), GatedResidual()), blocks=False)
    [entry] = report.skipped
    assert entry.kind == "squeeze_excite" and entry.shape == "C=16"
    assert "GatedResidual has the layers of a squeeze-excite module" in entry.reason


def test_an_se_refused_for_its_gate_is_reported_though_its_layers_are_folded():
    """The SE kind refuses the module (a tanh gate); the conv kind then folds its first 1x1 conv and activation.
    That fold is no SE: the refusal stays in the report."""
    class TanhSE(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.reduce, self.act = nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 4, 1), nn.ReLU()
            self.expand, self.gate = nn.Conv2d(4, 16, 1), nn.Tanh()

        def forward(self, x):
            return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))

    report = mbkernels.patch_report(nn.Sequential(nn.Conv2d(3, 16, 1), TanhSE()), blocks=False)
    assert [entry.path for entry in report.fusable] == ["1.reduce"]
    [entry] = report.skipped
    assert entry.path == "1" and entry.kind == "squeeze_excite" and "computes no known function" in entry.reason


def test_activation_table_names_every_module_used():
    for module, spec in [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                         (nn.LeakyReLU(0.2), "leaky_relu:0.2"), (nn.LeakyReLU(), "leaky_relu:0.01")]:
        assert activations.identify_activation(module) == spec


@pytest.mark.parametrize("gate, spec", [
    (nn.Hardsigmoid(), "hardsigmoid"), (lambda v: F.relu6(v + 3) / 6, "hardsigmoid"),
    (lambda v: v.clamp(0, 1), "hardsigmoid:6,-3"), (lambda v: F.relu6(1.2 * v + 3) / 6, "hardsigmoid:1.2,0"),
    (lambda v: (0.2 * v + 0.5).clamp(0, 1), "hardsigmoid:1.2,0"), (lambda v: torch.sigmoid(2 * v - 1), "sigmoid:2,-1"),
    (lambda v: torch.sigmoid(v / 3), "sigmoid:0.3333333333,0"),
    (torch.tanh, None), (F.relu, None), (F.relu6, None), (lambda v: v.clamp(0, 2), None), (torch.exp, None)])
def test_gates_of_an_affine_map_are_named_with_it(gate, spec):
    assert activations.identify_gate(gate) == spec
    if spec is not None:
        name, scale, shift = activations.parse_gate(spec)
        probe = torch.linspace(-9, 9, 301, dtype=torch.float64)
        assert torch.allclose(activations.apply_gate(name, scale * probe + shift), gate(probe), atol=1e-9)


@pytest.mark.parametrize("spec", ["hardsigmoid:1", "hardsigmoid:0,1", "hardsigmoid:nan,0", "tanh", "sigmoid:a,b", 3])
def test_bad_gate_specs_are_refused(spec):
    with pytest.raises(ValueError):
        activations.parse_gate(spec)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_op_asymmetric_padding_and_depth_multiplier(backend, poisoned_outputs):
    """The op itself with [top, bottom, left, right] padding and a multiplier, against the float64 oracle."""
    x, w, b = torch.randn(2, 5, 8, 9), torch.randn(10, 1, 4, 3), torch.randn(10)
    out = mbkernels.ops.dwconv_bn_act(x, w, b, stride=2, padding=[1, 2, 0, 1], activation="leaky_relu:0.2",
                                      backend=backend)
    assert_close_to_reference(out, dwconv64(x, w, b, [2, 2], [1, 2, 0, 1], [1, 1], "leaky_relu:0.2"), torch.float32)


def test_tf_same_and_mixed_conv_trace_whole_at_odd_and_even_sizes():
    """torch.compile(fullgraph=True) traces the per-call TF 'SAME' padding and the stacked mixed weight; the second
    size recompiles with dynamic shapes, where the padding must still come out as plain ints."""
    stock = stock_model("tf_mixnet_s").blocks[2][0]
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for size in (9, 10):
        x = torch.randn(1, stock.conv_pw.in_channels, size, size + 1)
        with torch.no_grad():
            assert relative_error(compiled(x), stock.double()(x.double())) < 1e-5
            stock.float()


@pytest.mark.parametrize("name", ["tf_mixnet_s", "rexnet_100", "mobileone_s0", "hgnet_tiny"])
def test_patched_model_loads_a_stock_checkpoint(name):
    """The fused modules' state_dict entries keep their stock names (a MixedConv2d's groups, an SE's folded norm,
    a nested slot): a stock checkpoint loads strictly into the patched model and changes what it computes."""
    model = mbkernels.patch(stock_model(name), backend="reference", blocks=False)
    other = randomize_batchnorm(stock_model(name), torch.Generator().manual_seed(7))
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = image(name)
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(other.state_dict())
        assert relative_error(model(x), before) > 1e-3  # the checkpoint took effect
    assert_matches_stock(model, other, x)
