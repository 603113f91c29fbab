"""``python -m edgeopt`` runs the CLI, as the installed ``edgeopt`` script does (a venv without the
script on PATH, or several Pythons side by side)."""

from __future__ import annotations

import subprocess
import sys

import edgeopt


def test_python_dash_m_edgeopt_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "edgeopt", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"edgeopt {edgeopt.__version__}"
    missing = subprocess.run([sys.executable, "-m", "edgeopt", "inspect", "no-such-model.onnx"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: model file no-such-model.onnx not found")
