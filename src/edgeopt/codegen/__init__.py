"""Code generation from QDQ models: ``codegen.c`` writes integer-only C99."""
