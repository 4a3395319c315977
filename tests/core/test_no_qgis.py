"""The engine never imports qgis, so it runs headless and in tests alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "siamese_analog_plugin" / "core"


def test_no_qgis_import_statement_under_core():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("qgis", "PyQt5", "PyQt6")]
    assert not offenders, offenders


def test_importing_the_engine_and_cli_loads_no_qgis():
    modules = sorted(f"siamese_analog_plugin.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib\n"
            f"for m in {modules!r} + ['siamese_analog_plugin.cli', 'siamese_analog_plugin']:\n"
            "    importlib.import_module(m)\n"
            "import siamese_analog_plugin.cli as c; c.build_parser()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('qgis', 'PyQt5', 'PyQt6')]\n"
            "assert not bad, bad\n"
            "print('ok', len(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(CORE.parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
