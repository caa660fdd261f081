"""The dataflow pass: models whose forward code, not their module tree, does the work (hand-written forwards in
tests/models/forwards.py, and efficientnet_pytorch), patched with every depthwise conv and SE taken over, outputs
equal to stock, the stock module tree and state_dict unchanged, training and autograd on the stock forward."""
import copy
import io

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels.nn import DWConvBNAct, InvertedResidual, SqueezeExcite
from mbkernels.nn.fused import FusedModule
from mbkernels.nn.rewrite import CONTAINER, captured_forward, rewritten
from models.forwards import FORWARDS, FeaturesAndAnUnusedHead, Net, TensorBranch

FLOAT32_RTOL = 1e-5


def relative_error(got, want) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def stock_module(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(FORWARDS[name][0](), torch.Generator().manual_seed(seed)).eval()


def probe(channels: int, size=(19, 17), batch=2, seed=1) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def fused_kinds(model: nn.Module) -> list:
    return [type(m) for m in model.modules() if isinstance(m, FusedModule)]


@pytest.mark.parametrize("name", FORWARDS)
def test_every_depthwise_conv_and_se_is_taken_over_and_outputs_equal_stock(name):
    _, channels, depthwise, ses = FORWARDS[name]
    stock = stock_module(name)
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    report = mbkernels.patch_report(model, blocks=False)
    assert report.count("dwconv_bn_act") == depthwise and report.count("squeeze_excite") == ses
    assert report.skipped == [] and all(not entry.note for entry in report.fused)
    assert fused_kinds(model).count(DWConvBNAct) == depthwise and fused_kinds(model).count(SqueezeExcite) == ses
    for size in ((19, 17), (32, 32), (21, 24)):
        x = probe(channels, size)
        with torch.no_grad():
            assert relative_error(model(x), stock(x)) < FLOAT32_RTOL, size


@pytest.mark.parametrize("name", ["functional-activations", "pad-then-conv", "folded-by-the-model"])
def test_the_activation_and_padding_are_fused_into_the_op(name, op_calls):
    """Fused runs take what the forward applies: the expression's activation, the pad before the conv."""
    _, channels, depthwise, _ = FORWARDS[name]
    model = mbkernels.patch(stock_module(name), backend="reference", blocks=False)
    op_calls.clear()  # the probes' calls
    with torch.no_grad():
        model(probe(channels))
    calls = [values for op, values in op_calls if op == "dwconv_bn_act"]
    assert len(calls) == depthwise
    activations = [values[6] for values in calls]
    paddings = [list(values[4]) for values in calls]
    expected = {"functional-activations": (["hardswish", "silu", "hardswish"], None),
                "pad-then-conv": (["relu", "silu", "hardswish"], [[0, 1, 0, 1], [2, 1, 1, 2], [1, 2, 1, 2]]),
                "folded-by-the-model": (["relu6", "gelu"], None)}[name]
    assert activations == expected[0]
    if expected[1] is not None:
        assert paddings == expected[1]


def test_the_report_gives_each_rewritten_runs_shape_and_activation(capsys):
    """Both reports: the one patch prints, made as it rewrites, and patch_report's, read from the patched model."""
    model = mbkernels.patch(stock_module("functional-activations"), backend="reference", blocks=False, verbose=True)
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if " dwconv+bn+act " in line]
    assert [words[-1] for words in printed] == ["hardswish", "silu", "hardswish"]
    report = mbkernels.patch_report(model, blocks=False)
    runs = [(entry.shape, entry.activation) for entry in report.fused if entry.kind == "dwconv_bn_act"]
    assert [activation for _, activation in runs] == ["hardswish", "silu", "hardswish"]
    assert all(shape.startswith("C=12 k=") for shape, _ in runs)


def test_blocks_in_forward_code_follow_the_cost_model_without_example_inputs():
    """On the CPU the cost model plans layer fusion for every block: the forward-code blocks are fused by layers,
    each with its plan in the report."""
    torch.manual_seed(0)
    stock = randomize_batchnorm(Net()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    assert not [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert fused_kinds(model).count(DWConvBNAct) == 3
    report = mbkernels.patch_report(copy.deepcopy(stock), backend="reference")  # what patch planned
    assert [decision.plan for decision in report.blocks] == ["layers"] * 3


def test_a_kind_turned_off_is_off_in_forward_code():
    """dwconv=False: no depthwise conv of a forward is fused, not even as a dense conv's fold."""
    model = mbkernels.patch(stock_module("functional-activations"), backend="reference", blocks=False, dwconv=False)
    assert not [m for m in model.modules() if isinstance(getattr(m, "conv", None), nn.Conv2d) and
                isinstance(m, FusedModule) and m.conv.groups > 1]


def test_the_report_says_which_forward_was_rewritten():
    model = mbkernels.patch(stock_module("inline-se"), backend="reference", blocks=False)
    report = mbkernels.patch_report(model, blocks=False)
    assert {entry.via for entry in report.fused} == {"forward of the model"}
    se = next(entry for entry in report.fused if entry.kind == "squeeze_excite")
    assert (se.path, se.shape, se.activation) == ("se_reduce", "C=24 R=6", "silu -> sigmoid")


def test_a_forward_branching_on_tensor_values_is_left_alone_with_the_reason():
    stock = randomize_batchnorm(TensorBranch()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    assert not rewritten(model)
    report = mbkernels.patch_report(model, blocks=False)
    reasons = " ".join(entry.reason + entry.note for entry in report.fused + report.skipped)
    assert "the forward of the model was not rewritten: its forward branches on tensor values" in reasons
    x = probe(16)
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL


def test_a_backbone_returning_features_and_holding_an_unused_head():
    torch.manual_seed(0)
    stock = randomize_batchnorm(FeaturesAndAnUnusedHead()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    report = mbkernels.patch_report(model, blocks=False)
    assert report.count("dwconv_bn_act") == 2 and all(entry.activation == "hardswish" for entry in report.fused
                                                      if entry.kind == "dwconv_bn_act")
    assert [(entry.path, entry.reason) for entry in report.skipped] == [
        ("head", "never called by the forward of its parent, FeaturesAndAnUnusedHead: nothing to fuse")]
    x = probe(3, (32, 30))
    with torch.no_grad():
        for got, want in zip(model(x), stock(x)):
            assert relative_error(got, want) < FLOAT32_RTOL


def test_blocks_in_forward_code_are_fused_whole_with_the_rate_their_parent_calls_them_with(op_calls):
    torch.manual_seed(0)
    stock = randomize_batchnorm(Net()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks="all")
    op_calls.clear()  # the probes' calls
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 3 and [b.parts.residual for b in blocks] == [True, True, True]
    assert [captured_forward(block).concrete for block in model.blocks] == [{"drop_rate": 0.2 * i / 3} for i in range(3)]
    x = probe(3, (32, 30))
    with torch.no_grad():
        assert relative_error(model(x), stock(x)) < FLOAT32_RTOL
    assert [op for op, _ in op_calls].count("inverted_residual") == 3  # the rewritten forwards ran


def test_a_call_with_other_arguments_runs_the_stock_forward(op_calls):
    torch.manual_seed(0)
    stock = randomize_batchnorm(Net()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks="all")
    op_calls.clear()  # the probes' calls
    x = probe(16, (15, 16))
    with torch.no_grad():
        assert torch.equal(model.blocks[1](x, drop_rate=0.5), stock.blocks[1](x, drop_rate=0.5))
    assert op_calls == []


def test_the_state_dict_and_module_tree_are_the_stock_ones_and_checkpoints_load_both_ways():
    stock = stock_module("net-of-blocks")
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    want, got = stock.state_dict(), model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    other = randomize_batchnorm(copy.deepcopy(stock), torch.Generator().manual_seed(9))
    x = probe(3, (32, 30))
    with torch.no_grad():
        model.load_state_dict(other.state_dict())
        assert relative_error(model(x), other(x)) < FLOAT32_RTOL
        stock.load_state_dict(model.state_dict())
        assert torch.equal(stock(x), other(x))


def test_unpatch_gives_back_the_very_stock_modules_and_forwards():
    stock = stock_module("net-of-blocks")
    model = copy.deepcopy(stock)
    before = dict(model.named_modules())
    mbkernels.patch(model, backend="reference", blocks=False)
    assert rewritten(model) and all(rewritten(block) for block in model.blocks)
    mbkernels.unpatch(model)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(rewritten(m) or hasattr(m, CONTAINER) for m in model.modules())


def test_training_and_autograd_run_the_stock_forward():
    stock = stock_module("net-of-blocks").train()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False).train()
    x = probe(3, (32, 30))
    for m in (stock, model):
        torch.manual_seed(3)
        m(x).square().mean().backward()
    want, got = stock.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
    for key in want:  # the same running statistics and gradients
        assert torch.equal(got[key], want[key]), key
        if isinstance(want[key], nn.Parameter):
            assert torch.equal(got[key].grad, want[key].grad), key
    model.eval()
    x = probe(3, (32, 30)).requires_grad_()
    assert relative_error(model(x), stock.eval()(x)) < FLOAT32_RTOL  # autograd: the stock forward, a graph
    model(x).sum().backward()
    assert x.grad is not None


def test_patching_twice_changes_nothing_and_copies_keep_their_rewrite():
    model = mbkernels.patch(stock_module("net-of-blocks"), backend="reference", blocks=False)
    first = str(mbkernels.patch_report(model, blocks=False))
    before = dict(model.named_modules())
    mbkernels.patch(model, backend="reference", blocks=False)
    after = dict(model.named_modules())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert str(mbkernels.patch_report(model, blocks=False)) == first
    x = probe(3, (32, 30))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert rewritten(copied) and captured_forward(copied).owner is copied
        with torch.no_grad():
            assert torch.equal(copied(x), model(x))


def test_torch_compile_and_export_of_a_rewritten_model():
    stock = stock_module("net-of-blocks")
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference", blocks=False)
    x = probe(3, (32, 30))
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert relative_error(compiled(x), stock(x)) < FLOAT32_RTOL
        exported = torch.export.export(model, (x,))
        ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
        assert "mbkernels.dwconv_bn_act.default" in ops and "mbkernels.squeeze_excite.default" in ops
        assert relative_error(exported.module()(x), stock(x)) < FLOAT32_RTOL
