"""The presets are installed with the package: a wheel built from the repository, installed into a fresh
virtual environment, runs `t2po presets` and `t2po train smoke --print-config` from another folder
(nothing is downloaded: the wheel is installed without dependencies, and the new environment reads the
dependencies from the project's own environment, whose editable t2po it does not see)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# what a user's shell would have: no PYTHONPATH pointing at a checkout, no active virtual environment
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(*args, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, env=ENV, **kw)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out


def test_a_wheel_installed_elsewhere_finds_its_presets(tmp_path):
    # built from a copy of what the wheel is made of: setuptools writes build/ and *.egg-info next to the source
    source = tmp_path / "source"
    shutil.copytree(REPO / "t2po", source / "t2po", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("t2po-*.whl"))
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    # the dependencies from this environment's site-packages, added as a plain path: its .pth files (the
    # editable install of the checkout) are not run, so `import t2po` can only find the wheel
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(python, "-c", "import t2po; print(t2po.__file__)", cwd=elsewhere).stdout.strip()
    assert where.startswith(str(venv)), f"t2po imported from {where}, not from the installed wheel"
    presets = _run(venv / "bin" / "t2po", "presets", cwd=elsewhere).stdout
    assert "smoke" in presets and "default" in presets
    config = _run(venv / "bin" / "t2po", "train", "smoke", "--print-config", cwd=elsewhere).stdout
    assert "iterations: 1" in config and "group_size: 2" in config  # smoke.yaml on top of its base, default.yaml
    assert list(elsewhere.iterdir()) == [], "--print-config writes nothing"
