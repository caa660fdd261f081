# The one version source: setup.py and CMakeLists.txt read this line; an installed wheel adds its build tag
# (e.g. 0.1.0+cu130.torch2.14, see setup.py).
__version__ = "0.1.0"


def installed_version() -> str:
    """The installed distribution's version (names what mbkernels._C was built for), else the source's."""
    from importlib import metadata

    try:
        return metadata.version("mbkernels")
    except metadata.PackageNotFoundError:
        return __version__
