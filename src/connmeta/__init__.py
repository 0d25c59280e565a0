"""connmeta: the authoritative metadata of a proxy's connections, served over gRPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("connmeta")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
