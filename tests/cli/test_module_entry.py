"""``python -m edgeopt`` runs the CLI, as the installed ``edgeopt`` script does (a venv without the
script on PATH, or several Pythons side by side)."""

from __future__ import annotations

import json
import subprocess
import sys

import edgeopt
import edgeopt.demo


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


# A C extension (ONNX Runtime's pybind11 module, numpy's) interrupted while it initializes turns the
# KeyboardInterrupt into an ImportError ("initialization failed", "import numpy failed"): simulated by an
# import hook sending the script a real SIGINT, then raising the ImportError as such a module does.
CTRL_C_INSIDE_AN_EXTENSION = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a process started in the background ignores it
class InterruptedExtension:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(10 ** 6):
                    pass  # the handler runs between bytecodes
            except KeyboardInterrupt:
                raise ImportError("initialization failed") from None
sys.meta_path.insert(0, InterruptedExtension())
from edgeopt.cli import main
main()
"""


def test_ctrl_c_inside_an_extensions_import_is_an_interrupt_not_an_internal_error(tmp_path):
    """A Ctrl-C in the first second of ``edgeopt quantize`` said 'internal error: ImportError:
    initialization failed' (exit 70): it had landed in ONNX Runtime's import."""
    loading = CTRL_C_INSIDE_AN_EXTENSION.format(module="edgeopt.cli.main")
    while_loading = subprocess.run([sys.executable, "-c", loading, "--help"], capture_output=True, text=True,
                                   timeout=120)
    assert (while_loading.returncode, while_loading.stderr) == (130, "error: interrupted\n")
    model = str(edgeopt.demo.demo_model_path())
    in_ort = CTRL_C_INSIDE_AN_EXTENSION.format(module="onnxruntime")
    in_a_command = subprocess.run([sys.executable, "-c", in_ort, "inspect", model, "--json"], capture_output=True,
                                  text=True, timeout=120)
    assert in_a_command.returncode == 130 and in_a_command.stderr == "error: interrupted\n", in_a_command.stderr
    assert '"exit_code": 130' in in_a_command.stdout
    no_ort = "import sys; sys.modules['onnxruntime'] = None\nfrom edgeopt.cli import main; main()"
    unrelated = subprocess.run([sys.executable, "-c", no_ort, "inspect", model], capture_output=True, text=True,
                               timeout=120)
    assert unrelated.returncode == 70 and "internal error" in unrelated.stderr  # no Ctrl-C: still a bug


def test_ctrl_c_while_the_commands_load_is_json_on_stdout_under_json():
    # the README: with --json, stdout is JSON whatever happens; a Ctrl-C before the commands loaded left it empty
    loading = CTRL_C_INSIDE_AN_EXTENSION.format(module="edgeopt.cli.main")
    model = str(edgeopt.demo.demo_model_path())
    done = subprocess.run([sys.executable, "-c", loading, "inspect", model, "--json"], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "error: interrupted\n")
    assert json.loads(done.stdout) == {"error": {"message": "interrupted", "exit_code": 130}}
    after_dash_dash = subprocess.run([sys.executable, "-c", loading, "inspect", "--", "--json"], capture_output=True,
                                     text=True, timeout=120)
    assert after_dash_dash.returncode == 130 and after_dash_dash.stdout == ""
