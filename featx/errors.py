"""featx's exception hierarchy.

Every error a user can cause is a :class:`FeatxError`; the CLI prints its message as one line on stderr and
exits non-zero.  Each subclass also derives from the built-in type it resembles, so ``except ValueError`` in a
caller keeps working.
"""
from __future__ import annotations


class FeatxError(Exception):
    """Root of every error featx raises on purpose.  ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class UsageError(FeatxError, ValueError):
    """A bad argument: unknown layer or backbone, malformed ``--split``, bad option value."""


class DataError(FeatxError, ValueError):
    """The input data cannot be used: missing or empty folder, a single class, NaN features, ..."""


class WeightsError(FeatxError, RuntimeError):
    """Weights that cannot be had or loaded: offline, wrong architecture, unsafe pickle."""


class IntegrityError(FeatxError, RuntimeError):
    """A stored artefact that does not match what was recorded (tampered head, corrupt checkpoint)."""


class StrictError(FeatxError):
    """``--strict`` was given and some input files were skipped."""

    exit_code = 3


class DivergenceError(FeatxError, FloatingPointError):
    """Training diverged (a non-finite loss or gradient) and did not recover; the last good checkpoint is kept."""


class DiskFullError(FeatxError, RuntimeError):
    """No space left (or the disk quota reached) while writing: what was being written is removed, everything
    finished before is kept, and the same command completes the work once space is freed (exit code 75)."""

    exit_code = 75


class ReadOnlyCacheError(FeatxError, PermissionError):
    """A command that must write met a read-only cache (or output folder); reading never needs to write
    (exit code 73)."""

    exit_code = 73
