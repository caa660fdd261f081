"""patch never breaks a model: fused modules answer what they replace, the whole patched model is proven against
stock (what fails is rolled back and reported), and what still runs stock is in the report. transformers'
MobileNetV1/V2, whose conv layers compute TensorFlow 'SAME' padding from their conv's attributes in forward, are
the models that first crashed."""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels.nn import rewrite
from mbkernels.nn.dwconv import DWConvBNAct, FusedInto
from mbkernels.planner import model_proof
from mbkernels.planner.changes import KEPT_STOCK

try:
    import transformers
except ImportError:  # the older stacks' CI runs the rest of this file without it
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")


def image(shape, seed=1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_error(out, want) -> float:
    out, want = out.detach().double(), want.detach().double()
    return ((out - want).abs().max() / want.abs().max()).item()


def float64_error(model: nn.Module, x: torch.Tensor, stock64: nn.Module) -> float:
    with torch.no_grad():
        out = model(x)
        want = stock64(x.double())
    out = getattr(out, "logits", out)
    return relative_error(out, getattr(want, "logits", want))


# ------------------------------------------------------------------------------------------ stand-ins
class ReadsItsConv(nn.Module):
    """A forward that computes TensorFlow 'SAME' padding from the attributes of the conv it calls (transformers'
    apply_tf_padding), and reads its BatchNorm's and conv's sizes."""

    def __init__(self, channels=10, kernel=5, stride=2):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, stride, padding=0, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU6()

    def forward(self, x):
        (kh, kw), (sh, sw), (dh, dw) = self.conv.kernel_size, self.conv.stride, self.conv.dilation
        height, width = int(x.shape[-2]), int(x.shape[-1])
        pad_h = max(dh * (kh - 1) + 1 - (sh if height % sh == 0 else height % sh), 0)
        pad_w = max(dw * (kw - 1) + 1 - (sw if width % sw == 0 else width % sw), 0)
        x = nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        assert self.bn.num_features == self.conv.out_channels == self.conv.weight.shape[0]
        return self.act(self.bn(self.conv(x)))


class ReadsItsLayers(nn.Module):
    """A forward that reads the attributes of the layers it calls (as code that derives sizes from them does)."""

    def __init__(self, channels=10):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU6()

    def forward(self, x):
        assert self.bn.num_features == self.conv.out_channels == self.conv.weight.shape[0] == x.shape[1]
        (kh, kw), (sh, sw) = self.conv.kernel_size, self.conv.stride
        return self.act(self.bn(self.conv(x))) * (kh * kw * sh * sw) / 36


def test_fused_modules_answer_the_attributes_of_what_they_replace():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(ReadsItsLayers(), nn.Conv2d(10, 6, 1))).eval()
    stock64 = copy.deepcopy(model).double()
    mbkernels.patch(model, backend="reference")
    fused = model[0].conv
    assert isinstance(fused, DWConvBNAct) and isinstance(model[0].bn, FusedInto)
    conv = fused.conv
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "weight", "bias"):
        assert getattr(fused, name) is getattr(conv, name), name
    assert model[0].bn.num_features == 10 and model[0].bn.eps == fused.bn.eps
    assert float64_error(model, image((1, 10, 17, 23)), stock64) < 1e-5


def test_a_forward_padding_by_its_conv_attributes_is_captured_per_shape_and_right():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(ReadsItsConv(), nn.Conv2d(10, 6, 1))).eval()
    stock64 = copy.deepcopy(model).double()
    mbkernels.patch(model, backend="reference")
    assert rewrite.captured_forward(model[0]) is not None
    for size in ((1, 10, 17, 23), (2, 10, 16, 16)):  # odd and even sides: different paddings per call
        assert float64_error(model, image(size), stock64) < 1e-5
        assert unfused_pads(model) == 0  # its forward captured at each shape: the pad inside the fused op
    assert len(rewrite.captured_forward(model[0]).codes) == 3  # the observed shape, then these two


def test_writes_to_a_stood_in_attribute_reach_the_stock_module_and_refold():
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                              nn.ReLU())).eval()
    mbkernels.patch(model, backend="reference")
    fused, bn_slot = model[0], model[1]
    fused.stride = (2, 2)
    bn_slot.eps = 0.5
    assert fused.conv.stride == (2, 2) and fused.bn.eps == 0.5
    with torch.no_grad():
        fused.weight.mul_(2)  # an in-place edit through the stand-in: the conv's own weight
    x = image((1, 8, 11, 12))
    stock = nn.Sequential(fused.conv, fused.bn, nn.ReLU()).eval()
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < 1e-5
    assert model(x).shape[-2:] == (6, 6)


# ------------------------------------------------------------------------------------------ the whole-model proof
class TypeChecking(nn.Module):
    """A forward that computes something else unless its conv is a stock nn.Conv2d: the conv alone is proven
    exact by itself, so only the whole model's forward shows the swap is wrong."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x):
        y = self.conv(x)
        return y if type(self.conv) is nn.Conv2d else y * 0.5


class LooksUpItsConv(nn.Module):
    """A forward that raises unless a child is an nn.Conv2d (code that looks its layers up by type), and branches
    on a tensor's value (so that it is not captured as a graph either)."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        if not any(isinstance(m, nn.Conv2d) for m in self.children()):
            raise RuntimeError("no conv child")
        y = self.bn(self.conv(x))
        return y if bool(x.abs().sum() >= 0) else -y


def unsafe_model() -> nn.Module:
    torch.manual_seed(0)
    c = 8
    layers = [nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
              nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),  # a safe run
              TypeChecking(c), LooksUpItsConv(c),
              nn.Conv2d(c, c, 5, padding=2, groups=c), nn.BatchNorm2d(c), nn.Hardswish()]  # a safe run
    return randomize_batchnorm(nn.Sequential(*layers)).eval()


def test_unsafe_swaps_are_rolled_back_and_reported_and_the_rest_stays_fused():
    model = unsafe_model()
    x = image((2, 3, 19, 20))
    with torch.no_grad():
        want = model(x)
    mbkernels.patch(model, backend="reference")
    with torch.no_grad():
        assert relative_error(model(x), want) < 1e-5
    assert type(model[6].conv) is nn.Conv2d and type(model[7].conv) is nn.Conv2d  # rolled back
    assert isinstance(model[3], DWConvBNAct) and isinstance(model[8], DWConvBNAct)  # kept
    report = mbkernels.patch_report(model)
    reasons = {entry.path: entry.reason for entry in report.skipped}
    assert "differ from stock's" in reasons["6.conv"]
    assert "the forward of 7 raised RuntimeError: no conv child" in reasons["7.conv"]
    assert "7.bn" not in reasons  # it runs stock as the rolled back run's part: one entry says why
    assert {"3", "8"} <= {entry.path for entry in report.fused}
    # Patching again keeps them stock from the note alone (no second proof needed), and unpatch forgets it.
    mbkernels.patch(model, backend="reference")
    assert type(model[6].conv) is nn.Conv2d and KEPT_STOCK in model[6].conv.__dict__
    mbkernels.unpatch(model)
    assert KEPT_STOCK not in model[6].conv.__dict__ and type(model[3]) is nn.Conv2d


def test_the_proof_runs_on_the_example_inputs_and_says_so(capsys):
    model = unsafe_model()
    x = image((1, 3, 13, 15))
    mbkernels.patch(model, backend="reference", example_inputs=x, verbose=True)
    printed = capsys.readouterr().out
    assert "whole-model proof: proven whole on 1 probe call(s)" in printed and "rolled back" in printed
    assert type(model[6].conv) is nn.Conv2d
    timed = next(line for line in printed.splitlines() if line.startswith("whole model, on the example inputs"))
    assert "failed" not in timed  # tuning timed the model without the swaps the proof rolled back


class WrongAtLargerBatches(nn.Module):
    """A forward whose fused conv goes wrong only at batches beyond 1 (another path for them that reads its conv's
    type): the proof must run every example call, not the first."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x):
        y = self.conv(x)
        return y if x.shape[0] == 1 or type(self.conv) is nn.Conv2d else y * 0.5


def test_a_swap_wrong_only_at_a_later_example_input_is_rolled_back(monkeypatch, capsys):
    monkeypatch.setenv("MBKERNELS_TUNE", "0")  # the proof alone
    torch.manual_seed(0)
    c = 8
    stock = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                              WrongAtLargerBatches(c),
                                              nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c),
                                              nn.ReLU())).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference",
                            example_inputs=[image((1, 3, 9, 11)), image((3, 3, 9, 11))], verbose=True)
    assert type(model[3].conv) is nn.Conv2d and isinstance(model[4], DWConvBNAct)
    assert "proven whole on 2 probe call(s)" in capsys.readouterr().out
    x = image((3, 3, 9, 11), seed=5)
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < 1e-5


def test_a_model_the_proof_cannot_run_keeps_its_swaps_and_the_report_says_why(capsys):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))

        def forward(self, x, scale):
            return self.body(x) * scale

    model = randomize_batchnorm(TwoInputs()).eval()
    mbkernels.patch(model, backend="reference", verbose=True)
    assert "not proven whole" in capsys.readouterr().out
    assert isinstance(model.body[0], DWConvBNAct)


def test_culprits_are_found_exactly_among_many():
    changes = list(range(23))
    for bad in ({5}, {0, 22}, {3, 4, 5, 17}, set(changes[::3])):
        checks = []

        def passes(placed, bad=bad):
            checks.append(1)
            return not bad & set(placed)

        assert sorted(model_proof.culprits(changes, passes)) == sorted(bad)
        assert len(checks) <= 2 * len(bad) * 5 + 2  # log2(23) < 5: group testing, not one check per change


@pytest.mark.parametrize("pair", [(2, 15), (3, 7), (12, 20)])
def test_culprits_that_fail_only_together_are_found_one_of_them(pair):
    """Two changes that break the model only together (one reads what the other replaced): removing one of them
    is enough, and the rest passes."""
    changes = list(range(23))

    def passes(placed):
        return not set(pair) <= set(placed)

    found = model_proof.culprits(changes, passes)
    assert len(found) == 1 and found[0] in pair
    assert passes([change for change in changes if change not in found])


def test_the_float64_check_accepts_rounding_as_stock_has_and_refuses_more():
    want = torch.tensor([1.0, -2.0, 3.0])
    reference = want.double() + torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)  # stock is 3.3e-4 off

    proof = model_proof.ModelProof(nn.Identity(), [((want,), {})], lambda: nn.Identity(), [want])
    proof.reference = [reference]
    assert proof.compare(0, want, want) is None
    assert proof.compare(0, want + torch.tensor([2e-3, 0, 0]), want) is None  # as close to float64 as stock
    failure = proof.compare(0, want + torch.tensor([0, 0, 0.1]), want)
    assert failure is not None and "max relative error 3.3e-02" in failure
    assert proof.compare(0, torch.tensor([1.0, float("nan"), 3.0]), want) is not None


def test_outputs_that_rounding_alone_changes_prove_only_that_the_forward_runs():
    want = (torch.tensor([1.0, 2.0]),)  # e.g. the scores of the boxes a threshold kept
    proof = model_proof.ModelProof(nn.Identity(), [((want,), {})], lambda: nn.Identity(), [want])
    proof.reference = [(torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64),)]  # float64 stock keeps another box
    assert proof.compare(0, (torch.tensor([1.0, 2.5]),), want) is None
    proof.reference = [(torch.tensor([1.0, 2.0], dtype=torch.float64),)]  # where it does not: judged
    assert proof.compare(0, (torch.tensor([1.0, 2.5]),), want) is not None


def test_outputs_of_another_shape_or_structure_are_refused_where_stock_keeps_its_own():
    want = torch.tensor([[1.0, -2.0, 3.0]])
    proof = model_proof.ModelProof(nn.Identity(), [((want,), {})], lambda: nn.Identity(), [want])
    proof.reference = [want.double()]
    for got in (torch.tensor([[1.0, -2.0]]), (want,), torch.cat([want, want])):
        failure = proof.compare(0, got, want)
        assert failure is not None and "in structure or shape" in failure, got
    proof.reference = []  # a model that does not run in float64: refused all the same
    assert "in structure or shape" in proof.compare(0, torch.cat([want, want]), want)


def test_discrete_outputs_prove_only_that_the_forward_runs():
    want = [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([3])}]  # a detector's
    proof = model_proof.ModelProof(nn.Identity(), [((want,), {})], lambda: nn.Identity(), [want])
    moved = [{"boxes": torch.tensor([[1.0, 2.0, 3.5, 4.0]]), "labels": torch.tensor([3])}]
    assert proof.compare(0, moved, want) is None
    assert proof.compare(0, [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([3, 1])}], want) is None


# ------------------------------------------------------------------------------------------ what runs stock
class NormOfASum(nn.Module):
    """A BatchNorm applied to a sum, which no fusion kind takes: it must be in the report."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.post = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.post(x + self.bn(self.conv(x)))


def test_every_batchnorm_the_patched_forward_runs_stock_is_reported():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 6, 1), NormOfASum())).eval()
    mbkernels.patch(model, backend="reference")
    for report in (mbkernels.patch_report(model),):
        entries = {entry.path: entry for entry in report.skipped}
        assert "1.post" in entries and "runs stock" in entries["1.post"].reason
        assert "1.bn" not in entries  # fused with its conv


# ------------------------------------------------------------------------------------------ transformers
def hf_model(version: int, tf_padding: bool):
    if version == 1:
        config = transformers.MobileNetV1Config(depth_multiplier=0.25, tf_padding=tf_padding, num_labels=10)
        model = transformers.MobileNetV1ForImageClassification(config)
    else:
        config = transformers.MobileNetV2Config(depth_multiplier=0.35, tf_padding=tf_padding, num_labels=10)
        model = transformers.MobileNetV2ForImageClassification(config)
    torch.manual_seed(0)
    return randomize_batchnorm(model, torch.Generator().manual_seed(0)).eval()


@needs_transformers
@pytest.mark.parametrize("tf_padding", [True, False], ids=["tf_padding", "torch_padding"])
@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_transformers_mobilenets_are_fused_whole_and_right(version, tf_padding):
    model = hf_model(version, tf_padding)
    stock = copy.deepcopy(model)
    stock64 = copy.deepcopy(model).double()
    dw_convs = sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    mbkernels.patch(model, backend="reference")
    report = mbkernels.patch_report(model)
    assert report.count("dwconv_bn_act") == dw_convs and not report.skipped, report
    for size in ((1, 3, 32, 32), (2, 3, 29, 31)):  # even and odd sides (the second never seen before)
        x = image(size)
        with torch.no_grad():
            out = model(x).logits
        assert unfused_pads(model) == 0  # TensorFlow's padding runs inside the fused ops, at every shape
        with torch.no_grad():
            want, stock_error = stock64(x.double()).logits, float64_error(stock, x, stock64)
        assert relative_error(out, want) <= max(2e-5, 2 * stock_error)
        assert model_proof.stock_runs(model, ((x,), {})) == []  # no BatchNorm, no depthwise conv runs stock


def unfused_pads(model: nn.Module) -> int:
    """The pads the patched model's forwards may still run: in the graphs of rewritten forwards (one per input
    shape seen), and one for each forward left stock around a conv that pads nothing itself."""
    pads = 0
    for module in model.modules():
        forward = rewrite.captured_forward(module)
        if forward is not None:
            pads += sum(node.target is nn.functional.pad for code in forward.codes.values()
                        for node in code.graph.nodes)
        elif not isinstance(module, nn.ModuleList) and any(  # a rewrite's list of fused modules aside
                isinstance(m, (nn.Conv2d, DWConvBNAct)) and max(m.kernel_size) > 1 and m.padding == (0, 0)
                for m in module.children()):
            pads += 1  # a forward left stock around a conv that pads nothing itself
    return pads


# ------------------------------------------------------------------------------------------ probes with real inputs
class TakesTwoTensors(nn.Module):
    """A block called with two tensors (a decoder's `forward(x, skip)`); its activation a function or a module."""

    def __init__(self, channels: int, functional: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.functional = functional
        if not functional:
            self.act = nn.ReLU6()

    def forward(self, x, skip):
        y = self.bn(self.conv(x))
        return (nn.functional.hardswish(y) if self.functional else self.act(y)) + skip


class CallsWithTwo(nn.Module):
    def __init__(self, channels=6):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1)
        self.first = TakesTwoTensors(channels, functional=False)
        self.second = TakesTwoTensors(channels, functional=True)

    def forward(self, x):
        y = self.stem(x)
        y = self.first(y, y * 0.5)
        return self.second(y, -y)


def test_forwards_that_take_two_tensors_are_proven_on_what_they_got_and_fused_whole():
    torch.manual_seed(0)
    model = randomize_batchnorm(CallsWithTwo()).eval()
    stock64 = copy.deepcopy(model).double()
    mbkernels.patch(model, backend="reference")
    report = mbkernels.patch_report(model)
    fused = {entry.path: entry for entry in report.fused}
    assert fused["first.conv"].activation == "relu6" and not fused["first.conv"].note
    assert fused["second.conv"].activation == "hardswish" and fused["second.conv"].via == "forward of second"
    assert not report.skipped, report
    assert float64_error(model, image((2, 3, 9, 11)), stock64) < 1e-5


@needs_transformers
def test_transformers_efficientnet_is_fused_whole_and_right():
    """Its SEs compute `inputs * scale` in forward, and its encoder's forward runs every block before its top conv
    (a probe of the encoder must be of the size the model gives it)."""
    config = transformers.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.3, image_size=64,
                                             num_labels=10, hidden_dim=320)  # its top BatchNorm's width
    torch.manual_seed(0)
    model = randomize_batchnorm(transformers.EfficientNetForImageClassification(config),
                                torch.Generator().manual_seed(0)).eval()
    stock, stock64 = copy.deepcopy(model), copy.deepcopy(model).double()
    dw_convs = sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    mbkernels.patch(model, backend="reference")
    report = mbkernels.patch_report(model)
    assert report.count("dwconv_bn_act") == report.count("squeeze_excite") == dw_convs and not report.skipped, report
    x = image((2, 3, 37, 40))
    assert model_proof.stock_runs(model, ((x,), {})) == []
    with torch.no_grad():
        stock_error = float64_error(stock, x, stock64)
    assert float64_error(model, x, stock64) <= max(2e-5, 2 * stock_error)
