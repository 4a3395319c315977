"""Installing the plugin's optional Python packages into a folder the plugin owns (no qgis here).

QGIS's Python is usually the system's (Debian, macOS/Homebrew) or OSGeo4W's: ``pip install``
into it is refused (PEP 668, "externally-managed-environment") or needs administrator rights,
and it could replace the numpy, GDAL or PyQt QGIS was built against. So the plugin installs
what it needs with ``pip install --target DIR --no-deps`` (PEP 668 allows ``--target``),
naming every needed dependency that is not importable yet, and appends DIR to the END of
``sys.path``: whatever QGIS already has always wins, and numpy, GDAL, PyQt and QGIS itself are
never installed (:data:`NEVER_INSTALL`).

The dialog that runs the command lives in ``gui/installer.py``; this module builds the command
and loads the result, so tests run it with the real pip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Requirement",
    "PACKAGES",
    "NEVER_INSTALL",
    "deps_dir",
    "activate",
    "module_available",
    "missing_packages",
    "install_list",
    "find_python",
    "pip_command",
    "manual_command",
    "check_import",
    "plan_install",
]

# Distribution names (lower case, '-' or '_') that are never installed: QGIS brings its own and
# a second copy in the same process breaks it (ABI clashes, two GDALs, two Qts).
NEVER_INSTALL = frozenset({"numpy", "gdal", "osgeo", "pyqt5", "pyqt6", "pyqt5-qt5", "pyqt6-qt6", "pyqt5-sip",
                           "pyqt6-sip", "sip", "qgis", "rasterio", "shapely", "pyproj", "fiona", "matplotlib",
                           "scipy", "pandas"})


@dataclass(frozen=True)
class Requirement:
    """One thing the plugin may install.

    Attributes:
        module: the name to import (what tells whether it is there).
        spec: the pip requirement, pinned to versions that work with numpy 1.x and 2.x.
        deps: ``(module, spec)`` of its runtime dependencies; only the missing ones are installed.
        index_url: a package index other than PyPI (torch's CPU-only wheels), or ``None``.
        purpose: a few words for the dialog.
    """

    module: str
    spec: str
    deps: tuple[tuple[str, str], ...] = ()
    index_url: str | None = None
    purpose: str = ""
    size: str = ""


# onnxruntime 1.16-1.22 supports Python 3.9-3.13 and numpy 1.21+ (1.20+ wheels are built against
# numpy 2, which keeps them importable with numpy 1.x); its Requires-Dist: flatbuffers,
# numpy>=1.21.6, packaging, protobuf (the last only for model tools, installed anyway).
PACKAGES: dict[str, Requirement] = {
    "onnxruntime": Requirement(
        "onnxruntime", "onnxruntime>=1.16,<1.33",
        (("flatbuffers", "flatbuffers"), ("packaging", "packaging"), ("google.protobuf", "protobuf>=4.25.8,<7")),
        purpose="runs the encoder (searches, embeddings, landform maps)", size="a 30 MB download"),
    "torch": Requirement(
        # Up to the version the project tests (requirements.txt): newer releases may need newer
        # sympy/typing-extensions than a distribution's Python has (those come first on sys.path).
        "torch", "torch>=2.1,<2.14",
        (("filelock", "filelock"), ("typing_extensions", "typing-extensions>=4.8"), ("sympy", "sympy"),
         ("mpmath", "mpmath<1.4"), ("networkx", "networkx"), ("jinja2", "jinja2"), ("markupsafe", "markupsafe"),
         ("fsspec", "fsspec")),
        index_url="https://download.pytorch.org/whl/cpu",
        purpose="trains encoders (and runs them when onnxruntime is missing)", size="about 200 MB (CPU-only build)"),
}


def deps_dir(settings_dir: str | os.PathLike) -> Path:
    """The plugin's package folder in a QGIS profile (``QgsApplication.qgisSettingsDirPath()``).

    One folder per Python version: binary wheels only load in the Python they were built for.
    """
    return Path(settings_dir) / "python" / "siamese_analog_deps" / f"py{sys.version_info[0]}{sys.version_info[1]}"


def activate(folder: str | os.PathLike) -> bool:
    """Append ``folder`` to the end of ``sys.path`` (once) so what it holds imports without a
    restart, and never shadows QGIS's own packages. Returns whether the folder exists."""
    folder = str(folder)
    if not os.path.isdir(folder):
        return False
    if folder not in sys.path:
        sys.path.append(folder)
    importlib.invalidate_caches()
    return True


def module_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(names=("onnxruntime",)) -> list[str]:
    """The keys of :data:`PACKAGES` among ``names`` that cannot be imported."""
    return [name for name in names if not module_available(PACKAGES[name].module)]


def _dist_name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def install_list(names, available=module_available) -> list[str]:
    """The pip requirements to install for the packages ``names``: each package and its missing
    dependencies, never anything in :data:`NEVER_INSTALL`.

    Args:
        names: keys of :data:`PACKAGES`.
        available: ``module -> bool`` (tests pass their own).
    """
    specs: list[str] = []
    for name in names:
        req = PACKAGES[name]
        for module, spec in ((req.module, req.spec), *req.deps):
            if available(module) or spec in specs:
                continue
            if _dist_name(spec) in NEVER_INSTALL:
                raise ValueError(f"{spec} must come with QGIS, not from the plugin")
            specs.append(spec)
    return specs


def _clean_env() -> dict:
    """The environment for a child Python: QGIS's PYTHONPATH/PYTHONHOME are for QGIS only."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PIP_USER", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(name, None)
    return env


def _python_info(path: str) -> tuple[int, int, str] | None:
    """``(major, minor, base prefix)`` of the interpreter at ``path`` when it has pip, else ``None``."""
    try:
        out = subprocess.run([path, "-c", "import sys, pip; print(sys.version_info[0], sys.version_info[1], "
                              "sys.base_prefix)"], capture_output=True, text=True, timeout=20, check=False,
                             env=_clean_env())
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.stdout.strip().split(" ", 2)
    return (int(parts[0]), int(parts[1]), parts[2]) if out.returncode == 0 and len(parts) == 3 else None


def _candidates() -> list[str]:
    """Where QGIS's own Python interpreter may be (``sys.executable`` is often the qgis binary)."""
    major, minor = sys.version_info[:2]
    names = [f"python{major}.{minor}", f"python{major}", "python"]
    if os.name == "nt":
        names = ["python3.exe", "python.exe"]
    found = [sys.executable, getattr(sys, "_base_executable", "")]
    for prefix in dict.fromkeys((sys.exec_prefix, sys.base_exec_prefix, sys.prefix)):
        # Linux/macOS: PREFIX/bin/python3.X; OSGeo4W: PREFIX/python3.exe (apps/Python3X) or bin/.
        found += [os.path.join(prefix, "bin", n) for n in names] + [os.path.join(prefix, n) for n in names]
    found += [shutil.which(n) or "" for n in names]
    return [c for c in dict.fromkeys(found) if c]


def find_python() -> str | None:
    """The Python interpreter that runs QGIS's Python (same major.minor, with pip), or ``None``.

    Only a file named python* counts: in QGIS ``sys.executable`` may be ``qgis`` or
    ``qgis-bin.exe`` (running that with ``-m pip`` would start another QGIS), or whatever
    ``python3`` comes first on PATH (pyenv, conda): an interpreter of QGIS's own installation
    (same base prefix) is preferred to one that only has the same version.
    """
    same_version = None
    for path in _candidates():
        if not os.path.basename(path).lower().startswith("python") or not os.path.isfile(path):
            continue
        info = _python_info(path)
        if info is None or info[:2] != tuple(sys.version_info[:2]):
            continue
        if os.path.realpath(info[2]) == os.path.realpath(sys.base_prefix):
            return path
        same_version = same_version or path
    return same_version


def pip_command(python: str, target: str | os.PathLike, requirements: list[str],
                index_url: str | None = None) -> list[str]:
    """The command installing ``requirements`` (exact list, ``--no-deps``) into ``target``.

    Binary wheels only (nothing to compile on the user's machine); ``index_url`` (torch's CPU
    wheels) replaces PyPI.
    """
    if not requirements:
        raise ValueError("nothing to install")
    for spec in requirements:
        if _dist_name(spec) in NEVER_INSTALL:
            raise ValueError(f"{spec} must come with QGIS, not from the plugin")
    cmd = [python, "-m", "pip", "install", "--target", str(target), "--no-deps", "--upgrade", "--only-binary=:all:",
           "--no-input", "--disable-pip-version-check", "--no-warn-script-location", "--progress-bar", "off"]
    if index_url:
        # That index only: PyPI's torch for Linux is the CUDA build (GBs, needs nvidia-* packages).
        # The CPU index also holds torch's small dependencies.
        cmd += ["--index-url", index_url]
    return cmd + list(requirements)


def manual_command(names, target: str | os.PathLike | None = None) -> str:
    """The same install as a shell command, for users who prefer a terminal."""
    specs = install_list(names) or [PACKAGES[n].spec for n in names]
    python = find_python() or ("python3.exe" if os.name == "nt" else "python3")
    index = next((PACKAGES[n].index_url for n in names if PACKAGES[n].index_url), None)
    cmd = [python, "-m", "pip", "install", "--target", str(target or "DIR"), "--no-deps"]
    if index:
        cmd += ["--index-url", index]
    return " ".join(f'"{c}"' if any(ch in c for ch in ' <>') else c for c in cmd + specs)


@dataclass
class InstallPlan:
    """What one click installs: the command to run and the folder to load afterwards."""

    names: list[str]
    target: Path
    python: str | None
    requirements: list[str] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        index = next((PACKAGES[n].index_url for n in self.names if PACKAGES[n].index_url), None)
        return pip_command(self.python or "python3", self.target, self.requirements, index)


def check_import(python: str, target: str | os.PathLike, modules) -> str | None:
    """Import ``modules`` in a fresh ``python`` with ``target`` at the end of its path, as QGIS
    will: ``None`` when they import, else the last line of the error (e.g. a missing shared
    library that ``find_spec`` cannot see)."""
    code = (f"import sys; sys.path.append({str(target)!r}); "
            + "; ".join(f"import {m}" for m in modules))
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, env=_clean_env())
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if out.returncode == 0:
        return None
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {out.returncode}"


def plan_install(names, target: str | os.PathLike) -> InstallPlan:
    """The plan for installing ``names`` into ``target`` (the python may be ``None``: not found)."""
    return InstallPlan(list(names), Path(target), find_python(), install_list(names))
