"""The oldest torch the package claims (TORCH_FLOOR, CI's oldest stack): below it `import mbkernels` warns once,
naming both versions; from it on (pre-releases of the floor's minor included) it says nothing."""
import subprocess
import sys

import pytest

from mbkernels._version import TORCH_FLOOR, below_torch_floor


@pytest.mark.parametrize("version, below", [
    ("2.9.1+cu128", True), ("1.13.1", True), (f"{TORCH_FLOOR}.0", False), (f"{TORCH_FLOOR}.0a0+git1234abc", False),
    ("2.14.1+cu130", False), ("3.0.0", False)])
def test_versions_below_the_floor_are_told_apart_by_minor(version, below):
    assert below_torch_floor(version) is below


def _import_warnings(torch_version: str) -> str:
    """What `import mbkernels` warns with torch.__version__ set to torch_version (in a fresh interpreter)."""
    code = ("import warnings, torch; warnings.simplefilter('always'); "
            f"torch.__version__ = {torch_version!r}; import mbkernels")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_importing_under_an_older_torch_warns_naming_the_floor():
    assert f"mbkernels needs torch {TORCH_FLOOR} or newer (the oldest tested), and torch 2.9.1 is installed" in \
        _import_warnings("2.9.1")
