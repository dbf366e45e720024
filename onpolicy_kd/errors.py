"""Errors a user can act on.

Every error a user can cause (a broken recipe, a missing file, an unreachable Hub, mismatched
vocabularies, a dataset without the expected columns) is a `UserError`. The command-line entry
points print its message without a traceback and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the input that the user can fix; the message says what, where and how."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """The recipe (file, command-line overrides or environment) is invalid."""


class ModelLoadError(UserError, OSError):
    """A teacher or student model (or its tokenizer) could not be loaded."""


class VocabularyMismatchError(UserError, ValueError):
    """Teacher and student tokenizers do not map tokens to the same ids."""


class DataError(UserError, ValueError):
    """The dataset could not be loaded or does not have the columns the task needs."""
