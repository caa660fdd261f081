"""The fused modules fold their stock layers once and refold when anything a fold reads changes: every kind
(DWConvBNAct, ConvBNAct, MixedDWConvBNAct, SqueezeExcite with a BatchNorm as rexnet's, InvertedResidual), every
source (each conv or linear layer's weight and bias, present or absent; each BatchNorm's weight, bias, running
statistics and eps, affine or not) and every kind of edit (in place, copy_, a new Parameter, a `.data` swap, a bias
added or removed, load_state_dict, .to(dtype)), one source at a time, called alone and inside a patched model
(whose eager window makes the checks once per forward), with ordinary tensors and with inference tensors (made
under torch.inference_mode(): no version counter tells their edits).

After each edit the next forward is compared with the stock modules in float64, with the same (edited) values.
"""
import copy
from contextlib import nullcontext

import pytest
import torch
from torch import nn

import mbkernels
from conftest import DEVICE, assert_close_to_reference
from mbkernels.nn import ConvBNAct, DWConvBNAct, FusedModule, InvertedResidual, MixedDWConvBNAct, SqueezeExcite
from mbkernels.match import randomize_batchnorm

timm_layers = pytest.importorskip("timm.layers")
timm_blocks = pytest.importorskip("timm.models._efficientnet_blocks")


def _with_random_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_batchnorm(module, torch.Generator().manual_seed(seed)).eval().to(DEVICE)


def _rexnet_se(channels: int) -> nn.Module:
    """timm's SEModule with a BatchNorm after its reduce layer, as rexnet builds it."""
    return timm_layers.SEModule(channels, rd_ratio=0.5, norm_layer=nn.BatchNorm2d)


def _timm_block(channels: int) -> nn.Module:
    return timm_blocks.InvertedResidual(channels, channels, 3, exp_ratio=2.0, se_layer=timm_blocks.SqueezeExcite)


# name: (the fused module, built from eval-mode stock layers with random statistics, its input channels). Between
# them: conv biases present and absent, affine and affine=False BatchNorms, every fused module kind.
KINDS = {
    "dwconv": (lambda: DWConvBNAct(*_with_random_statistics(nn.Sequential(
        nn.Conv2d(10, 10, 3, padding=1, groups=10), nn.BatchNorm2d(10), nn.Hardswish())), backend="reference"), 10),
    "dwconv-multiplier-affine-free": (lambda: DWConvBNAct(*_with_random_statistics(nn.Sequential(
        nn.Conv2d(10, 20, 5, stride=2, padding=2, groups=10, bias=False), nn.BatchNorm2d(20, affine=False),
        nn.ReLU())), backend="reference"), 10),
    "conv": (lambda: ConvBNAct(*_with_random_statistics(nn.Sequential(
        nn.Conv2d(10, 14, 3, padding=1, bias=False), nn.BatchNorm2d(14), nn.SiLU()))), 10),
    "conv-pointwise-affine-free": (lambda: ConvBNAct(*_with_random_statistics(nn.Sequential(
        nn.Conv2d(10, 14, 1), nn.BatchNorm2d(14, affine=False)))), 10),
    "mixed": (lambda: MixedDWConvBNAct(*_with_random_statistics(nn.Sequential(
        timm_layers.MixedConv2d(12, 12, [3, 5, 7], depthwise=True, bias=True), nn.BatchNorm2d(12), nn.ReLU())),
        backend="reference"), 12),
    "se-with-norm": (lambda: SqueezeExcite.from_module(_with_random_statistics(_rexnet_se(12)), backend="reference"),
                     12),
    "block": (lambda: InvertedResidual.from_module(_with_random_statistics(_timm_block(12)), backend="reference"),
              12),
}


# ------------------------------------------------------------------------------------------------ the edits
def _layers(module: nn.Module) -> list:
    return [(path, m) for path, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _norms(module: nn.Module) -> list:
    return [(path, m) for path, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _set(module: nn.Module, name: str, value) -> None:
    setattr(module, name, value)


# name: (the sources it edits, one at a time: (path, module) pairs of a model, the edit of one source).
EDITS = {
    "weight-in-place": (_layers, lambda m: m.weight.mul_(-0.7)),
    "weight-copied-into": (_layers, lambda m: m.weight.copy_(torch.randn_like(m.weight) * m.weight.std())),
    "weight-new-parameter": (_layers, lambda m: _set(m, "weight", nn.Parameter(m.weight * -0.7))),
    "weight-data-swapped": (_layers, lambda m: _set(m.weight, "data", m.weight.data * -0.7)),
    "bias-in-place": (lambda model: [(p, m) for p, m in _layers(model) if m.bias is not None],
                      lambda m: m.bias.add_(0.5)),
    "bias-added": (lambda model: [(p, m) for p, m in _layers(model) if m.bias is None],
                   lambda m: _set(m, "bias", nn.Parameter(torch.randn(m.weight.shape[0], device=m.weight.device)))),
    "bias-removed": (lambda model: [(p, m) for p, m in _layers(model) if m.bias is not None],
                     lambda m: _set(m, "bias", None)),
    "norm-weight": (lambda model: [(p, m) for p, m in _norms(model) if m.affine], lambda m: m.weight.mul_(-1.3)),
    "norm-bias": (lambda model: [(p, m) for p, m in _norms(model) if m.affine], lambda m: m.bias.add_(0.7)),
    "norm-running-mean": (_norms, lambda m: m.running_mean.copy_(torch.randn_like(m.running_mean))),
    "norm-running-var": (_norms, lambda m: m.running_var.mul_(2.5)),
    "norm-running-var-data-swapped": (_norms, lambda m: _set(m.running_var, "data", m.running_var * 0.3)),
    "norm-eps": (_norms, lambda m: _set(m, "eps", 0.3)),
    # Eval-mode BatchNorm does not read its momentum: the outputs stay the stock modules' (and nothing breaks).
    "norm-momentum": (_norms, lambda m: _set(m, "momentum", 0.9)),
}


def _x(channels: int, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(2, channels, 9, 11, device=DEVICE) * 2).to(dtype)


def _stock64_of_module(fused: nn.Module) -> nn.Module:
    """The fused module's stock layers in float64 (a float64 input runs them: the fused op takes no float64)."""
    return copy.deepcopy(fused).double()


def _stock64_of_model(patched: nn.Module) -> nn.Module:
    return mbkernels.unpatch(copy.deepcopy(patched)).double()


def _check(model: nn.Module, stock64, x: torch.Tensor, what: str, mode) -> None:
    with mode():
        got = model(x)
    with torch.no_grad():
        want = stock64(model)(x.double())
    try:
        assert_close_to_reference(got, want, x.dtype)
    except AssertionError as error:
        raise AssertionError(f"after {what}: {error}") from None


def _edit_every_source(model: nn.Module, stock64, channels: int, edit: str, inference: bool) -> int:
    """Apply the edit to each of its sources in turn, each followed by a forward checked against stock; the number
    of sources edited."""
    select, change = EDITS[edit]
    mode = torch.inference_mode if inference else torch.no_grad
    x = _x(channels)
    _check(model, stock64, x, "building", mode)  # folded and planned before the first edit
    sources = select(model)
    for path, source in sources:
        with mode():
            change(source)
        _check(model, stock64, x, f"{edit} of {path or 'the module'}", mode)
    return len(sources)


def _build(kind: str, inference: bool) -> nn.Module:
    with torch.inference_mode() if inference else nullcontext():
        return KINDS[kind][0]()


@pytest.mark.parametrize("inference", [False, True], ids=["tensors", "inference-tensors"])
@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_module_alone_refolds_after_each_edit(kind, edit, inference):
    module = _build(kind, inference)
    if inference:
        assert all(t.is_inference() for t in module.state_dict().values())
    _edit_every_source(module, _stock64_of_module, KINDS[kind][1], edit, inference)


def test_every_edit_has_sources_in_some_kind():
    """No edit is a no-op over every kind (a source kind missing from KINDS would make its tests vacuous)."""
    modules = [KINDS[kind][0]() for kind in KINDS]
    for edit, (select, _) in EDITS.items():
        assert any(select(module) for module in modules), edit


def _every_kind_model() -> nn.Module:
    """A stock model with one of each fused module kind in it once patched (blocks="all" fuses the block whole)."""
    return _with_random_statistics(nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.Hardswish(),
        timm_layers.MixedConv2d(12, 12, [3, 5], depthwise=True, bias=True), nn.BatchNorm2d(12), nn.ReLU(),
        _rexnet_se(12),
        _timm_block(12),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False), nn.BatchNorm2d(12, affine=False), nn.ReLU6()))


def _patched_every_kind(inference: bool) -> nn.Module:
    with torch.inference_mode() if inference else nullcontext():
        stock = _every_kind_model()
    patched = mbkernels.patch(stock, backend="reference", blocks="all")
    kinds = {type(m) for m in patched.modules() if isinstance(m, FusedModule)}
    assert kinds == {ConvBNAct, DWConvBNAct, MixedDWConvBNAct, SqueezeExcite, InvertedResidual}, \
        mbkernels.patch_report(patched)
    return patched


@pytest.mark.parametrize("inference", [False, True], ids=["tensors", "inference-tensors"])
@pytest.mark.parametrize("edit", EDITS)
def test_a_patched_model_refolds_after_each_edit(edit, inference):
    """The same edits between forwards of a patched model, whose eager window makes the checks once a forward."""
    patched = _patched_every_kind(inference)
    assert _edit_every_source(patched, _stock64_of_model, 3, edit, inference) > 0


@pytest.mark.parametrize("inference", [False, True], ids=["tensors", "inference-tensors"])
def test_a_patched_model_follows_load_state_dict(inference):
    patched = _patched_every_kind(inference)
    _check(patched, _stock64_of_model, _x(3), "patching", torch.no_grad)
    other = _every_kind_model()  # other weights, other statistics
    randomize_batchnorm(other, torch.Generator().manual_seed(7))
    with torch.inference_mode() if inference else nullcontext():
        patched.load_state_dict(other.state_dict())
    x = _x(3)
    with torch.no_grad():
        assert_close_to_reference(patched(x), other.double()(x.double()), torch.float32)


@pytest.mark.parametrize("inference", [False, True], ids=["tensors", "inference-tensors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_module_follows_to_dtype_and_edits_after_it(kind, dtype, inference):
    """.to(dtype) (under inference_mode: the converted tensors are inference tensors), a forward in that dtype,
    an edit of every BatchNorm's statistics, and back to float32."""
    module = _build(kind, inference=False)
    channels = KINDS[kind][1]
    mode = torch.inference_mode if inference else torch.no_grad
    _check(module, _stock64_of_module, _x(channels), "building", mode)
    with mode():
        module.to(dtype)
    if inference:
        assert all(t.is_inference() for t in module.state_dict().values() if t.is_floating_point())
    _check(module, _stock64_of_module, _x(channels, dtype), f"to({dtype})", mode)
    with mode():
        for _, norm in _norms(module):
            norm.running_var.mul_(0.5)
    _check(module, _stock64_of_module, _x(channels, dtype), f"to({dtype}) and an edit", mode)
    with mode():
        module.float()
    _check(module, _stock64_of_module, _x(channels), "float()", mode)


# ------------------------------------------------------------------- what the fused modules read once, at build
def _replace_with_a_new_one(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put a fresh module of the same shape, with other values, in module's place."""
    fresh = copy.deepcopy(module)
    with torch.no_grad():
        for tensor in fresh.parameters():
            tensor.copy_(torch.randn_like(tensor) * tensor.std().clamp_min(0.1))
    randomize_batchnorm(fresh, torch.Generator().manual_seed(3))
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, fresh)


@pytest.mark.parametrize("sources", ["layers", "norms"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_module_replaced_by_a_new_one_is_folded(kind, sources):
    module = _build(kind, inference=False)
    x = _x(KINDS[kind][1])
    _check(module, _stock64_of_module, x, "building", torch.no_grad)
    for path, source in (_layers if sources == "layers" else _norms)(module):
        _replace_with_a_new_one(module, path, source)
        _check(module, _stock64_of_module, x, f"replacing {path}", torch.no_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_refresh_folds_a_module_replaced_by_a_new_one(kind):
    """refresh() folds replaced layers and BatchNorms too."""
    module = _build(kind, inference=False)
    x = _x(KINDS[kind][1])
    _check(module, _stock64_of_module, x, "building", torch.no_grad)
    for path, source in _layers(module) + _norms(module):
        _replace_with_a_new_one(module, path, source)
        module.refresh()
        _check(module, _stock64_of_module, x, f"replacing {path} and refresh()", torch.no_grad)


@pytest.mark.parametrize("setting, value", [("stride", (2, 2)), ("padding", (0, 2)), ("dilation", (2, 1))])
@pytest.mark.parametrize("kind", ["dwconv", "conv"])
def test_a_conv_setting_changed_after_building_is_followed(kind, setting, value):
    module = _build(kind, inference=False)
    x = _x(KINDS[kind][1])
    _check(module, _stock64_of_module, x, "building", torch.no_grad)
    setattr(module.conv, setting, value)
    _check(module, _stock64_of_module, x, f"setting the conv's {setting} to {value}", torch.no_grad)
