"""The one oracle: float64 references built from stock torch modules and functions, never the package's own math.

Activation specs ("relu", "leaky_relu:0.2") are parsed here by name only; what each computes comes from torch.nn.
"""
import torch
import torch.nn.functional as F
from torch import nn

STOCK_ACTIVATIONS = {
    "identity": lambda: nn.Identity(),
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "hardswish": lambda: nn.Hardswish(),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "leaky_relu": lambda slope=0.01: nn.LeakyReLU(slope),
}
STOCK_GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def stock_activation(spec: str) -> nn.Module:
    """The torch.nn module an activation spec names."""
    name, _, parameter = spec.partition(":")
    return STOCK_ACTIVATIONS[name](*([float(parameter)] if parameter else []))


def as64(t):
    return None if t is None else t.detach().to(torch.float64)


def padding_lrtb(padding) -> list:
    """[h, w] or [top, bottom, left, right] as F.pad's [left, right, top, bottom]."""
    top, bottom, left, right = padding if len(padding) == 4 else (padding[0], padding[0], padding[1], padding[1])
    return [left, right, top, bottom]


def dwconv64(x, weight, bias, stride, padding, dilation, activation) -> torch.Tensor:
    """act(conv2d(x, weight, bias, groups=C)) in float64 on the CPU; padding [h, w] or [top, bottom, left, right]."""
    x64 = F.pad(as64(x).cpu(), padding_lrtb(padding))
    y = F.conv2d(x64, as64(weight).cpu(), as64(bias).cpu(), stride, 0, dilation, groups=x.shape[1])
    return stock_activation(activation)(y)


def se64(x, w_reduce, b_reduce, w_expand, b_expand, activation, gate) -> torch.Tensor:
    """x * gate(w_expand @ act(w_reduce @ mean_hw(x) + b_reduce) + b_expand) in float64 on the CPU."""
    cpu = [None if t is None else as64(t).cpu() for t in (x, w_reduce, b_reduce, w_expand, b_expand)]
    x64, w_reduce, b_reduce, w_expand, b_expand = cpu
    pooled = x64.mean(dim=(2, 3))
    hidden = stock_activation(activation)(F.linear(pooled, w_reduce.flatten(1), b_reduce))
    scale = STOCK_GATES[gate]()(F.linear(hidden, w_expand.flatten(1), b_expand))
    return x64 * scale[:, :, None, None]
