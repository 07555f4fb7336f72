"""Errors a user can cause.

Every error raised because of bad input (a file, a record, a config key, a server reply) is a
:class:`KpodError`. The CLI prints its message on one line and exits with code 2, never a
traceback. Messages name where the problem is (file, line or record, field) and, where one
exists, the fix.
"""

from __future__ import annotations


class KpodError(Exception):
    """Base class of every error a user can cause and fix."""

    exit_code = 2


class DataError(KpodError):
    """A data file or record that cannot be read as reasoning data.

    ``source`` is the file (or dataset name), ``line`` the 1-based line for line-oriented files
    or the 0-based record index otherwise (``where`` says which), ``field`` the offending field.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        where: str = "line",
    ) -> None:
        self.reason = message
        self.source = source
        self.line = line
        self.field = field
        self.where = where
        parts = []
        if source is not None:
            parts.append(str(source))
        if line is not None:
            parts.append(f"{where} {line}")
        if field is not None:
            parts.append(f"field '{field}'")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(KpodError):
    """A configuration key, type or value that is not allowed."""


class ModelError(KpodError):
    """A model that cannot be found, loaded or served."""


class TeacherError(KpodError):
    """A teacher server that cannot be reached or answers something unusable."""
