"""Process-wide CLI settings set by the global options (``--debug``, ``--verbose``)."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped output (files, CI logs, docs) gets wide tables instead of rich's 80 columns.
_PIPE_WIDTH = 150

debug = False
# Messages carry user text (node names, shapes like [1,8,1,1]): no markup, no hard wrapping.
stdout = Console(highlight=False, markup=False, soft_wrap=True, width=None if sys.stdout.isatty() else _PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
