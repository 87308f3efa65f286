"""One error family for daami2i.

Every error says what was expected, what was received, and how to fix it.
Catch :class:`Daami2iError` to catch them all; query errors are also ``ValueError`` (as in DAAM),
so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class Daami2iError(Exception):
    """Base class of every error raised by daami2i."""


class UnsupportedPipelineError(Daami2iError, TypeError):
    """The object given to :func:`daami2i.trace` is not a pipeline daami2i can trace."""


class TraceError(Daami2iError, RuntimeError):
    """Tracing was used in a way that cannot work (nested traces, nothing captured, ...)."""


class QueryError(Daami2iError, ValueError):
    """A heat-map query received an argument it cannot use (out-of-range pixel, unknown word, ...)."""


class ConfigError(Daami2iError, ValueError):
    """A trace option has a value daami2i does not understand."""


class ExperimentError(Daami2iError, OSError):
    """An experiment folder cannot be written or read: missing, damaged, inconsistent or unsafe files.

    Also an ``OSError`` (as it was before the error family gathered here), so ``except OSError`` keeps
    working."""
