"""PyTorch's conv2d with the activation applied in place on its fresh output: the reference backend's depthwise
path and ConvBNAct's folded conv (no second tensor is written for the activation)."""
import torch.nn.functional as F

from . import activations


def prepare_conv2d_act(weight, bias, stride, padding, dilation, groups: int, activation: str):
    """x -> activation(conv2d(x, weight, bias, ...)); padding [top, bottom, left, right] (asymmetric: x padded
    first)."""
    top, bottom, left, right = padding
    activate = activations.in_place(activation)
    if (top, left) == (bottom, right):
        return lambda x: activate(F.conv2d(x, weight, bias, stride, [top, left], dilation, groups))
    return lambda x: activate(F.conv2d(F.pad(x, [left, right, top, bottom]), weight, bias, stride, 0, dilation, groups))


def conv2d_act(x, weight, bias, stride, padding, dilation, groups: int, activation: str):
    """activation(conv2d(x, weight, bias, ...)) (see prepare_conv2d_act)."""
    return prepare_conv2d_act(weight, bias, stride, padding, dilation, groups, activation)(x)
