"""Opening the store's arrays so that a lost chunk is an error, never the fill value.

zarr reads a chunk that is absent from storage as the array's fill value: a deleted chunk file
of a partition would read as NaN (the store's fill value) and be taken for data. Arrays opened
here go through :class:`StrictStore`, which raises :class:`~astar.store.errors.MissingChunk`
instead. It wraps any zarr store, so remote stores (fsspec) get the same guarantee.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import zarr
from zarr.storage import WrapperStore

from astar.store.errors import MissingChunk
from astar.store.location import StorePath, zarr_store

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest
    from zarr.core.buffer import Buffer, BufferPrototype

# Documents zarr probes for when opening a node; their absence is an answer, not a loss.
METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA_NAMES


class StrictStore(WrapperStore):
    """A zarr store that raises :class:`MissingChunk` where the wrapped one finds no chunk."""

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        found = await self._store.get(key, prototype, byte_range)
        if found is None and not is_metadata(key):
            raise MissingChunk(key)
        return found

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        found = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, found, strict=True):
            if value is None and not is_metadata(key):
                raise MissingChunk(key)
        return found


def open_array(path: StorePath) -> zarr.Array:
    """The zarr v3 array at ``path``, read-only, reading its chunks through a StrictStore."""
    store = StrictStore(zarr_store(path, read_only=True))
    return zarr.open_array(store=store, mode="r", zarr_format=3)


def chunk_key(array: zarr.Array, axis: int, index: int) -> str:
    """Key of chunk ``index`` along ``axis`` of an array chunked along that axis only."""
    coords = tuple(index if dim == axis else 0 for dim in range(array.ndim))
    return array.metadata.encode_chunk_key(coords)
