"""The package's exceptions: one family per kind of mistake, each a :class:`ValueError`.

Every error a user can cause by handing the package bad data or a bad setting is one of these, so
callers can catch the kind they care about while ``except ValueError`` keeps working:

* :class:`TraceFormatError` — a routing trace or rollout-batch *file or payload* is unreadable or
  malformed (not safetensors, truncated, wrong dtype or rank, bad metadata, bad base64, wrong byte
  count); the message names the file or argument and what is wrong.
* :class:`ConfigError` — a configuration value is out of range or unknown (training config,
  objective options, engine settings, command-line values).
* :class:`AlignmentError` — routes and tokens do not line up: a trace whose rows do not follow the
  ``n - 1`` rule of :func:`reference_impl.routing.routed_rows`, a replay that consumed too few or too
  many rows, traces with different boundaries or expert counts compared with each other.
"""

from __future__ import annotations

__all__ = ["ReferenceImplError", "TraceFormatError", "ConfigError", "AlignmentError"]


class ReferenceImplError(ValueError):
    """Base class of every error this package raises for bad input."""


class TraceFormatError(ReferenceImplError):
    """A routing trace or batch file/payload is unreadable or malformed."""


class ConfigError(ReferenceImplError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class AlignmentError(ReferenceImplError):
    """Routes and tokens do not line up (row counts, sequence boundaries, expert counts)."""
