"""Measured plans: patch(model, example_inputs=...) on the CPU.

The choices are tested on a simulated clock (each variant call advances simulated time by a scripted cost, the
real computation still runs), so that a variant made faster or slower per candidate is chosen or refused exactly;
one test tunes for real and checks the outputs against stock; the cache, the checks of the example inputs, the
report and torch.compile of a tuned model are tested on small models.
"""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels.nn import ConvBNAct, DWConvBNAct, InvertedResidual, SqueezeExcite
from mbkernels.nn.fused import FusedModule
from mbkernels.nn.rewrite import CONTAINER, captured_forward, rewritten
from mbkernels.planner import timing, tuning
from conftest import HAS_GPU
from models.forwards import Net

timm = pytest.importorskip("timm")

FLOAT32_RTOL = 1e-5
real_time_variants = timing.time_variants


@pytest.fixture(autouse=True)
def tuning_cache(tmp_path, monkeypatch):
    """Every test tunes into its own table."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(path))
    monkeypatch.delenv("MBKERNELS_TUNE", raising=False)
    monkeypatch.delenv("MBKERNELS_BACKEND", raising=False)
    return path


def small_model(name="mobilenetv3_small_050", seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model(name), torch.Generator().manual_seed(seed)).eval()


def image(batch=1, size=32, seed=1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_error(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


WHOLE_MODEL = ("tuned", "fused", "stock")


class Scripted:
    """time_variants on a simulated clock: a variant's call costs `cost(variant names, name)` simulated ms (and
    still computes), so the measured medians are exactly the scripted costs. The whole-model check's variants
    cost `whole[name]` (a tie by default: the tuned choices stand). Each timing gets budget_s."""

    def __init__(self, cost, whole=None, budget_s=0.01):
        whole = whole or dict.fromkeys(WHOLE_MODEL, 1.0)
        self.cost = lambda names, name: whole[name] if names == WHOLE_MODEL else cost(names, name)
        self.seconds = 0.0
        self.budget_s = budget_s
        self.timed = []  # the variant names of every candidate timed

    def __call__(self, variants, inputs, device, **kwargs):
        names = tuple(variants)
        self.timed.append(names)

        def costly(name, fn):
            def call(x):
                self.seconds += self.cost(names, name) / 1e3
                return fn(x)
            return call

        clock = timing.HostClock(now=lambda: self.seconds, round_ms=1.0)
        scripted = {name: costly(name, fn) for name, fn in variants.items()}
        return real_time_variants(scripted, inputs, device, **{**kwargs, "clock": clock, "budget_s": self.budget_s})


def scripted(monkeypatch, cost, whole=None, budget_s=0.01) -> Scripted:
    clock = Scripted(cost, whole, budget_s)
    monkeypatch.setattr(timing, "time_variants", clock)
    return clock


def choices(model: nn.Module, kind) -> list:
    return [choice for m in model.modules() if type(m) is kind for choice in m.tuned.values()]


def kept_stock(model: nn.Module, kind: str) -> list:
    """The report's entries of `kind` a tuned patch kept stock (their stock modules stand, as in the stock model)."""
    return [entry for entry in mbkernels.patch_report(model).skipped
            if entry.kind == kind and entry.reason.startswith("kept stock on this CPU: ")]


# ------------------------------------------------------------------------------------------------ the choice
def test_faster_fused_variants_are_chosen_and_slower_ones_refused(monkeypatch):
    # Depthwise runs fused at half the stock time, SEs fused at twice it, folded convs at 0.9; every block kernel
    # five times slower than its layers.
    fused_ms = {DWConvBNAct: 0.5, SqueezeExcite: 2.0, ConvBNAct: 0.9}
    tuning_now = {}
    tune_module = tuning.Tuner.tune_module

    def tuning_one(self, fused, seen, largest):
        tuning_now["kind"] = type(fused)
        return tune_module(self, fused, seen, largest)

    monkeypatch.setattr(tuning.Tuner, "tune_module", tuning_one)

    def cost(names, name):
        if "layers" in names:
            return 1.0 if name == "layers" else 5.0
        return 1.0 if name == "stock" else fused_ms[tuning_now["kind"]]

    clock = scripted(monkeypatch, cost)
    model = mbkernels.patch(small_model(), example_inputs=image())
    assert clock.timed
    assert choices(model, DWConvBNAct) and set(choices(model, DWConvBNAct)) == {"reference"}
    assert choices(model, ConvBNAct) and set(choices(model, ConvBNAct)) == {"folded"}
    # The SEs measured faster stock: their stock modules stand, and the report says why.
    assert choices(model, SqueezeExcite) == [] and len(kept_stock(model, "squeeze_excite")) == 9
    assert kept_stock(model, "squeeze_excite")[0].reason == (
        "kept stock on this CPU: not faster: reference 2.000 ms vs stock 1.000 ms: 100.0% slower (round by round "
        "100.0% slower, spread 0.0% over 3 rounds)")
    assert not any(isinstance(m, InvertedResidual) for m in model.modules())  # the blocks lost to their layers


@pytest.mark.parametrize("fused_ms", [1.0, 0.995, 0.99])
def test_ties_and_gains_within_the_floor_keep_stock(monkeypatch, fused_ms):
    scripted(monkeypatch, lambda names, name: 1.0 if name in ("stock", "layers") else fused_ms)
    stock = small_model()
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=image())
    assert not any(isinstance(m, FusedModule) for m in model.modules())  # every stock module back in its slot
    assert [type(m) for m in model.modules()] == [type(m) for m in stock.modules()]
    assert len(kept_stock(model, "dwconv_bn_act")) == 11 and len(kept_stock(model, "conv_bn_act")) > 0


@pytest.mark.parametrize("block_ms, plan", [(0.5, "block"), (1.5, "layers")])
def test_a_block_is_fused_whole_only_where_it_beats_its_layers(monkeypatch, block_ms, plan):
    scripted(monkeypatch, lambda names, name: {"stock": 1.0, "layers": 1.0}.get(name, block_ms if "layers" in names
                                                                              else 0.5))
    model = small_model()
    stock = copy.deepcopy(model)
    mbkernels.patch(model, example_inputs=image())
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    if plan == "block":
        assert blocks and all(set(m.tuned.values()) == {"reference"} for m in blocks)
        # A block fused whole holds the stock block, with no layer fusion left inside it.
        assert not any(isinstance(m, FusedModule) for b in blocks for m in b.stock.modules())
    else:
        assert blocks == []
    report = mbkernels.patch_report(model)
    assert report.count("inverted_residual") == len(blocks)
    with torch.no_grad():
        assert relative_error(model(image(seed=5)), stock(image(seed=5))) < FLOAT32_RTOL
    mbkernels.unpatch(model)
    assert all(type(m) is type(s) for m, s in zip(model.modules(), stock.modules()))


@pytest.mark.parametrize("block_ms, plan", [(0.5, "block"), (1.5, "layers")])
def test_a_block_in_forward_code_is_fused_whole_only_where_it_beats_its_layers(monkeypatch, capsys, op_calls,
                                                                               block_ms, plan):
    """Blocks that are their module's whole forward (efficientnet_pytorch's), called with a rate computed by their
    parent: the forward rewritten with the block fused is timed against the one with its layers fused."""
    clock = scripted(monkeypatch, lambda names, name: {"stock": 1.0, "layers": 1.0}.get(
        name, block_ms if "layers" in names else 0.5))
    ran = {}  # variant -> the ops one call of it ran, for the blocks' timings

    def recording(variants, inputs, device, **kwargs):
        if "layers" in variants:
            for name, variant in variants.items():
                op_calls.clear()
                variant(inputs[0])
                ran.setdefault(name, set()).update(op for op, _ in op_calls)
        return clock(variants, inputs, device, **kwargs)

    monkeypatch.setattr(timing, "time_variants", recording)
    torch.manual_seed(0)
    stock = randomize_batchnorm(Net(), torch.Generator().manual_seed(0)).eval()
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=image(batch=2), verbose=True)
    # What was timed: the forward with its layers fused (not the stock forward), against the block kernel.
    assert ran == {"layers": {"dwconv_bn_act", "squeeze_excite"}, "reference": {"inverted_residual"}}
    plans = [line for line in capsys.readouterr().out.splitlines() if "measured: " in line]  # the block plans
    assert [(line.split()[0], f" {plan} " in line) for line in plans] == [(f"blocks.{i}.depthwise", True)
                                                                          for i in range(3)]
    assert sum("layers" in names for names in clock.timed) == 2  # blocks 0 and 2 are alike: the second from the table
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    report = mbkernels.patch_report(model)
    if plan == "block":
        assert len(blocks) == 3 and all(set(m.tuned.values()) == {"reference"} for m in blocks)
        # Each block module's forward calls its block's fused module alone, with the rate its parent gives.
        assert all([type(m) for m in getattr(b, CONTAINER)] == [InvertedResidual] for b in model.blocks)
        assert [captured_forward(b).concrete for b in model.blocks] == [{"drop_rate": 0.2 * i / 3} for i in range(3)]
        assert [(e.path, e.via) for e in report.fused if e.kind == "inverted_residual"] == [
            (f"blocks.{i}.depthwise", f"forward of blocks.{i}") for i in range(3)]
    else:
        assert blocks == [] and all(DWConvBNAct in map(type, getattr(b, CONTAINER)) for b in model.blocks)
    x = image(batch=3, size=30, seed=5)
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL
    again = mbkernels.patch(copy.deepcopy(model), example_inputs=image(batch=2))  # from the table: the same plan
    assert [type(m) for m in again.modules()] == [type(m) for m in model.modules()]
    mbkernels.unpatch(model)
    assert all(type(m) is type(s) for m, s in zip(model.modules(), stock.modules()))
    assert not any(rewritten(b) or hasattr(b, CONTAINER) for b in model.blocks)


def test_a_stock_choice_runs_the_stock_modules(monkeypatch, op_calls):
    scripted(monkeypatch, lambda names, name: 1.0 if name in ("stock", "layers") else 2.0)
    model = mbkernels.patch(small_model(), example_inputs=image())
    op_calls.clear()
    with torch.no_grad():
        model(image(seed=3))
    assert op_calls == []  # every fused module ran its stock modules


@pytest.mark.parametrize("whole, fused_modules", [({"tuned": 1.0, "fused": 0.5, "stock": 2.0}, True),
                                                  ({"tuned": 1.0, "fused": 2.0, "stock": 0.5}, False),
                                                  ({"tuned": 1.0, "fused": 0.99, "stock": 1.01}, False)],
                         ids=["fused-faster", "stock-faster", "within-noise"])
def test_the_whole_model_check_keeps_the_fastest_forward(monkeypatch, whole, fused_modules):
    """Per layer the depthwise runs keep stock (fused 1.5x slower alone; the folded convs tie); the whole forward
    then decides: every candidate fused, or the stock model."""
    scripted(monkeypatch, lambda names, name: 1.5 if name == "reference" else 1.0, whole)
    for model in (small_model(), small_model()):  # the second from the table: the same choice, nothing timed
        mbkernels.patch(model, example_inputs=image())
        if fused_modules:
            assert set(choices(model, DWConvBNAct)) == {"reference"}
            # Each measured line says the whole model overrode it.
            whys = [why for e in mbkernels.patch_report(model).fused if e.kind == "dwconv_bn_act"
                    for _, _, why in e.measured.values()]
            assert len(whys) == 11 and all(why.startswith("stock kept, not faster: reference 1.500 ms") and
                                           why.endswith("; then fused: the whole model measured faster with "
                                                        "every candidate fused") for why in whys)
        else:
            assert not any(isinstance(m, FusedModule) for m in model.modules())
            kept = kept_stock(model, "dwconv_bn_act")
            assert len(kept) == 11
            assert ("the whole model measured fastest stock" in kept[0].reason) == (whole["stock"] < 1.0)


def test_the_whole_model_line_in_the_report(monkeypatch, capsys):
    scripted(monkeypatch, lambda names, name: 1.0, {"tuned": 1.0, "fused": 0.5, "stock": 2.0})
    mbkernels.patch(small_model(), example_inputs=image(), verbose=True)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("whole model"))
    # The medians, then the comparison that decided, whose gain is the ratio of the medians beside it.
    assert line.endswith("tuned 1.000  fused 0.5000*  stock 2.000; fused chosen, faster beyond the spread and the "
                         "2% floor: fused 0.5000 ms vs tuned 1.000 ms: 50.0% faster (round by round 50.0% faster, "
                         "spread 0.0% over 3 rounds)")


# ------------------------------------------------------------------------------------------------ for real
def test_a_real_cpu_tuning_keeps_the_stock_outputs():
    model = small_model("mobilenetv3_small_100")
    stock = copy.deepcopy(model)
    x = image(batch=2, size=64)
    mbkernels.patch(model, example_inputs=x)
    fused = [m for m in model.modules() if isinstance(m, FusedModule)]
    assert all(m.tuned and m.timings for m in fused)
    # Every candidate measured: fused with its choice, or its stock modules kept (the report says so).
    report = mbkernels.patch_report(model)
    layers = [entry for entry in report.skipped if entry.kind != "inverted_residual"]  # blocks: layers planned
    assert all(entry.reason.startswith("kept stock on this CPU: ") for entry in layers)
    assert len(report.fused) + len(layers) >= 11 + 9
    for module in fused:
        for key, timings in module.timings.items():
            assert module.tuned[key] in timings and all(ms is None or ms > 0 for ms in timings.values())
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL


def test_each_example_input_is_measured_at_the_shape_its_module_sees(monkeypatch):
    clock = scripted(monkeypatch, lambda names, name: 1.0 if name in ("stock", "layers")
                     else 5.0 if "layers" in names else 0.5)
    model = mbkernels.patch(small_model(), example_inputs=[image(batch=1), image(batch=3)])
    first_dw = next(m for m in model.modules() if isinstance(m, DWConvBNAct))
    assert sorted(key[0][0] for key in first_dw.tuned) == [1, 3]
    # The stem halves the plane: its depthwise conv sees 16 x 16 (recorded in the forward, not guessed).
    assert all(key[0][2:] == (16, 16) for key in first_dw.tuned)
    assert len(clock.timed) > 0


# ------------------------------------------------------------------------------------------------ cache
def test_a_second_patch_with_the_same_model_and_device_times_nothing(monkeypatch, tuning_cache):
    first = scripted(monkeypatch, lambda names, name: 1.0 if name in ("stock", "layers") else 0.5)
    model = mbkernels.patch(small_model(), example_inputs=image())
    assert first.timed and tuning_cache.exists()
    second = scripted(monkeypatch, lambda names, name: 1.0)
    again = mbkernels.patch(small_model(), example_inputs=image())
    assert second.timed == []
    assert [m.tuned for m in again.modules() if isinstance(m, FusedModule)] == \
        [m.tuned for m in model.modules() if isinstance(m, FusedModule)]
    other = scripted(monkeypatch, lambda names, name: 1.0)
    mbkernels.patch(small_model(), example_inputs=image(size=48))  # another input: other signatures
    assert other.timed


def test_tuning_turned_off_plans_from_the_cost_model(monkeypatch):
    monkeypatch.setenv("MBKERNELS_TUNE", "0")
    clock = scripted(monkeypatch, lambda names, name: 1.0)
    model = mbkernels.patch(small_model(), example_inputs=image())
    assert clock.timed == []
    assert all(not m.tuned for m in model.modules() if isinstance(m, FusedModule))


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("make, message", [
    (lambda: image().double(), "float64 but the model's weights are float32"),
    (lambda: image()[0], "cannot be the model's input: its stock forward raised"),
    (lambda: torch.randn(1, 5, 32, 32), "cannot be the model's input"),
    (lambda: image().to("meta"), "is on meta but the model's weights are on cpu"),
    (lambda: [], "empty list"),
    (lambda: ("not a tensor",), "hold no tensor"),
], ids=["dtype", "rank", "channels", "device", "empty", "no-tensor"])
def test_example_inputs_that_cannot_be_the_models_are_refused_before_anything_changes(monkeypatch, make, message):
    clock = scripted(monkeypatch, lambda names, name: 1.0)
    model = small_model()
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=message):
        mbkernels.patch(model, example_inputs=make())
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert clock.timed == [] and not model._forward_pre_hooks


class ListOfImages(nn.Module):
    """A detection-style forward: a list of images (torchvision's detection models take one), a dict out."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        return {"logits": self.net(torch.stack(images))}


def test_example_inputs_holding_tensors_in_a_list(monkeypatch):
    clock = scripted(monkeypatch, lambda names, name: 1.0 if name in ("stock", "layers")
                     else 5.0 if "layers" in names else 0.5)
    stock = ListOfImages(small_model())
    images = [image()[0], image(seed=2)[0]]
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=(images,))
    assert clock.timed and set(choices(model, DWConvBNAct)) == {"reference"}
    first_dw = next(m for m in model.modules() if isinstance(m, DWConvBNAct))
    assert [key[0][0] for key in first_dw.tuned] == [2]  # the batch the forward stacked
    with torch.no_grad():
        assert relative_error(model(images)["logits"], stock(images)["logits"]) < FLOAT32_RTOL
    with pytest.raises(ValueError, match=r"example_inputs \(\[1, 3, 32, 32\]\) cannot be the model's input"):
        mbkernels.patch(copy.deepcopy(stock), example_inputs=image())  # a tensor where the forward wants a list


# ------------------------------------------------------------------------------------------------ shown, fixed
def test_the_report_shows_each_variants_time_and_the_choice(monkeypatch):
    scripted(monkeypatch, lambda names, name: {"stock": 1.0, "layers": 1.0}.get(name, 0.5))
    model = mbkernels.patch(small_model(), example_inputs=image())
    report = mbkernels.patch_report(model)
    measured = [entry for entry in report.fused if entry.measured]
    assert len(measured) == len(report.fused)
    text = str(report)
    assert "measured (median ms per call; * the choice; why: the comparison that decided it):" in text
    row = next(line for line in text.splitlines() if line.strip().startswith(measured[0].path + " ")
               and "stock" in line)
    assert "1x" in row and "stock 1.000  folded 0.5000*" in row
    assert row.endswith("folded chosen, faster beyond the spread and the 2% floor: folded 0.5000 ms vs stock 1.000 "
                        "ms: 50.0% faster (round by round 50.0% faster, spread 0.0% over 3 rounds)")


def test_nothing_is_timed_under_torch_compile(monkeypatch):
    scripted(monkeypatch, lambda names, name: 1.0 if name in ("stock", "layers") else 0.5)
    model = small_model()
    stock = copy.deepcopy(model)
    mbkernels.patch(model, example_inputs=image())

    def refuse(*args, **kwargs):
        raise AssertionError("timed after patch returned")

    monkeypatch.setattr(timing, "time_variants", refuse)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(image(seed=4)), stock(image(seed=4))) < FLOAT32_RTOL


def test_export_keeps_the_choices_the_stock_modules_where_stock_won(monkeypatch):
    """Depthwise runs measured faster stock, SEs faster fused: the exported graph holds the SE op and no depthwise
    op (the stock convs in its place)."""
    tuning_now = {}
    tune_module = tuning.Tuner.tune_module

    def tuning_one(self, fused, seen, largest):
        tuning_now["kind"] = type(fused)
        return tune_module(self, fused, seen, largest)

    monkeypatch.setattr(tuning.Tuner, "tune_module", tuning_one)
    fused_ms = {DWConvBNAct: 2.0, SqueezeExcite: 0.5, ConvBNAct: 0.5}
    scripted(monkeypatch, lambda names, name: (5.0 if name != "layers" else 1.0) if "layers" in names
             else 1.0 if name == "stock" else fused_ms[tuning_now["kind"]])
    model = small_model()
    stock = copy.deepcopy(model)
    mbkernels.patch(model, example_inputs=image())
    x = image(seed=6)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
        assert "mbkernels.squeeze_excite.default" in targets and "mbkernels.dwconv_bn_act.default" not in targets
        assert relative_error(exported.module()(x), stock(x)) < FLOAT32_RTOL


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_a_gpu_tuning_measures_every_backend():
    model = small_model().cuda().half().to(memory_format=torch.channels_last)
    x = image(batch=8, size=64).cuda().half().contiguous(memory_format=torch.channels_last)
    mbkernels.patch(model, example_inputs=x)
    dw = next(m for m in model.modules() if isinstance(m, DWConvBNAct))
    timings = next(iter(dw.timings.values()))
    assert {"stock", "cuda", "triton"} <= set(timings)
