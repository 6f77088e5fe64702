"""The one exception type for mistakes in what a user gave us (a file, a record, a flag, a request).

``UserError`` subclasses ``ValueError`` so validation code and callers that catch ``ValueError``
keep working; the CLI prints a ``UserError`` as one short line and lets every other exception keep
its traceback, so an internal bug never looks like a user mistake."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message names what is wrong (file, record, field, value)."""
