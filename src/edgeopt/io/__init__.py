"""The only protobuf boundary of edgeopt: load, validate, fix shapes, save atomically."""

from __future__ import annotations

from edgeopt.io.load import (FILE_BYTES_KEY, SUPPORTED_OPSETS, load_model, model_file_bytes, model_files,
                             parse_input_shapes)
from edgeopt.io.save import (atomic_write_bytes, atomic_write_files, check_writable, external_data_path,
                             make_output_folder, model_file_contents, model_to_bytes, save_model)

__all__ = [
    "FILE_BYTES_KEY",
    "SUPPORTED_OPSETS",
    "atomic_write_bytes",
    "atomic_write_files",
    "check_writable",
    "external_data_path",
    "load_model",
    "make_output_folder",
    "model_file_bytes",
    "model_file_contents",
    "model_files",
    "model_to_bytes",
    "parse_input_shapes",
    "save_model",
]
