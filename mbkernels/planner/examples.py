"""The example inputs of a tuned patch: checked as calls of the model (device, dtype, accepted by its stock forward,
whose outputs are kept as the whole-model proof's reference), and what each fused module receives in the model's
forward on them (the inputs each candidate is timed at).
"""
import json
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..match.probe import eval_mode
from ..nn.fused import tuning_key


@dataclass
class Calls:
    """The example calls of patch(model, example_inputs=...): their arguments, checked against the model, and what
    the stock model returned for each (the whole-model proof's reference)."""
    calls: list  # [args]
    device: torch.device
    outputs: list


def example_calls(model: nn.Module, example_inputs) -> Calls:
    """The example inputs as calls of model (a tensor, a tuple of a call's arguments, or a list of either, e.g. one
    per batch size served), checked before anything is timed: on the model's device, in the dtype of its weights,
    and accepted by its stock forward; ValueError saying what does not fit. A call's arguments may hold tensors in
    lists, tuples or dicts (torchvision's detection models take a list of images: example_inputs=([image],))."""
    if isinstance(example_inputs, list):
        calls = [x if isinstance(x, tuple) else (x,) for x in example_inputs]
    else:
        calls = [example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)]
    if not calls:
        raise ValueError("example_inputs is an empty list")
    weights = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    devices = {t.device for t in weights}
    dtypes = {t.dtype for t in weights if t.is_floating_point()}
    for call in calls:
        tensors = [v for v in pytree.tree_leaves(call) if isinstance(v, torch.Tensor)]
        if not tensors:
            raise ValueError(f"example_inputs hold no tensor ({', '.join(type(v).__name__ for v in call)})")
        for t in tensors:
            if len(devices) == 1 and t.device not in devices:
                raise ValueError(f"an example input is on {t.device} but the model's weights are on "
                                 f"{next(iter(devices))}; give inputs on the device the model runs on")
            if t.is_floating_point() and len(dtypes) == 1 and t.dtype not in dtypes:
                raise ValueError(f"an example input is {_dtype_name(t.dtype)} but the model's weights are "
                                 f"{_dtype_name(next(iter(dtypes)))}; give inputs in the dtype the model runs (or "
                                 f"convert the model first)")
    outputs = []
    with eval_mode(model), torch.no_grad():
        for call in calls:
            try:
                outputs.append(model(*call))
            except Exception as error:  # whatever the forward says: these are not this model's inputs
                shapes = ", ".join(json.dumps(arguments) for arguments in shapes_of(call))
                raise ValueError(f"example_inputs ({shapes}) cannot be the model's input: its stock forward "
                                 f"raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                                 ) from error
    device = next(t.device for t in pytree.tree_leaves(calls[0]) if isinstance(t, torch.Tensor))
    return Calls(calls, device, outputs)


def shapes_of(call: tuple) -> list:
    """A call's arguments with each tensor as its shape (a list) and anything else as its repr: JSON."""
    return [pytree.tree_map(lambda v: list(v.shape) if isinstance(v, torch.Tensor) else repr(v), argument)
            for argument in call]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Seen:
    """An input signature a module was called with in the example forward: one tensor of it to time with."""
    key: tuple
    meta: torch.Tensor  # an empty tensor with the input's shape, strides, dtype and device


def record_inputs(model: nn.Module, modules: list, calls: Calls) -> tuple[dict, int]:
    """({module: [Seen]}, the largest activation in bytes) from the example forwards."""
    seen, largest = {module: {} for module in modules}, [0]

    def hook(module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            key = tuning_key(x)
            seen[module].setdefault(key, Seen(key, torch.empty_strided(x.shape, x.stride(), dtype=x.dtype,
                                                                       device=x.device)))
            largest[0] = max(largest[0], x.numel() * x.element_size())

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        with eval_mode(model), torch.no_grad():
            for call in calls.calls:
                model(*call)
    finally:
        for handle in handles:
            handle.remove()
    return {module: list(found.values()) for module, found in seen.items()}, largest[0]
