"""Every distinct depthwise conv + BN + act and squeeze-excite shape of the benchmarked models.

Found by running each timm model once on a 224x224 input with forward hooks, never written by hand.
`python -m benchmarks.shapes` regenerates layer_shapes.json; the benchmarks read that file, so they need
neither timm's model walk nor its exact version at run time.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from mbkernels.activations import identify_activation, identify_gate

MODELS = ("mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0")
IMAGE_SIZE = 224
SHAPES_FILE = Path(__file__).with_name("layer_shapes.json")


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def _is_squeeze_excite(module: nn.Module) -> bool:
    """timm's SqueezeExcite (MobileNetV3, EfficientNet)."""
    return all(hasattr(module, name) for name in ("conv_reduce", "act1", "conv_expand", "gate"))


def _activation_after(calls: list, index: int) -> str:
    """The activation that follows the BN at calls[index]: the BN's own (timm's BatchNormAct2d) or the next call."""
    bn = calls[index][0]
    if hasattr(bn, "act"):
        act = bn.act
    elif index + 1 < len(calls):
        act = calls[index + 1][0]
    else:
        act = nn.Identity()
    name = identify_activation(act)
    if name is None:
        raise ValueError(f"no fused activation computes {type(act).__name__} (after {type(bn).__name__})")
    return name


def walk_model(model: nn.Module, image_size: int = IMAGE_SIZE) -> tuple[list, list]:
    """(depthwise layers, squeeze-excite layers) in execution order, as dicts of their shapes."""
    calls = []  # (module, input shape) in the order the modules were entered
    hooks = [
        m.register_forward_pre_hook(lambda mod, inputs: calls.append((mod, tuple(inputs[0].shape))))
        for m in model.modules()
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    dwconvs, squeeze_excites = [], []
    for i, (module, shape) in enumerate(calls):
        if _is_depthwise(module):
            bn_index = i + 1
            if bn_index >= len(calls) or not isinstance(calls[bn_index][0], nn.BatchNorm2d):
                raise ValueError(f"depthwise conv {module} is not followed by a BatchNorm2d")
            dwconvs.append({
                "channels": module.in_channels, "height": shape[2], "width": shape[3],
                "kernel": list(module.kernel_size), "stride": list(module.stride),
                "padding": list(module.padding), "dilation": list(module.dilation),
                "activation": _activation_after(calls, bn_index),
            })
        elif _is_squeeze_excite(module):
            activation, gate = identify_activation(module.act1), identify_gate(module.gate)
            if activation is None or gate is None:
                raise ValueError(f"no fused squeeze-excite computes {module.act1} / {module.gate}")
            squeeze_excites.append({
                "channels": shape[1], "height": shape[2], "width": shape[3],
                "reduced": module.conv_reduce.out_channels, "activation": activation, "gate": gate,
            })
    return dwconvs, squeeze_excites


def _merge(distinct: dict, layers: list, model_name: str) -> None:
    for layer in layers:
        key = json.dumps(layer, sort_keys=True)
        entry = distinct.setdefault(key, dict(layer, models=[]))
        if model_name not in entry["models"]:
            entry["models"].append(model_name)


def distinct_shapes(model_names=MODELS) -> dict:
    import timm

    dwconvs, squeeze_excites = {}, {}
    for name in model_names:
        dw, se = walk_model(timm.create_model(name, pretrained=False))
        _merge(dwconvs, dw, name)
        _merge(squeeze_excites, se, name)
    return {"image_size": IMAGE_SIZE, "models": list(model_names),
            "dwconv_bn_act": list(dwconvs.values()), "squeeze_excite": list(squeeze_excites.values())}


def load_shapes(path: Path = SHAPES_FILE) -> dict:
    return json.loads(path.read_text())


def _dumps(shapes: dict) -> str:
    """JSON with one layer per line."""
    parts = []
    for key, value in shapes.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ",\n".join(f"  {json.dumps(entry)}" for entry in value)
            parts.append(f"{json.dumps(key)}: [\n{rows}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def main() -> int:
    shapes = distinct_shapes()
    SHAPES_FILE.write_text(_dumps(shapes))
    print(f"{SHAPES_FILE}: {len(shapes['dwconv_bn_act'])} depthwise and "
          f"{len(shapes['squeeze_excite'])} squeeze-excite shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
