"""Static sm_90 evidence, no GPU needed: what each launcher's kernels cost in registers, spills, occupancy and
load widths, for every depthwise and squeeze-excite layer of benchmarks/layer_shapes.json.

    python -m benchmarks.static [--arch 9.0] [--backend triton|cuda|all] [--output FILE] [--check]

triton: each case's exact Launches (the launcher's own `plan`, on CPU stand-in tensors) are compiled ahead of
time with Triton's compiler for the target; ptxas -v reads registers and spills, cuobjdump -sass the global
load/store widths. cuda: benchmarks/static_cuda.py (the C++ launchers' plans, cuobjdump of mbkernels/_C*.so).
Compiled results are cached on disk (MBKERNELS_STATIC_CACHE, default ~/.cache/mbkernels-static), keyed by the
kernel source, its specialisation and the toolchain, so a warm CI run takes seconds.

What this proves and what it cannot: docs/triton.md.
"""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .shapes import load_shapes

BATCHES = (1, 32, 256)
# (dtype, channels_last): the configurations the benchmarks run.
FORMATS = ((torch.float16, True), (torch.bfloat16, True), (torch.float32, False))
# H200: copy bandwidth in bytes read + written per second, measured with a device-to-device tensor copy on an H200
# (`pytest benchmarks/` measures the GPU at hand the same way: timing.copy_bandwidth_gbps), and its SMs.
COPY_BANDWIDTH = 4.3e12
MULTIPROCESSORS = 132
# Per-SM limits of sm_80 / sm_90: registers, shared memory (bytes), threads, blocks.
SM_LIMITS = {80: (65536, 164 * 1024, 2048, 32), 90: (65536, 228 * 1024, 2048, 32)}
LARGE_LAYER_BYTES = 16 * 2**20
MIN_VECTOR_FRACTION = 0.75
MIN_OCCUPANCY = 0.25
ANALYSIS_VERSION = 1  # bump when what a cached record holds changes
CACHE_DIR = Path(os.environ.get("MBKERNELS_STATIC_CACHE", Path.home() / ".cache" / "mbkernels-static"))
# Kernels that read x along channels in channels_last: the 16-byte load gate applies to them.
VECTOR_GATED_KERNELS = ("_dwconv_bn_act_kernel", "_pool_kernel", "_scale_kernel")


# ------------------------------------------------------------------------------------ toolchain (one place)
def _nvidia_bin() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _tool(name: str, *args: str) -> str:
    done = subprocess.run([str(_nvidia_bin() / name), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout + done.stderr


class TritonCompiler:
    """Triton's ahead-of-time compile of one Launch, through its JIT binder so the signature, constexprs and
    divisibility attributes are exactly what a launch of those arguments would compile (private API: it changes
    between Triton versions, and this class is the one place that knows it; tested with 3.6 and 3.8)."""

    def __init__(self, capability: int):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.capability = capability
        self.target = GPUTarget("cuda", capability, 32)
        self.backend = make_backend(self.target)
        self.version = triton.__version__
        self._binders = {}

    def specialise(self, launch) -> tuple:
        """(signature, constexprs, attrs, options) of the launch."""
        from triton.runtime.jit import create_function_from_signature

        fn = launch.kernel
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        kwargs = dict(launch.constexprs)
        bound, specialization, options = self._binders[fn](*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, options)
        return signature, constexprs, attrs, options

    def key(self, launch) -> str:
        signature, constexprs, attrs, options = self.specialise(launch)
        text = repr((ANALYSIS_VERSION, self.version, self.capability, launch.kernel.cache_key,
                     sorted(signature.items()),
                     sorted((str(k), repr(v)) for k, v in constexprs.items()),
                     sorted((str(k), repr(v)) for k, v in attrs.items()), sorted(options.__dict__.items(), key=str)))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def compile(self, launch) -> dict:
        """Compile and read the kernel: resources and global load/store widths."""
        import triton
        from triton.compiler import ASTSource

        signature, constexprs, attrs, options = self.specialise(launch)
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=self.target,
                                  options=options.__dict__)
        gpu = f"sm_{self.capability}a" if self.capability == 90 else f"sm_{self.capability}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
            ptx.write_text(compiled.asm["ptx"])
            cubin.write_bytes(compiled.asm["cubin"])
            ptxas = _tool("ptxas", "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp, "v.cubin")))
            sass = _tool("cuobjdump", "-sass", str(cubin))
        registers = int(re.search(r"Used (\d+) registers", ptxas).group(1))
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
        stack = re.search(r"(\d+) bytes stack frame", ptxas)
        return dict(registers=registers, spill_bytes=int(spill.group(1)) + int(spill.group(2)) if spill else 0,
                    local_bytes=int(stack.group(1)) if stack else 0, shared_bytes=int(compiled.metadata.shared),
                    threads=32 * compiled.metadata.num_warps, **memory_instructions(sass))


def memory_instructions(sass: str) -> dict:
    """Global loads and stores by width (bytes), and the share of loads that are 16 bytes wide."""
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    loads, stores = {}, {}
    for op, suffix in re.findall(r"\b(LDG|STG)\.E((?:\.[A-Z0-9]+)*)", sass):
        parts = [p for p in suffix.split(".") if p]
        width = next((widths[p] for p in parts if p in widths), 4)
        table = loads if op == "LDG" else stores
        table[width] = table.get(width, 0) + 1
    total = sum(loads.values())
    return dict(loads_by_width={str(k): v for k, v in sorted(loads.items())},
                stores_by_width={str(k): v for k, v in sorted(stores.items())},
                vector_load_fraction=round(loads.get(16, 0) / total, 3) if total else 1.0,
                local_instructions=len(re.findall(r"\b(?:LDL|STL)\b", sass)))


def residency(capability: int, registers: int, shared: int, threads: int) -> tuple[int, float]:
    """(resident blocks per SM, occupancy: resident warps / 64)."""
    max_registers, max_shared, max_threads, max_blocks = SM_LIMITS[capability]
    warps = max(1, threads // 32)
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated in units of 256
    by_registers = (max_registers // registers_per_warp) // warps
    by_shared = max_shared // (shared + 1024) if shared else max_blocks  # 1 KB reserved per block
    blocks = min(max_blocks, max_threads // threads, by_registers, by_shared)
    return blocks, round(blocks * warps / (max_threads // 32), 3)


# ---------------------------------------------------------------------------------------------- cases
def _stand_in(shape, dtype, channels_last=False) -> torch.Tensor:
    """A CPU tensor with the strides of the real one (never touched: its pages are not even allocated)."""
    t = torch.empty(shape, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _label(op: str, entry: dict, batch: int, dtype, channels_last: bool) -> str:
    """The layer benchmarks' case label, so that benchmarks/report.py puts the floor beside the measured time."""
    from .cases import LayerCase, _frozen

    return LayerCase(op, _frozen(entry), batch, dtype, channels_last).label


def _dwconv_case(entry: dict, batch: int, dtype, channels_last: bool):
    from mbkernels._contract import DWConvArgs, normalise_dwconv_bn_act

    c, kernel = entry["channels"], entry["kernel"]
    x = _stand_in((batch, c, entry["height"], entry["width"]), dtype, channels_last)
    top, left = entry["padding"]
    weight, bias = _stand_in((c, 1, *kernel), torch.float32), _stand_in((c,), torch.float32)
    args = normalise_dwconv_bn_act(DWConvArgs(x, weight, bias,
                                              entry["stride"], [top, top, left, left], entry["dilation"],
                                              entry["activation"]))
    out_h, out_w = args.out_hw
    size = dtype.itemsize
    moved = x.numel() * size + batch * c * out_h * out_w * size + 4 * c * (kernel[0] * kernel[1] + 1)
    return "dwconv_bn_act", _label("dwconv_bn_act", entry, batch, dtype, channels_last), args, moved


def _se_case(entry: dict, batch: int, dtype, channels_last: bool):
    from mbkernels._contract import SEArgs, normalise_squeeze_excite

    c, r = entry["channels"], entry["reduced"]
    x = _stand_in((batch, c, entry["height"], entry["width"]), dtype, channels_last)
    f32 = torch.float32
    args = normalise_squeeze_excite(SEArgs(x, _stand_in((r, c), f32), _stand_in((r,), f32), _stand_in((c, r), f32),
                                           _stand_in((c,), f32), entry["activation"], entry["gate"]))
    moved = 2 * x.numel() * dtype.itemsize + 4 * (2 * r * c + r + c)  # x read once, written once
    return "squeeze_excite", _label("squeeze_excite", entry, batch, dtype, channels_last), args, moved


def cases():
    shapes = load_shapes()
    for batch in BATCHES:
        for dtype, channels_last in FORMATS:
            for entry in shapes["dwconv_bn_act"]:
                yield batch, dtype, channels_last, _dwconv_case(entry, batch, dtype, channels_last)
            for entry in shapes["squeeze_excite"]:
                yield batch, dtype, channels_last, _se_case(entry, batch, dtype, channels_last)


# ------------------------------------------------------------------------------------------- backends
def _cache_path(key: str) -> Path:
    return CACHE_DIR / f"{key}.json"


def _cached(key: str, make) -> dict:
    path = _cache_path(key)
    if path.exists():
        return json.loads(path.read_text())
    result = make()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def _launches():
    """(batch, dtype, channels_last, op, name, args, moved, launch) of every Triton launch of every case, in one
    order (the compile workers find their share by its index)."""
    from mbkernels.backends.triton import dwconv, squeeze_excite

    planners = {"dwconv_bn_act": dwconv.plan, "squeeze_excite": squeeze_excite.plan}
    for batch, dtype, channels_last, (op, name, args, moved) in cases():
        _, launches = planners[op](args, multiprocessors=MULTIPROCESSORS)
        for launch in launches:
            yield batch, dtype, channels_last, op, name, args, moved, launch


def _compile_share(capability: int, share: list) -> None:
    """A compile worker: (index, label) of the launches to compile into the cache; a failure is left for the
    caller, which meets it again and names it."""
    compiler = TritonCompiler(capability)
    wanted = dict(share)
    for index, entry in enumerate(_launches()):
        if index in wanted:
            launch = entry[-1]
            print(f"  compile {wanted[index]}: {launch.kernel.__name__} ({entry[4]})", file=sys.stderr, flush=True)
            try:
                _cached(compiler.key(launch), lambda: compiler.compile(launch))
            except Exception:  # noqa: BLE001 -- named by triton_records, which compiles it again
                pass


def triton_records(capability: int, log=print, jobs: int = 1) -> list:
    """The records of every launch; the kernels not in the cache are compiled first, by `jobs` processes (a
    compile is one process's work: Triton's passes, then ptxas and cuobjdump)."""
    compiler = TritonCompiler(capability)
    entries = list(_launches())
    keys = [compiler.key(entry[-1]) for entry in entries]
    first = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    todo = [(index, f"{number + 1} of {len(first)}") for number, (key, index) in enumerate(first.items())
            if not _cache_path(key).exists()]
    log(f"triton: {len(first)} kernels, {len(todo)} to compile ({min(jobs, max(len(todo), 1))} processes)")
    if jobs > 1 and len(todo) > 1:
        import concurrent.futures
        import multiprocessing

        # spawn: a fresh interpreter per worker (this one has torch's threads; fork would copy them half-made).
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_compile_share, [capability] * jobs, [todo[worker::jobs] for worker in range(jobs)]))
    else:
        _compile_share(capability, todo)
    records = []
    for (batch, dtype, channels_last, op, name, args, moved, launch), key in zip(entries, keys):
        try:
            resources = _cached(key, lambda: compiler.compile(launch))
        except Exception as error:  # noqa: BLE001 -- a kernel that does not compile is a gate failure, named
            resources = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
        records.append(_record("triton", launch.kernel.__name__, op, name, batch, dtype, channels_last,
                               args, moved, launch.grid, resources, capability, key))
    return records


def _record(backend, kernel, op, case, batch, dtype, channels_last, args, moved, grid, resources, capability,
            config) -> dict:
    record = dict(backend=backend, kernel=kernel, op=op, case=case, batch=batch, dtype=str(dtype).replace("torch.", ""),
                  layout="channels_last" if channels_last else "nchw", channels=int(args.x.shape[1]),
                  bytes=moved, floor_us=round(moved / COPY_BANDWIDTH * 1e6, 2), arch=capability / 10, config=config,
                  **resources)
    if "error" not in resources:
        programs = 1
        for size in grid:
            programs *= size
        blocks, occupancy = residency(capability, resources["registers"], resources["shared_bytes"],
                                      resources["threads"])
        record.update(grid=programs, blocks_per_sm=blocks, occupancy=occupancy,
                      waves=round(programs / (blocks * MULTIPROCESSORS), 2) if blocks else None)
    return record


def cuda_records(capability: int) -> tuple[list, str]:
    """(the cuda backend's records per layer case and launch, from benchmarks/static_cuda.py; why none when
    skipped)."""
    from mbkernels import _native

    from . import static_cuda
    from .cases import LayerCase, _frozen

    if _native.C is None:
        return [], f"the cuda extension is not built or loaded ({_native.unavailable_reason})"
    if not hasattr(_native.C, "dwconv_bn_act_launch_plan"):
        return [], f"{_native.C.__file__} predates the launch plans (_C.dwconv_bn_act_launch_plan): rebuild it"
    arch = f"{capability // 10}.{capability % 10}"
    if arch not in static_cuda.ARCHS:
        return [], f"benchmarks/static_cuda.py knows no sm_{capability} limits"
    shapes = load_shapes()
    layer_cases = [LayerCase(op, _frozen(entry), batch, dtype, channels_last)
                   for batch in BATCHES for dtype, channels_last in FORMATS
                   for op in ("dwconv_bn_act", "squeeze_excite") for entry in shapes[op]]
    try:
        records = static_cuda.records(layer_cases, arch)
    except ValueError as error:  # the library holds no code for this arch
        return [], str(error)
    for record in records:
        record["floor_us"] = round(record["bytes"] / COPY_BANDWIDTH * 1e6, 2)
    return records, ""


# ---------------------------------------------------------------------------------------------- gates
def gate_failures(records: list) -> list:
    """Every failed gate, one line each (the cuda records' gates: benchmarks/static_cuda.py)."""
    from . import static_cuda

    failures = static_cuda.gate_failures([r for r in records if r["backend"] == "cuda"])
    for r in (r for r in records if r["backend"] == "triton"):
        where = f"{r['backend']} {r['kernel']} [{r['case']}]"  # the case label names batch, dtype and layout
        if "error" in r:
            failures.append(f"compile: {where} does not compile for sm_{int(r['arch'] * 10)}: {r['error']}")
            continue
        if r["spill_bytes"] or r["local_bytes"] or r["local_instructions"]:
            failures.append(f"spill: {where} spills {r['spill_bytes']} bytes ({r['local_bytes']} bytes local memory)")
        if (r["kernel"] in VECTOR_GATED_KERNELS and r["layout"] == "channels_last"
                and r["dtype"] != "float32" and r["channels"] % 8 == 0
                and r["vector_load_fraction"] < MIN_VECTOR_FRACTION):
            failures.append(f"vector loads: {where} issues {r['vector_load_fraction']:.0%} of its global loads "
                            f"16 bytes wide (< {MIN_VECTOR_FRACTION:.0%}): {r['loads_by_width']}")
        if r["bytes"] and r["bytes"] > LARGE_LAYER_BYTES and r["occupancy"] is not None \
                and r["occupancy"] < MIN_OCCUPANCY:
            failures.append(f"occupancy: {where} moves {r['bytes'] / 2**20:.0f} MB at occupancy "
                            f"{r['occupancy']:.0%} (< {MIN_OCCUPANCY:.0%})")
    return failures


# --------------------------------------------------------------------------------------------- output
COLUMNS = ("backend", "kernel", "case", "batch", "dtype", "layout", "registers", "spill_bytes", "shared_bytes",
           "threads", "blocks_per_sm", "occupancy", "grid", "waves", "vector_load_fraction", "bytes", "floor_us")


def summary(records: list) -> str:
    """Per backend and kernel: configurations, worst registers / spills, lowest occupancy and 16-byte share."""
    groups = {}
    for r in records:
        if "error" not in r:
            groups.setdefault((r["backend"], r["kernel"], r.get("dtype"), r.get("layout")), []).append(r)
    lines = ["| backend | kernel | dtype | layout | records | configs | registers (max) | spill bytes (max) "
             "| occupancy (min) | 16-byte loads (min) |", "|" + "---|" * 10]
    for (backend, kernel, dtype, layout), rows in sorted(groups.items(), key=lambda kv: [str(k) for k in kv[0]]):
        occupancies = [r["occupancy"] for r in rows if r["occupancy"] is not None]
        lines.append(f"| {backend} | {kernel} | {dtype} | {layout} | {len(rows)} | "
                     f"{len({r.get('config') for r in rows})} | {max(r['registers'] for r in rows)} | "
                     f"{max(r['spill_bytes'] for r in rows)} | "
                     f"{min(occupancies) if occupancies else '-'} | "
                     f"{min(r['vector_load_fraction'] for r in rows):.0%} |")
    return "\n".join(lines)


def table(records: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in records:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="9.0", choices=("9.0", "8.0"))
    parser.add_argument("--backend", default="all", choices=("triton", "cuda", "all"))
    parser.add_argument("--output", type=Path, help="write the records as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a gate fails, naming each")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes compiling Triton kernels (default: one per CPU)")
    options = parser.parse_args(argv)
    # Compile for the GPU: read when the kernels' @triton.jit runs, so before triton_records imports them (a
    # process that imported them under the interpreter cannot compile them).
    os.environ["TRITON_INTERPRET"] = "0"
    capability = int(float(options.arch) * 10)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731 -- progress on stderr, the table on stdout
    records = []
    if options.backend in ("triton", "all"):
        records += triton_records(capability, log, max(options.jobs, 1))
    if options.backend in ("cuda", "all"):
        found, skipped = cuda_records(capability)
        if skipped:
            print(f"cuda backend skipped: {skipped}")
        records += found
    if options.output:
        options.output.parent.mkdir(parents=True, exist_ok=True)
        options.output.write_text(json.dumps(records, indent=1))
    print(f"## Static sm_{capability} resources ({len(records)} records)\n")
    print(summary(records))
    print()
    print(table(records))
    failures = gate_failures(records)
    for failure in failures:
        print(f"GATE FAILED: {failure}", file=sys.stderr)
    print(f"\n{len(failures)} gate failures", file=sys.stderr)
    return 1 if options.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
