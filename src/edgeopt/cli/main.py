"""Entry point: runs the Typer app and turns user errors into one line and an exit code.

Exit codes: 0 success; 1-7 an :class:`EdgeoptError` (its ``exit_code``);
2 also for a command-line usage error (Typer's own); 8 an accuracy goal of
``quantize`` not met (the best model found is written); 70 an internal error (a
bug, whose traceback ``--debug`` shows); 130 interrupted; 143 terminated (SIGTERM).
Under ``--json`` every error is also ``{"error": {"message": ..., "exit_code": ...}}`` on stdout.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback
import warnings

from rich.text import Text

from edgeopt.api._terms import command_line
from edgeopt.cli import INTERRUPTED, InterruptedAfterWriting, ctrl_c_seen, error_object, json_flag_given, state
from edgeopt.cli.app import app
from edgeopt.cli.render import print_json
from edgeopt.errors import EdgeoptError, EdgeoptWarning

__all__ = ["main"]

INTERNAL_ERROR = 70
TERMINATED = 143  # 128 + SIGTERM


def _fail(message: str, code: int, *, as_json: bool, result: dict | None = None) -> int:
    """The error's one line on stderr, its exit code, and under --json the error on stdout too."""
    state.stderr.print(Text.assemble(("error:", "bold red"), f" {message}"))
    if as_json:
        print_json(error_object(message, code, result))
    return code


def _json_requested(argv: list[str] | None) -> bool:
    """Whether the command line asks for --json: the flag, not an option's value (``--exclude --json``)."""
    args = sys.argv[1:] if argv is None else argv
    return "--json" in args and json_flag_given(args, _values_taken(args))


def _values_taken(args: list[str]) -> dict[str, int]:
    """How many values each option of the command ``args`` runs takes (its name is the first word: the
    options before it are flags), the flags left out."""
    import typer.main

    group = typer.main.get_command(app)
    name = next((token for token in args if not token.startswith("-")), None)
    params = [*group.params, *(group.commands[name].params if name in group.commands else ())]
    return {opt: param.nargs for param in params if param.param_type_name == "option"
            and not param.is_flag and not param.count for opt in param.opts}


class _ConsoleLog(logging.Handler):
    """edgeopt's own log records as ``warning: message`` lines on stderr, each message once per command
    (data opened again for the checks after quantizing must not repeat its warnings; a report's
    warnings that were already said as they happened are not said again)."""

    def __init__(self) -> None:
        super().__init__()
        self._line = _LogLine()

    def emit(self, record: logging.LogRecord) -> None:
        if self._line.filter(record):
            state.stderr.print(self._line.format(record))


def _run(argv: list[str] | None) -> int:
    log = logging.getLogger("edgeopt")
    handler, propagate = _ConsoleLog(), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        with warnings.catch_warnings():  # the API's EdgeoptWarnings are the report's, which the commands print
            warnings.simplefilter("ignore", EdgeoptWarning)
            with command_line():  # errors keep the command line's option names alone
                return _run_app(argv)
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _run_app(argv: list[str] | None) -> int:
    as_json = False
    try:
        as_json = _json_requested(argv)  # inside: reading the commands' options can be interrupted too
        app(args=argv, prog_name="edgeopt")
    except SystemExit as done:  # Typer turns Ctrl-C (and SIGTERM, raised as one) into exit code 130
        if done.code == INTERRUPTED:
            return _interrupted(as_json=as_json)
        return _exited(done, as_json)
    except InterruptedAfterWriting as stop:
        return _interrupted(stop.message, stop.result, as_json=as_json)
    except EdgeoptError as error:
        _debug_traceback()
        return _fail(str(error), error.exit_code, as_json=as_json, result=getattr(error, "result", None))
    except KeyboardInterrupt:
        return _interrupted(as_json=as_json)
    except Exception as error:  # a bug: one line unless --debug
        if ctrl_c_seen():  # a Ctrl-C inside an extension's import surfaces as its ImportError
            return _interrupted(as_json=as_json)
        _debug_traceback()
        return _fail(f"internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback "
                     "and please report it)", INTERNAL_ERROR, as_json=as_json)
    return 0


def _debug_traceback() -> None:
    """With --debug, the traceback of the exception being handled, on stderr; the exit code stays the error's
    (a traceback escaping to Python exited 1 whatever the error)."""
    if state.debug:
        traceback.print_exc(file=sys.stderr)


def _exited(done: SystemExit, as_json: bool) -> int:
    """The exit code of Typer's exit; a usage error Typer showed (the SystemExit raised while handling
    it) is also JSON on stdout under --json."""
    code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    usage = getattr(done.__context__, "format_message", None)
    if as_json and code and usage is not None:
        print_json(error_object(usage(), code))
    return code


class _LogLine(logging.Formatter):
    """Other libraries' log records as ``warning: message``, in the style of the CLI's lines; each once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"

    def filter(self, record: logging.LogRecord) -> bool:
        line = self.format(record)
        if line in self._seen:
            return False
        self._seen.add(line)
        return True


_terminated = False


def _interrupted(written: str | None = None, result: dict | None = None, *, as_json: bool) -> int:
    """Ctrl-C, or SIGTERM raised as one (:func:`_terminate`): said in one line, with its exit code, and
    what was ``written`` before stopping."""
    message, code = ("terminated", TERMINATED) if _terminated else ("interrupted", INTERRUPTED)
    return _fail(f"{message}: {written}" if written else message, code, as_json=as_json, result=result)


def _terminate(signum, frame) -> None:
    """SIGTERM: raised like Ctrl-C, so that temporary files and folders are removed on the way out."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _terminate)
    handler = logging.StreamHandler()
    line = _LogLine()
    handler.setFormatter(line)
    handler.addFilter(line)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # onnx_ir's passes log their own failures (e.g. "Shape inference failed: %s" with no argument), which
    # edgeopt handles and reports in its words: not lines for the user
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    sys.exit(_run(argv))
