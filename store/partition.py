"""Reading one complete partition: its manifest, and its arrays opened on demand.

Every read is checked: a chunk that is missing or cannot be decoded damages exactly the videos
whose spans touch it, and (with ``verify``) each video's values must match the sha256 recorded
in the manifest at write time. Damage is returned, not raised, so that a caller sees every
damaged video of a request at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from astar.store.chunkstore import chunk_key, open_array
from astar.store.digest import checksum
from astar.store.errors import MissingChunk, StoreError
from astar.store.geometry import LAYERS
from astar.store.manifest import SPAN_NAMES, parse_timestamps, read_manifest
from astar.store.schema import time_axis

# Threads hashing the videos of a read (hashlib releases the GIL). bench_store_read.py on 2
# cores, batches of 8 paper-size videos: verification costs 7.3-7.5 ms a video on one thread,
# 3.1-4.3 on two while the cores are free (the same as one thread while other work keeps them
# busy). A single video gains nothing: each layer is one array, hashed where it is read.
HASH_THREADS = min(4, os.cpu_count() or 1)
_hashers: ThreadPoolExecutor | None = None  # made on first use
_hashers_lock = threading.Lock()


def _forget_hashers() -> None:
    """In a forked child: the parent's threads did not come along, nor may its lock's state."""
    global _hashers, _hashers_lock
    _hashers, _hashers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hashers)


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """Index selecting ``start:stop`` on ``axis`` and everything on the axes before it."""
    return (*[slice(None)] * axis, slice(start, stop))


class PartitionReader:
    """A complete partition opened for reading: its manifest, and its arrays opened on demand.

    Complete partitions never change, so everything read here may be cached for the life of
    the store object.
    """

    def __init__(self, path: Path):
        self.name = path.name
        self.path = path
        self.table = read_manifest(path / "manifest.csv")
        self.rows = {video_id: row for row, video_id in enumerate(self.table["id"])}
        self.offsets = {
            name: self.table[f"{name}_offset"].to_numpy(np.int64) for name in SPAN_NAMES
        }  # array -> (videos,)
        self.lengths = {
            name: self.table[f"{name}_length"].to_numpy(np.int64) for name in SPAN_NAMES
        }  # array -> (videos,)
        self.sha256 = {
            layer: self.table[f"{layer}_sha256"].to_numpy(object) for layer in LAYERS
        }  # layer -> (videos,) hex digests
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        """Array ``name``, opened so that reading a lost chunk raises :class:`MissingChunk`."""
        if name not in self._arrays:
            try:
                self._arrays[name] = open_array(self.path / name)
            except (OSError, ValueError, TypeError, KeyError) as error:  # zarr's: ValueError
                raise StoreError(
                    f"{self.path / name}: cannot open array ({error}); see inspect-store --verify"
                ) from error
        return self._arrays[name]

    def info(self, row: int) -> dict[str, Any]:
        record = self.table.iloc[row]
        return {
            "source": record["source"],
            "status": record["status"],
            "reason": record["reason"],
            "partition": self.name,
            "n_frames": int(record["n_frames"]),
            "n_sampled": int(record["n_sampled"]),
            "padded": bool(record["padded"]),
            "subsampled": bool(record["subsampled"]),
            "duration": float(record["duration"]),
            "fps": float(record["fps"]),
            "source_fps": float(record["source_fps"]),
            "timestamps": parse_timestamps(record["timestamps"]),  # (frames,)
        }

    def read_layer(
        self, layer: str, rows: Sequence[int], verify: bool = True
    ) -> tuple[list[np.ndarray | None], dict[int, str]]:
        """``layer`` of each of ``rows`` (in that order), reading every needed chunk once.

        Returns the arrays and what is wrong with the damaged ones, position in ``rows`` -> reason
        (their array is then None): a lost or unreadable chunk or array, and with ``verify``
        values that differ from the manifest's checksum.
        """
        results, damaged = self.read_spans(layer, rows)
        if verify:
            expected = self.sha256[layer][list(rows)]  # (n,)
            read = [k for k, data in enumerate(results) if data is not None]
            for k, digest in zip(read, checksums([results[k] for k in read]), strict=True):
                if digest != expected[k]:  # the writer refuses non-finite values: say which
                    finite = np.isfinite(results[k]).all()
                    results[k] = None
                    damaged[k] = "checksum mismatch" if finite else "NaN or inf values"
        return results, damaged

    def read_spans(
        self, name: str, rows: Sequence[int]
    ) -> tuple[list[np.ndarray | None], dict[int, str]]:
        """Array ``name`` (a layer or ``timestamps``) of each of ``rows``, and the damaged ones.

        As :meth:`read_layer` without checksums. The spans are read in contiguous groups of
        chunks; a group that cannot be read whole is read chunk by chunk, so that exactly the
        rows touching a lost chunk are damaged (a chunk shared by several videos damages all).
        """
        try:
            array = self.array(name)
        except StoreError as error:  # no readable metadata: every row's data is lost
            reason = f"array unreadable ({error.__cause__ or error})"
            return [None] * len(rows), dict.fromkeys(range(len(rows)), reason)
        axis = time_axis(name)
        chunk = array.chunks[axis]
        starts = self.offsets[name][list(rows)]  # (n,)
        stops = starts + self.lengths[name][list(rows)]  # (n,)
        # Videos without time steps (pool5 of a very short video) read nothing.
        empty = np.empty((*array.shape[:axis], 0, *array.shape[axis + 1 :]), array.dtype)
        results: list[np.ndarray | None] = [empty] * len(rows)
        damaged: dict[int, str] = {}
        for group in chunk_groups(starts, stops, chunk):
            low, high = int(starts[group].min()), int(stops[group].max())
            block, lost = _read_block(array, axis, low, high)
            for k in group:
                start, stop = int(starts[k]), int(stops[k])
                first, last = start // chunk, (stop - 1) // chunk  # the chunks of the span
                touched = [why for index, why in lost.items() if first <= index <= last]
                if touched:
                    results[k], damaged[k] = None, ", ".join(touched)
                else:
                    results[k] = block[_along(axis, start - low, stop - low)]
        return results, damaged


def checksums(arrays: Sequence[np.ndarray]) -> list[str]:
    """:func:`~astar.store.digest.checksum` of each array, several at a time on a few threads."""
    if len(arrays) < 2 or HASH_THREADS < 2:
        return [checksum(array) for array in arrays]
    return list(_hash_pool().map(checksum, arrays))


def _hash_pool() -> ThreadPoolExecutor:
    """The process's hashing threads (a forked child makes its own: see _forget_hashers)."""
    global _hashers
    with _hashers_lock:
        if _hashers is None:
            _hashers = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="astar-sha256")
        return _hashers


def _read_block(
    array: zarr.Array, axis: int, low: int, high: int
) -> tuple[np.ndarray, dict[int, str]]:
    """Steps ``low:high`` along ``axis``, and the chunks there that are lost (index -> reason).

    One read when every chunk is sound. Otherwise the chunks are read one by one to tell which
    are lost; their steps in the block are left NaN.
    """
    try:
        return array[_along(axis, low, high)], {}
    except Exception:  # a missing chunk or any codec error: find out below which chunk it is
        pass
    shape = (*array.shape[:axis], high - low, *array.shape[axis + 1 :])
    block = np.full(shape, np.nan, array.dtype)
    chunk = array.chunks[axis]
    lost: dict[int, str] = {}
    for index in range(low // chunk, (high - 1) // chunk + 1):
        start, stop = max(low, index * chunk), min(high, (index + 1) * chunk)
        try:
            block[_along(axis, start - low, stop - low)] = array[_along(axis, start, stop)]
        except MissingChunk as error:
            lost[index] = str(error)
        except Exception as error:  # the codec's own exception type varies (zstd: RuntimeError)
            key = chunk_key(array, axis, index)
            lost[index] = f"chunk {key} unreadable ({type(error).__name__}: {error})"
    return block, lost


def chunk_groups(starts: np.ndarray, stops: np.ndarray, chunk: int) -> list[list[int]]:
    """Group the non-empty spans ``[starts[k], stops[k])`` into contiguous chunk ranges.

    Spans are taken in storage order; a span joins the current group when its first chunk
    overlaps or directly follows the group's last one. Each group is then one read of its
    time range: no chunk is read by two groups, and no chunk outside the spans is read.
    """
    groups: list[list[int]] = []
    last_chunk = -2  # last chunk of the current group
    for k in np.argsort(starts, kind="stable").tolist():
        if stops[k] <= starts[k]:
            continue
        first, last = int(starts[k]) // chunk, (int(stops[k]) - 1) // chunk
        if groups and first <= last_chunk + 1:
            groups[-1].append(k)
            last_chunk = max(last_chunk, last)
        else:
            groups.append([k])
            last_chunk = last
    return groups


def damage_text(partition: str, wrong: dict[str, str]) -> str:
    """What is wrong with one video, array by array:
    ``partition p00001, pool3: chunk c.0.1.0.0 missing; ...``."""
    return f"partition {partition}, " + "; ".join(f"{name}: {why}" for name, why in wrong.items())
