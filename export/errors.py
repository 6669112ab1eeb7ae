"""Errors of the export step; each message says what to change and try again."""

from __future__ import annotations

from protocols.errors import ProtocolError


class ExportError(ProtocolError):
    """A model cannot be exported or lifted as asked; nothing usable was written."""


class VerifyError(ExportError):
    """ONNX Runtime and the reference disagree on the exported model's loss or count."""
