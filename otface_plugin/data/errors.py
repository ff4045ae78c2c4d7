"""Exceptions raised by the data tools."""
from __future__ import annotations


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` file, or a record inside one, is malformed or unreadable.

    Subclasses ``ValueError`` so callers that already catch bad-value errors keep working.
    Messages always name the file and, where there is one, the record (key and byte offset).
    """


class ImageDecodeError(RecordIOError):
    """A record's payload, or an input file, is not a decodable image."""


class DatasetLayoutError(ValueError):
    """An image folder tree does not have the one-folder-per-identity layout we need."""
