"""The zero padding a Conv2d computes, as the [top, bottom, left, right] the ops take: its own attributes, or, for
a subclass that overrides forward (timm's Conv2dSame, a package's static 'SAME' conv), what its forward computes on
probes (never its class or name); TensorFlow 'SAME' computed from the input's size at every call is told apart.
"""
import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def tf_same_padding(size: tuple, conv: nn.Conv2d) -> list[int]:
    """[top, bottom, left, right] that TensorFlow 'SAME' (timm's pad_same) gives an input plane of `size`: the
    total that makes the output ceil(size / stride), its odd pixel at the bottom / right."""
    padding = []
    for length, k, s, d in zip(size, conv.kernel_size, conv.stride, conv.dilation):
        # (ceil(length / s) - 1) * s + (k - 1) * d + 1 - length depends on length % s alone. Found by comparison,
        # the remainder is a plain int even for a symbolic length (torch.compile, dynamic shapes: a guard on it).
        remainder = next(r for r in range(s) if length % s == r)
        total = max((s - remainder) % s - s + (k - 1) * d + 1, 0)
        padding += [total // 2, total - total // 2]
    return padding


def attribute_padding(conv: nn.Conv2d) -> list[int]:
    """nn.Conv2d's own zero padding, from its attributes, as [top, bottom, left, right]."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        # PyTorch's 'same' (stride 1 only): the odd pixel of an even total goes at the bottom / right.
        padding = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            padding += [total // 2, total - total // 2]
        return padding
    return [conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1]]


def static_padding(conv: nn.Conv2d) -> Optional[list[int]]:
    """conv's zero padding as the [top, bottom, left, right] the ops take, or None when it is TensorFlow 'SAME'
    computed from the input's size at every call (see tf_same_padding). nn.Conv2d's own forward pads by its
    attributes; a subclass that overrides forward is recognised by what it computes (identify_padding);
    ValueError when it computes no zero-padded conv of its weights."""
    if not overrides_forward(conv, nn.Conv2d):
        return attribute_padding(conv)
    return identify_padding(conv)


# a conv's configuration (see _configuration) -> its identified padding (a tuple, or "same"), or the ValueError
# message: the planner asks for every copy it probes, and models repeat a few configurations many times
_IDENTIFIED = {}
_IDENTIFY_TOLERANCE = 1e-9  # float64: the same conv of the same weights agrees to rounding
_TF_SAME = "same"


def identify_padding(conv: nn.Conv2d) -> Optional[list[int]]:
    """The padding a Conv2d subclass with its own forward applies, found on float64 probes of several sizes (every
    remainder of the stride): its attributes' padding (a forward that adds nothing), a zero-padding child's padding
    plus that (efficientnet_pytorch's Conv2dStaticSamePadding: a ZeroPad2d fixed at construction), or TensorFlow
    'SAME' (timm's Conv2dSame, efficientnet_pytorch's Conv2dDynamicSamePadding; a plain list at stride 1, where it
    does not depend on the size). ValueError when it computes none of them (e.g. standardised weights)."""
    key = _configuration(conv)
    known = _IDENTIFIED.get(key)
    if known is None:
        known = _IDENTIFIED[key] = _identify_padding(conv)
    if isinstance(known, ValueError):
        raise ValueError(str(known))
    return None if known == _TF_SAME else list(known)


def _configuration(module: nn.Module) -> tuple:
    """What a module's forward may depend on besides its tensors: its class and its plain attributes, and those of
    its submodules (a ZeroPad2d's padding)."""
    settings = tuple(sorted((name, value) for name, value in vars(module).items()
                            if isinstance(value, (bool, int, float, str, tuple)) and not name.startswith("_")))
    return (type(module), settings, tuple(_configuration(child) for child in module.children()))


@torch.no_grad()
def _identify_padding(conv: nn.Conv2d):
    own = attribute_padding(conv)
    candidates = [own]
    pads = [m for m in conv.modules() if isinstance(m, nn.ConstantPad2d) and float(m.value) == 0.0]
    if len(pads) == 1:
        left, right, top, bottom = pads[0].padding
        candidates.append([own[0] + top, own[1] + bottom, own[2] + left, own[3] + right])
    candidates.append(_TF_SAME)
    probe = copy.deepcopy(conv).to(device="cpu", dtype=torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    reach = [d * (k - 1) + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    sizes = [(reach[0] + 2 * conv.stride[0] + i, reach[1] + 2 * conv.stride[1] + i + 1)
             for i in range(max(conv.stride) + 1)]
    inputs = [torch.randn(1, conv.in_channels, h, w, dtype=torch.float64, generator=generator) for h, w in sizes]
    try:
        outputs = [probe(x) for x in inputs]
    except Exception as error:  # whatever the forward raises: nothing we can stand in for
        return ValueError(f"conv is a {type(conv).__name__} whose forward fails on a probe: {type(error).__name__}: "
                          f"{error}")
    for candidate in candidates:
        matches = True
        for x, out in zip(inputs, outputs):
            top, bottom, left, right = tf_same_padding(x.shape[2:], conv) if candidate == _TF_SAME else candidate
            want = F.conv2d(F.pad(x, [left, right, top, bottom]), probe.weight, probe.bias, conv.stride, 0,
                            conv.dilation, conv.groups)
            if not (isinstance(out, torch.Tensor) and out.shape == want.shape and (out - want).abs().max()
                    <= _IDENTIFY_TOLERANCE * want.abs().max().clamp_min(1e-30)):
                matches = False
                break
        if matches:
            if candidate == _TF_SAME and tuple(conv.stride) == (1, 1):
                return tuple(tf_same_padding(sizes[0], conv))  # at stride 1 the same at every size
            return candidate if candidate == _TF_SAME else tuple(candidate)
    return ValueError(f"conv is a {type(conv).__name__}, whose forward differs from nn.Conv2d's and computes no "
                      f"zero-padded conv of its weights on probes (neither its own padding, a zero-padding module "
                      f"before it, nor TensorFlow 'SAME')")
