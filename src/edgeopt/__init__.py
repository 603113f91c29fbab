"""edgeopt: make trained neural networks small, low-bit, fast and deployable on edge devices.

The top-level functions mirror the CLI commands; see :mod:`edgeopt.api`.
"""

__version__ = "0.1.0"

from edgeopt.api import bench, from_torch, inspect, load, run  # noqa: E402

__all__ = ["__version__", "bench", "from_torch", "inspect", "load", "run"]
