"""The block cost model: block fusion or layer fusion for one inverted-residual block, from estimates (used when
no example input lets the planner measure, see mbkernels.planner.tuning).

Per input pixel in float16 on the GPU the kernels aim at (an H200): block fusion saves the HBM bytes of the
expanded activations (nn.InvertedResidual.traffic: layers minus block) at the copy bandwidth, and pays for what its
small tiles re-read from L2 (every tile reads all weights: the Triton launcher's l2_reads) and for the expand conv
it recomputes over tile halos (expand_recompute). A block the Triton kernel declines (its limit: registers, shared
memory), or that a named backend cannot run, gets layer fusion. The L2 and tensor-core rates are assumptions.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .. import dispatch
from ..backends import get as get_backend
from ..nn.inverted_residual import InvertedResidual

# bytes/s: device-to-device copy on an H200 (bytes read + written), measured with torch's tensor copy.
BANDWIDTH = 4.3e12
L2_BANDWIDTH = 1e13  # bytes/s: assumed, about 2.3x HBM's
TENSOR_FLOPS = 2e14  # FLOP/s: assumed, 20% of H200's dense fp16 peak for these small dots
PLANE = 28  # the input plane of the estimate: bytes and FLOPs both scale with it, the choice barely does


@dataclass
class BlockDecision:
    """The planner's choice for one inverted-residual block: block fusion or layer fusion, from the cost model's
    estimates per input pixel in float16, or from measurements (tuned patches)."""
    path: str
    shape: str
    plan: str  # "block" or "layers"
    block_bytes: float  # HBM bytes per input pixel, block fusion
    layer_bytes: float  # the same, layer fusion
    recompute: float  # the expand conv's work on the GPU tiles over its ideal (halo recompute)
    reason: str = ""  # why layers, where chosen


def on_gpu(fused: InvertedResidual) -> bool:
    return any(t.is_cuda for t in fused.stock.parameters())


def decide(fused: InvertedResidual, path: str, backend: Optional[str], every_block: bool) -> BlockDecision:
    """Block or layer fusion for `fused` (every_block: block fusion wherever the Triton kernel takes the block)."""
    parts, modules = fused.parts, fused.part_modules
    dw = modules[parts.dw_conv]
    channels = modules[parts.expand_conv].in_channels if parts.expand_conv else dw.in_channels
    pixels = PLANE * PLANE
    shape = (1, channels, PLANE, PLANE)
    bytes_moved = fused.traffic(shape, element_size=2)
    block, layers = bytes_moved["block"] / pixels, bytes_moved["layers"] / pixels

    def planned(plan: str, recompute: float = 1.0, reason: str = "") -> BlockDecision:
        return BlockDecision(path, fused.shape, plan, block, layers, recompute, reason)

    named = dispatch.requested_backend(backend)
    if named is not None and "inverted_residual" not in get_backend(named).ops:
        return planned("layers", reason=f"the {named} backend has no inverted_residual kernel")
    try:
        from ..backends.triton import inverted_residual as triton_block
    except ImportError:  # no triton here: nothing recomputes halos, the reference backend runs the block
        return planned("block")
    args = fused.bundle(torch.empty(shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last))
    recompute = triton_block.expand_recompute(args)
    declined = triton_block.limit(args, interpreter=False)
    if declined is not None:
        return planned("layers", recompute, f"the Triton block kernel declines it: {declined}")
    if every_block:
        return planned("block", recompute, "blocks='all'")
    if not on_gpu(fused):
        # The cost model is the GPU's; on the CPU the reference backend runs a block as the very convs of layer
        # fusion, with more Python per call.
        return planned("layers", recompute,
                       "a CPU model: block fusion saves nothing there (patch after .cuda() for the GPU plan)")
    expand_flops = 2 * channels * dw.in_channels if parts.expand_conv else 0  # per input pixel
    saved_s = (layers - block) / BANDWIDTH
    l2_s = triton_block.l2_reads(args) / L2_BANDWIDTH
    recompute_s = expand_flops * (recompute - 1) / TENSOR_FLOPS
    if saved_s <= l2_s + recompute_s:
        return planned("layers", recompute,
                       f"the tiles' L2 re-reads ({l2_s * 1e12:.0f} ps/px) and halo recompute "
                       f"({recompute_s * 1e12:.0f} ps/px) cost more than the HBM bytes block fusion "
                       f"saves ({saved_s * 1e12:.0f} ps/px)")
    return planned("block", recompute)
