"""The C target: lower (QDQ -> integer ops) -> plan (static arena) -> emit (C99) -> build (gcc)."""

from edgeopt.codegen.c.api import CompileResult, LayerMismatch, VerifyResult, compile_c, verify

__all__ = ["CompileResult", "LayerMismatch", "VerifyResult", "compile_c", "verify"]
