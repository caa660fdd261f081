"""mbkernels.match.prove: the one numeric proof every swap and rewrite needs."""
import torch
from torch import nn

from mbkernels.match import VERIFY_TOLERANCE, probe_input, prove


class Features(nn.Module):
    """Returns several outputs, as a backbone does: (x * a, {"deep": x * b})."""

    def __init__(self, a=1.0, b=2.0):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return [x * self.a, {"deep": x * self.b}]


class ScalesInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(2)


def probe():
    return probe_input(3, 5, 6, torch.Generator().manual_seed(0))


def test_every_output_of_a_structured_result_is_compared():
    proof = prove(Features(), [("b off", lambda: Features(b=2.001)), ("same", lambda: Features())], probe())
    assert proof.proven == "same"
    assert "max relative error" in proof.failures["b off"]


def test_another_structure_or_shape_is_refused_with_both_shapes():
    proof = prove(Features(), [("tensor", lambda: nn.Identity())], probe())
    assert proof.proven is None and "differs from stock" in proof.failure and "(1, 3, 5, 6)" in proof.failure


def test_nan_and_errors_are_refused_and_the_first_match_wins():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("no kernel")

    class NaN(nn.Module):
        def forward(self, x):
            return x * float("nan")

    proof = prove(nn.Identity(), [("broken", Broken), ("nan", NaN), ("first", nn.Identity), ("second", nn.Identity)],
                  probe())
    assert proof.proven == "first"
    assert "RuntimeError: no kernel" in proof.failures["broken"] and "max relative error nan" in proof.failures["nan"]


def test_a_stock_module_that_writes_its_input_is_seen():
    assert prove(ScalesInPlace(), [("fused", ScalesInPlace)], probe()).stock_writes_input
    assert not prove(Features(), [("fused", Features)], probe()).stock_writes_input


def test_the_tolerance_is_relative_to_the_largest_value():
    class Off(nn.Module):
        def __init__(self, by):
            super().__init__()
            self.by = by

        def forward(self, x):
            return x + self.by * x.abs().max()

    assert prove(nn.Identity(), [("within", lambda: Off(VERIFY_TOLERANCE / 2))], probe()).proven == "within"
    assert prove(nn.Identity(), [("beyond", lambda: Off(VERIFY_TOLERANCE * 2))], probe()).proven is None
