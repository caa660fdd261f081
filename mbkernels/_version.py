# The one version source: setup.py and CMakeLists.txt read these lines; an installed wheel with mbkernels._C adds
# the CUDA it was built for (e.g. 0.1.0+cu130, see setup.py).
__version__ = "0.1.0"
TORCH_FLOOR = "2.10"  # the oldest torch CI tests (with 2.11 and 2.14); setup.py reads this line too
# mbkernels._C is written against PyTorch's stable ABI of this torch (its TORCH_TARGET_VERSION): one build loads
# under every torch from this version on, whichever torch built it, and under no older one.
NATIVE_TORCH_FLOOR = "2.10"


def below_torch_floor(torch_version: str) -> bool:
    """True for a torch (e.g. "2.9.1+cu128") of a minor older than TORCH_FLOOR; a pre-release of the floor's
    minor (NVIDIA's containers ship "2.10.0a0+...") is not."""
    def minor(version: str) -> tuple:
        return tuple(int(part) for part in version.split(".")[:2])

    return minor(torch_version) < minor(TORCH_FLOOR)


def installed_version() -> str:
    """The installed distribution's version (names the CUDA mbkernels._C was built for), else the source's."""
    from importlib import metadata

    try:
        return metadata.version("mbkernels")
    except metadata.PackageNotFoundError:
        return __version__
