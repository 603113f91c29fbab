"""Calibration, evaluation and benchmark data: one interface for ``--data``.

A data source is an iterable of batches ``{input_name: np.ndarray}``, each
checked against the model inputs (:func:`check_feed`). Sources stream: files
are opened one at a time and stacked .npy/.npz files are read a sample at a
time as they are sliced, so a data set never has to fit in memory.
:func:`open_data` picks the source for a folder of .npy/.npz files, a folder
of images plus an :class:`ImagePreprocess`, a .npy/.npz file, a
``module:function`` or an in-memory iterable.
"""

from __future__ import annotations

from edgeopt.data.base import (
    AlsoCheckedSource,
    ArraySource,
    DataSource,
    IterableSource,
    LabelledFeed,
    TakeSource,
    batch_rows,
    checked_feed,
    dataset_from_arrays,
    take,
    with_origin,
)
from edgeopt.data.callable import CallableSource
from edgeopt.data.feeds import check_feed
from edgeopt.data.images import ImageDtype, ImageFolderSource, ImagePreprocess, Layout
from edgeopt.data.npy import NpyFileSource, NpyFolderSource
from edgeopt.data.sources import open_data

__all__ = [
    "AlsoCheckedSource",
    "ArraySource",
    "CallableSource",
    "DataSource",
    "ImageDtype",
    "ImageFolderSource",
    "ImagePreprocess",
    "IterableSource",
    "LabelledFeed",
    "Layout",
    "NpyFileSource",
    "NpyFolderSource",
    "TakeSource",
    "batch_rows",
    "check_feed",
    "checked_feed",
    "dataset_from_arrays",
    "open_data",
    "take",
    "with_origin",
]
