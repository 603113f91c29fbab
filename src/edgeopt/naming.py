"""Fresh names for what edgeopt adds to or renames in a model.

One rule everywhere (the loader naming unnamed nodes, the Q/DQ and float16 rewrites naming new values and
nodes): ``base`` itself when nothing has it, else the first of ``base_1``, ``base_2`` ... that is free.
"""

from __future__ import annotations

__all__ = ["claim_name"]


def claim_name(base: str, taken: set[str]) -> str:
    """The first free name of ``base``, ``base_1``, ``base_2`` ...; added to ``taken``."""
    name, suffix = base, 0
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name
