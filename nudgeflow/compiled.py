"""The hot modules compiled with Cython, optional, and the way back to their Python source.

A worker spends ~80 % of its CPU in the batch core and the engine (`bench/peers_compare.py`
under py-spy). Compiled as they are, from the same `.py` files, they run the same code with the
interpreter's dispatch taken out: ~10 % fewer instructions per event in `bench/core_only.py`. The
engine's `_Run` is also declared a C class (`engine/core.pxd`: its attributes as C fields, its
methods called through a C table), where most of the engine's calls go.

Nothing here changes what the code does:
- annotations are not turned into C types (`annotation_typing=False`): an `int` stays Python's
  int, with no overflow and no conversions;
- a compiled module is imported only while it is newer than its source, so an edited file never
  runs stale compiled code (it runs from source until the next build);
- `NUDGEFLOW_PURE=1` imports every module from source; the tests compare both builds' outputs.

    nudgeflow compile             # what `make` runs after installing (needs a C compiler)
    nudgeflow compile --status    # which modules run compiled
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

MODULES = (
    "nudgeflow.engine.core",
    "nudgeflow.engine.state",
    "nudgeflow.engine.predicates",
    "nudgeflow.engine.templates",
    "nudgeflow.engine.graph",
    "nudgeflow.agents.batch",
    "nudgeflow.agents.store",
    "nudgeflow.agents.timers",
    "nudgeflow.agents.keys",
    "nudgeflow.agents.occupancy",
    "nudgeflow.streams.events",
    "nudgeflow.streams.wire",
)
PURE_ENV = "NUDGEFLOW_PURE"
PACKAGE = Path(__file__).resolve().parent
# the options every module is compiled with: Python's semantics, not C's
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True}


def source_of(module: str) -> Path:
    """The module's .py file (through the package's links: engine/, agents/, streams/)."""
    return PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")


def compiled_of(module: str) -> Path:
    """Where the module's compiled extension lives: beside its source."""
    src = source_of(module)
    return src.with_name(src.stem + importlib.machinery.EXTENSION_SUFFIXES[0])


def state_of(module: str) -> str:
    """`compiled` (its extension is current), `stale` (the source changed since) or `source`."""
    ext, src = compiled_of(module), source_of(module)
    if not ext.exists():
        return "source"
    deps = [src, src.with_suffix(".pxd")]
    newest = max(p.stat().st_mtime for p in deps if p.exists())
    return "compiled" if ext.stat().st_mtime >= newest else "stale"


def pure() -> bool:
    """NUDGEFLOW_PURE, read as the settings read a flag (`Settings.pure`: it is one)."""
    return os.environ.get(PURE_ENV, "").strip().lower() not in ("", "0", "false", "f", "no", "n", "off")


def status() -> dict[str, str]:
    """Each module's state, as it imports in this process."""
    return {m: "source" if pure() else state_of(m) for m in MODULES}


def summary() -> str:
    """Compiled of all, e.g. "12/12" (`nudgeflow_build_info{compiled}`, the worker's first line)."""
    return f"{list(status().values()).count('compiled')}/{len(MODULES)}"


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports a hot module from its .py when compiled code must not run (pure mode, or stale)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES or (not pure() and state_of(fullname) != "stale"):
            return None  # the usual finders: the extension if there is one, else the source
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


def install() -> None:
    """Put the finder first (once); `nudgeflow/__init__.py` calls it before any submodule loads."""
    if not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def build(jobs: int = 2) -> list[Path]:
    """Compile every module in place (Cython, then the C compiler Python was built with)."""
    from Cython.Build import cythonize  # the `compiled` extra: only the build needs it
    from setuptools import Distribution, Extension

    built = []
    with tempfile.TemporaryDirectory(prefix="nudgeflow-build-") as tmp:  # the C files: ~40 MB
        work = Path(tmp)
        exts = [Extension(m, [str(source_of(m))]) for m in MODULES]
        c_exts = cythonize(exts, build_dir=tmp, compiler_directives=DIRECTIVES, quiet=True)  # type: ignore[no-untyped-call]
        dist = Distribution({"ext_modules": c_exts})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_temp, cmd.build_lib, cmd.parallel = str(work / "temp"), str(work / "lib"), jobs
        dist.run_command("build_ext")
        for m in MODULES:  # build_lib mirrors the module names; each goes beside its source
            out, dest = work / "lib" / Path(*m.split(".")[:-1]) / compiled_of(m).name, compiled_of(m)
            # copied beside it, then renamed over it: a process that has the old one loaded keeps
            # its file (a rename, unlike a copy onto it); and /tmp may be another file system
            staged = dest.with_name(dest.name + ".new")
            shutil.copyfile(out, staged)
            staged.replace(dest)
            built.append(dest)
    return built
