"""What STYLE.md asks of every module, checked: a module is split by concept before ~600 lines."""

from __future__ import annotations

from pathlib import Path

import edgeopt

MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines():
    source = Path(edgeopt.__file__).parent
    lengths = {path.relative_to(source).as_posix(): len(path.read_text().splitlines())
               for path in source.rglob("*.py")}
    assert {name: lines for name, lines in lengths.items() if lines > MAX_MODULE_LINES} == {}
