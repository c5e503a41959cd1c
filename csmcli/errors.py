"""The one user-facing error type.

Raise `CsmError` for anything the user can fix (bad flag, missing file, unknown preset). The CLI prints it as a
single red `error: ...` line and exits 2; every other exception is treated as a bug (exit 1).
"""

DEBUG_ENV = "CSMCLI_DEBUG"


class CsmError(Exception):
    """A user error: bad input or usage. The message is shown as-is, so make it say how to fix the problem."""
