"""Process-wide CLI settings set by the global options (``--debug``, ``--verbose``)."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped output (files, CI logs, docs) gets wide tables instead of rich's 80 columns.
_PIPE_WIDTH = 150

debug = False
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False)
