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


# A Ctrl-C that lands while the script imports the commands (ONNX, ONNX Runtime, numpy: a second or
# more on a loaded machine), simulated by an import hook that raises it when edgeopt.cli.main loads.
INTERRUPT_WHILE_IMPORTING = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "edgeopt.cli.main":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from edgeopt.cli import main
main()
"""


def test_ctrl_c_while_the_commands_load_is_one_line_and_exit_130():
    done = subprocess.run([sys.executable, "-c", INTERRUPT_WHILE_IMPORTING, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr, done.stdout) == (130, "error: interrupted\n", "")


def test_the_commands_load_without_onnx_until_one_runs():
    """``edgeopt --help`` took 1-2 s importing ONNX, ONNX Runtime and onnx_ir (sympy) it does not use."""
    probe = ("import sys, edgeopt, edgeopt.cli.main, edgeopt.errors, edgeopt.api; "
             "heavy = {'onnx', 'onnxruntime', 'onnx_ir'}; print(sorted(heavy & set(sys.modules))); "
             "edgeopt.Int8Config; print('onnx_ir' in sys.modules); print(edgeopt.bench is edgeopt.api.bench)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:3] == ["[]", "True", "True"], done.stderr
