"""The C target: lower (QDQ -> integer ops) -> schedule (order of least peak memory) -> plan (static arena)
-> emit (C99) -> build (gcc); ``host`` runs the result on the host, ``report`` measures it."""

from edgeopt.codegen.c.api import CompileResult, LayerMismatch, VerifyResult, compile_c, is_c_folder, verify

__all__ = ["CompileResult", "LayerMismatch", "VerifyResult", "compile_c", "is_c_folder", "verify"]
