"""The one exception hierarchy of compeft.

Every failure a user can cause (a malformed file, a bad argument, a base that does not match)
raises a subclass of :class:`CompeftError` whose message names the file and the problem.
"""

from __future__ import annotations


class CompeftError(Exception):
    """Base class of every error compeft raises on purpose."""

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InvalidArgumentError(CompeftError, ValueError):
    """An argument is outside its documented range (e.g. a density outside (0, 1])."""


class NotACompeftFileError(CompeftError):
    """The file does not start with the compeft magic bytes."""


class UnsupportedVersionError(CompeftError):
    """The file's format version (or a flag or encoding) is unknown to this reader."""


class TruncatedFileError(CompeftError):
    """The file is shorter (or longer) than its preamble and header declare."""


class HeaderError(CompeftError):
    """The header is too large, is not valid JSON, or breaks a rule of spec/FORMAT.md."""


class LayoutError(HeaderError):
    """Payload offsets overlap, leave holes, or point outside the file."""


class ChecksumError(CompeftError):
    """A CRC-32 stored in the file does not match the bytes it covers."""


class CorruptPayloadError(CompeftError):
    """A payload passed its checksum but its content contradicts the header."""


class OutputTooLargeError(CompeftError, MemoryError):
    """A tensor the file declares cannot be allocated: its decoded size exceeds the memory available."""


class SourceError(CompeftError):
    """An input adapter, model directory or tensor mapping cannot be read or is inconsistent."""


class BaseMismatchError(CompeftError):
    """The base weights do not match the expert (names, shapes, dtypes or fingerprint)."""


class RemoteError(CompeftError):
    """A URL cannot be read or written: no such object, access denied, a package for its protocol
    missing, or the store still failing after the bounded retries."""


class CatalogError(CompeftError):
    """A library catalog is malformed, of an unknown version, or does not match the expert files it lists."""


class FidelityWarning(UserWarning):
    """A compressed expert keeps little of its task vector: a compressed tensor kept no entry, a
    LoRA module's B̃·Ã is zero, or the update as a whole lost its direction (FORMAT.md 7.6)."""
