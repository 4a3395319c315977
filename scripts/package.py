#!/usr/bin/env python3
"""Build the plugin zip a user installs with QGIS's "Install from ZIP".

    python scripts/package.py [--out-dir dist]

The zip holds one folder, ``siamese_analog_plugin/``, with the code, ``metadata.txt``, the
shipped model(s) under ``models/`` and the icon, sample data and example model under
``resources/``. Byte-for-byte reproducible: files sorted, fixed timestamps. Needs only the
standard library (no QGIS, no torch).
"""

from __future__ import annotations

import argparse
import configparser
import re
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "siamese_analog_plugin"
REQUIRED_METADATA = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
                     "repository", "tracker", "homepage", "icon", "hasProcessingProvider", "category", "tags")
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".ipynb_checkpoints"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".state.pt", ".aux.xml", ".swp", "~")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def _skip(path: Path) -> bool:
    name = path.name
    return (any(part in SKIP_DIRS for part in path.parts) or name.startswith(".") or name.endswith(SKIP_SUFFIXES)
            or ".partial-" in name or ".tmp-" in name)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not _skip(p.relative_to(folder)))


def read_metadata(path: Path) -> configparser.SectionProxy:
    """``metadata.txt``'s [general] section, checked for the keys the plugin repository wants."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    parser.read(path, encoding="utf-8")
    if "general" not in parser:
        raise SystemExit(f"{path}: no [general] section")
    general = parser["general"]
    missing = [k for k in REQUIRED_METADATA if not general.get(k, "").strip()]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)}")
    return general


def package_version() -> str:
    text = (ROOT / PACKAGE / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not match:
        raise SystemExit(f"{PACKAGE}/__init__.py has no __version__")
    return match.group(1)


def plan(root: Path = ROOT) -> dict[str, Path]:
    """``archive name -> source file`` for everything the zip holds."""
    entries: dict[str, Path] = {}
    for f in _files(root / PACKAGE):
        entries[f"{PACKAGE}/{f.relative_to(root / PACKAGE).as_posix()}"] = f
    for folder in ("resources", "models"):
        src = root / folder
        if src.is_dir():
            for f in _files(src):
                if folder == "models" and f.relative_to(src).parts[0] == "folds":
                    continue  # the leave-one-site-out models only serve the evaluation (make evaluate)
                entries[f"{PACKAGE}/{folder}/{f.relative_to(src).as_posix()}"] = f
    for extra in ("LICENSE", "README.md", "CHANGELOG.md"):
        if (root / extra).is_file():
            entries.setdefault(f"{PACKAGE}/{extra}", root / extra)
    return entries


def build(out_dir: Path, root: Path = ROOT) -> Path:
    """Write ``<out_dir>/siamese_analog_plugin-<version>.zip`` and return its path."""
    general = read_metadata(root / PACKAGE / "metadata.txt")
    version = package_version()
    if general["version"].strip() != version:
        raise SystemExit(f"metadata.txt says version {general['version']} but {PACKAGE}.__version__ is {version}")
    entries = plan(root)
    icon = f"{PACKAGE}/{general['icon'].strip()}"
    if icon not in entries:
        raise SystemExit(f"metadata.txt names the icon {general['icon']} but the zip would not hold it")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PACKAGE}-{version}.zip"
    tmp = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for folder in sorted({str(Path(name).parent) for name in entries}):  # explicit folder entries
            parts = Path(folder).parts
            for i in range(1, len(parts) + 1):
                name = "/".join(parts[:i]) + "/"
                if name not in zf.namelist():
                    zf.writestr(zipfile.ZipInfo(name, FIXED_TIME), "")
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, entries[name].read_bytes())
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "dist"), help="where to write the zip (default: dist/)")
    args = parser.parse_args(argv)
    target = build(Path(args.out_dir))
    with zipfile.ZipFile(target) as zf:
        files = [n for n in zf.namelist() if not n.endswith("/")]
        models = [n for n in files if n.startswith(f"{PACKAGE}/models/")]
    print(f"Wrote {target} ({target.stat().st_size / 1e6:.2f} MB, {len(files)} files; models: "
          f"{', '.join(Path(m).name for m in models) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
