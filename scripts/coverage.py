"""Patch coverage of real models: per model, depthwise convs taken over / total, SE-like modules taken over / total,
what patch_report left alone or half-fused (and why), and the patched model's error against float64 stock.

    PYTHONPATH=. python scripts/coverage.py [MODEL,MODEL,...]     # default: tests/models/timm_zoo.py's MODELS

Models have random weights and random BatchNorm statistics (no download); mobileone / fastvit / repghostnet are
measured in their deployed form (timm.utils.reparameterize_model). Depthwise convs and SE-like modules are counted
by structure, independently of patch's matching. CPU, reference backend.
"""
import collections
import copy
import sys
import time

import torch
from torch import nn

import mbkernels
from tests.models.timm_zoo import MODELS, build, is_depthwise, is_se_like, taken_over

def smallest_input(model: nn.Module) -> torch.Tensor:
    """A batch-1 image of the smallest size from 64 to 256 that the model runs (for models outside MODELS)."""
    for size in (64, 96, 128, 224, 256):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # too small for this model's stages: try the next size
            continue
    raise RuntimeError("no input size from 64 to 256 runs")


def survey(name: str) -> None:
    start = time.time()
    stock = build(name)
    x = (torch.randn(1, 3, MODELS[name], MODELS[name], generator=torch.Generator().manual_seed(1))
         if name in MODELS else smallest_input(stock))
    depthwise = {m for m in stock.modules() if is_depthwise(m)}
    se_like = {m for m in stock.modules() if is_se_like(m)}
    report = mbkernels.patch_report(stock)
    model = mbkernels.patch(copy.deepcopy(stock), backend="reference")
    convs, ses = taken_over(model)
    half = [entry for entry in mbkernels.patch_report(model).fused if entry.note]
    with torch.no_grad():
        want = copy.deepcopy(stock).double()(x.double())
        scale = want.abs().max()
        error = ((model(x).double() - want).abs().max() / scale).item()
        stock_error = ((stock(x).double() - want).abs().max() / scale).item()
    print(f"{name:26s} dw {len(convs):3d}/{len(depthwise):3d}  se {len(ses):2d}/{len(se_like):2d}  "
          f"left alone {len(report.skipped):2d}  half-fused {len(half):2d}  rel err {error:.1e} "
          f"(stock float32 {stock_error:.1e})  {x.shape[-1]}px  {time.time() - start:.0f}s", flush=True)
    reasons = collections.Counter(f"left alone: {e.reason[:100]}" for e in report.skipped)
    reasons.update(f"half-fused: {e.note[:100]}" for e in half)
    for reason, count in reasons.most_common(5):
        print(f"    {count:3d}x {reason}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for model_name in (sys.argv[1].split(",") if len(sys.argv) > 1 else MODELS):
        survey(model_name)
