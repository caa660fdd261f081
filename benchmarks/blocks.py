"""Whole-block cases and the traffic model: bytes per forward under compile's plan, layer fusion, block fusion.

    python -m benchmarks.blocks [--batch 256] [--dtype float16] [--image-size 224]

prints, per model, the bytes that must cross HBM in one forward under each plan and the floor they set at the
H200's measured copy bandwidth. The block plan counts only what the block kernels must move (x in, y out, the
depthwise output once each way around an SE); halo re-reads hit L2 and are not counted. Layers outside the
blocks (the stem, the head) move the same bytes under every plan: their inputs and outputs, once.
Per-block benchmark cases (benchmarks/test_blocks.py) are every distinct block of the models at batch 1, 32
and 256, with the block plan's bytes as the bytes moved.
"""
import argparse
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .cases import BATCHES, DTYPE_NAMES, DTYPE_SHORT, FORMATS, MODEL_IMAGE_SIZE, MODELS, layout_name, priority, quick
from .static import COPY_BANDWIDTH  # the H200's measured copy bandwidth, bytes/s

PLANS = ("compile", "layers", "block")
QUICK_BLOCK_CONFIGS = ((256, torch.float16, True),)


@functools.lru_cache(maxsize=None)
def model_blocks(model_name: str, image_size: int = MODEL_IMAGE_SIZE) -> tuple:
    """The stock timm model (random weights and BN statistics, eval mode, float32 CPU), and (path, fused
    InvertedResidual, input shape [C, H, W]) of every block it holds, innermost match first."""
    import timm

    from mbkernels.nn import InvertedResidual
    from mbkernels.match import randomize_batchnorm

    model = randomize_batchnorm(timm.create_model(model_name).eval(), torch.Generator().manual_seed(0))
    found, shapes = [], {}
    for path, module in model.named_modules():
        try:
            fused = InvertedResidual.from_module(module)
        except ValueError:
            continue
        if found and path.startswith(found[-1][0] + "."):
            found.pop()  # a container holding just one block matches too: keep the block itself
        found.append((path, fused))
    hooks = [model.get_submodule(path).register_forward_pre_hook(
        lambda m, inputs, path=path: shapes.__setitem__(path, tuple(inputs[0].shape[1:]))) for path, _ in found]
    outside = _outside_layers(model, {path for path, _ in found})
    with torch.no_grad():
        model(torch.randn(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return model, tuple((path, fused, shapes[path]) for path, fused in found), outside


def _outside_layers(model: nn.Module, block_paths: set) -> list:
    """[(elements in, elements out, weights)] of every conv and linear layer outside the blocks, per image, filled
    by hooks on the next forward."""
    sizes = []
    for path, module in model.named_modules():
        inside = any(path == block or path.startswith(block + ".") for block in block_paths)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not inside:
            weights = sum(p.numel() for p in module.parameters())
            module.register_forward_hook(lambda m, inputs, out, weights=weights: sizes.append(
                (inputs[0][0].numel(), out[0].numel(), weights)) and None)
    return sizes


def traffic(model_name: str, batch: int, element_size: int, image_size: int = MODEL_IMAGE_SIZE) -> dict:
    """Bytes per forward under each plan: {plan: bytes}, plus 'outside' (the same in every plan)."""
    _, blocks, outside = model_blocks(model_name, image_size)
    totals = dict.fromkeys(PLANS, 0)
    for _, fused, shape in blocks:
        for plan, nbytes in fused.traffic((batch, *shape), element_size).items():
            totals[plan] += nbytes
    outside_bytes = sum(batch * (a + b) * element_size + w * element_size for a, b, w in outside)
    return {**{plan: totals[plan] + outside_bytes for plan in PLANS}, "outside": outside_bytes}


def traffic_table(models=MODELS, batch: int = 256, dtype: torch.dtype = torch.float16,
                  image_size: int = MODEL_IMAGE_SIZE) -> str:
    element_size = torch.empty((), dtype=dtype).element_size()
    rows = [("model", *(f"{plan} GB" for plan in PLANS), "compile/block", *(f"{plan} floor ms" for plan in PLANS))]
    for model in models:
        t = traffic(model, batch, element_size, image_size)
        rows.append((model, *(f"{t[plan] / 1e9:.2f}" for plan in PLANS), f"{t['compile'] / t['block']:.2f}x",
                     *(f"{t[plan] / COPY_BANDWIDTH * 1e3:.3f}" for plan in PLANS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    title = (f"bytes per forward, batch {batch}, {DTYPE_NAMES[dtype]}, {image_size}x{image_size}; floor at "
             f"{COPY_BANDWIDTH / 1e9:.0f} GB/s (H200 copy)")
    return "\n".join([title] + ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows])


# ------------------------------------------------------------------------------------- benchmark cases
@dataclass(frozen=True)
class BlockCase:
    model: str
    path: str  # the block's path in the model ("blocks.2.1")
    shape: str  # the fused module's shape ("C=40 E=120 O=40 k5x5 s1 se +x")
    plane: tuple  # the input's (H, W)
    batch: int
    dtype: torch.dtype
    channels_last: bool
    image_size: int = MODEL_IMAGE_SIZE
    priority: int = 0

    def fused(self):
        _, blocks, _ = model_blocks(self.model, self.image_size)
        return next(fused for path, fused, _ in blocks if path == self.path)

    @property
    def input_shape(self) -> tuple:
        _, blocks, _ = model_blocks(self.model, self.image_size)
        return (self.batch, *next(shape for path, _, shape in blocks if path == self.path))

    @property
    def input_bytes(self) -> int:
        n, c, h, w = self.input_shape
        return n * c * h * w * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_moved(self) -> int:
        """What the block plan must move (benchmarks compare every provider against this floor)."""
        return self.fused().traffic(self.input_shape, torch.empty((), dtype=self.dtype).element_size())["block"]

    @property
    def label(self) -> str:
        return (f"block {self.shape} {self.plane[0]}x{self.plane[1]}, batch {self.batch}, "
                f"{DTYPE_NAMES[self.dtype]} {layout_name(self.channels_last)}")

    @property
    def test_id(self) -> str:
        shape = self.shape.replace("=", "").replace(" ", "-").replace("+x", "res")
        return (f"{shape}-{self.plane[0]}x{self.plane[1]}-b{self.batch}-{DTYPE_SHORT[self.dtype]}"
                + ("-cl" if self.channels_last else ""))


def _distinct_blocks(models, image_size: int):
    """(model, path, shape, plane) of each distinct block (shape, plane and activations) of the models."""
    seen = set()
    for model in models:
        _, blocks, _ = model_blocks(model, image_size)
        for path, fused, shape in blocks:
            key = (fused.extra_repr(), shape)
            if key not in seen:
                seen.add(key)
                yield model, path, fused.shape, shape[1:]


def block_cases(models=MODELS) -> list:
    """The GPU matrix: every distinct block of the models, at batch 1, 32 and 256, float32 NCHW and float16
    channels_last (MBKERNELS_BENCH_QUICK=1: batch 256 float16 channels_last only), headline first."""
    configs = QUICK_BLOCK_CONFIGS if quick() else [(b, dtype, cl) for dtype, cl in FORMATS for b in BATCHES]
    cases = [BlockCase(model, path, shape, plane, batch, dtype, cl,
                       priority=priority(batch, dtype, cl, QUICK_BLOCK_CONFIGS))
             for model, path, shape, plane in _distinct_blocks(models, MODEL_IMAGE_SIZE)
             for batch, dtype, cl in configs]
    return sorted(cases, key=lambda case: case.priority)


def smoke_block_cases(count: int = 3, image_size: int = 64) -> list:
    """A few CPU cases from MobileNetV3-Small at a small image size: the first block with SE, the first without,
    and one with a residual, in both formats."""
    picked, wanted = [], [lambda s: " se" in s, lambda s: " se" not in s, lambda s: "+x" in s]
    candidates = list(_distinct_blocks(("mobilenetv3_small_100",), image_size))
    for want in wanted[:count]:
        picked.append(next(c for c in candidates if want(c[2]) and c not in picked))
    return [BlockCase(model, path, shape, plane, 2, dtype, cl, image_size=image_size)
            for model, path, shape, plane in picked for dtype, cl in FORMATS]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="the traffic model: bytes per forward under each plan")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), default="float16")
    parser.add_argument("--image-size", type=int, default=MODEL_IMAGE_SIZE)
    options = parser.parse_args(argv)
    print(traffic_table(batch=options.batch, dtype=getattr(torch, options.dtype), image_size=options.image_size))


if __name__ == "__main__":
    main()
