"""connmeta: the authoritative metadata of a proxy's connections, served over gRPC."""

import os
import sys
from importlib import machinery, util
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("connmeta")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]


def _prefer_source(name: str) -> None:
    """Import ``connmeta.<name>`` from its .py, not from its compiled module (hatch_build.py),
    when CONNMETA_PURE_PYTHON is set or the compiled one is older than the source (an
    editable install whose source changed since: running stale code would mislead)."""
    here = os.path.dirname(__file__)
    source = os.path.join(here, f"{name}.py")
    compiled = [os.path.join(here, f"{name}{suffix}") for suffix in machinery.EXTENSION_SUFFIXES]
    found = [path for path in compiled if os.path.exists(path)]
    if not found or not os.path.exists(source):
        return
    # A second's slack: installing a wheel writes both files in the same moment.
    if not os.environ.get("CONNMETA_PURE_PYTHON") and all(
        os.path.getmtime(path) + 1.0 >= os.path.getmtime(source) for path in found
    ):
        return
    spec = util.spec_from_file_location(f"{__name__}.{name}", source)
    assert spec is not None
    assert spec.loader is not None
    module = util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_prefer_source("_ingest")
_prefer_source("_wirecore")
_prefer_source("_sorted")
