"""The project's own errors: every refusal says what was wrong, so a caller can log it and go on."""

from __future__ import annotations


class ZoError(Exception):
    """Base class for every error this project raises on purpose."""


class ProtocolError(ZoError):
    """A message, file or flag was malformed or breaks the protocol; nothing was changed.

    ``code`` is a short stable word (``"stale_round"``, ``"non_finite"``…) that metrics
    count by; the message text is for people.
    """

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


class JournalError(ZoError):
    """The journal on disk cannot be trusted (corrupt in the middle, wrong run, wrong format)."""


class StateMismatch(ZoError):
    """Weights are not the bits they should be (fingerprint differs); a resync is needed."""
