"""The simulator's hot modules compiled with mypyc, for ``simulate.py --native``.

The same source files (``peerd.sim`` and the picker, choker and scheduling
code it drives) are compiled to C extension modules by mypyc, which ships
with mypy (a test dependency), and a C compiler. The build lands in
``.native/<hash>/`` at the top of the repository, keyed by the sources, the
Python version and mypyc's version, so it runs once per change (about a
minute) and never touches the source tree. :func:`activate` puts the built
modules ahead of the sources for this process only; the tests and the node
always run the plain Python.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("peerd/sim.py", "peerd/picker.py", "peerd/choker.py", "peerd/scheduling.py")


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
    for module in MODULES:
        digest.update(module.encode())
        digest.update((ROOT / module).read_bytes())
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
    shutil.rmtree(tmp / "tmp", ignore_errors=True)
    (tmp / "built").touch()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def activate() -> Path:
    """Build if needed, then make ``import peerd.sim`` (and the modules it
    drives) load the compiled modules in this process. Call it before
    anything imports them.

    Raises:
        NativeBuildError: the build failed, or a module was already imported
            from source.
    """
    names = [m.removesuffix(".py").replace("/", ".") for m in MODULES]
    early = [n for n in names if n in sys.modules]
    if early:
        raise NativeBuildError(f"already imported from source: {', '.join(early)}")
    lib = build() / "lib"
    import peerd  # the source package first (lib/peerd has no __init__)

    peerd.__path__.insert(0, str(lib / "peerd"))
    sys.path.insert(0, str(lib))  # the shared runtime, peer_native__mypyc
    for name in names:
        module = importlib.import_module(name)
        if not (module.__file__ or "").endswith(".so"):
            raise NativeBuildError(f"{name} did not load compiled ({module.__file__})")
    return lib
