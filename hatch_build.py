"""Build hook: compile connmeta's hot modules with mypyc (as black and mypy ship).

hatchling runs this for every wheel it builds, the editable one of
``pip install -e .`` (``make``) included, so ``make serve`` and ``make test``
stay two commands: the compiled module lands next to its source in
``src/connmeta`` (editable; ``connmeta/__init__.py`` ignores it once the
source is newer) or inside the wheel (a platform wheel then).

The modules stay plain Python that also runs uncompiled: with
``CONNMETA_PURE_PYTHON=1`` this hook compiles nothing, and at run time the
same variable makes connmeta import the sources. A machine without a C
compiler gets a warning and the pure-Python package rather than a failed
install.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

COMPILED = ("src/connmeta/_ingest.py", "src/connmeta/_sorted.py", "src/connmeta/_wirecore.py")
"""Small, self-contained modules (they import nothing of connmeta, so mypyc
type-checks them without the package's dependencies in the build env)."""


class MypycBuildHook(BuildHookInterface):  # type: ignore[misc]  # hatchling is untyped
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        if os.environ.get("CONNMETA_PURE_PYTHON"):
            if version == "editable":  # no module compiled earlier may stay in place
                for path in COMPILED:
                    stem = root / path
                    for built in stem.parent.glob(
                        f"{stem.stem}*{sysconfig.get_config_var('EXT_SUFFIX')}"
                    ):
                        built.unlink()
            return
        work = self._work = Path(tempfile.mkdtemp(prefix="connmeta-mypyc-"))
        try:
            built = _compile(root, work)
        except Exception as e:  # no compiler, no headers: still a working package
            self.app.display_warning(
                f"connmeta: compiling {', '.join(COMPILED)} with mypyc failed ({e}); "
                "installing the pure-Python modules (slower ingest and addon)"
            )
            shutil.rmtree(work, ignore_errors=True)
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        for path in built:
            relative = path.relative_to(work / "lib")
            if version == "editable":
                target = root / "src" / relative
                target.unlink(missing_ok=True)  # never overwrite a mapped, loaded library
                shutil.copy2(path, target)
            else:
                build_data["force_include"][str(path)] = str(relative)
        self.app.display_info(f"connmeta: compiled {', '.join(p.name for p in built)}")

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        work = getattr(self, "_work", None)
        if work is not None:  # the wheel holds its copies now
            shutil.rmtree(work, ignore_errors=True)


def _compile(root: Path, work: Path) -> list[Path]:
    """Build the extension modules into ``work/lib``; returns the built files."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    cwd = os.getcwd()
    os.chdir(root)  # mypyc names modules from paths relative to here
    try:
        extensions = mypycify(
            list(COMPILED),
            opt_level="3",
            # One shared library per module, beside it (connmeta/<name>__mypyc*.so): the
            # modules never call each other, and a group's library would be a top-level
            # module named by a hash of the group.
            separate=True,
            target_dir=str(work / "c"),
            verbose=False,
        )
        dist = Distribution({"name": "connmeta", "ext_modules": extensions})
        build_ext = dist.get_command_obj("build_ext")
        build_ext.build_lib = str(work / "lib")  # type: ignore[attr-defined]
        build_ext.build_temp = str(work / "tmp")  # type: ignore[attr-defined]
        dist.run_command("build_ext")
    finally:
        os.chdir(cwd)
    built = sorted((work / "lib").rglob(f"*{sysconfig.get_config_var('EXT_SUFFIX')}"))
    if not built:
        raise RuntimeError("mypyc built nothing")
    return built
