"""Packaging: the import-time check of mbkernels._C against the running torch/CUDA, the version and torch pin
a build gets (setup.py), and what an installed wheel says about itself.

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
UNDEFINED_SYMBOL = ImportError("/site-packages/mbkernels/_C.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")


@pytest.fixture
def running(monkeypatch):
    """Pretends torch 2.14.1+cu130 runs, quietness off, and a GPU present (so every fallback warns)."""
    monkeypatch.setattr(torch, "__version__", RUNNING_TORCH)
    monkeypatch.setattr(torch.version, "cuda", RUNNING_CUDA)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("MBKERNELS_QUIET", raising=False)


def fake_extension(torch_version, cuda_version):
    return types.SimpleNamespace(TORCH_VERSION=torch_version, CUDA_VERSION=cuda_version)


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


@pytest.mark.parametrize("built_torch, built_cuda", [("2.14.1+cu130", "13.0"), ("2.14.0+cu130", "13.2")])
def test_an_extension_built_for_the_running_minor_versions_is_used(running, monkeypatch, built_torch, built_cuda):
    extension = fake_extension(built_torch, built_cuda)
    C, reason, caught = load_with(monkeypatch, extension)
    assert C is extension and reason is None and not caught


@pytest.mark.parametrize(
    "built_torch, built_cuda",
    [("2.13.0+cu130", "13.0"), ("2.15.0+cu130", "13.0"), ("2.14.1+cu128", "12.8"), ("3.14.1+cu130", "13.0")],
    ids=["older-torch", "newer-torch", "other-cuda-major", "other-torch-major"],
)
def test_an_extension_built_for_another_torch_or_cuda_is_refused_naming_both(
    running, monkeypatch, built_torch, built_cuda
):
    C, reason, caught = load_with(monkeypatch, fake_extension(built_torch, built_cuda))
    assert C is None
    assert f"torch {built_torch} with CUDA {built_cuda}" in reason
    assert f"torch {RUNNING_TORCH} with CUDA {RUNNING_CUDA} is running" in reason
    assert_one_fallback_warning(caught, reason)


def test_an_extension_built_for_cuda_is_refused_by_a_cpu_only_torch(running, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    C, reason, caught = load_with(monkeypatch, fake_extension(RUNNING_TORCH, RUNNING_CUDA))
    assert C is None and "with CUDA none is running" in reason
    assert_one_fallback_warning(caught, reason)


def test_an_extension_that_cannot_load_is_named_with_the_installed_build(running, monkeypatch):
    installed_version(monkeypatch, "0.1.0+cu130.torch2.13")
    C, reason, caught = load_with(monkeypatch, error=UNDEFINED_SYMBOL)
    assert C is None
    assert "undefined symbol: _ZN3c104impl" in reason
    assert "built for torch 2.13 with CUDA 13.0 (mbkernels 0.1.0+cu130.torch2.13)" in reason
    assert f"torch {RUNNING_TORCH} with CUDA {RUNNING_CUDA} is running" in reason
    assert_one_fallback_warning(caught, reason)


@pytest.mark.parametrize("version", [None, "0.1.0"], ids=["not-installed", "no-build-label"])
def test_an_extension_that_cannot_load_without_a_known_build_blames_the_torch_version(running, monkeypatch, version):
    installed_version(monkeypatch, version)
    C, reason, caught = load_with(monkeypatch, error=UNDEFINED_SYMBOL)
    assert C is None
    assert f"torch {RUNNING_TORCH} with CUDA {RUNNING_CUDA} is running" in reason
    assert "built against another torch" in reason
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
    installed_version(monkeypatch, "0.1.0+cu130.torch2.14")
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
    C, reason, caught = load_with(monkeypatch, fake_extension("2.13.0+cu130", "13.0"))
    assert C is None and "2.13.0+cu130" in reason and not caught


@pytest.fixture
def reload_native_afterwards(monkeypatch):
    yield
    monkeypatch.undo()  # torch's real version back first
    importlib.reload(_native)  # the state the rest of the session expects


@pytest.mark.skipif(_native.C is None, reason=f"mbkernels._C is not loaded here: {_native.unavailable_reason}")
def test_importing_under_another_torch_turns_the_cuda_backend_off_with_one_warning(
    running, monkeypatch, reload_native_afterwards
):
    monkeypatch.setattr(torch, "__version__", "2.99.0+cu130")
    with pytest.warns(RuntimeWarning) as caught:
        importlib.reload(_native)
    assert _native.C is None
    assert f"was built for torch {mbkernels._C.TORCH_VERSION}" in _native.unavailable_reason
    assert "torch 2.99.0+cu130 with CUDA 13.0 is running" in _native.unavailable_reason
    assert_one_fallback_warning(caught.list, _native.unavailable_reason)
    status = mbkernels.backend_status()
    assert not status["cuda"].available and status["cuda"].reason == _native.unavailable_reason
    assert status["reference"].available


# --- the extension and the distribution actually installed -----------------------------------------------


@pytest.mark.skipif(_native.C is None, reason=f"mbkernels._C is not loaded here: {_native.unavailable_reason}")
def test_the_loaded_extension_registers_the_ops_and_fits_the_running_torch():
    C = _native.C
    assert _native._minor(C.TORCH_VERSION) == _native._minor(torch.__version__)
    assert C.CUDA_VERSION.split(".")[0] == torch.version.cuda.split(".")[0]
    assert Path(C.__file__).parent == Path(mbkernels.__file__).parent
    for op in ("dwconv_bn_act_cuda", "squeeze_excite_cuda"):
        assert str(getattr(torch.ops.mbkernels, op).default._schema).startswith(f"mbkernels::{op}(Tensor x")
    assert mbkernels.backend_status()["cuda"].available


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
def test_an_installed_wheel_is_versioned_and_pinned_for_the_torch_its_extension_was_built_with():
    dist = _wheel_installed_distribution()
    C = _native.C
    assert C is not None, _native.unavailable_reason
    major, minor = (int(part) for part in _native._minor(C.TORCH_VERSION))
    cuda_tag = C.CUDA_VERSION.replace(".", "")
    assert dist.version.endswith(f"+cu{cuda_tag}.torch{major}.{minor}"), dist.version
    assert f"torch<{major}.{minor + 1},>={major}.{minor}" in (dist.requires or []), dist.requires
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
@pytest.mark.parametrize(
    "torch_version, cuda_version, version, requirement",
    [
        ("2.14.1+cu130", "13.0", "+cu130.torch2.14", "torch>=2.14,<2.15"),
        ("2.9.0+cu128", "12.8", "+cu128.torch2.9", "torch>=2.9,<2.10"),
        ("2.15.0a0+git1234abc", "13.1", "+cu131.torch2.15", "torch>=2.15,<2.16"),
    ],
)
def test_a_native_build_is_versioned_and_pinned_for_its_torch(
    setup_py, torch_version, cuda_version, version, requirement
):
    full = setup_py.native_version(torch_version, cuda_version)
    assert full == setup_py.BASE_VERSION + version
    assert setup_py.native_torch_requirement(torch_version) == requirement


@needs_source_tree
def test_the_import_check_reads_the_build_label_that_setup_writes(setup_py, monkeypatch):
    installed_version(monkeypatch, setup_py.native_version("2.14.1+cu130", "13.0"))
    assert _native.installed_build() == f"torch 2.14 with CUDA 13.0 (mbkernels {setup_py.BASE_VERSION}+cu130.torch2.14)"


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
