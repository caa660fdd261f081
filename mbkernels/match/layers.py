"""What a module tree says about single layers: depthwise convs and the checks that they can be fused, BatchNorms
that can be folded, activation modules (recognised numerically, mbkernels.activations), and what runs after a child in
a plain Sequential. Never by class or model names: by module types PyTorch defines and by which classes override
forward.
"""

from typing import Optional

from torch import nn

from .. import activations
from .padding import overrides_forward, static_padding


def is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and not overrides_forward(module, nn.Sequential)


def is_depthwise(module: nn.Module) -> bool:
    """A Conv2d with one group per input channel (any depth multiplier), more than one channel."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1


def check_depthwise(conv: nn.Module) -> None:
    """Raise ValueError naming what keeps `conv` from being a fusable depthwise conv."""
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if not (conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0):
        raise ValueError(
            f"conv is not depthwise: groups={conv.groups}, in_channels={conv.in_channels}, "
            f"out_channels={conv.out_channels} (groups must equal in_channels, and out_channels be a multiple of it)"
        )
    check_conv_forward(conv, "fused")


def check_conv_forward(conv: nn.Module, done: str) -> None:
    """Raise ValueError when conv pads other than with zeros, or its forward computes no zero-padded conv of its
    weights (see static_padding); `done` says what would be done with it ("fused", "folded")."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; only zero padding is {done}")
    static_padding(conv)


def carried_activation(bn: nn.Module) -> Optional[nn.Module]:
    """The activation a norm-plus-activation module applies after normalising (timm's BatchNormAct2d: bn.act,
    after bn.drop, which is an identity in eval mode), or None for a plain BatchNorm2d."""
    if isinstance(bn, nn.BatchNorm2d) and overrides_forward(bn, nn.BatchNorm2d):
        act = getattr(bn, "act", None)
        return act if isinstance(act, nn.Module) else None
    return None


def check_norm(bn: nn.Module) -> None:
    """Raise ValueError naming what keeps `bn` from being folded into the conv."""
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"expected an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False): it normalises with "
            "batch statistics and cannot be folded"
        )
    if overrides_forward(bn, nn.BatchNorm2d) and carried_activation(bn) is None:
        raise ValueError(
            f"{type(bn).__name__} overrides BatchNorm2d.forward without an `act` module; "
            "what it computes after normalising is unknown"
        )


def activation_name(act: Optional[nn.Module]) -> str:
    """The fused-op spec of a stock or hand-written activation module (None or nn.Identity: 'identity')."""
    if act is None:
        return "identity"
    name = activations.identify_activation(act)
    if name is None:
        raise ValueError(
            f"activation {type(act).__name__} has no fused kernel; supported: {', '.join(activations.ACTIVATIONS)}"
        )
    return name


def fused_activation(bn: Optional[nn.Module], act: Optional[nn.Module]) -> str:
    """The one activation spec applied after a conv's norm: the norm's own (BatchNormAct2d) or the next module's."""
    names = [activation_name(m) for m in (carried_activation(bn) if bn is not None else None, act)]
    applied = [n for n in names if n != "identity"]
    if len(applied) > 1:
        raise ValueError(f"two activations follow the norm ({' then '.join(applied)}); only one is fused")
    return applied[0] if applied else "identity"


def is_activation_module(module: nn.Module) -> bool:
    """A parameter-free module from an activations module (torch.nn's, timm's): an activation we may lack."""
    origin = type(module).__module__
    stateless = next(module.parameters(), None) is None and next(module.children(), None) is None
    return stateless and ("activation" in origin) and not isinstance(module, nn.Identity)


def following(children: list, i: int) -> list:
    """(slot, module) of what follows children[i] in the parent, a plain Sequential that starts with a BatchNorm
    (conv -> Sequential(BN, act)) opened into its children ("5.0", "5.1")."""
    found = []
    for name, child in children[i + 1:]:
        if is_plain_sequential(child) and isinstance(next(child.children(), None), nn.BatchNorm2d):
            found += [(f"{name}.{inner}", m) for inner, m in child.named_children()]
        else:
            found.append((name, child))
    return found
