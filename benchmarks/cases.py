"""What is measured: layer and model cases, their names, the bytes each layer must move, and the matrix.

The full matrix is every layer shape of layer_shapes.json and every model at batch 1, 32 and 256, in float32
NCHW and float16 channels_last. MBKERNELS_BENCH_QUICK=1 keeps the headline configurations only (see QUICK_*).
Cases are ordered by `priority` so a run that meets its time budget has measured the most telling ones first.
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .shapes import load_shapes

BATCHES = (1, 32, 256)
# (dtype, channels_last) pairs: float32 in the default layout, float16 in the layout fast fp16 convs want.
FORMATS = ((torch.float32, False), (torch.float16, True))
MODELS = ("mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0")
MODEL_IMAGE_SIZE = 224

# The reduced matrix: layers at the batch where the bandwidth targets apply; models at the two batches
# that carry targets (throughput at 256 first: the headline configuration; CUDA-graph latency at 1).
QUICK_LAYER_CONFIGS = ((256, torch.float16, True),)
HEADLINE_MODEL_CONFIG = (256, torch.float16, True)
QUICK_MODEL_CONFIGS = (HEADLINE_MODEL_CONFIG, (1, torch.float16, True))

WEIGHT_BYTES = 4  # the fused ops read float32 folded weights whatever x's dtype
BANDWIDTH_TARGET_MIN_BYTES = 16 * 2**20  # the bandwidth target applies to layers whose input exceeds this

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def quick() -> bool:
    return os.environ.get("MBKERNELS_BENCH_QUICK", "0") not in ("", "0")


def layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "NCHW"


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def dwconv_bytes(batch: int, channels: int, height: int, width: int, kernel, stride, padding, dilation,
                 element_size: int) -> int:
    """Bytes a depthwise conv + BN + act must move at least: x read once, y written once, and the folded
    float32 weight [C, 1, kh, kw] and bias [C] read once."""
    out_h = conv_output_size(height, kernel[0], stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kernel[1], stride[1], padding[1], dilation[1])
    activations = batch * channels * (height * width + out_h * out_w) * element_size
    return activations + channels * (kernel[0] * kernel[1] + 1) * WEIGHT_BYTES


def squeeze_excite_bytes(batch: int, channels: int, height: int, width: int, reduced: int,
                         element_size: int) -> int:
    """Bytes a squeeze-excite must move at least: x read once, y (x's shape) written once, and the float32
    w_reduce [R, C], b_reduce [R], w_expand [C, R], b_expand [C] read once."""
    activations = 2 * batch * channels * height * width * element_size
    return activations + (2 * reduced * channels + reduced + channels) * WEIGHT_BYTES


def priority(batch: int, dtype: torch.dtype, channels_last: bool, headline_configs) -> int:
    """0 for the headline configurations (the quick matrix), 1 for the rest of the full matrix."""
    return 0 if (batch, dtype, channels_last) in headline_configs else 1


@dataclass(frozen=True)
class LayerCase:
    op: str  # "dwconv_bn_act" or "squeeze_excite"
    shape: tuple  # the layer_shapes.json entry as sorted (key, value) pairs, lists as tuples
    batch: int
    dtype: torch.dtype
    channels_last: bool
    priority: int = 0

    def get(self, key):
        return dict(self.shape)[key]

    @property
    def input_shape(self) -> tuple:
        return (self.batch, self.get("channels"), self.get("height"), self.get("width"))

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_shape) * self.element_size

    @property
    def bytes_moved(self) -> int:
        g = self.get
        if self.op == "dwconv_bn_act":
            return dwconv_bytes(self.batch, g("channels"), g("height"), g("width"), g("kernel"), g("stride"),
                                g("padding"), g("dilation"), self.element_size)
        return squeeze_excite_bytes(self.batch, g("channels"), g("height"), g("width"), g("reduced"),
                                    self.element_size)

    @property
    def layer_name(self) -> str:
        g = self.get
        if self.op == "dwconv_bn_act":
            (kh, kw), (sh, sw), (dh, dw) = g("kernel"), g("stride"), g("dilation")
            stride = f"s{sh}" if sh == sw else f"s{sh}x{sw}"
            dilation = "" if (dh, dw) == (1, 1) else f" d{dh}x{dw}"
            return f"dwconv {kh}x{kw} {stride}{dilation} c{g('channels')} {g('height')}x{g('width')} {g('activation')}"
        return (f"se c{g('channels')} r{g('reduced')} {g('height')}x{g('width')} "
                f"{g('activation')}/{g('gate')}")

    @property
    def label(self) -> str:
        """The readable case name the results and the report group providers by."""
        return (f"{self.layer_name}, batch {self.batch}, {DTYPE_NAMES[self.dtype]} "
                f"{layout_name(self.channels_last)}")

    @property
    def test_id(self) -> str:
        return f"{self.layer_name.replace(' ', '-').replace('/', '-')}-b{self.batch}-{DTYPE_SHORT[self.dtype]}" + (
            "-cl" if self.channels_last else "")


@dataclass(frozen=True)
class ModelCase:
    model: str
    batch: int
    dtype: torch.dtype
    channels_last: bool
    image_size: int = MODEL_IMAGE_SIZE
    priority: int = 0

    @property
    def input_shape(self) -> tuple:
        return (self.batch, 3, self.image_size, self.image_size)

    @property
    def input_bytes(self) -> int:
        return math.prod(self.input_shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        size = "" if self.image_size == MODEL_IMAGE_SIZE else f" {self.image_size}x{self.image_size}"
        return (f"{self.model}{size}, batch {self.batch}, {DTYPE_NAMES[self.dtype]} "
                f"{layout_name(self.channels_last)}")

    @property
    def test_id(self) -> str:
        size = "" if self.image_size == MODEL_IMAGE_SIZE else f"-{self.image_size}px"
        return f"{self.model}{size}-b{self.batch}-{DTYPE_SHORT[self.dtype]}" + ("-cl" if self.channels_last else "")


def _frozen(entry: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in entry.items() if k != "models"))


def _configs(quick_configs) -> list:
    if quick():
        return list(quick_configs)
    return [(batch, dtype, cl) for dtype, cl in FORMATS for batch in BATCHES]


def layer_cases(op: str) -> list:
    """The GPU matrix for one op, headline configurations first."""
    shapes = load_shapes()[op]
    cases = [
        LayerCase(op, _frozen(entry), batch, dtype, cl, priority(batch, dtype, cl, QUICK_LAYER_CONFIGS))
        for batch, dtype, cl in _configs(QUICK_LAYER_CONFIGS)
        for entry in shapes
    ]
    return sorted(cases, key=lambda case: case.priority)


def model_cases() -> list:
    cases = [
        ModelCase(model, batch, dtype, cl, priority=priority(batch, dtype, cl, QUICK_MODEL_CONFIGS))
        for batch, dtype, cl in _configs(QUICK_MODEL_CONFIGS)
        for model in MODELS
    ]
    return sorted(cases, key=lambda case: case.priority)


def smoke_layer_cases(op: str, count: int, batch: int = 2) -> list:
    """A few small CPU cases in both formats: the `count` smallest shapes, one per (kernel, stride)."""
    entries, seen = [], set()
    for entry in sorted(load_shapes()[op], key=lambda e: e["channels"] * e["height"] * e["width"]):
        key = (tuple(entry.get("kernel", ())), tuple(entry.get("stride", ())), entry["channels"])
        key = key[:2] if op == "dwconv_bn_act" else key
        if key not in seen and len(entries) < count:
            seen.add(key)
            entries.append(entry)
    return [LayerCase(op, _frozen(entry), batch, dtype, cl) for dtype, cl in FORMATS for entry in entries]


SMOKE_MODEL_CASE = ModelCase("mobilenetv3_small_100", batch=2, dtype=torch.float32, channels_last=False,
                             image_size=64)


def compile_mode(case) -> Optional[str]:
    """The torch.compile mode of the `compile` and `patched+compile` providers for a case (None: default).

    The full matrix compiles layers, and models in the headline configuration, with max-autotune-no-cudagraphs
    (the strongest compiled baseline without CUDA graphs). Autotuning every conv of a model takes minutes, so
    other model configurations, and the quick matrix throughout, compile in the default mode. The mode goes
    into every record and the report. MBKERNELS_BENCH_COMPILE_MODE ("default" for None) overrides all.
    """
    override = os.environ.get("MBKERNELS_BENCH_COMPILE_MODE")
    if override:
        return None if override == "default" else override
    if quick():
        return None
    if isinstance(case, ModelCase) and (case.batch, case.dtype, case.channels_last) != HEADLINE_MODEL_CONFIG:
        return None
    return "max-autotune-no-cudagraphs"
