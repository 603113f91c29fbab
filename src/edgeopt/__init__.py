"""edgeopt: make trained neural networks small, low-bit, fast and deployable on edge devices."""

__version__ = "0.1.0"
