"""The installer's pip logic, with the real pip: what is installed, where, and how it loads."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from siamese_analog_plugin import dependencies


def make_wheel(folder: Path, name: str = "tinyanalogpkg", version: str = "0.1") -> Path:
    """A minimal pure-Python wheel (the format pip installs), built here without network."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = 'installed {version}'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


def test_install_list_never_holds_qgis_packages():
    """Even with nothing importable, the list is onnxruntime and its own small deps: never numpy."""
    everything_missing = dependencies.install_list(["onnxruntime", "torch"], available=lambda module: False)
    names = {dependencies._dist_name(spec) for spec in everything_missing}
    assert "onnxruntime" in names and "torch" in names and "flatbuffers" in names
    assert not names & dependencies.NEVER_INSTALL
    assert "numpy" not in " ".join(everything_missing)
    # What is already importable is not installed again.
    only_ort = dependencies.install_list(["onnxruntime"], available=lambda module: module != "onnxruntime")
    assert [dependencies._dist_name(s) for s in only_ort] == ["onnxruntime"]


def test_pip_command_is_a_target_install_without_dependencies(tmp_path):
    cmd = dependencies.pip_command("python3", tmp_path, ["onnxruntime>=1.16,<1.33"])
    assert cmd[:4] == ["python3", "-m", "pip", "install"]
    assert cmd[cmd.index("--target") + 1] == str(tmp_path)
    assert "--no-deps" in cmd and "--break-system-packages" not in cmd and "--user" not in cmd
    for forbidden in ("numpy", "numpy==1.26.4", "GDAL", "PyQt5"):
        with pytest.raises(ValueError):
            dependencies.pip_command("python3", tmp_path, [forbidden])


def test_deps_dir_is_per_python_version(tmp_path):
    folder = dependencies.deps_dir(tmp_path)
    assert folder.parent == tmp_path / "python" / "siamese_analog_deps"
    assert folder.name == f"py{sys.version_info[0]}{sys.version_info[1]}"


def test_find_python_finds_an_interpreter_of_this_version_with_pip():
    python = dependencies.find_python()
    assert python is not None and Path(python).name.startswith("python")
    out = subprocess.run([python, "-c", "import sys, pip; print(sys.version_info[:2])"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == str(tuple(sys.version_info[:2]))


def test_real_pip_installs_into_the_target_and_it_imports_without_restart(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path)
    target = dependencies.deps_dir(tmp_path / "profile")
    target.mkdir(parents=True)
    cmd = dependencies.pip_command(dependencies.find_python(), target, [str(wheel)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / "tinyanalogpkg" / "__init__.py").exists()
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert not dependencies.module_available("tinyanalogpkg")
    assert dependencies.activate(target)
    assert sys.path[-1] == str(target)  # last: QGIS's own packages always win
    dependencies.activate(target)
    assert sys.path.count(str(target)) == 1
    module = importlib.import_module("tinyanalogpkg")
    try:
        assert module.VALUE == "installed 0.1"
    finally:
        sys.modules.pop("tinyanalogpkg", None)


def test_the_folder_never_shadows_what_python_already_has(tmp_path, monkeypatch):
    """A copy of a package in the plugin's folder (say an old numpy) is never the one imported."""
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("raise ImportError('the plugin folder shadowed numpy')\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    dependencies.activate(tmp_path)
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.append({str(tmp_path)!r}); import numpy; "
                          "print(numpy.__file__)"], capture_output=True, text=True)
    assert out.returncode == 0 and str(tmp_path) not in out.stdout
    assert not dependencies.activate(tmp_path / "missing")


def test_check_import_reports_what_find_spec_cannot_see(tmp_path):
    """A package that is found but fails on import (torch without its CUDA libraries) is no
    success: the real import in a fresh Python says why."""
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("raise ImportError('libcudnn.so.9: cannot open')\n")
    (tmp_path / "goodpkg.py").write_text("X = 1\n")
    python = dependencies.find_python()
    assert dependencies.check_import(python, tmp_path, ["goodpkg"]) is None
    error = dependencies.check_import(python, tmp_path, ["goodpkg", "brokenpkg"])
    assert error is not None and "libcudnn" in error


def test_torch_is_pinned_to_the_tested_cpu_build_index():
    req = dependencies.PACKAGES["torch"]
    assert req.index_url == "https://download.pytorch.org/whl/cpu"
    cmd = dependencies.pip_command("python3", "T", dependencies.install_list(["torch"], lambda m: False),
                                   req.index_url)
    assert "https://pypi.org/simple" not in cmd  # PyPI's Linux torch is the CUDA build
    assert "torch>=2.1,<2.14" in cmd
