# The one version source: setup.py and CMakeLists.txt read these lines; an installed wheel with mbkernels._C adds
# the CUDA it was built for (e.g. 0.1.0+cu130, see setup.py).
__version__ = "0.1.0"
# mbkernels._C is written against PyTorch's stable ABI of this torch (its TORCH_TARGET_VERSION): one build loads
# under every torch from this version on, whichever torch built it, and under no older one.
NATIVE_TORCH_FLOOR = "2.10"


def installed_version() -> str:
    """The installed distribution's version (names the CUDA mbkernels._C was built for), else the source's."""
    from importlib import metadata

    try:
        return metadata.version("mbkernels")
    except metadata.PackageNotFoundError:
        return __version__
