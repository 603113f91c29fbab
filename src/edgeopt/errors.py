"""The error hierarchy of edgeopt.

Every error a user can cause (a bad file, bad data, a bad option, an op we do
not support) is an :class:`EdgeoptError`. The CLI prints its message on one
line and exits non-zero; any other exception is a bug in edgeopt.
:class:`Interrupted` is no error but a Ctrl-C that kept what was done.
"""

from __future__ import annotations

__all__ = [
    "EdgeoptError",
    "ModelError",
    "DataError",
    "EmptyDataError",
    "ConfigError",
    "OutputError",
    "UnsupportedOpError",
    "PassError",
    "CodegenError",
    "Interrupted",
    "EdgeoptWarning",
]


class EdgeoptError(Exception):
    """Base of every error a user can cause; the message says what to do."""

    exit_code = 1


class ModelError(EdgeoptError):
    """The model file is missing, corrupt, or not usable as given."""

    exit_code = 2


class DataError(EdgeoptError):
    """Input or calibration data does not match the model or is invalid."""

    exit_code = 3


class EmptyDataError(DataError):
    """The data gave no batch at all (an empty folder, or a generator read a second time)."""


class ConfigError(EdgeoptError):
    """An option, recipe key or configuration value is invalid."""

    exit_code = 4


class OutputError(ConfigError):
    """An output (``-o``) cannot be written there: a file where a folder is needed or the other way
    round, a missing or read-only folder, an existing output without ``--force``, the input itself,
    a full disk. A :class:`ConfigError`: the same exit code whichever command writes."""


class UnsupportedOpError(EdgeoptError):
    """An op is not supported by the requested stage."""

    exit_code = 5


class PassError(EdgeoptError):
    """A graph pass could not be applied."""

    exit_code = 6


class CodegenError(EdgeoptError):
    """Code generation refused the model or failed to build it."""

    exit_code = 7


class EdgeoptWarning(UserWarning):
    """A warning of a result (too few calibration samples, an accuracy goal not met, int8 slower than
    float ...), issued by the Python API through :mod:`warnings` as well as kept in the result's
    ``warnings``; the command line prints them as ``warning:`` lines instead."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a long search, once it had a result: ``partial`` is what the function
    interrupted returns, built from the work done so far (and written to its output, when it has one).

    A KeyboardInterrupt, so a script stops as on any Ctrl-C; ``except edgeopt.Interrupted as stop``
    takes ``stop.partial`` instead.
    """

    def __init__(self, partial: object) -> None:
        super().__init__("interrupted")
        self.partial = partial
