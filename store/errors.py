"""The store's exceptions: one base class, so callers can catch every store problem at once."""

from __future__ import annotations


class StoreError(Exception):
    """The feature store is missing, unreadable, inconsistent, or was asked something impossible."""


class SchemaMismatch(StoreError):
    """An existing store was made with other settings than the ones asked for."""


class PartitionLocked(StoreError):
    """Another live process holds the partition's lock."""


class InvalidFeatures(StoreError):
    """Features or video info handed to a writer do not fit the store's schema."""


class VideoNotFound(KeyError, StoreError):
    """A video id that is not readable from the store (unknown, failed, or not yet complete).

    A ``KeyError`` so that ``store[video_id]`` behaves like a mapping, with a readable message:
    ``KeyError.__str__`` would print the message's repr.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
