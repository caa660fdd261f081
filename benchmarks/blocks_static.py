"""Static sm_90 evidence for the block kernels, without a GPU: every Launch the Triton launcher plans for each
inverted-residual block of a model (the very configuration it would run) compiled for sm_90 with
triton.compile, then ptxas -v on its PTX: registers per thread, spill stores / loads, shared memory.

    python -m benchmarks.blocks_static [--model mobilenetv3_large_100] [--batch 256]

Run it without TRITON_INTERPRET (the launcher then plans GPU tiles). Gates: no spills, shared memory within the
sm_90 per-block limit (227 KiB), registers within 255. Exit status 1 when a configuration fails a gate.
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

import torch

SM90_SHARED_BYTES = 227 * 1024
MAX_REGISTERS = 255


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_launch(launch, target):
    """The launch compiled for target, specialised exactly as the JIT would specialise it (private Triton API:
    the binder and _pack_args; kept in this one function)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.constexprs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.constexprs, bound_args, specialization,
                                                          options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def resources(compiled) -> dict:
    """Registers, spill bytes and shared memory of a compiled kernel (ptxas -v on its PTX)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    try:
        report = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(ptx.name)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(registers=registers, spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared=int(compiled.metadata.shared))


def model_blocks(model_name: str, batch: int, dtype=torch.float16, image_size: int = 224):
    """(path, shape, BlockArgs) of every block of the timm model, at batch, channels_last."""
    from .blocks import model_blocks as blocks_of

    for path, fused, shape in blocks_of(model_name, image_size)[1]:
        x = torch.empty((batch, *shape), dtype=dtype).contiguous(memory_format=torch.channels_last)
        yield path, fused.shape, fused.bundle(x)


def report(model_name: str, batch: int, first: Optional[int] = None) -> list:
    """One row per planned launch of each block (the first `first` blocks only, when given)."""
    from triton.backends.compiler import GPUTarget

    from mbkernels.backends.triton import inverted_residual as triton_block

    target = GPUTarget("cuda", 90, 32)
    rows = []
    for path, shape, args in itertools.islice(model_blocks(model_name, batch), first):
        reason = triton_block.limit(args)
        if reason is not None:
            rows.append(dict(block=path, shape=shape, kernel="(declined)", note=reason))
            continue
        tile = triton_block.tiles(args)
        for launch in triton_block.plan(args)[1]:
            used = resources(compile_launch(launch, target))
            rows.append(dict(block=path, shape=shape, kernel=launch.kernel.__name__,
                             tile=f"{tile['TILE_H']}x{tile['TILE_W']} E{tile['BLOCK_E']} O{tile['BLOCK_O']}",
                             warps=launch.constexprs.get("num_warps", 4), **used))
    return rows


def _failures(row) -> list:
    if "registers" not in row:
        return []
    failed = []
    if row["spill_stores"] or row["spill_loads"]:
        failed.append("spills")
    if row["shared"] > SM90_SHARED_BYTES:
        failed.append("shared memory")
    if row["registers"] > MAX_REGISTERS:
        failed.append("registers")
    return failed


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the launcher must plan its GPU tiles")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--batch", type=int, default=256)
    options = parser.parse_args(argv)
    rows = report(options.model, options.batch)
    print(f"{options.model}, batch {options.batch}, float16 channels_last, sm_90 (ptxas -v)")
    header = ("block", "shape", "kernel", "tile", "warps", "regs", "spill st/ld", "smem B", "gate")
    table = [header] + [
        (r["block"], r["shape"], r["kernel"], r.get("tile", ""), str(r.get("warps", "")),
         str(r.get("registers", "")), f"{r['spill_stores']}/{r['spill_loads']}" if "registers" in r else "",
         str(r.get("shared", "")), ", ".join(_failures(r)) or ("ok" if "registers" in r else r["note"]))
        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    return 1 if any(_failures(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
