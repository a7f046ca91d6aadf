"""One exception hierarchy; every message is meant for the user.

A `ReconcilerError` carries a one-line message that says what is wrong, where, and what
to do. The command line prints it as is (no traceback) and exits with `exit_code`.
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """Base of every error a user can cause or must act on."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ManifestError(ReconcilerError):
    """A manifest failed to parse or validate; `errors` holds `file:line: message` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(errors[0] if len(errors) == 1 else f"{len(errors)} manifest errors")
        self.errors = errors


class StateError(ReconcilerError):
    """The state file is missing, corrupt, of an unknown version, or locked."""


class LockedError(StateError):
    """Another reconciler process holds the instance lock."""


class KernelError(ReconcilerError):
    """A kernel operation failed in a way the user must hear about."""


class OwnershipError(KernelError):
    """An object we were about to touch is not provably ours."""
