"""Builds mbkernels, with the CUDA extension mbkernels._C when a CUDA toolkit is found.

The decision rests on the toolkit (CUDA_HOME, or nvcc on PATH), never on whether a GPU is present, so GPU-less
build machines produce full wheels. The extension is written against PyTorch's stable ABI, targeting torch
NATIVE_TORCH_FLOOR (mbkernels/_version.py; TORCH_TARGET_VERSION refuses newer APIs at compile time), and against
CPython's limited API: built once, with any torch from the floor on, it loads under every torch from the floor on
and every CPython the abi3 tag names. Such a build is versioned for its CUDA major version, the one thing it is
tied to: 0.1.0+cu130 (cp310-abi3) requires torch>=2.10. A build without the extension is plain 0.1.0 and takes any
torch from TORCH_FLOOR on. Knobs (environment variables):
  MBKERNELS_SKIP_CUDA_BUILD=1   pure-Python package: Triton and reference backends only
  MBKERNELS_CUDA_ARCHS          compute capabilities, e.g. "8.0;9.0+PTX" (default: 7.5;8.0;8.6;8.9;9.0+PTX)
  MBKERNELS_DEBUG=1             a debug build of the extension: -O0 -g for the host code, -G for device code
  MAX_JOBS                      parallel compile jobs (default: cores, at most one per 3 GB of memory)
  CUDA_HOME                     the toolkit to use
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
# The version lives in mbkernels/_version.py alone (read as text: importing mbkernels needs torch).
BASE_VERSION = re.search(r'__version__ = "([^"]+)"', open(os.path.join(ROOT, "mbkernels", "_version.py")).read())[1]
# The oldest torch tested, also read by the import-time check (mbkernels/__init__.py).
TORCH_FLOOR = re.search(r'TORCH_FLOOR = "([^"]+)"', open(os.path.join(ROOT, "mbkernels", "_version.py")).read())[1]
# The stable ABI version mbkernels._C is built for: it loads under every torch from this one on.
NATIVE_TORCH_FLOOR = re.search(
    r'NATIVE_TORCH_FLOOR = "([^"]+)"', open(os.path.join(ROOT, "mbkernels", "_version.py")).read())[1]


def log(message: str) -> None:
    print(f"mbkernels setup: {message}", file=sys.stderr)


def _is_toolkit(path: str) -> bool:
    return (
        os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
        and bool(glob.glob(os.path.join(path, "lib*", "libcudart.so*")))
    )


def find_cuda_home():
    """The CUDA toolkit's root, or None. A /usr/local/bin/nvcc wrapper script is not a toolkit root."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for path in candidates:
        if path and _is_toolkit(path):
            return os.path.realpath(path)
    return None


def normalized_arch_list(spec: str) -> str:
    """'7.5 8.0', '75,80' or '7.5;8.0+PTX' -> '7.5;8.0+PTX' (torch's TORCH_CUDA_ARCH_LIST form)."""
    archs = []
    for item in spec.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        number = item[:-4] if ptx else item
        if "." not in number:
            number = f"{number[:-1]}.{number[-1]}"
        archs.append(number + ("+PTX" if ptx else ""))
    if not archs:
        raise SystemExit(f"MBKERNELS_CUDA_ARCHS={spec!r} names no architecture")
    return ";".join(archs)


def default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gb = 3 * cores
    return str(max(1, min(cores, int(memory_gb // 3))))


def cuda_build_plan():
    """(cuda_home, None) to build the extension, or (None, why not)."""
    if os.environ.get("MBKERNELS_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return None, "MBKERNELS_SKIP_CUDA_BUILD is set"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return None, "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    try:
        import torch
    except ImportError:
        return None, "torch is not importable in the build environment (install torch, use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build and cannot build CUDA extensions"
    if torch_minor(torch.__version__) < torch_minor(NATIVE_TORCH_FLOOR):
        return None, (f"torch {torch.__version__} predates the stable ABI of torch {NATIVE_TORCH_FLOOR} that "
                      "mbkernels._C is written for")
    return cuda_home, None


def torch_minor(torch_version: str) -> tuple[int, int]:
    """'2.14.1+cu130' or '2.15.0a0+git1234' -> (2, 14)."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise SystemExit(f"cannot read a torch version from {torch_version!r}")
    return int(match[1]), int(match[2])


def native_version(cuda_version: str) -> str:
    """The version of a wheel whose extension was built for this CUDA: 0.1.0+cu130. Not for a torch: the stable
    ABI serves every torch from NATIVE_TORCH_FLOOR on."""
    return f"{BASE_VERSION}+cu{cuda_version.replace('.', '')}"


def native_torch_requirement() -> str:
    """torch>=2.10: the stable ABI holds from the version the extension targets on."""
    return f"torch>={NATIVE_TORCH_FLOOR}"


def stable_abi_target(version: str) -> str:
    """'2.10' -> '0x020a000000000000': TORCH_TARGET_VERSION (major and minor in the top two bytes)."""
    major, minor = torch_minor(version)
    return f"0x{(major << 56) | (minor << 48):016x}"


def limited_api_tag(py_limited_api: str) -> str:
    """'0x030A0000' (the Py_LIMITED_API torch compiles with) -> 'cp310': the abi3 wheel's minimum CPython."""
    value = int(py_limited_api, 16)
    return f"cp{value >> 24}{(value >> 16) & 0xFF}"


def compile_flags() -> dict:
    """Release flags, or with MBKERNELS_DEBUG=1 debuggable ones (cuda-gdb, compute-sanitizer line numbers)."""
    if os.environ.get("MBKERNELS_DEBUG", "0") not in ("", "0"):
        log("MBKERNELS_DEBUG is set: a debug build (-O0 -g, device code -G), slow kernels")
        return {"cxx": ["-O0", "-g"], "nvcc": ["-O0", "-g", "-G"]}
    return {"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]}


def cuda_extension(cuda_home: str):
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")
    archs = normalized_arch_list(
        os.environ.get("MBKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    )
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", default_max_jobs())

    import torch
    from torch.utils import cpp_extension

    log(f"building mbkernels._C with the CUDA toolkit at {cuda_home} for archs {archs} "
        f"(MAX_JOBS={os.environ['MAX_JOBS']}, torch {torch.__version__}, stable ABI of torch {NATIVE_TORCH_FLOOR})")
    defines = [
        ("MBKERNELS_TORCH_VERSION", f'"{torch.__version__}"'),
        ("MBKERNELS_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("MBKERNELS_CUDA_ARCHS", f'"{archs}"'),
        ("TORCH_TARGET_VERSION", stable_abi_target(NATIVE_TORCH_FLOOR)),
        ("USE_CUDA", None),  # declares the stable shim's CUDA functions (the current stream)
    ]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    extension = cpp_extension.CUDAExtension(
        name="mbkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=defines,
        extra_compile_args=compile_flags(),
        py_limited_api=True,  # Py_LIMITED_API, no libtorch_python
    )
    version = native_version(torch.version.cuda)
    requirement = native_torch_requirement()
    abi3 = limited_api_tag(cpp_extension.min_supported_cpython)
    log(f"version {version} ({abi3}-abi3), requiring {requirement}")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [extension], cmdclass, version, requirement, {"bdist_wheel": {"py_limited_api": abi3}}


def main():
    cuda_home, why_not = cuda_build_plan()
    if cuda_home is None:
        log(f"building the pure-Python package {BASE_VERSION} (Triton and reference backends only, "
            f"no mbkernels._C): {why_not}")
        ext_modules, cmdclass, version, requirement, options = [], {}, BASE_VERSION, f"torch>={TORCH_FLOOR}", {}
    else:
        ext_modules, cmdclass, version, requirement, options = cuda_extension(cuda_home)
    setup(
        version=version,
        install_requires=[requirement],
        packages=find_packages(include=["mbkernels", "mbkernels.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        options=options,
    )


if __name__ == "__main__":  # as setuptools runs it; tests import the helpers above
    main()
