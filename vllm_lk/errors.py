"""Errors that mean "what you asked for is wrong", as opposed to a bug.

The CLI prints a :class:`UserError` as one line and exits 2; every other exception keeps its
traceback, so a bug never passes for a user's mistake. Each subclass is also the built-in error a
caller would catch (``except ValueError`` / ``FileNotFoundError`` keep working). Shared by
``training`` and ``server``, which both depend on this package; vLLM processes never import it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (config, files, arguments); the message says what to change."""


class InvalidInput(UserError, ValueError):
    """A value, config or file content that cannot be used."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the command needs is not there."""


class ExistingOutput(UserError, FileExistsError):
    """The output already exists and the command will not overwrite it."""
