"""Tuning on more than one case: kinds mixed in one model, several example inputs, both layouts, forwards that
hold more than their fused parts; on a scripted clock whose costs differ per kind, batch size and layout, so that
a choice made from the wrong measurement (another input's, another layout's, another part's) comes out wrong."""
import copy
import itertools

import pytest
import torch
from torch import nn

import mbkernels
import mbkernels.planner
from mbkernels.match import randomize_batchnorm
from mbkernels.nn import ConvBNAct, DWConvBNAct, InvertedResidual, SqueezeExcite
from mbkernels.nn.fused import FusedModule
from mbkernels.nn.rewrite import rewritten
from mbkernels.planner import timing, tuning
from models.forwards import Block
from test_tuning import (FLOAT32_RTOL, Scripted, choices, image, kept_stock, relative_error, small_model,  # noqa: F401
                         tuning_cache)  # the fixture: every test tunes into its own table


def layout(x: torch.Tensor) -> str:
    return "channels_last" if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 else "NCHW"


class ByCase(Scripted):
    """The scripted clock, with costs that depend on what is timed: cost(kind, names, name, x), kind the type of
    the fused module being tuned (None for a block and for the whole model), x the first input it is timed on."""

    def __init__(self, monkeypatch, cost, whole=None, budget_s=0.01):
        self.kind = self.x = None
        super().__init__(lambda names, name: cost(self.kind, names, name, self.x), whole, budget_s)
        tune_module = tuning.Tuner.tune_module

        def tuning_one(tuner, fused, seen, largest):
            self.kind = type(fused)
            try:
                return tune_module(tuner, fused, seen, largest)
            finally:
                self.kind = None

        monkeypatch.setattr(tuning.Tuner, "tune_module", tuning_one)
        monkeypatch.setattr(timing, "time_variants", self)

    def __call__(self, variants, inputs, device, **kwargs):
        self.x = inputs[0]
        return super().__call__(variants, inputs, device, **kwargs)


def by_batch(model: nn.Module, kind) -> list:
    """{batch size: choice} of each fused module of `kind`."""
    return [{key[0][0]: choice for key, choice in m.tuned.items()} for m in model.modules() if type(m) is kind]


# ------------------------------------------------------------------------------- kinds and batch sizes mixed
@pytest.mark.parametrize("block_at_3, installed", [(2.0, False), (0.5, True)], ids=["loses-at-3", "wins-at-both"])
def test_each_kind_is_decided_per_batch_size_and_a_block_only_where_it_wins_at_every_one(monkeypatch, capsys,
                                                                                         block_at_3, installed):
    """Depthwise runs fused win at batch 1 and lose at batch 3; SEs lose at both; folded convs win at both; the
    block kernel wins at batch 1, and at batch 3 loses (then its layers stay everywhere) or wins (then it is
    installed)."""
    fused_ms = {DWConvBNAct: {1: 0.5, 3: 2.0}, SqueezeExcite: {1: 2.0, 3: 2.0}, ConvBNAct: {1: 0.5, 3: 0.5}}

    def cost(kind, names, name, x):
        if "layers" in names:
            return 1.0 if name == "layers" else {1: 0.5, 3: block_at_3}[x.shape[0]]
        return 1.0 if name == "stock" else fused_ms[kind][x.shape[0]]

    ByCase(monkeypatch, cost)
    stock = small_model()
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=[image(batch=1), image(batch=3)], verbose=True)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    # Each block's plan gives the decision at each batch size.
    plans = [line for line in capsys.readouterr().out.splitlines() if " measured: " in line]
    assert len(plans) == 11 and all(line.count(" at 1x") == 1 and line.count("; at 3x") == 1 for line in plans)
    if installed:
        assert len(blocks) == 11 and all(m.tuned for m in blocks)
        assert all(" block " in line and "layers kept" not in line for line in plans)
        assert by_batch(model, DWConvBNAct) == [] and by_batch(model, ConvBNAct) == [{1: "folded", 3: "folded"}] * 2
        assert choices(model, SqueezeExcite) == []  # the SEs are inside the blocks
    else:
        assert blocks == []
        assert all(" layers " in line and "layers kept" in line for line in plans)
        assert by_batch(model, DWConvBNAct) == [{1: "reference", 3: "stock"}] * 11
        assert set(choices(model, ConvBNAct)) == {"folded"} and len(by_batch(model, ConvBNAct)) > 11
        assert choices(model, SqueezeExcite) == [] and len(kept_stock(model, "squeeze_excite")) == 9
    for batch in (1, 3):
        with torch.no_grad():
            assert relative_error(model(image(batch=batch, seed=7)), stock(image(batch=batch, seed=7))) < FLOAT32_RTOL


# ------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("what", ["layers", "blocks"])
def test_channels_last_is_measured_again_not_read_from_an_nchw_measurement(monkeypatch, what):
    """The same model and batch in both layouts, one table: fused layers (or the block kernels) win on NCHW and
    lose on channels_last; the channels_last patch must time again and keep stock (or the layers)."""
    def cost(kind, names, name, x):
        nchw = layout(x) == "NCHW"
        if "layers" in names:
            return 1.0 if name == "layers" else (0.5 if nchw and what == "blocks" else 5.0)
        return 1.0 if name == "stock" else (0.5 if nchw or what == "blocks" else 2.0)

    clock = ByCase(monkeypatch, cost)
    nchw = mbkernels.patch(small_model(), example_inputs=image(batch=2))
    assert any(isinstance(m, InvertedResidual) for m in nchw.modules()) == (what == "blocks")
    clock.timed.clear()
    stock = small_model().to(memory_format=torch.channels_last)
    x = image(batch=2).contiguous(memory_format=torch.channels_last)
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=x)
    assert clock.timed  # measured on channels_last
    assert not any(isinstance(m, InvertedResidual) for m in model.modules())
    if what == "layers":
        assert not any(isinstance(m, FusedModule) for m in model.modules())  # every candidate kept stock
        kept = kept_stock(model, "dwconv_bn_act")
        assert len(kept) == 11 and all("reference 2.000 ms vs stock 1.000 ms" in e.reason for e in kept)
    else:
        assert set(choices(model, DWConvBNAct)) == {"reference"}
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL


# ------------------------------------------------------------------------------------------------ rewrites
class Blocks(nn.Module):
    """A stem, then blocks in forward code (each a rewrite with several fused parts); the last block's forward
    does more after its block (a scale), so that block is not all its forward computes."""

    def __init__(self, c=16, last=None):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList([Block(c), Block(c, 2)] + ([last(c, 3)] if last else []))

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return x


class BlockThenScale(Block):
    def forward(self, inputs, drop_rate=None):
        return super().forward(inputs, drop_rate) * 0.5


def blocks_model(last=None) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(Blocks(last=last), torch.Generator().manual_seed(0)).eval()


def test_one_stock_choice_keeps_the_other_fused_parts_of_a_rewrite(monkeypatch, op_calls):
    """Each block's rewritten forward holds a depthwise run (measured faster fused), an SE and two convs (measured
    faster stock): the rewrite stands, its depthwise run fused, the rest running stock inside it."""
    def cost(kind, names, name, x):
        return 1.0 if name == "stock" else 0.5 if kind is DWConvBNAct else 2.0

    ByCase(monkeypatch, cost)
    stock = blocks_model()
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=image(batch=2), blocks=False)
    assert all(rewritten(block) for block in model.blocks)
    op_calls.clear()
    x = image(batch=2, seed=3)
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL
    assert [op for op, _ in op_calls] == ["dwconv_bn_act"] * 2


def test_a_block_followed_by_more_code_is_not_timed_as_its_whole_forward(monkeypatch):
    """Only a block that is its module's whole forward is timed against that forward with its layers fused; what
    each timing compares computes the same thing (the block kernel against the forward it replaces)."""
    compared = []

    def cost(kind, names, name, x):
        return 1.0 if name in ("stock", "layers") else 0.5

    clock = ByCase(monkeypatch, cost)

    def checking(variants, inputs, device, **kwargs):
        if "layers" in variants:
            with torch.no_grad():
                want = variants["layers"](inputs[0])
                compared.append(all(relative_error(fn(inputs[0]), want) < FLOAT32_RTOL for fn in variants.values()))
        return clock(variants, inputs, device, **kwargs)

    monkeypatch.setattr(timing, "time_variants", checking)
    stock = blocks_model(last=BlockThenScale)
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=image(batch=2))
    assert compared == [True, True]  # blocks 0 and 1 timed; block 2 left to the cost model
    x = image(batch=2, seed=3)
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL


# ------------------------------------------------------------------------------------------------ the report
def test_a_tuned_patch_plans_once_and_explains_each_module_once(monkeypatch, capsys):
    """Every block measured slower than its layers, every depthwise run faster stock: the printed report (the
    planner's, updated with what was measured: the model is planned once) gives each block one explanation, its
    measured plan, and lists each module left alone once."""
    planned = []
    plan = mbkernels.planner.plan
    monkeypatch.setattr(mbkernels.planner, "plan", lambda *args, **kwargs: planned.append(1) or plan(*args, **kwargs))

    def cost(kind, names, name, x):
        if "layers" in names:
            return 1.0 if name == "layers" else 2.0
        return 1.0 if name == "stock" else 2.0 if kind is DWConvBNAct else 0.5

    ByCase(monkeypatch, cost)
    model = mbkernels.patch(small_model(), example_inputs=image(batch=2), verbose=True)
    assert planned == [1]
    out = capsys.readouterr().out
    fused = [line.split()[0] for line in out.split("\nfused:\n")[1].split("\nmeasured")[0].splitlines()[1:]]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    assert len(fused) == 11 + 9 + 23 - 11 and fused == sorted(fused, key=order.__getitem__)  # in the model's order
    left_alone = out.split("\nleft alone:\n")[1].splitlines()[1:]
    paths = [line.split()[0] for line in left_alone]
    assert len(paths) == 11 and len(set(paths)) == len(paths)
    assert all("kept stock on this CPU: not faster: reference 2.000 ms vs stock 1.000 ms" in line
               for line in left_alone)
    block_plans = out.split("block plans")[1].split("\nleft alone:")[0]
    assert block_plans.count("measured: layers kept, not faster: reference 2.000 ms vs layers 1.000 ms") == 11


def test_rounds_that_disagree_are_measured_again(monkeypatch, capsys):
    """A folded conv whose rounds alternate between 40% faster and 30% slower than stock: tuning measures more
    rounds (the budget allows them), still cannot tell, keeps stock and says so with the numbers."""
    folded = itertools.cycle([1.2, 2.6])

    def cost(kind, names, name, x):
        return 2.0 if name == "stock" else next(folded)

    ByCase(monkeypatch, cost, budget_s=1.0)
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
                                torch.Generator().manual_seed(0)).eval()
    mbkernels.patch(model, example_inputs=image(batch=2), verbose=True)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("0 "))
    assert line.endswith(f"kept stock on this CPU: the rounds are too noisy to tell (a spread over 50%): folded "
                         f"1.200 ms vs stock 2.000 ms: 40.0% faster (round by round 40.0% faster, spread 70.0% over "
                         f"{timing.MAX_ROUNDS} rounds)")


# ------------------------------------------------------------------------------- the proof after tuning
def blocks_win(kind, names, name, x):
    if "layers" in names:
        return 1.0 if name == "layers" else 0.5
    return 1.0 if name == "stock" else 0.5


def test_a_block_tuning_installs_is_proven_in_the_whole_model_and_rolled_back_when_wrong(monkeypatch):
    """Tuning installs the blocks that won; one of them computes wrong in place (its weights folded wrong after its
    own proof): the whole-model proof after tuning finds it, puts its stock block back and says so; the rest stay."""
    swap = mbkernels.planner.kinds.BlockAlternative.swap
    broken = []

    def sabotaged(alternative):
        parent, assignments, restore, fused, entries = swap(alternative)
        if not broken:  # its depthwise weights folded wrong from now on
            broken.append(entries[0]["path"])
            fold = fused[0]._fold
            object.__setattr__(fused[0], "_fold", lambda: {name: value + 1.0 if name == "w_dw" else value
                                                          for name, value in fold().items()})
            fused[0].refresh()
        return parent, assignments, restore, fused, entries

    monkeypatch.setattr(mbkernels.planner.kinds.BlockAlternative, "swap", sabotaged)
    ByCase(monkeypatch, blocks_win)
    stock = small_model()
    model = mbkernels.patch(copy.deepcopy(stock), example_inputs=image(batch=2))
    report = mbkernels.patch_report(model)
    assert len([m for m in model.modules() if isinstance(m, InvertedResidual)]) == 10
    assert not isinstance(model.get_submodule(broken[0]), InvertedResidual)
    assert any(entry.path == broken[0] and entry.reason.startswith("stock kept: ") for entry in report.skipped)
    with torch.no_grad():
        assert relative_error(model(image(batch=2, seed=7)), stock(image(batch=2, seed=7))) < FLOAT32_RTOL


def layers_win(kind, names, name, x):
    return 1.0 if name in ("layers", "stock") else 0.5 if kind is not None else 2.0


def stock_ses(kind, names, name, x):
    return 2.0 if kind is SqueezeExcite and name != "stock" else layers_win(kind, names, name, x)


@pytest.mark.parametrize("cost, checks", [(blocks_win, 2), (stock_ses, 2), (layers_win, 1)],
                         ids=["blocks-installed", "stock-kept", "nothing-changed"])
def test_a_warm_table_proves_the_model_once_unless_tuning_changed_it(monkeypatch, cost, checks):
    """With every choice in the table, tuning that installs nothing and keeps nothing stock leaves the first proof
    standing (one check of the whole model); one that installs blocks or keeps SEs stock proves the model again."""
    ByCase(monkeypatch, cost)
    x = image(batch=2)
    mbkernels.patch(small_model(), example_inputs=x)  # fills the table
    runs = []
    check = mbkernels.planner.model_proof.ModelProof.check
    monkeypatch.setattr(mbkernels.planner.model_proof.ModelProof, "check",
                        lambda proof: runs.append(1) or check(proof))
    model = mbkernels.patch(small_model(), example_inputs=x)
    assert len(runs) == checks
    assert bool([m for m in model.modules() if isinstance(m, InvertedResidual)]) == (cost is blocks_win)
    assert bool([m for m in model.modules() if isinstance(m, SqueezeExcite)]) == (cost is layers_win)
