"""The simulator's hot modules compiled with mypyc, for ``simulate.py --native``.

The same source files (``sim.simulation`` and the picker, choker, scheduling
and wire-protocol modules it drives; :data:`MODULES`) are compiled to C
extension modules by mypyc, which ships with mypy (a test dependency), and
a C compiler. The build lands in ``.native/<hash>/`` at the top of the
repository, keyed by the package sources, the Python version and mypy's
version, so it runs once per change (about 40 s) and never touches the
source tree.
:func:`activate` installs an import hook that loads the built modules
instead of those sources, in this process only (a package's ``__init__``
and every other module stay Python); the tests and the node always run the
plain Python.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "sim/simulation.py",
    "peerd/engine/picker.py",
    "peerd/engine/upload_queue.py",
    "peerd/engine/scheduling.py",
    "peerd/wire/_connection.py",
    "peerd/wire/_codec.py",
    "peerd/wire/_frames.py",
    "peerd/wire/_state.py",
)


class NativeBuildError(RuntimeError):
    """mypyc or the C compiler is missing, or the build failed."""


def _build_dir() -> Path:
    try:
        from mypy.version import __version__ as mypy_version
    except ImportError:
        raise NativeBuildError(
            "--native needs mypy (with mypyc): pip install mypy, or run without --native"
        ) from None
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update(mypy_version.encode())
    # Every source the compiled modules were type-checked against, not only
    # theirs (mypyc may build in what it knows of the modules they import).
    sources = [
        *ROOT.glob("sim/**/*.py"),
        *ROOT.glob("peerd/**/*.py"),
        *ROOT.glob("tracker/**/*.py"),
    ]
    for source in sorted(sources):
        digest.update(source.relative_to(ROOT).as_posix().encode())
        digest.update(source.read_bytes())
    return ROOT / ".native" / digest.hexdigest()[:16]


_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
out = sys.argv[1]
setup(
    name="peer-native",
    ext_modules=mypycify(sys.argv[2:], group_name="peer_native", target_dir=out + "/c"),
    script_args=["-q", "build_ext", "--build-lib", out + "/lib", "--build-temp", out + "/tmp"],
)
"""


def build() -> Path:
    """Compile :data:`MODULES` unless this version is built; return the build directory.

    Raises:
        NativeBuildError: mypyc or the compiler failed (its output is in the message).
    """
    out = _build_dir()
    if (out / "built").exists():
        return out
    tmp = out.with_name(out.name + f".{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-c", _SETUP, str(tmp), *MODULES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise NativeBuildError(f"mypyc build failed (run without --native):\n{tail}")
    for scratch in ("tmp", "c"):  # object files and generated C
        shutil.rmtree(tmp / scratch, ignore_errors=True)
    (tmp / "built").touch()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    for old in out.parent.iterdir():  # builds of earlier sources
        if old.name != out.name and "." not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return out


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules first (a package's own ``__init__`` stays Python)."""

    def __init__(self, modules: dict[str, Path]) -> None:
        self._modules = modules

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        so = self._modules.get(fullname)
        return None if so is None else importlib.util.spec_from_file_location(fullname, so)


def activate() -> Path:
    """Build if needed, then make this process import the compiled modules
    (``sim.simulation`` and what it drives). Call it before anything imports them.

    Raises:
        NativeBuildError: the build failed, or a module was already imported
            from source.
    """
    names = [m.removesuffix(".py").replace("/", ".") for m in MODULES]
    early = [n for n in names if n in sys.modules]
    if early:
        raise NativeBuildError(f"already imported from source: {', '.join(early)}")
    lib = build() / "lib"
    modules: dict[str, Path] = {}
    for name in names:
        found = sorted(
            (lib / name.rpartition(".")[0].replace(".", "/")).glob(
                name.rpartition(".")[2] + ".*.so"
            )
        )
        if not found:
            raise NativeBuildError(f"the build has no {name}; remove {lib.parent} and retry")
        modules[name] = found[0]
    runtime = sorted(lib.glob("peer_native__mypyc.*.so"))  # shared by the modules
    if not runtime:
        raise NativeBuildError(f"the build has no mypyc runtime; remove {lib.parent} and retry")
    modules["peer_native__mypyc"] = runtime[0]
    sys.meta_path.insert(0, _CompiledFinder(modules))
    for name in names:
        module = importlib.import_module(name)
        if module.__file__ != str(modules[name]):
            raise NativeBuildError(f"{name} did not load compiled ({module.__file__})")
    return lib
