"""The project's error types.

Every error a user can act on derives from :class:`FingrpoError`; the CLI prints its message on one
line (no traceback) and exits non-zero. Messages name the file, the record id and the field or rule.
"""

from __future__ import annotations


class FingrpoError(Exception):
    """Base class of errors the CLI reports as a one-line message."""

    exit_code = 2


class ConfigError(FingrpoError, ValueError):
    """params.yaml or a CLI override is invalid."""


class DataError(FingrpoError, ValueError):
    """A data file is unreadable, malformed, or a record breaks the FinQA schema."""


class ModelError(FingrpoError):
    """A model or adapter cannot be found or loaded."""


class TrackingError(FingrpoError):
    """The MLflow tracking server or registry cannot be reached or used."""


class TrainingError(FingrpoError):
    """Training stopped: repeated non-finite losses, a reward failing on every completion, ..."""
