"""``sessionmw.__version__``: the installed distribution's version, read from its metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sessionmw")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
