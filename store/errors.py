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


class MissingChunk(StoreError):
    """A chunk file that an array's shape implies is absent from storage.

    Raised while reading, where zarr would return the fill value; readers turn it into
    :class:`CorruptVideo` for the videos whose spans touch the chunk. ``key`` is the chunk's key
    within its array, e.g. ``c.3.0.0.0``.
    """

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"chunk {self.key} missing"


class CorruptVideo(StoreError):
    """Stored data of one or more videos is lost (a missing chunk) or altered (checksum mismatch).

    ``videos`` maps each affected video id to what is wrong with it, naming its partition and
    layer, e.g. ``{"v1": "partition p00002, pool3: checksum mismatch"}``. Readers check every
    video of a request before raising, so a caller that skips corrupt videos can read the rest.
    """

    def __init__(self, videos: dict[str, str], store: str = ""):
        self.videos = dict(videos)
        self.store = store
        shown = "; ".join(f"video {vid!r}: {why}" for vid, why in list(self.videos.items())[:5])
        more = f" (and {len(self.videos) - 5} more)" if len(self.videos) > 5 else ""
        where = f" in {store}" if store else ""
        super().__init__(
            f"corrupt data{where}: {shown}{more}; `inspect-store --verify` lists every damaged "
            "video, and re-extracting those partitions repairs them"
        )

    def __reduce__(self) -> tuple[type, tuple[dict[str, str], str]]:
        # Rebuilt from its fields, not its message: it crosses process boundaries (loaders).
        return type(self), (self.videos, self.store)
