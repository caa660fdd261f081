"""Static sm_XX evidence for the cuda backend, per layer and case: what the launcher runs, read from the machine code.

For each benchmarks.cases.LayerCase, the C++ launcher's own plan (`_C.dwconv_bn_act_launch_plan`,
`_C.squeeze_excite_launch_plan`: the launch code run without launching) names the kernels, grids, blocks and
shared memory; `cuobjdump -res-usage` and `-sass` of the built mbkernels/_C*.so give each kernel's registers,
stack / local memory and global load / store instructions by width. `records(cases, arch)` gives one record per
(case, launch); `gate_failures(records)` the issue-10 gates they fail. benchmarks.static merges these records with
the Triton ones. Load and store counts are instructions in the machine code, not executed instructions.
"""
import functools
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cases import BANDWIDTH_TARGET_MIN_BYTES, DTYPE_NAMES, LayerCase, layout_name


@dataclass(frozen=True)
class Arch:
    sms: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int
    shared_bytes_per_sm: int
    # The system's share of each block's shared memory. cuobjdump counts it in a kernel's static SHARED (every
    # kernel of the sm_90 build shows 1024, those without shared memory too).
    reserved_shared_bytes_per_block: int


# The GPUs the targets are stated for: H100/H200 (sm_90, 132 SMs) and A100 (sm_80, 108 SMs).
ARCHS = {
    "9.0": Arch(132, 64, 32, 65536, 228 * 1024, 1024),
    "8.0": Arch(108, 64, 32, 65536, 164 * 1024, 1024),
}
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
VECTOR_LOAD_GATE = 0.75
OCCUPANCY_GATE = 0.25


def cuobjdump() -> str:
    """The cuobjdump that ships inside triton (the reduced CUDA toolkit here has none)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.is_file():
        return str(path)
    found = shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError(f"no cuobjdump at {path} nor on PATH")
    return found


def extension_path() -> str:
    from mbkernels import _native

    return _native.C.__file__


def _sm(arch: str) -> str:
    return "sm_" + arch.replace(".", "")


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _demangle(symbols: list) -> list:
    out = subprocess.run(["c++filt"], input="\n".join(symbols), check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def unqualified(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<__half, 3>(ns::P)' -> 'k<__half, 3>': the name the plan gives."""
    depth, end = 0, len(demangled)
    for i in range(len(demangled) - 1, -1, -1):  # the '(' opening the parameter list
        depth += {")": 1, "(": -1}.get(demangled[i], 0)
        if depth == 0:
            end = i
            break
    head = demangled[:end]
    if head.startswith("void "):
        head = head[len("void "):]
    template = head.find("<")
    qualifier = head.rfind("::", 0, template if template >= 0 else len(head))
    return head if qualifier < 0 else head[qualifier + 2:]


@dataclass(frozen=True)
class KernelCode:
    symbol: str  # mangled, as cuobjdump prints it
    registers: int
    stack_bytes: int
    local_bytes: int
    static_shared_bytes: int
    loads: dict  # global load instructions by width in bytes
    stores: dict  # global store instructions by width in bytes


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _width(instruction: str) -> int:
    """Bytes of one LDG/STG: its size modifier (LDG.E.128, LDG.E.U16, ...), 4 when it has none."""
    for part in instruction.split(".")[1:]:
        if part in _WIDTH:
            return _WIDTH[part]
    return 4


@functools.lru_cache(maxsize=None)
def kernels(library: str, arch: str) -> dict:
    """{unqualified demangled name: KernelCode} for every kernel of `library` compiled for `arch`."""
    usage, current_arch, symbol = {}, None, None
    for line in _run(cuobjdump(), "-res-usage", library).splitlines():
        if line.startswith("arch = "):
            current_arch = line.split("=")[1].strip()
        elif line.strip().startswith("Function "):
            symbol = line.strip()[len("Function "):].rstrip(":")
        elif symbol and "REG:" in line and current_arch == _sm(arch):
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            usage[symbol] = fields
            symbol = None
    if not usage:
        raise ValueError(f"{library} holds no {_sm(arch)} code (build it with MBKERNELS_CUDA_ARCHS={arch})")
    loads = {s: {} for s in usage}
    stores = {s: {} for s in usage}
    symbol = None
    for line in _run(cuobjdump(), "-sass", "-arch", _sm(arch), library).splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            symbol = match.group(1) if match.group(1) in usage else None
            continue
        instruction = re.search(r"\b((?:LDG|STG)\.[\w.]+|LDG|STG)\b", line)
        if symbol and instruction:
            table = loads if instruction.group(1).startswith("LDG") else stores
            width = _width(instruction.group(1))
            table[symbol][width] = table[symbol].get(width, 0) + 1
    symbols = sorted(usage)
    by_name = {}
    for symbol, demangled in zip(symbols, _demangle(symbols)):
        name = unqualified(demangled)
        if name in by_name:
            raise ValueError(f"two kernels of {library} are both named {name}: the plan's names are not exact")
        fields = usage[symbol]
        by_name[name] = KernelCode(symbol, int(fields["REG"]), int(fields["STACK"]), int(fields["LOCAL"]),
                                   int(fields["SHARED"]), loads[symbol], stores[symbol])
    return by_name


def blocks_per_sm(code: KernelCode, threads: int, dynamic_shared_bytes: int, arch: Arch) -> int:
    """Resident blocks per SM, limited by warps, blocks, registers and shared memory (dynamic, plus static with
    the system reserve at least)."""
    warps = math.ceil(threads / 32)
    registers_per_warp = math.ceil(code.registers * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
    limits = [arch.max_warps_per_sm // warps, arch.max_blocks_per_sm,
              arch.registers_per_sm // (registers_per_warp * warps)]
    shared_bytes = dynamic_shared_bytes + max(code.static_shared_bytes, arch.reserved_shared_bytes_per_block)
    limits.append(arch.shared_bytes_per_sm // shared_bytes)
    return min(limits)


def launch_plan(case: LayerCase) -> list:
    """The cuda launcher's launches for this case."""
    from mbkernels import _native

    g, dtype = case.get, DTYPE_NAMES[case.dtype]
    n, c, h, w = case.input_shape
    if case.op == "dwconv_bn_act":
        (ph, pw) = g("padding")
        return _native.C.dwconv_bn_act_launch_plan(n, c, h, w, case.channels_last, c, *g("kernel"), g("stride"),
                                                   [ph, ph, pw, pw], g("dilation"), dtype)
    return _native.C.squeeze_excite_launch_plan(n, c, h, w, case.channels_last, g("reduced"), dtype)


def vector_load_fraction(loads: dict) -> float:
    total = sum(loads.values())
    return loads.get(16, 0) / total if total else 1.0


def records(cases, arch: str = "9.0") -> list:
    """One record per (case, kernel launch) of the cuda backend. `bytes` is the layer's minimum traffic (the
    case's, on each of its launches)."""
    target = ARCHS[arch]
    code_of = kernels(extension_path(), arch)
    out = []
    for case in cases:
        for index, launch in enumerate(launch_plan(case)):
            code = code_of[launch["kernel"]]
            resident = blocks_per_sm(code, launch["block"], launch["shared_bytes"], target)
            out.append({
                "backend": "cuda", "op": case.op, "case": case.label, "layer": case.layer_name,
                "batch": case.batch, "dtype": DTYPE_NAMES[case.dtype], "layout": layout_name(case.channels_last),
                "launch": index, "kernel": launch["kernel"], "symbol": code.symbol, "arch": arch,
                "registers": code.registers, "spill_bytes": code.stack_bytes + code.local_bytes,
                "local_bytes": code.local_bytes,
                "shared_bytes": launch["shared_bytes"] + code.static_shared_bytes, "threads": launch["block"],
                "grid": launch["grid"], "blocks_per_sm": resident,
                "occupancy": resident * math.ceil(launch["block"] / 32) / target.max_warps_per_sm,
                "waves": launch["grid"] / (resident * target.sms),
                "global_loads": {str(k): v for k, v in sorted(code.loads.items())},
                "global_stores": {str(k): v for k, v in sorted(code.stores.items())},
                "vector_load_fraction": vector_load_fraction(code.loads),
                "bytes": case.bytes_moved,
            })
    return out


def is_vector_fast_path(record: dict) -> bool:
    """A fp16/bf16 channels_last depthwise fast kernel: the ones held to 16-byte loads."""
    return (record["kernel"].startswith("dwconv_cl_fast_kernel<")
            and record["dtype"] in ("float16", "bfloat16") and record["layout"] == "channels_last")


def gate_failures(records_: list) -> list:
    """One line per failed gate: spills or local memory anywhere; < 75% 16-byte global loads in the fp16/bf16
    channels_last fast paths (taken only with C % 8 == 0); occupancy < 25% on layers moving > 16 MB."""
    failures = []
    for r in records_:
        where = f"cuda {r['kernel']} on {r['case']}"
        if r["spill_bytes"]:
            failures.append(f"spills: {where} has {r['spill_bytes']} bytes of stack/local memory")
        if is_vector_fast_path(r) and r["vector_load_fraction"] < VECTOR_LOAD_GATE:
            failures.append(f"16-byte loads: {where} has {r['vector_load_fraction']:.0%} of its global loads "
                            f"16 bytes wide, under {VECTOR_LOAD_GATE:.0%}")
        if r["bytes"] > BANDWIDTH_TARGET_MIN_BYTES and r["occupancy"] < OCCUPANCY_GATE:
            failures.append(f"occupancy: {where} reaches {r['occupancy']:.0%}, under {OCCUPANCY_GATE:.0%}")
    return failures
