"""The package's layers: the engine never imports qgis nor the learning side, and no module
imports itself back through others (no import cycles)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "siamese_analog_plugin"
ENGINE = PACKAGE / "engine"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Absolute names of the modules ``path`` imports (anywhere in it, function bodies too)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if path.name != "__init__.py" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package[:len(package) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.append((node.lineno, base))
            # ``from . import x`` / ``from .pkg import module``: the modules themselves
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_engine_imports_neither_qgis_nor_learning():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for line, name in _imports(path):
            top = name.split(".")
            if top[0] in ("qgis", "PyQt5", "PyQt6") or name.startswith("siamese_analog_plugin.learning"):
                offenders.append(f"{path.name}:{line} {name}")
    assert not offenders, offenders


def test_no_import_cycles_in_the_package():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: sorted({n for _, n in _imports(p) if n in modules and n != m}) for m, p in modules.items()}
    # A package's __init__ importing nothing of its own is the rule here; a module importing its
    # package is not an edge worth following (Python loads the package first).
    for m in graph:
        graph[m] = [n for n in graph[m] if not m.startswith(n + ".")]
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_importing_the_engine_and_cli_loads_no_qgis():
    modules = sorted(f"siamese_analog_plugin.engine.{p.stem}" for p in ENGINE.glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib\n"
            f"for m in {modules!r} + ['siamese_analog_plugin.cli', 'siamese_analog_plugin']:\n"
            "    importlib.import_module(m)\n"
            "import siamese_analog_plugin.cli as c; c.build_parser()\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('qgis', 'PyQt5', 'PyQt6')]\n"
            "assert not bad, bad\n"
            "print('ok', len(sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(PACKAGE.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
