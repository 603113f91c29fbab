"""Rendering of result objects for people (rich tables) and machines (JSON)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeopt.cli import state
from edgeopt.metrics import count_of, json_text

__all__ = ["bytes_text", "count_of", "count_text", "in_batches", "print_json", "progress_bar", "stdout_to_stderr",
           "table"]


def count_text(value: float) -> str:
    """1234567 -> '1.23 M' (SI prefixes, the model-zoo convention for MACs/params)."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.0f}"


def bytes_text(value: float) -> str:
    """Binary units: 1536 -> '1.5 KiB'."""
    for factor, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {suffix}"
    return f"{value:.0f} B"


def in_batches(samples: int, batches: int) -> str:
    """`` in M batches`` after a count of samples, when the batches hold more than one sample each."""
    return f" in {count_of(batches, 'batch', 'batches')}" if batches != samples else ""


def print_json(data: dict) -> None:
    print(json_text(data))


@contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """Inside, what user code (an --eval or --data function) writes to stdout goes to stderr: Python's
    ``print``, and (file descriptor 1 pointed at 2) what its child processes and C extensions write, so
    that ``--json`` leaves one JSON document on stdout. Only ``print`` where stdout has no descriptor."""
    if not active:
        yield
        return
    sys.stdout.flush()
    descriptor = _descriptor(sys.stdout)
    saved = os.dup(descriptor) if descriptor is not None and _descriptor(sys.stderr) is not None else None
    try:
        if saved is not None:
            os.dup2(_descriptor(sys.stderr), descriptor)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, descriptor)
            os.close(saved)


def _descriptor(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO, a pytest capture
        return None


def table(title: str | None, columns: list[tuple[str, str]]) -> Table:
    """A table with (header, justify) columns."""
    result = Table(title=title, title_justify="left", header_style="bold")
    for header, justify in columns:
        result.add_column(header, justify=justify)
    return result


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int | None], None]]:
    """A progress bar on stderr when it is a terminal (with --json too: stdout stays pure JSON);
    yields ``update(done, total)``."""
    if not state.stderr.is_terminal:
        yield lambda done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=state.stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
