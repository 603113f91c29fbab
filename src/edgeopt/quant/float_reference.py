"""The float model's tensors on the measurement data, computed once for every round of a search.

Each round of the accuracy search compares a new quantized model with the
same float model on the same samples: the float side of the comparison (its
outputs and the activations matched with quantized ones) is the same every
round. :class:`FloatReference` keeps one session of the float model and the
tensors it gave for each sample, keyed by a hash of the sample's values (data
that comes in another order, or changes, from one pass to the next is run
again, never answered with another sample's tensors). Only the tensors asked
for are kept, and only while they fit in ``max_bytes``: the samples beyond it
are run again each round, through the same session. A round asking for a
tensor the session does not expose rebuilds it with that tensor added, and
forgets what it kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["FLOAT_REFERENCE_BYTES", "FloatReference"]

#: What the tensors kept may take: MobileNetV2's at 224x224 are about 27 MB a sample, so 9 of its 64.
FLOAT_REFERENCE_BYTES = 256 << 20

_Arrays = dict[str, np.ndarray]


def _fingerprint(feed: Mapping[str, np.ndarray]) -> bytes:
    """A digest of the sample's names, dtypes, shapes and values."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(feed):
        array = np.asarray(feed[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype.hasobject:  # strings: an object array's bytes would be its pointers
            for item in array.flat:
                _update_with_item(digest, item)
        else:
            digest.update(array.tobytes())
    return digest.digest()


def _update_with_item(digest, item: object) -> None:
    """One element of an object array, by its type and its text, length first: joined with a separator,
    ``["a\0b", "c"]`` and ``["a", "b\0c"]``, or ``"1"`` and ``1``, would read the same."""
    text = (item if isinstance(item, str) else repr(item)).encode("utf-8", "surrogatepass")
    digest.update(f"{type(item).__name__}:{len(text)}:".encode())
    digest.update(text)


class FloatReference:
    """The float model's tensors per sample, from one session, kept while they fit in ``max_bytes``.

    ``run(feed, names)`` answers as ``OrtSession.run`` does; ``runs`` counts the samples the model ran on.
    """

    def __init__(self, model: ir.Model, *, max_bytes: int = FLOAT_REFERENCE_BYTES) -> None:
        self.model, self.max_bytes = model, max_bytes
        self.runs = 0
        self._names: tuple[str, ...] = ()
        self._session = None
        self._kept: dict[bytes, _Arrays] = {}
        self._kept_bytes = 0

    def run(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> _Arrays:
        key = _fingerprint(feed)
        kept = self._kept.get(key)
        if kept is None or not kept.keys() >= set(names):
            kept = self._computed(key, feed, names)
        return {name: kept[name] for name in names}

    def _computed(self, key: bytes, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> _Arrays:
        from edgeopt.runtime.ort import observing_session

        if self._session is None or not set(self._names) >= set(names):
            self._names = tuple(dict.fromkeys([*self._names, *names]))
            outputs = {value.name for value in self.model.graph.outputs}
            self._session = observing_session(self.model, [name for name in self._names if name not in outputs])
            self._kept.clear()
            self._kept_bytes = 0
        arrays = self._session.run(feed, list(self._names))
        self.runs += 1
        size = sum(array.nbytes for array in arrays.values())
        if self._kept_bytes + size <= self.max_bytes:
            for array in arrays.values():
                array.flags.writeable = False  # handed to every round: none may change it
            self._kept[key] = arrays
            self._kept_bytes += size
        return arrays
