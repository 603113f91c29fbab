"""The numpy integer interpreter of QDQ models: the spec of every integer back end.

``lower`` turns a QDQ ``onnx_ir`` model into a :class:`Program` of integer ops
(the table in ``ops.py``); ``ReferenceModel`` runs it.
"""

from edgeopt.runtime.reference.interpreter import ReferenceModel, quantize_input
from edgeopt.runtime.reference.lower import lower
from edgeopt.runtime.reference.ops import OPS, OpSpec
from edgeopt.runtime.reference.program import IntOp, Program, ProgramIO, TensorInfo

__all__ = ["OPS", "IntOp", "OpSpec", "Program", "ProgramIO", "ReferenceModel", "TensorInfo", "lower",
           "quantize_input"]
