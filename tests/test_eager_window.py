"""The eager window (mbkernels.nn.fused.EagerWindow): a patched model's forward makes its checks once and its fused
modules run their plans with nothing else per call; what a fused module's own checks would see (in-place edits,
replaced tensors, training submodules, grad mode, a forward that raised, copies, compiled parts) it still sees.
Every output is compared with the stock model in float64, on random BatchNorm statistics."""
import copy
import io

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.nn import ConvBNAct, DWConvBNAct, FusedModule, InvertedResidual, SqueezeExcite
from mbkernels.nn.fused import EagerWindow
from mbkernels.match import randomize_batchnorm
from tests.conftest import DEVICE, assert_close_to_reference
from tests.models.mobilenetv3 import mobilenetv3_small


def _patched(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    stock = randomize_batchnorm(mobilenetv3_small().eval(), torch.Generator().manual_seed(seed)).to(DEVICE)
    return mbkernels.patch(stock, blocks=False)


def _reference64(patched: nn.Module) -> nn.Module:
    """The stock model in float64 (eval mode) with the patched model's current parameters and statistics."""
    stock = mobilenetv3_small().to(DEVICE).eval()
    stock.load_state_dict(patched.state_dict())
    return stock.double()


def _image(batch: int = 2, size: int = 40) -> torch.Tensor:
    return torch.randn(batch, 3, size, size + 5, device=DEVICE) * 2


def _assert_matches_stock(patched: nn.Module, x: torch.Tensor, run=None) -> None:
    """run(x) (default: patched(x)) against the stock model with patched's weights, in float64."""
    with torch.no_grad():
        want = _reference64(patched)(x.double())
        assert_close_to_reference((patched if run is None else run)(x), want, torch.float32)


def _fused(model: nn.Module) -> list[FusedModule]:
    return [m for m in model.modules() if isinstance(m, FusedModule)]


def _windows(model: nn.Module) -> list[EagerWindow]:
    return [hook.__self__ for hook in model._forward_pre_hooks.values()
            if isinstance(getattr(hook, "__self__", None), EagerWindow)]


@pytest.fixture
def checked_calls(monkeypatch):
    """The fused modules' full-check forwards, as a list of the modules (the calls no plan served)."""
    calls = []
    for module_type in (DWConvBNAct, ConvBNAct, SqueezeExcite, InvertedResidual):
        checked = module_type.checked_forward
        monkeypatch.setattr(module_type, "checked_forward",
                            lambda self, x, checked=checked: calls.append(self) or checked(self, x))
    return calls


def test_a_warm_forward_runs_plans_and_nothing_else(checked_calls):
    patched = _patched()
    x = _image()
    with torch.no_grad():
        patched(x)
    assert checked_calls, "the first forward makes the plans"
    checked_calls.clear()
    _assert_matches_stock(patched, x)
    assert checked_calls == []
    _assert_matches_stock(patched, _image(batch=3, size=33))  # a new signature: new plans
    assert checked_calls
    checked_calls.clear()
    _assert_matches_stock(patched, _image(batch=3, size=33))
    assert checked_calls == []


@pytest.mark.parametrize("edit", ["in-place", "replaced"])
def test_edits_between_forwards_are_seen(edit):
    patched = _patched(seed=1)
    x = _image()
    _assert_matches_stock(patched, x)
    with torch.no_grad():
        if edit == "in-place":  # every parameter and statistic: version counters tell
            for name, tensor in patched.state_dict(keep_vars=True).items():
                if tensor.is_floating_point():
                    tensor.mul_(-0.8 if "running_var" not in name else 1.3).add_(0.05 if "var" not in name else 0)
        else:  # new Parameters in the convs' and the SE layers' slots: their storages tell
            for module in list(patched.modules()):
                for name, parameter in list(module.named_parameters(recurse=False)):
                    if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                        setattr(module, name, nn.Parameter(parameter * -0.7))
    _assert_matches_stock(patched, x)


def test_a_submodule_in_training_mode_runs_stock_inside_the_window():
    patched = _patched(seed=2)
    x = _image()
    _assert_matches_stock(patched, x)
    patched.features[4].train()  # its BatchNorms normalise with batch statistics and update their running ones
    before = copy.deepcopy(patched.state_dict())
    reference = _reference64(patched)
    reference.features[4].train()
    with torch.no_grad():
        got, want = patched(x), reference(x.double())
    assert_close_to_reference(got, want, torch.float32)
    changed = [k for k in before if "running_mean" in k and not torch.equal(before[k], patched.state_dict()[k])]
    assert changed and all(k.startswith("features.4.") for k in changed)
    patched.features[4].eval()  # and back in eval mode its folds follow the updated statistics
    _assert_matches_stock(patched, x)


def test_with_autograd_the_window_stays_closed_and_gradients_flow():
    patched = _patched(seed=3)
    x = _image().requires_grad_()
    out = patched(x)
    assert out.requires_grad
    out.square().sum().backward()
    x64 = x.detach().double().requires_grad_()
    _reference64(patched)(x64).square().sum().backward()
    assert_close_to_reference(x.grad, x64.grad, torch.float32)


def test_a_forward_that_raises_leaves_the_window_closed():
    patched = _patched(seed=4)
    _assert_matches_stock(patched, _image())
    with pytest.raises(RuntimeError), torch.no_grad():
        patched(torch.randn(1, 5, 32, 32, device=DEVICE))  # five channels: the stem conv refuses them
    assert not any(window.open for window in _windows(patched))
    module = next(m for m in _fused(patched) if hasattr(m, "bn") and isinstance(m.bn, nn.BatchNorm2d))
    with torch.no_grad():  # a fused module called alone makes its own checks, and sees this edit
        module.bn.weight.mul_(-2)
        x = torch.randn(2, module.conv.in_channels, 9, 11, device=DEVICE)
        assert_close_to_reference(module(x), copy.deepcopy(module).double()(x.double()), torch.float32)


def test_copies_have_their_own_window():
    patched = _patched(seed=5)
    x = _image()
    _assert_matches_stock(patched, x)
    for twin in (copy.deepcopy(patched), _saved_and_loaded(patched)):
        (window,), (twin_window,) = _windows(patched), _windows(twin)
        assert twin_window is not window
        assert all(m._window is twin_window for m in _fused(twin))
        _assert_matches_stock(twin, x)
        with torch.no_grad():
            for module in _fused(twin):
                if isinstance(getattr(module, "bn", None), nn.BatchNorm2d):
                    module.bn.running_mean.add_(0.5)
        _assert_matches_stock(twin, x)
        _assert_matches_stock(patched, x)  # the original is untouched by the twin's edits


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_one_window_after_patching_twice_and_none_after_unpatch():
    patched = _patched(seed=6)
    mbkernels.patch(patched, blocks=False)
    (window,) = _windows(patched)
    assert set(window.modules) == set(_fused(patched))
    mbkernels.unpatch(patched)
    assert _windows(patched) == [] and not patched._forward_hooks


def test_eager_and_compiled_calls_alternate_without_recompiling():
    patched = _patched(seed=7)
    x = _image()
    compiles = []

    def counting(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(patched, backend=counting)
    for _ in range(3):
        _assert_matches_stock(patched, x)
        _assert_matches_stock(patched, x, run=compiled)
    assert len(compiles) == 1


def test_a_compiled_part_inside_an_eager_forward():
    patched = _patched(seed=8)
    x = _image()
    _assert_matches_stock(patched, x)
    reference = _reference64(patched)
    torch._dynamo.reset()
    patched.features = torch.compile(patched.features, backend="aot_eager")
    for _ in range(2):
        with torch.no_grad():
            assert_close_to_reference(patched(x), reference(x.double()), torch.float32)
