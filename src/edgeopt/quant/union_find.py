"""Union-find over tensor names: the sets of tensors that must share one scale."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["UnionFind"]


class UnionFind:
    """Union-find over tensor names; groups come out in order of first appearance."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self._parent.setdefault(name, name)
        while self._parent[name] != name:
            self._parent[name] = self._parent[self._parent[name]]
            name = self._parent[name]
        return name

    def union(self, names: Iterable[str]) -> None:
        roots = [self.find(n) for n in names]
        for root in roots[1:]:
            if root != roots[0]:
                self._parent[root] = roots[0]

    def clusters(self) -> tuple[tuple[str, ...], ...]:
        """Every set, singletons included."""
        members: dict[str, list[str]] = {}
        for name in self._parent:
            members.setdefault(self.find(name), []).append(name)
        return tuple(tuple(group) for group in members.values())

    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The sets of two or more names."""
        return tuple(group for group in self.clusters() if len(group) > 1)
