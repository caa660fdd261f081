"""A patched model in eval mode with autograd on (fine-tuning with frozen BatchNorm statistics, saliency maps):
every fused module, rewritten forward and shape-specialised graph steps aside for the stock layers, and the
gradients, of the input and of every parameter, equal stock's."""
import copy

import pytest
import torch
from torch import nn

import mbkernels
from mbkernels.match import randomize_batchnorm
from mbkernels.models import build_model
from mbkernels.nn import rewrite
from models.forwards import FORWARDS
from test_model_proof import ReadsItsConv, unsafe_model


def gradients(model: nn.Module, x: torch.Tensor, input_grad: bool = True) -> dict:
    """d(sum of squares of the output)/d(input, when input_grad, and each parameter), in eval mode with grad
    enabled. Without input_grad only the parameters ask for gradients, as in fine-tuning on images."""
    model.eval()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(input_grad)
    out = model(x)
    out = getattr(out, "logits", out)
    (out.double() ** 2).sum().backward()
    found = {"input": x.grad} if input_grad else {}  # parameters by their state_dict names, which patch keeps
    found.update({name: p.grad for name, p in model.state_dict(keep_vars=True).items()
                  if isinstance(p, nn.Parameter) and p.grad is not None})
    return found


def assert_same_gradients(model: nn.Module, stock: nn.Module, x: torch.Tensor, input_grad: bool = True) -> None:
    want, got = gradients(stock, x, input_grad), gradients(model, x, input_grad)
    assert len(want) > 1 and got.keys() == want.keys()  # the same parameters get a gradient, under the same names
    for name, grad in want.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert ((got[name] - grad).abs().max() / scale).item() < 1e-5, name


def rewritten_modules(model: nn.Module) -> int:
    return sum(rewrite.rewritten(m) for m in model.modules())


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-and-parameters", "parameters-only"])
@pytest.mark.parametrize("name", ["functional-activations", "inline-se", "pad-then-conv", "net-of-blocks"])
def test_gradients_through_rewritten_forwards_in_eval_equal_stock(name, input_grad):
    make, channels, _, _ = FORWARDS[name]
    torch.manual_seed(0)
    stock = randomize_batchnorm(make()).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    assert rewritten_modules(model) > 0
    assert_same_gradients(model, stock, torch.randn(2, channels, 11, 13), input_grad)


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-and-parameters", "parameters-only"])
def test_gradients_through_a_patched_timm_model_in_eval_equal_stock(input_grad):
    stock = build_model("timm:mobilenetv3_small_100")
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    assert_same_gradients(model, stock, torch.randn(1, 3, 35, 33), input_grad)


def test_gradients_through_shape_specialised_graphs_and_rolled_back_swaps_equal_stock():
    torch.manual_seed(0)
    stock = randomize_batchnorm(nn.Sequential(ReadsItsConv(), nn.Conv2d(10, 6, 1))).eval()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    assert rewritten_modules(model) == 1
    assert_same_gradients(model, stock, torch.randn(2, 10, 17, 16))
    stock = unsafe_model()
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    assert_same_gradients(model, stock, torch.randn(1, 3, 12, 9))
