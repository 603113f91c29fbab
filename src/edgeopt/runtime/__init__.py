"""Execution back ends: ONNX Runtime (``ort``) and the integer reference."""
