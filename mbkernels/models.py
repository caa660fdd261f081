"""The stock models the main command (python -m mbkernels) and the server (mbkernels.serve) build, by name."""
import torch

from .match import randomize_batchnorm

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A timm ("timm:NAME") or torchvision ("tv:NAME") model, or NAME looked up in timm then torchvision; random
    weights, random BatchNorm statistics, eval mode. A name neither library knows raises ValueError."""
    source, _, model_name = name.rpartition(":")
    torch.manual_seed(seed)
    if source not in ("", "timm", "tv", "torchvision"):
        raise ValueError(f"model {name!r}: prefix must be timm: or tv:")
    model = None
    if source in ("", "timm"):
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
