"""Errors the library raises on purpose.

Every error a user can cause derives from :class:`FinetuneError`; its message names the file or
value at fault, what was expected and what to do. The CLI turns these into a clean message and a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FinetuneError",
    "ModelError",
    "NotAvailableError",
    "TrainingError",
]


class FinetuneError(Exception):
    """Base class of every error that finetune raises about user input."""


class ConfigError(FinetuneError, ValueError):
    """An option has a value that cannot work (names the option and the valid values)."""


class DataError(FinetuneError):
    """The image folder cannot be used as it is (names the folder or file and the fix)."""


class ModelError(FinetuneError):
    """A backbone or its weights cannot be created or loaded."""


class CheckpointError(FinetuneError):
    """A checkpoint or run directory cannot be read."""


class NotAvailableError(FinetuneError):
    """A documented feature that this version does not provide yet."""


class TrainingError(FinetuneError):
    """Training stopped: interrupted (the message says how to resume) or diverged."""
