"""Builds mbkernels, with the CUDA extension mbkernels._C when a CUDA toolkit is found.

The decision rests on the toolkit (CUDA_HOME, or nvcc on PATH), never on whether a GPU is present, so GPU-less
build machines produce full wheels. The extension works only with the torch it was compiled against, so such a
build is versioned and pinned to it: 0.1.0+cu130.torch2.14 requires torch>=2.14,<2.15. A build without the
extension is plain 0.1.0 and takes any torch from TORCH_FLOOR on. Knobs (environment variables):
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
    return cuda_home, None


def torch_minor(torch_version: str) -> tuple[int, int]:
    """'2.14.1+cu130' or '2.15.0a0+git1234' -> (2, 14)."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise SystemExit(f"cannot read a torch version from {torch_version!r}")
    return int(match[1]), int(match[2])


def native_version(torch_version: str, cuda_version: str) -> str:
    """The version of a wheel whose extension was built against this torch and CUDA: 0.1.0+cu130.torch2.14."""
    major, minor = torch_minor(torch_version)
    return f"{BASE_VERSION}+cu{cuda_version.replace('.', '')}.torch{major}.{minor}"


def native_torch_requirement(torch_version: str) -> str:
    """torch>=2.14,<2.15: the C++ ABI of torch holds within one minor version only."""
    major, minor = torch_minor(torch_version)
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


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
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    log(f"building mbkernels._C with the CUDA toolkit at {cuda_home} for archs {archs} "
        f"(MAX_JOBS={os.environ['MAX_JOBS']}, torch {torch.__version__})")
    defines = [
        ("MBKERNELS_TORCH_VERSION", f'"{torch.__version__}"'),
        ("MBKERNELS_CUDA_VERSION", f'"{torch.version.cuda}"'),
        ("MBKERNELS_CUDA_ARCHS", f'"{archs}"'),
    ]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        name="mbkernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=defines,
        extra_compile_args=compile_flags(),
    )
    version = native_version(torch.__version__, torch.version.cuda)
    requirement = native_torch_requirement(torch.__version__)
    log(f"version {version}, requiring {requirement}")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}, version, requirement


def main():
    cuda_home, why_not = cuda_build_plan()
    if cuda_home is None:
        log(f"building the pure-Python package {BASE_VERSION} (Triton and reference backends only, "
            f"no mbkernels._C): {why_not}")
        ext_modules, cmdclass, version, requirement = [], {}, BASE_VERSION, f"torch>={TORCH_FLOOR}"
    else:
        ext_modules, cmdclass, version, requirement = cuda_extension(cuda_home)
    setup(
        version=version,
        install_requires=[requirement],
        packages=find_packages(include=["mbkernels", "mbkernels.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # as setuptools runs it; tests import the helpers above
    main()
