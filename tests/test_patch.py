"""mbkernels.patch / unpatch / patch_report on timm, torchvision and hand-written MobileNets, and on near misses:
layer fusion (blocks=False); whole-block fusion is tested in test_inverted_residual.py."""
import copy
import functools

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels import dispatch
from mbkernels.models import build_model
from mbkernels.nn.dwconv import DWConvBNAct, FusedInto
from mbkernels.match import randomize_batchnorm
from conftest import HAS_GPU, backend_unavailable
from models.mobilenetv3 import SELayer, h_swish, mobilenetv3_large, mobilenetv3_small

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from mbkernels.nn.squeeze_excite import SqueezeExcite

HAND_WRITTEN = {"hand:mobilenetv3_small": mobilenetv3_small, "hand:mobilenetv3_large": mobilenetv3_large}
MODELS = [
    "timm:mobilenetv3_small_100", "timm:mobilenetv3_large_100", "timm:efficientnet_b0", "timm:mobilenetv2_100",
    "tv:mobilenet_v3_small", "tv:mobilenet_v3_large", "tv:mobilenet_v2", "tv:efficientnet_b0",
    *HAND_WRITTEN,
]
# The squeeze-excite classes of each family, to count SEs independently of patch's matching.
STOCK_SE = (timm.models._efficientnet_blocks.SqueezeExcite, torchvision.ops.SqueezeExcitation, SELayer)
IMAGE = (2, 3, 64, 64)
SMALL_IMAGE = (2, 3, 32, 32)  # for the tests that compare stock with stock
FLOAT32_RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _stock(name: str) -> nn.Module:
    if name in HAND_WRITTEN:
        torch.manual_seed(0)
        return randomize_batchnorm(HAND_WRITTEN[name](), torch.Generator().manual_seed(0)).eval()
    return build_model(name)


def stock_model(name: str) -> nn.Module:
    return copy.deepcopy(_stock(name))


def patched_model(name: str, backend="reference") -> nn.Module:
    return mbkernels.patch(stock_model(name), backend=backend, blocks=False)


def image(shape=IMAGE, seed=1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.detach().double().cpu(), want.detach().double().cpu()
    return ((out - want).abs().max() / want.abs().max()).item()


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1


def count(model: nn.Module, predicate) -> int:
    return sum(1 for m in model.modules() if predicate(m))


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend


@pytest.fixture
def ran_on(monkeypatch):
    """The kernel modules the fused ops ran in: {'mbkernels.backends.reference', ...}."""
    modules = set()
    select = dispatch.select

    def recording(*args, **kwargs):
        choice = select(*args, **kwargs)
        modules.add(choice.run.__module__)
        return choice

    monkeypatch.setattr(dispatch, "select", recording)
    return modules


# ------------------------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("name", MODELS)
def test_every_depthwise_conv_is_fused(name):
    model = stock_model(name)
    depthwise = count(model, is_depthwise)
    assert depthwise > 0
    mbkernels.patch(model, backend="reference", blocks=False)
    fused = [m for m in model.modules() if isinstance(m, DWConvBNAct)]
    assert len(fused) == depthwise and all(is_depthwise(m.conv) for m in fused)
    report = mbkernels.patch_report(model, blocks=False)
    assert report.count("dwconv_bn_act") == depthwise
    assert [e for e in report.skipped if e.kind == "dwconv_bn_act"] == []


@pytest.mark.parametrize("name", MODELS)
def test_every_squeeze_excite_is_fused(name):
    model = stock_model(name)
    squeeze_excites = [m for m in model.modules() if isinstance(m, STOCK_SE)]
    assert squeeze_excites or name.endswith(("mobilenetv2_100", "mobilenet_v2"))
    mbkernels.patch(model, backend="reference", blocks=False)
    fused = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert sorted(map(id, (m.stock for m in fused))) == sorted(map(id, squeeze_excites))  # each wrapped once
    report = mbkernels.patch_report(model, blocks=False)
    assert report.count("squeeze_excite") == len(squeeze_excites) and report.skipped == []


GPU_ONLY = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
RUNS = [
    pytest.param("reference", torch.float32, id="reference-float32"),
    pytest.param("triton", torch.float32, id="triton-float32"),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=GPU_ONLY),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=GPU_ONLY),
    pytest.param("triton", torch.float16, id="triton-float16", marks=GPU_ONLY),
]


@pytest.mark.parametrize("backend, dtype", RUNS)
@pytest.mark.parametrize("name", MODELS)
def test_outputs_match_stock(name, backend, dtype, ran_on):
    if backend_unavailable(backend):
        pytest.skip(f"{backend} backend unavailable: {backend_unavailable(backend)}")
    device = torch.device("cuda" if HAS_GPU else "cpu")
    stock = stock_model(name)
    patched = mbkernels.patch(copy.deepcopy(stock), backend=backend, blocks=False).to(device, dtype)  # after patching
    ran_on.clear()  # patch's own probe checks run the reference backend
    x = image()
    with torch.no_grad():
        got = patched(x.to(device, dtype))
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert relative_error(got, stock(x)) < FLOAT32_RTOL
        else:  # no worse than the stock model in the same dtype, against float64
            want = stock.to(device, torch.float64)(x.to(device, torch.float64))
            stock_error = relative_error(stock.to(dtype)(x.to(device, dtype)), want)
            assert relative_error(got, want) <= 2 * stock_error + 1e-3
    assert ops_in(patched) and ran_on == {f"mbkernels.backends.{backend}"}


def ops_in(model: nn.Module) -> set:
    ops = {"dwconv_bn_act"} if count(model, lambda m: isinstance(m, DWConvBNAct)) else set()
    if count(model, lambda m: isinstance(m, SqueezeExcite)):
        ops.add("squeeze_excite")
    return ops


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_is_the_stock_one_and_loads_both_ways(name):
    stock = stock_model(name)
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    want, got = stock.state_dict(), patched.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # A checkpoint of other weights loads into either and takes effect (the folded weights are refreshed).
    other = randomize_batchnorm(copy.deepcopy(stock), torch.Generator().manual_seed(7))
    x = image(SMALL_IMAGE)
    with torch.no_grad():
        assert relative_error(patched(x), stock(x)) < FLOAT32_RTOL  # folds the current weights
        want = other(x)
        assert relative_error(want, stock(x)) > 1e-2
        patched.load_state_dict(other.state_dict())
        stock.load_state_dict(mbkernels.patch(copy.deepcopy(other), blocks=False).state_dict())
        assert relative_error(patched(x), want) < FLOAT32_RTOL
        assert torch.equal(stock(x), want)


def test_missing_and_unexpected_keys_keep_their_stock_names():
    stock = stock_model("tv:mobilenet_v3_small")
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    state = stock.state_dict()
    dropped = "features.1.block.0.1.running_var"  # the BN of the first depthwise conv
    assert isinstance(patched.features[1].block[0][1], FusedInto)
    del state[dropped]
    state["features.1.block.0.1.extra"] = torch.zeros(1)
    result = patched.load_state_dict(state, strict=False)
    assert result.missing_keys == [dropped]
    assert result.unexpected_keys == ["features.1.block.0.1.extra"]
    with pytest.raises(RuntimeError, match="running_var"):
        patched.load_state_dict(state)


@pytest.mark.parametrize("name", MODELS)
def test_unpatch_puts_back_the_same_modules(name):
    model = stock_model(name)
    before = dict(model.named_modules())
    mbkernels.patch(model, backend="reference", blocks=False)
    assert dict(model.named_modules()).keys() != before.keys()
    mbkernels.unpatch(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("name", MODELS)
def test_training_mode_is_the_stock_model(name, ran_on):
    stock = stock_model(name).train()
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False).train()
    ran_on.clear()  # patch's own probe checks run the reference backend
    x = image(SMALL_IMAGE)
    for model in (stock, patched):
        torch.manual_seed(3)  # dropout draws the same masks
        model(x).square().mean().backward()
    assert ran_on == set()  # the fused ops never ran
    want, got = stock.state_dict(keep_vars=True), patched.state_dict(keep_vars=True)
    for key in want:  # running statistics updated alike, gradients equal
        assert torch.equal(got[key], want[key]), key
        if isinstance(want[key], nn.Parameter):
            assert torch.equal(got[key].grad, want[key].grad), key


@pytest.mark.parametrize("name", ["tv:mobilenet_v3_small", "timm:efficientnet_b0", "hand:mobilenetv3_small"])
def test_patching_twice_changes_nothing(name):
    model = patched_model(name)
    before = dict(model.named_modules())
    first = str(mbkernels.patch_report(model, blocks=False))
    mbkernels.patch(model, backend="reference", blocks=False)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert str(mbkernels.patch_report(model, blocks=False)) == first


def test_half_then_float_after_patching():
    stock = stock_model("hand:mobilenetv3_small")
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    x = image()
    with torch.no_grad():
        want = stock(x)  # float32's own error is far below float16's
        half_error = relative_error(patched.half()(x.half()), want)
        stock_half_error = relative_error(copy.deepcopy(stock).half()(x.half()), want)
        assert half_error <= 2 * stock_half_error + 1e-3
        # back in float32 (with weights rounded to float16 on the way), the folded weights follow
        rounded = copy.deepcopy(stock).half().float()
        assert relative_error(patched.float()(x), rounded(x)) < FLOAT32_RTOL


@GPU_ONLY
def test_cuda_after_patching():
    stock = stock_model("tv:mobilenet_v3_large")
    patched = mbkernels.patch(copy.deepcopy(stock), blocks=False).cuda()
    x = image()
    with torch.no_grad():
        assert relative_error(patched(x.cuda()), stock(x)) < FLOAT32_RTOL


def test_print_shows_the_fused_modules():
    text = str(patched_model("tv:mobilenet_v3_small"))
    assert "(0): DWConvBNAct(\n" in text
    assert "channels=16, kernel_size=(3, 3), stride=(2, 2), activation='relu', fused=True\n" in text
    assert "(1): FusedInto(BatchNorm2d runs fused in '0')\n" in text


def test_report_of_a_stock_model_lists_what_would_be_fused():
    model = stock_model("hand:mobilenetv3_small")
    report = mbkernels.patch_report(model, blocks=False)
    assert report.fused == [] and report.count("dwconv_bn_act", "fusable") == count(model, is_depthwise)
    assert "fusable, not patched yet:" in str(report)
    assert isinstance(model.features[1].conv[0], nn.Conv2d)  # the report changed nothing


def test_report_table():
    model = mbkernels.patch(stock_model("hand:mobilenetv3_small"), backend="reference", blocks=False)
    text = str(mbkernels.patch_report(model, blocks=False))
    lines = text.splitlines()
    assert lines[0].startswith("mbkernels patch report -- fused: 11 dwconv+bn+act")
    header = lines[lines.index("fused:") + 1].split()
    assert header == ["module", "kind", "shape", "activation"]
    row = next(line.split() for line in lines if line.strip().startswith("features.1.conv.0 "))
    assert row == ["features.1.conv.0", "dwconv+bn+act", "C=16", "k=3x3", "s=2", "relu"]


def test_verbose_prints_the_report(capsys):
    mbkernels.patch(stock_model("tv:mobilenet_v2"), backend="reference", verbose=True, blocks=False)
    out = capsys.readouterr().out
    assert out.startswith("mbkernels patch report -- fused: 17 dwconv+bn+act, 0 squeeze-excite")


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    stock = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), h_swish(),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        SELayer(16),
        nn.Conv2d(16, 16, 5, 2, 2, groups=16), nn.BatchNorm2d(16),
    )
    randomize_batchnorm(stock).eval()
    patched = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    x = image((2, 3, 19, 21))
    with torch.no_grad():
        assert relative_error(compiled(x), stock(x)) < FLOAT32_RTOL
        # load_state_dict after compiling still takes effect
        other = randomize_batchnorm(copy.deepcopy(stock), torch.Generator().manual_seed(5))
        patched.load_state_dict(other.state_dict())
        assert relative_error(compiled(x), other(x)) < FLOAT32_RTOL


# ------------------------------------------------------------------------------------- near misses, safety
def dw(channels=8, kernel=3, **kwargs):
    kwargs.setdefault("padding", kernel // 2)
    return nn.Conv2d(channels, channels, kernel, groups=channels, bias=False, **kwargs)


class BNBeforeConv(nn.Module):
    """Registers conv then bn, but applies them the other way round: a registration-order match would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = dw()
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.conv(self.bn(x))


class Named(nn.Module):
    """Holds the cases by name; never run as a whole."""

    def __init__(self, **cases):
        super().__init__()
        for name, module in cases.items():
            self.add_module(name, module)


def near_misses() -> nn.Module:
    torch.manual_seed(0)
    model = Named(
        dilated=nn.Sequential(dw(padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU6()),
        no_act=nn.Sequential(dw(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)),
        same_odd=nn.Sequential(dw(kernel=5, padding="same"), nn.BatchNorm2d(8), nn.Hardswish()),
        same_even=nn.Sequential(dw(kernel=4, padding="same"), nn.BatchNorm2d(8), nn.ReLU()),
        conv2d_same=nn.Sequential(timm.layers.Conv2dSame(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8)),
        no_bn=nn.Sequential(dw(), nn.ReLU()),
        last=nn.Sequential(nn.Conv2d(3, 8, 1), dw()),
        gelu=nn.Sequential(dw(), nn.BatchNorm2d(8), nn.GELU()),
        multiplier=nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16)),
        batch_stats=nn.Sequential(dw(), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU()),
        reflect=nn.Sequential(dw(padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU()),
        swapped=BNBeforeConv(),
    )
    return randomize_batchnorm(model).eval()


FUSED_NEAR_MISSES = ["batch_stats.0", "conv2d_same.0", "dilated.0", "gelu.0", "last.1", "multiplier.0", "no_act.0",
                     "no_bn.0", "same_even.0", "same_odd.0", "swapped.conv"]


def test_near_misses_are_reported_with_the_reason():
    model = near_misses()
    report = mbkernels.patch_report(model, blocks=False)
    assert sorted(e.path for e in report.fusable) == FUSED_NEAR_MISSES
    # Half fusions: the conv alone, what follows it named with the reason.
    notes = {e.path: e.note for e in report.fusable if e.note}
    assert notes.keys() == {"batch_stats.0", "swapped.conv"}
    assert "running statistics" in notes["batch_stats.0"]
    assert "BatchNorm2d runs on its own" in notes["swapped.conv"] and "differs from stock on a probe" in notes["swapped.conv"]
    assert [(e.path, e.reason) for e in report.skipped] == [
        ("reflect.0", "conv has padding_mode='reflect'; only zero padding is fused")]
    assert "left alone:" in str(report) and "padding_mode='reflect'" in str(report)
    assert "(2 half-fused)" in report.summary() and "half-fused: BatchNorm2d runs on its own" in str(report)


def test_fused_near_misses_compute_the_stock_result():
    model = near_misses()
    stock = copy.deepcopy(model)
    mbkernels.patch(model, backend="reference", blocks=False)
    assert model.no_act[0].activation == "identity" and isinstance(model.no_act[2], nn.Conv2d)
    assert model.gelu[0].activation == "gelu" and model.no_bn[0].activation == "relu"
    x = image((2, 8, 13, 10))
    with torch.no_grad():
        for path in FUSED_NEAR_MISSES:
            assert isinstance(model.get_submodule(path), DWConvBNAct), path
            name = path.split(".")[0]
            inputs = x[:, :3] if name == "last" else x
            assert relative_error(getattr(model, name)(inputs), getattr(stock, name)(inputs)) < FLOAT32_RTOL, path
    # Applied before the conv, the BN was not folded in: it still runs on its own.
    assert model.swapped.conv.activation == "identity" and type(model.swapped.bn) is nn.BatchNorm2d
    assert isinstance(model.reflect[0], nn.Conv2d)  # refused: left as it was


def test_nothing_to_fuse():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    before = list(model.modules())
    assert mbkernels.patch(model, blocks=False) is model
    assert list(model.modules()) == before
    report = mbkernels.patch_report(model, blocks=False)
    assert report.fused == report.fusable == report.skipped == []
    assert "nothing to fuse" in str(report)


class RefusesFusedModules(nn.Sequential):
    def __setattr__(self, name, value):
        if isinstance(value, DWConvBNAct):
            raise RuntimeError("this container takes no fused modules")
        super().__setattr__(name, value)


def test_a_failure_half_way_leaves_the_model_as_it_was():
    model = nn.Sequential(
        nn.Sequential(dw(), nn.BatchNorm2d(8), nn.ReLU()),
        RefusesFusedModules(dw(), nn.BatchNorm2d(8), nn.ReLU()),
    ).eval()
    before = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="takes no fused modules"):
        mbkernels.patch(model, blocks=False)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
