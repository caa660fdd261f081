"""The stock models the main command (python -m mbkernels) and the server (mbkernels.serve) build, by name."""
import torch

from .match import randomize_batchnorm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


PREFIXES = ("timm", "tv", "torchvision", "efficientnet_pytorch")


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A timm ("timm:NAME"), torchvision ("tv:NAME") or efficientnet_pytorch ("efficientnet_pytorch:efficientnet-b0")
    model, or NAME looked up in timm then torchvision; random weights, random BatchNorm statistics, eval mode. A name
    no library knows raises ValueError."""
    source, _, model_name = name.rpartition(":")
    torch.manual_seed(seed)
    if source not in ("",) + PREFIXES:
        raise ValueError(f"model {name!r}: prefix must be one of {', '.join(p + ':' for p in PREFIXES)}")
    model = None
    if source == "efficientnet_pytorch":
        from efficientnet_pytorch import EfficientNet
        try:
            model = EfficientNet.from_name(model_name)
        except ValueError as error:
            raise ValueError(f"model {name!r}: {error}") from None
    if model is None and source in ("", "timm"):
        import timm
        if timm.is_model(model_name):
            model = timm.create_model(model_name, pretrained=False)
        elif source == "timm":
            raise ValueError(f"model {name!r}: timm has no model {model_name!r}")
    if model is None:
        import torchvision
        if model_name not in torchvision.models.list_models():
            raise ValueError(f"model {name!r}: neither timm nor torchvision has a model {model_name!r}")
        model = torchvision.models.get_model(model_name, weights=None)
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed)).eval()
