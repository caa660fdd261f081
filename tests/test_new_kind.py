"""A new fusion kind is its fused module, its FusionKind and its tests, and works in module trees and forward code
alike: here a BatchNorm with the activation after it and no conv before it (a pre-activation network's), added to the
registry as the package's own kinds are. Its fused module and kind live in this file; the planner, the dataflow pass
(which asks the kind whether a forward may hold its pattern, finds it with the graph helpers, builds its module),
the rewrite, the report and unpatch need nothing else."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbkernels
from mbkernels import activations, planner
from mbkernels.match import probe_copy, probe_input, prove
from mbkernels.match.layers import following, is_plain_sequential
from mbkernels.nn.dwconv import FusedInto
from mbkernels.nn.fused import FusedModule
from mbkernels.nn.rewrite import CONTAINER, rewritten
from mbkernels.planner import kinds

torch.manual_seed(0)


class BNAct(FusedModule):
    """act(bn(x)) as one per-channel affine map, folded once, and the activation (eval mode)."""
    stands_in_for = "bn"

    def __init__(self, bn: nn.BatchNorm2d, activation: str):
        super().__init__()
        self.bn, self.activation = bn, activation
        self.refresh()

    def _fold_modules(self):
        return (self.bn,)

    def _fold_settings(self):
        return (self.bn.eps,)

    def _fold(self):
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        return {"scale": scale[:, None, None], "shift": (self.bn.bias - self.bn.running_mean * scale)[:, None, None]}

    def forward(self, x):
        return activations.apply_activation(self.activation, x * self.scale + self.shift)


class BNActKind(kinds.FusionKind):
    kind, label, fused_type = "bn_act", "bn+act", BNAct

    def candidates(self, parent, path, children, taken):
        if not is_plain_sequential(parent):
            return
        for i, (name, module) in enumerate(children):
            after = following(children, i)
            if (name not in taken and type(module) is nn.BatchNorm2d and after
                    and activations.identify_activation(after[0][1]) not in (None, "identity")):
                yield kinds.Candidate(f"{path}{name}", f"C={module.num_features}",
                                      functools.partial(self.build, name, module, *after[0]))

    def build(self, name, bn, act_name, act):
        fused = BNAct(bn, activations.identify_activation(act))
        stock = probe_copy(nn.Sequential(bn, act), self.planner.generator)
        proof = prove(stock, [(0, lambda: BNAct(stock[0], fused.activation))],
                      probe_input(bn.num_features, 5, 6, self.planner.generator))
        if proof.proven is None:
            raise kinds.Skip(proof.failure)
        return [(name, fused, bn), (act_name, FusedInto(name, act, fused), act)]

    def describe(self, fused):
        return f"C={fused.bn.num_features}", fused.activation

    graph_priority = 3

    @classmethod
    def graph_matches(cls, found):
        view, matches = found.view, []
        for node in view.graph.nodes:
            if type(view.module(node)) is nn.BatchNorm2d and len(node.args) == 1:
                activation, region = view.region_after(node, activations.identify_activation)
                if region:
                    matches.append(BNActMatch([node] + region, node.args[0], region[-1], node.target, activation))
        return matches

    @staticmethod
    def anchor(match):
        return match.norm

    @classmethod
    def from_match(cls, root, match, backend):
        return BNAct(root.get_submodule(match.norm), match.activation)

    def left_in_forward(self, children, taken, entries):
        return any(type(child) is nn.BatchNorm2d and name not in taken for name, child in children)


class BNActMatch:
    def __init__(self, nodes, input, output, norm, activation):
        self.nodes, self.input, self.output, self.norm, self.activation = nodes, input, output, norm, activation


@pytest.fixture
def with_bn_act_kind(monkeypatch):
    registry = kinds.REGISTRY + (kinds.Registered(BNActKind, "convs"),)
    for module in (kinds, planner, planner.planner):
        monkeypatch.setattr(module, "REGISTRY", registry)
    monkeypatch.setitem(kinds.KIND_LABELS, BNActKind.kind, BNActKind.label)


class PreActivation(nn.Module):
    """Forward code: BN, activation as a function, conv (no conv before the BN: no structural kind takes it)."""

    def __init__(self, channels):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.hardswish(self.bn(x)))


def _randomized(model):
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_a_new_kind_fuses_in_a_module_tree_and_in_forward_code(with_bn_act_kind):
    model = _randomized(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6), nn.ReLU6(),
                                      PreActivation(6)))
    x = torch.randn(2, 3, 11, 13)
    with torch.no_grad():
        want = model(x)
        patched = mbkernels.patch(model)
        got = patched(x)
    report = mbkernels.patch_report(patched)
    assert isinstance(patched[2], BNAct) and isinstance(patched[3], FusedInto)
    assert rewritten(patched[4]) and isinstance(getattr(patched[4], CONTAINER)[0], BNAct)
    fused = {(entry.path, entry.kind, entry.shape, entry.activation) for entry in report.fused}
    assert {("2", "bn_act", "C=6", "relu6"), ("4.bn", "bn_act", "C=6", "hardswish")} <= fused
    assert "2 bn+act" in report.summary()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mbkernels.unpatch(patched)
    assert type(patched[2]) is nn.BatchNorm2d and not rewritten(patched[4])


def test_a_new_kinds_flag_turns_it_off_in_both_matchers(with_bn_act_kind):
    model = _randomized(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.BatchNorm2d(6), nn.ReLU6(),
                                      PreActivation(6)))
    patched = mbkernels.patch(model, convs=False)
    assert type(patched[2]) is nn.BatchNorm2d and not rewritten(patched[4])
    assert not [module for module in patched.modules() if isinstance(module, BNAct)]
