"""Reading one complete partition: its manifest, and its arrays opened on demand.

Every read is checked: a chunk that is missing or cannot be decoded damages exactly the videos
whose spans touch it, and (with ``verify``) each video's values must match the checksum recorded
in the manifest at write time. Damage is returned, not raised, so that a caller sees every
damaged video of a request at once.

Chunks are read directly (:class:`ChunkLayout`): the store writes every array with one layout
(chunked along time only, little-endian bytes then zstd or nothing, ``c.3.0.0.0`` keys), so a
read is the chunk files' bytes, their decompression on a few threads, and a copy into the
block, with none of zarr's per-call machinery (about 5 ms a call on the 2-core machine of
``benchmarks/bench_store_read.py``, more than reading a small layer itself). An array written
any other way is read through zarr.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np
import zarr

from astar.store.chunkstore import chunk_key, open_array
from astar.store.digest import algorithm_of, checksum
from astar.store.errors import MissingChunk, StoreError
from astar.store.geometry import LAYERS
from astar.store.location import StorePath, is_remote
from astar.store.manifest import SPAN_NAMES, parse_timestamps, read_manifest
from astar.store.schema import StoreSchema

# Threads decompressing the chunks and hashing the videos of a read (zstd and xxhash release
# the GIL). More than the cores gains nothing; a single chunk or video is done where it is read.
HASH_THREADS = min(4, os.cpu_count() or 1)
# Below this many bytes a read's chunks are done on the reader's thread: handing them to the
# pool costs about 0.3 ms of wake-ups, as much as reading a few MB (bench_store_read.py).
PARALLEL_BYTES = 4 << 20
_hashers: ThreadPoolExecutor | None = None  # made on first use
_hashers_lock = threading.Lock()


def _forget_hashers() -> None:
    """In a forked child: the parent's threads did not come along, nor may its lock's state."""
    global _hashers, _readers, _hashers_lock
    _hashers, _readers, _hashers_lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_hashers)


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    """Index selecting ``start:stop`` on ``axis`` and everything on the axes before it."""
    return (*[slice(None)] * axis, slice(start, stop))


class PartitionReader:
    """A complete partition opened for reading: its manifest, and its arrays opened on demand.

    Complete partitions never change, so everything read here may be cached for the life of
    the store object.
    """

    def __init__(self, path: StorePath, schema: StoreSchema, name: str | None = None):
        self.name = name or path.name  # the partition's name (its folder, on a local disk)
        self.path = path  # the folder of its arrays and manifest
        self.schema = schema  # the store's: it says how the arrays are laid out on disk
        self.table = read_manifest(path / "manifest.csv")
        self.rows = {video_id: row for row, video_id in enumerate(self.table["id"])}
        self.statuses: list[str] = self.table["status"].tolist()  # row -> ok or failure kind
        self.offsets = {
            name: self.table[f"{name}_offset"].to_numpy(np.int64) for name in SPAN_NAMES
        }  # array -> (videos,)
        self.lengths = {
            name: self.table[f"{name}_length"].to_numpy(np.int64) for name in SPAN_NAMES
        }  # array -> (videos,)
        self.checksums = {
            layer: self.table[f"{layer}_checksum"].to_numpy(object) for layer in LAYERS
        }  # layer -> (videos,) digests, see astar.store.digest
        self._arrays: dict[str, zarr.Array] = {}
        self._layouts: dict[str, ChunkLayout | None] = {}  # None: read through zarr
        self._records: list[dict[str, Any]] | None = None  # the manifest's rows, made on use
        self._step_bytes: dict[str, int] = {}  # array -> bytes of one time step

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

    def nbytes(self, name: str, rows: Sequence[int]) -> int:
        """Bytes of array ``name`` that ``rows`` span (what reading them returns)."""
        if name not in self._step_bytes:
            try:
                array = self.array(name)
            except StoreError:  # unreadable: read_spans reports it, as damage of every row
                return 0
            axis = self.axis(name)
            per = math.prod(d for k, d in enumerate(array.shape) if k != axis)
            self._step_bytes[name] = per * np.dtype(array.dtype).itemsize
        return int(self.lengths[name][list(rows)].sum()) * self._step_bytes[name]

    def layout(self, name: str) -> ChunkLayout | None:
        """How to read array ``name``'s chunks directly, or None if zarr must read them."""
        if name not in self._layouts:
            layout = ChunkLayout.of(self.array(name), self.path / name, self.axis(name))
            self._layouts[name] = layout
        return self._layouts[name]

    def axis(self, name: str) -> int:
        """Axis of time in array ``name`` on disk (a layer, or ``timestamps``)."""
        return self.schema.stored_axis(name) if name in LAYERS else 0

    def info(self, row: int) -> dict[str, Any]:
        if self._records is None:  # pandas' row access costs about 1 ms, a dict's nothing
            self._records = self.table.to_dict("records")
        record = self._records[row]
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

        Returns the arrays, (C, T, H, W) or (clips, D), and what is wrong with the damaged ones,
        position in ``rows`` -> reason (their array is then None): a lost or unreadable chunk or
        array, and with ``verify`` values that differ from the manifest's checksum. From format
        2 on, a pool layer is a transposed view of (T, C, H, W) memory, as it is stored.
        """
        results, damaged = self.read_spans(layer, rows)
        if verify:
            expected = self.checksums[layer][list(rows)]  # (n,)
            read = [k for k, data in enumerate(results) if data is not None]
            found = checksums([results[k] for k in read], [expected[k] for k in read])
            for k, digest in zip(read, found, strict=True):
                if digest != expected[k]:  # the writer refuses non-finite values: say which
                    finite = np.isfinite(results[k]).all()
                    results[k] = None
                    damaged[k] = "checksum mismatch" if finite else "NaN or inf values"
        as_read = [None if a is None else self.schema.from_stored(layer, a) for a in results]
        return as_read, damaged

    def read_spans(
        self, name: str, rows: Sequence[int]
    ) -> tuple[list[np.ndarray | None], dict[int, str]]:
        """Array ``name`` (a layer or ``timestamps``) of each of ``rows``, and the damaged ones.

        As :meth:`read_layer` without checksums, in the axis order of the disk. The spans are
        read in contiguous groups of chunks; a group that cannot be read whole is read chunk by
        chunk, so that exactly the rows touching a lost chunk are damaged (a chunk shared by
        several videos damages all).
        """
        try:
            array = self.array(name)
        except StoreError as error:  # no readable metadata: every row's data is lost
            reason = f"array unreadable ({error.__cause__ or error})"
            return [None] * len(rows), dict.fromkeys(range(len(rows)), reason)
        axis = self.axis(name)
        chunk = array.chunks[axis]
        starts = self.offsets[name][list(rows)]  # (n,)
        stops = starts + self.lengths[name][list(rows)]  # (n,)
        # Videos without time steps (pool5 of a very short video) read nothing.
        empty = np.empty((*array.shape[:axis], 0, *array.shape[axis + 1 :]), array.dtype)
        results: list[np.ndarray | None] = [empty] * len(rows)
        damaged: dict[int, str] = {}
        layout = self.layout(name)
        for group in chunk_groups(starts, stops, chunk):
            low, high = int(starts[group].min()), int(stops[group].max())
            if layout is not None:
                block, lost = layout.read(low, high)
            else:
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


def checksums(arrays: Sequence[np.ndarray], like: Sequence[str]) -> list[str]:
    """:func:`~astar.store.digest.checksum` of each array with the algorithm of the digest
    ``like`` it is compared with, several at a time on a few threads."""
    algorithms = [algorithm_of(digest) for digest in like]
    if len(arrays) < 2 or not in_parallel(sum(a.nbytes for a in arrays)):
        return [checksum(a, algorithm) for a, algorithm in zip(arrays, algorithms, strict=True)]
    return list(_hash_pool().map(checksum, arrays, algorithms))


_readers: ThreadPoolExecutor | None = None  # the layers of a batch read side by side


def in_parallel(nbytes: int) -> bool:
    """Whether work on ``nbytes`` bytes is worth handing to threads (see PARALLEL_BYTES)."""
    return HASH_THREADS > 1 and nbytes >= PARALLEL_BYTES


def reader_pool() -> ThreadPoolExecutor:
    """Threads reading the (partition, layer) pieces of a batch side by side. A pool of its
    own: its tasks wait on the chunk and hashing pool's, which never waits on them."""
    global _readers
    with _hashers_lock:
        if _readers is None:
            _readers = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="astar-batch")
        return _readers


def _hash_pool() -> ThreadPoolExecutor:
    """The process's hashing threads (a forked child makes its own: see _forget_hashers)."""
    global _hashers
    with _hashers_lock:
        if _hashers is None:
            _hashers = ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="astar-reader")
        return _hashers


@dataclass(frozen=True)
class ChunkLayout:
    """An array of the store's own layout, read chunk file by chunk file without zarr.

    That layout: chunked along one axis only (time), ``bytes`` little-endian then at most one
    zstd compressor, no filters, dotted chunk keys. :meth:`of` returns None for any other array.
    """

    folder: StorePath  # the array's folder, holding its chunk files
    shape: tuple[int, ...]  # the whole array's shape
    chunks: tuple[int, ...]  # one chunk's shape (edge chunks are stored whole)
    dtype: np.dtype
    axis: int  # the chunked axis
    keys: tuple[str, ...]  # chunk index -> its file name
    codec: numcodecs.abc.Codec | None  # the decompressor; None for raw bytes

    @classmethod
    def of(cls, array: zarr.Array, folder: StorePath, axis: int) -> ChunkLayout | None:
        """The layout of ``array`` (stored at ``folder``, chunked along ``axis``), or None."""
        metadata = array.metadata
        if getattr(metadata, "zarr_format", None) != 3 or not 0 <= axis < array.ndim:
            return None
        if any(array.chunks[d] != array.shape[d] for d in range(array.ndim) if d != axis):
            return None
        names = [type(codec).__name__ for codec in metadata.codecs]
        if names not in (["BytesCodec"], ["BytesCodec", "ZstdCodec"]):
            return None  # sharding, filters or another compressor: zarr knows them
        endian = getattr(metadata.codecs[0], "endian", None)
        if endian is not None and getattr(endian, "value", endian) != "little":
            return None
        codec = None
        if len(names) == 2:
            codec = numcodecs.Zstd(level=metadata.codecs[1].level)
        count = math.ceil(array.shape[axis] / array.chunks[axis]) if array.shape[axis] else 0
        keys = tuple(chunk_key(array, axis, index) for index in range(count))
        dtype = np.dtype(array.dtype).newbyteorder("<")
        return cls(folder, array.shape, array.chunks, dtype, axis, keys, codec)

    def read(self, low: int, high: int) -> tuple[np.ndarray, dict[int, str]]:
        """Steps ``low:high`` along the axis, and the chunks there that are lost (index ->
        reason, the same words as a zarr read's); a lost chunk's steps are left NaN."""
        length = self.chunks[self.axis]
        indices = range(low // length, (high - 1) // length + 1)
        shape = (*self.shape[: self.axis], high - low, *self.shape[self.axis + 1 :])
        block = np.empty(shape, self.dtype)
        lost: dict[int, str] = {}
        remote = self._fetch_remote([self.keys[i] for i in indices]) if self.remote else None

        def place(index: int) -> None:
            key = self.keys[index]
            start, stop = max(low, index * length), min(high, (index + 1) * length)
            target = block[_along(self.axis, start - low, stop - low)]
            offset = index * length
            try:
                if (
                    remote is None
                    and self.codec is None
                    and self._read_into(key, target, start - offset, stop - offset)
                ):
                    return
                chunk = self._chunk(key, remote)
            except MissingChunk as error:
                lost[index], target[...] = str(error), np.nan
                return
            except Exception as error:  # the codec's own type varies (zstd: RuntimeError)
                lost[index] = f"chunk {key} unreadable ({type(error).__name__}: {error})"
                target[...] = np.nan
                return
            target[...] = chunk[_along(self.axis, start - offset, stop - offset)]

        if len(indices) > 1 and in_parallel(block.nbytes):
            list(_hash_pool().map(place, indices))
        else:
            for index in indices:
                place(index)
        return block, lost

    @property
    def remote(self) -> bool:
        return is_remote(self.folder)

    def _chunk(self, key: str, fetched: dict[str, bytes | None] | None) -> np.ndarray:
        """Chunk ``key`` decoded, as a view of this thread's scratch buffer (valid until the
        thread's next chunk): a fresh buffer a chunk costs as much again in page faults as the
        decompression itself (measured on the 2-core VM of bench_store_read.py)."""
        nbytes = math.prod(self.chunks) * self.dtype.itemsize
        plain = _scratch("plain", nbytes)
        if fetched is not None:
            data = fetched[key]
            if data is None:
                raise MissingChunk(key)
            if self.codec is None:
                if len(data) != nbytes:
                    raise ValueError(f"{len(data)} bytes, {nbytes} expected")
                plain[:] = np.frombuffer(data, np.uint8)
            else:
                self.codec.decode(data, out=plain)
        else:
            try:
                handle = open(os.path.join(self.folder, key), "rb")  # noqa: SIM115
            except FileNotFoundError:
                raise MissingChunk(key) from None
            with handle:
                if self.codec is None:
                    if handle.readinto(plain) != nbytes or handle.read(1):
                        raise ValueError(f"chunk file is not {nbytes} bytes")
                else:
                    size = os.fstat(handle.fileno()).st_size
                    packed = _scratch("packed", size)
                    if handle.readinto(packed) != size:
                        raise ValueError("chunk file shorter than its size")
                    self.codec.decode(packed, out=plain)
        return plain.view(self.dtype).reshape(self.chunks)

    def _read_into(self, key: str, target: np.ndarray, first: int, last: int) -> bool:
        """Read steps ``first:last`` of uncompressed local chunk ``key`` straight into
        ``target``: one ``preadv`` where they are one range of the file (the one copy
        ``np.load`` makes too; always so from format 2 on, time being first), else (part of a
        format-1 pool layer's chunk, C runs) through a memory map, which touches only those
        bytes. False if ``target`` cannot be written in place."""
        pre = self.chunks[: self.axis]  # axes before time: (C,) for a pool layer
        step = math.prod(self.chunks[self.axis + 1 :]) * self.dtype.itemsize  # bytes a step
        whole = math.prod(self.chunks) * self.dtype.itemsize
        try:
            descriptor = os.open(os.path.join(self.folder, key), os.O_RDONLY)
        except FileNotFoundError:
            raise MissingChunk(key) from None
        try:
            if os.fstat(descriptor).st_size != whole:
                raise ValueError(f"chunk file is not {whole} bytes")
            if pre and (first, last) != (0, self.chunks[self.axis]):
                # Part of every channel's run: map the file and copy just those bytes (reading
                # the whole chunk would cost a copy of all of it for a few steps).
                # MAP_POPULATE: the pages mapped in one call, not one fault at a time.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                mapped = mmap.mmap(descriptor, whole, flags=flags, prot=mmap.PROT_READ)
                try:
                    chunk = np.frombuffer(mapped, self.dtype).reshape(self.chunks)
                    target[...] = chunk[_along(self.axis, first, last)]
                    del chunk
                finally:
                    mapped.close()
                return True
            # Each piece is one row of ``target`` before the time axis (all of it for fc7).
            rows = target.reshape(math.prod(pre), -1) if pre else target.reshape(1, -1)
            if not np.may_share_memory(rows, target):  # reshape had to copy: not in place
                return False
            pieces = [memoryview(row).cast("B") for row in rows]
            wanted = sum(piece.nbytes for piece in pieces)
            if os.preadv(descriptor, pieces, first * step) != wanted:
                raise ValueError("chunk file shorter than its size")
        finally:
            os.close(descriptor)
        return True

    def _fetch_remote(self, keys: list[str]) -> dict[str, bytes | None]:
        """Each chunk object's bytes (None where it does not exist), in one concurrent call."""
        fs, base = self.folder.fs, self.folder.path.rstrip("/")
        found = fs.cat([f"{base}/{key}" for key in keys], on_error="return")
        out: dict[str, bytes | None] = {}
        for key in keys:
            value = found.get(f"{base}/{key}")
            if isinstance(value, FileNotFoundError):
                out[key] = None
            elif isinstance(value, BaseException):
                raise value
            else:
                out[key] = value
        return out


_scratches = threading.local()  # per thread: name -> reusable uint8 buffer


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """This thread's reusable buffer ``name`` of ``nbytes`` bytes (grown as needed)."""
    buffers = _scratches.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = buffers[name] = np.empty(nbytes, np.uint8)
    return buffer[:nbytes]


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
    ``partition p00001, pool3: chunk c.1.0.0.0 missing; ...``."""
    return f"partition {partition}, " + "; ".join(f"{name}: {why}" for name, why in wrong.items())
