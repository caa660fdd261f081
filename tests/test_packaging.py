"""Packaging: the import-time check of mbkernels._C against the running torch/CUDA (the stable ABI serves every
torch from mbkernels._version.NATIVE_TORCH_FLOOR on, one CUDA major version), the version and torch requirement a
build gets (setup.py), the loaded library's own claims (no C++ symbol of torch, the limited API of CPython), and
what an installed wheel says about itself.

Mismatches are simulated: a stand-in extension module, patched torch versions, a patched distribution
version. Tests that read setup.py need the source tree and skip in a run against an installed wheel.
"""
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import mbkernels
from mbkernels import _native

ROOT = Path(__file__).resolve().parents[1]
RUNNING_TORCH, RUNNING_CUDA = "2.14.1+cu130", "13.0"
MISSING_CUDA_RUNTIME = ImportError("libcudart.so.12: cannot open shared object file")


@pytest.fixture
def running(monkeypatch):
    """Pretends torch 2.14.1+cu130 runs, quietness off, and a GPU present (so every fallback warns)."""
    monkeypatch.setattr(torch, "__version__", RUNNING_TORCH)
    monkeypatch.setattr(torch.version, "cuda", RUNNING_CUDA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MBKERNELS_QUIET", raising=False)


def fake_extension(torch_version, cuda_version):
    return types.SimpleNamespace(TORCH_VERSION=torch_version, CUDA_VERSION=cuda_version, TORCH_TARGET_VERSION="2.10")


def load_with(monkeypatch, extension=None, error=None):
    """_native._load() with the import of mbkernels._C giving `extension` or raising `error`; (C, reason, warnings)."""

    def import_extension():
        if error is not None:
            raise error
        return extension

    monkeypatch.setattr(_native, "_import_extension", import_extension)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        C, reason = _native._load()
    return C, reason, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def installed_version(monkeypatch, version):
    """Pretends the installed mbkernels distribution has this version (None: not installed)."""

    def fake_version(name):
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake_version)


def assert_one_fallback_warning(caught, reason):
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert reason in message and "triton/reference backends serve" in message


# --- the import-time check --------------------------------------------------------------------------------


@pytest.mark.parametrize("running_torch", ["2.10.0+cu130", "2.11.0+cu130", "2.14.1+cu130", "3.0.0+cu130"])
@pytest.mark.parametrize("built_torch, built_cuda", [("2.14.1+cu130", "13.0"), ("2.11.0+cu130", "13.2")])
def test_an_extension_serves_every_torch_from_the_stable_abi_floor_on(
    running, monkeypatch, running_torch, built_torch, built_cuda
):
    monkeypatch.setattr(torch, "__version__", running_torch)
    extension = fake_extension(built_torch, built_cuda)
    C, reason, caught = load_with(monkeypatch, extension)
    assert C is extension and reason is None and not caught


@pytest.mark.parametrize("running_torch", ["2.9.1+cu130", "2.6.0+cu124", "1.13.1"])
def test_a_torch_older_than_the_floor_is_refused_before_the_extension_is_loaded(running, monkeypatch, running_torch):
    monkeypatch.setattr(torch, "__version__", running_torch)
    C, reason, caught = load_with(monkeypatch, error=AssertionError("the extension was imported"))
    assert C is None
    assert f"needs torch >= {_native.NATIVE_TORCH_FLOOR}" in reason
    assert f"torch {running_torch} with CUDA {RUNNING_CUDA} is running" in reason
    assert_one_fallback_warning(caught, reason)


@pytest.mark.parametrize("built_cuda", ["12.8", "14.0"])
def test_an_extension_built_for_another_cuda_major_is_refused_naming_both(running, monkeypatch, built_cuda):
    C, reason, caught = load_with(monkeypatch, fake_extension("2.14.1+cu128", built_cuda))
    assert C is None
    assert f"built for CUDA {built_cuda}" in reason
    assert f"torch {RUNNING_TORCH} with CUDA {RUNNING_CUDA} is running" in reason
    assert_one_fallback_warning(caught, reason)


def test_a_build_of_an_older_mbkernels_left_beside_the_new_one_is_refused_saying_so(running, monkeypatch):
    # An in-place build leaves _C.cpython-*.so beside the new _C.abi3.so, and Python imports the former first.
    old = types.SimpleNamespace(TORCH_VERSION=RUNNING_TORCH, CUDA_VERSION=RUNNING_CUDA,
                                __file__="/site/mbkernels/_C.cpython-311-x86_64-linux-gnu.so")
    C, reason, caught = load_with(monkeypatch, old)
    assert C is None and "_C.cpython-311-x86_64-linux-gnu.so is a build of an older mbkernels" in reason
    assert_one_fallback_warning(caught, reason)


def test_an_extension_built_for_cuda_is_refused_by_a_cpu_only_torch(running, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    C, reason, caught = load_with(monkeypatch, fake_extension(RUNNING_TORCH, RUNNING_CUDA))
    assert C is None and "with CUDA none is running" in reason
    assert_one_fallback_warning(caught, reason)


def test_an_extension_that_cannot_load_is_named_with_the_installed_build(running, monkeypatch):
    installed_version(monkeypatch, "0.1.0+cu128")
    C, reason, caught = load_with(monkeypatch, error=MISSING_CUDA_RUNTIME)
    assert C is None
    assert "libcudart.so.12: cannot open" in reason
    assert "built for CUDA 12.8 (mbkernels 0.1.0+cu128)" in reason
    assert f"torch {RUNNING_TORCH} with CUDA {RUNNING_CUDA} is running" in reason
    assert_one_fallback_warning(caught, reason)


@pytest.mark.parametrize("version", [None, "0.1.0", "0.1.0+cu130.torch2.14"],
                         ids=["not-installed", "no-build-label", "another-label"])
def test_an_extension_that_cannot_load_without_a_known_build_names_the_running_torch(running, monkeypatch, version):
    installed_version(monkeypatch, version)
    C, reason, caught = load_with(monkeypatch, error=MISSING_CUDA_RUNTIME)
    assert C is None and "built for" not in reason
    assert f"libcudart.so.12: cannot open shared object file); torch {RUNNING_TORCH} with CUDA {RUNNING_CUDA} is running" in reason
    assert_one_fallback_warning(caught, reason)


@pytest.mark.parametrize(
    "error",
    [
        ModuleNotFoundError("No module named 'numpy'", name="numpy"),
        OSError("libcudart.so.13: cannot open shared object file"),
        RuntimeError("static initialisation failed"),
    ],
    ids=["other-missing-module", "missing-cuda-runtime", "any-other-error"],
)
def test_any_failure_to_load_falls_back_with_a_warning_instead_of_raising(running, monkeypatch, error):
    installed_version(monkeypatch, "0.1.0+cu130")
    C, reason, caught = load_with(monkeypatch, error=error)
    assert C is None and type(error).__name__ in reason and str(error) in reason
    assert_one_fallback_warning(caught, reason)


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "no-gpu"])
def test_a_pure_python_install_warns_only_where_a_gpu_could_have_used_the_extension(running, monkeypatch, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    C, reason, caught = load_with(monkeypatch, error=ModuleNotFoundError("no _C", name="mbkernels._C"))
    assert C is None and "mbkernels._C was not built" in reason
    if gpu:
        assert_one_fallback_warning(caught, reason)
    else:
        assert not caught


def test_mbkernels_quiet_silences_the_warning_but_keeps_the_reason(running, monkeypatch):
    monkeypatch.setenv("MBKERNELS_QUIET", "1")
    C, reason, caught = load_with(monkeypatch, fake_extension("2.14.1+cu128", "12.8"))
    assert C is None and "CUDA 12.8" in reason and not caught


@pytest.fixture
def reload_native_afterwards(monkeypatch):
    yield
    monkeypatch.undo()  # torch's real version back first
    importlib.reload(_native)  # the state the rest of the session expects


needs_loaded_extension = pytest.mark.skipif(
    _native.C is None, reason=f"mbkernels._C is not loaded here: {_native.unavailable_reason}")


@needs_loaded_extension
def test_importing_under_a_torch_older_than_the_floor_turns_the_cuda_backend_off_with_one_warning(
    running, monkeypatch, reload_native_afterwards
):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu130")
    with pytest.warns(RuntimeWarning) as caught:
        importlib.reload(_native)
    assert _native.C is None
    assert f"needs torch >= {_native.NATIVE_TORCH_FLOOR}" in _native.unavailable_reason
    assert "torch 2.9.1+cu130 with CUDA 13.0 is running" in _native.unavailable_reason
    assert_one_fallback_warning(caught.list, _native.unavailable_reason)
    status = mbkernels.backend_status()
    assert not status["cuda"].available and status["cuda"].reason == _native.unavailable_reason
    assert status["reference"].available


@needs_loaded_extension
def test_importing_under_a_newer_torch_keeps_the_cuda_backend(running, monkeypatch, reload_native_afterwards):
    monkeypatch.setattr(torch, "__version__", "2.99.0+cu130")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        importlib.reload(_native)
    assert _native.C is mbkernels._C and _native.unavailable_reason is None
    assert mbkernels.backend_status()["cuda"].available


# --- the extension and the distribution actually installed -----------------------------------------------


@needs_loaded_extension
def test_the_loaded_extension_registers_the_ops_and_serves_the_running_torch():
    C = _native.C
    assert C.TORCH_TARGET_VERSION == _native.NATIVE_TORCH_FLOOR  # the build followed the source
    assert _native._minor(torch.__version__) >= _native._minor(C.TORCH_TARGET_VERSION)
    assert C.CUDA_VERSION.split(".")[0] == torch.version.cuda.split(".")[0]
    assert Path(C.__file__).parent == Path(mbkernels.__file__).parent
    for op in ("dwconv_bn_act_cuda", "squeeze_excite_cuda"):
        assert str(getattr(torch.ops.mbkernels, op).default._schema).startswith(f"mbkernels::{op}(Tensor x")
    assert mbkernels.backend_status()["cuda"].available


def _undefined_symbols(library: str) -> list:
    result = subprocess.run(["nm", "-D", "--undefined-only", library], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in result.stdout.splitlines() if line.strip()]


@needs_loaded_extension
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_the_loaded_extension_needs_no_cpp_symbol_of_torch_and_no_libtorch_python():
    """What lets one build serve every torch from the floor on: torch is reached through the C functions of its
    stable ABI only (a mangled c10::, at:: or torch:: name would tie the library to one torch), and CPython
    through its limited API (an abi3 library, without libtorch_python, which is built for one CPython)."""
    library = _native.C.__file__
    assert library.endswith(".abi3.so"), library
    symbols = _undefined_symbols(library)
    assert "torch_library_impl" in symbols and "aoti_torch_get_current_cuda_stream" in symbols
    cpp_of_torch = [s for s in symbols if re.match(r"_ZN?K?(3c10|2at|5torch)", s)]
    assert not cpp_of_torch, cpp_of_torch[:10]
    needed = subprocess.run(["readelf", "-d", library], capture_output=True, text=True).stdout
    assert "libtorch_python" not in needed


def _wheel_installed_distribution():
    """The installed mbkernels distribution when it ships mbkernels._C itself (a wheel install), else None."""
    try:
        dist = importlib.metadata.distribution("mbkernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    shipped = [f for f in dist.files or [] if re.fullmatch(r"mbkernels/_C\..*\.so", str(f))]
    return dist if shipped else None


@pytest.mark.skipif(
    _wheel_installed_distribution() is None, reason="mbkernels is not installed from a wheel with mbkernels._C"
)
def test_an_installed_wheel_is_versioned_for_its_cuda_and_requires_the_stable_abi_floor():
    dist = _wheel_installed_distribution()
    C = _native.C
    assert C is not None, _native.unavailable_reason
    assert dist.version.endswith(f"+cu{C.CUDA_VERSION.replace('.', '')}"), dist.version
    assert f"torch>={C.TORCH_TARGET_VERSION}" in (dist.requires or []), dist.requires
    loaded = Path(C.__file__).resolve()
    assert loaded in {Path(dist.locate_file(f)).resolve() for f in dist.files}, "a different mbkernels._C loaded"


# --- setup.py ---------------------------------------------------------------------------------------------

needs_source_tree = pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree")


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("mbkernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_source_tree
@pytest.mark.parametrize("cuda_version, label", [("13.0", "+cu130"), ("12.8", "+cu128"), ("13.1", "+cu131")])
def test_a_native_build_is_versioned_for_its_cuda_alone_and_requires_the_floor(setup_py, cuda_version, label):
    assert setup_py.native_version(cuda_version) == setup_py.BASE_VERSION + label
    assert setup_py.native_torch_requirement() == f"torch>={_native.NATIVE_TORCH_FLOOR}"
    assert setup_py.NATIVE_TORCH_FLOOR == _native.NATIVE_TORCH_FLOOR


@needs_source_tree
def test_the_import_check_reads_the_build_label_that_setup_writes(setup_py, monkeypatch):
    installed_version(monkeypatch, setup_py.native_version("13.0"))
    assert _native.installed_build() == f"CUDA 13.0 (mbkernels {setup_py.BASE_VERSION}+cu130)"


@needs_source_tree
@pytest.mark.parametrize("version, target", [("2.10", "0x020a000000000000"), ("2.14", "0x020e000000000000"),
                                             ("3.1", "0x0301000000000000")])
def test_the_stable_abi_target_is_torchs_version_encoding(setup_py, version, target):
    assert setup_py.stable_abi_target(version) == target


@needs_source_tree
@pytest.mark.parametrize("limited_api, tag", [("0x030A0000", "cp310"), ("0x030C0000", "cp312"), ("0x03090000", "cp39")])
def test_the_abi3_tag_is_the_limited_apis_cpython(setup_py, limited_api, tag):
    assert setup_py.limited_api_tag(limited_api) == tag


@needs_source_tree
def test_a_torch_older_than_the_floor_builds_the_pure_python_package(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py, "find_cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.delenv("MBKERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu130")
    cuda_home, why_not = setup_py.cuda_build_plan()
    assert cuda_home is None and "predates the stable ABI of torch 2.10" in why_not
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu130")
    assert setup_py.cuda_build_plan() == ("/usr/local/cuda", None)


@needs_source_tree
@pytest.mark.parametrize(
    "spec, expected",
    [("7.5;8.0;8.6;8.9;9.0+PTX", "7.5;8.0;8.6;8.9;9.0+PTX"), ("75 90+ptx", "7.5;9.0+PTX"), ("8.0,12.0", "8.0;12.0")],
)
def test_arch_lists_take_torchs_form(setup_py, spec, expected):
    assert setup_py.normalized_arch_list(spec) == expected


@needs_source_tree
@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the `build` package")
def test_a_build_without_the_extension_is_a_plain_pure_python_wheel_that_says_so(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "mbkernels", source / "mbkernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, MBKERNELS_SKIP_CUDA_BUILD="1")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "building the pure-Python package" in result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert re.fullmatch(r"mbkernels-\d+\.\d+\.\d+-py3-none-any\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert not any(name.endswith(".so") for name in names)
    assert re.search(r"^Version: \d+\.\d+\.\d+$", metadata, re.M), metadata
    requirements = re.findall(r"^Requires-Dist: (torch\b[^;\n]*)$", metadata, re.M)
    assert len(requirements) == 1 and "<" not in requirements[0], requirements
