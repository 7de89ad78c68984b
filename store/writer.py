"""Writing one partition: stage every finished video, then commit the partition whole.

Life of a partition ``p`` in ``STORE``:

1. ``locks/p.lock`` is taken (see :class:`~astar.store.files.FileLock`), so exactly one process
   writes ``p``: no two writers can ever touch the same chunk.
2. Each finished video, ok or failed, is staged at once as ``staging/p/v<k>.npz`` (``k`` its
   place in the plan; ids may hold characters unfit for file names), written to a temporary and
   renamed. A killed run loses only the videos in flight; the next run reuses what is staged.
3. ``commit()`` concatenates the staged videos into a zarr group built in ``staging/p/.commit``,
   fsyncs it, writes its ``manifest.csv`` last, and renames the directory to ``partitions/p``.
   Readers count a partition only when that directory holds its manifest, so a half-built one is
   never visible; a commit killed midway leaves only ``staging/p/.commit``, rebuilt next time.
4. The staging directory is deleted, then the lock released.

On object storage (a store at an fsspec URL) rename is a copy, object by object, so it cannot
publish a partition at once. There a commit builds the group under a name of its own,
``partitions/p/<attempt>/`` (``a-`` and random hex), manifest included, and then creates the
marker ``commits/p.json`` naming that attempt with a conditional write (``If-None-Match: *``
on S3): the marker, written last, is what makes the partition exist for readers, and of two
writers racing to commit ``p`` exactly one creates it, the other deleting its own attempt and
taking the winner's. So a reader never sees a partly written partition, and the objects of the
published partition were all written by one writer, even if a lock was wrongly broken: locks
there (objects created only if absent, renewed while held) only spare duplicate work. Staged
videos are objects too, so a partition resumes on any host.

Staging files are uncompressed (``np.savez``): they are short-lived and writing them must not
slow the extractor down; compression happens once, at commit.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import ZstdCodec

from astar.store.digest import checksum
from astar.store.errors import InvalidFeatures, StoreError
from astar.store.files import TEMP_PREFIX, FileLock, atomic_write, fsync_dir, fsync_tree
from astar.store.geometry import LAYERS
from astar.store.location import StorePath, is_remote, remove_tree, write_once, zarr_store
from astar.store.manifest import INFO_KEYS, MISSING, OK, SPAN_NAMES, write_manifest
from astar.store.plan import PartitionPlan, normalize_source
from astar.store.schema import StoreSchema, time_axis

log = logging.getLogger(__name__)

# About 1 MiB per chunk: large enough that file count follows bytes stored (and that object
# stores and network filesystems see few, large files), small enough that reading one video of a
# partition decodes little beyond its own time range.
TARGET_CHUNK_BYTES = 1 << 20
# zstd level 1: measured on ReLU-like fp16 features (half zeros), it compresses as well as the
# default level 3 (ratio 1.69 vs 1.70) and writes 2-3x faster (about 105-130 vs 45-60 MB/s per
# core); blosc-lz4 was faster but compressed only 1.09x, and no compression doubles the bytes.
# "none" trades those bytes for reads: zstd decompresses at about 0.5 GB/s a core on the 2-core
# EPYC of benchmarks/bench_store_read.py, which bounds a read of the big pool2 layer there.
# "auto" (the default) picks by where the store is: on a local disk read speed counts (none:
# reads at 0.5-1x np.load there, zstd at 0.1-0.25x), on object storage bytes do (transfer and
# storage are paid by the byte, and each request's latency dwarfs decompression).
COMPRESSIONS = {"zstd": (ZstdCodec(level=1),), "none": ()}
DEFAULT_COMPRESSION = "auto"


def resolve_compression(choice: str, remote: bool) -> str:
    """``zstd`` or ``none`` for ``choice`` (``auto``: zstd on object storage, else none)."""
    if choice == "auto":
        return "zstd" if remote else "none"
    if choice not in COMPRESSIONS:
        raise StoreError(f"compression {choice!r} is not one of {['auto', *COMPRESSIONS]}")
    return choice


CHUNKS_PER_WRITE = 16  # chunks encoded per zarr write call at commit (bounded memory)
COMMIT_DIR = ".commit"  # under staging/<partition>/: the partition being built
COMMITS = "commits"  # on object storage: commits/<partition>.json, the marker written last
ATTEMPT_PREFIX = "a-"  # on object storage: partitions/<partition>/a-<hex>/, one commit's build
DIMENSION_NAMES = {"pool": ("channel", "time", "height", "width"), "fc7": ("clip", "feature")}


def chunk_length(schema: StoreSchema, layer: str, total: int) -> int:
    """Time steps per chunk of ``layer``: about TARGET_CHUNK_BYTES, never beyond the array.

    Capped at the array's length because zarr stores edge chunks at full size.
    """
    step_bytes = math.prod(schema.layer_shapes[layer]) * np.dtype(schema.dtype).itemsize
    return max(1, min(math.ceil(TARGET_CHUNK_BYTES / step_bytes), total))


def staged_name(index: int) -> str:
    return f"v{index:05d}.npz"


class WritableStore(Protocol):
    """What a writer needs of its store (a :class:`~astar.store.FeatureStore`), no more: the
    store makes writers, so the writer may not import it back."""

    path: StorePath  # the store's root directory or URL
    schema: StoreSchema  # how every video of the store is shaped and typed

    def is_complete(self, name: str) -> bool: ...  # partition ``name`` is committed

    def refresh(self) -> None: ...  # forget the index, so a new partition is seen


class PartitionWriter:
    """Writes one partition of a store; get it from :meth:`FeatureStore.partition_writer`.

    Use it as a context manager, which holds the partition's lock::

        with store.partition_writer("p00003") as writer:
            for video_id, source in plan.videos:
                if video_id not in writer.done_ids:
                    writer.add(video_id, source, features, info)  # or add_failure(...)
            writer.commit()

    ``add`` and ``add_failure`` may be called from another thread than the one that entered.
    If the partition is already complete (another process committed it first), ``done_ids``
    holds all its videos and ``commit`` does nothing.
    """

    def __init__(
        self, store: WritableStore, plan: PartitionPlan, compression: str = DEFAULT_COMPRESSION
    ):
        # Of the arrays this writer commits: zstd or none (see COMPRESSIONS).
        self.compression = resolve_compression(compression, is_remote(store.path))
        self.plan = plan
        self.name = plan.name
        self.done_ids: set[str] = set()  # videos staged (ok or failed) or already committed
        self.complete = False  # the partition is committed
        self._store = store
        self._schema = store.schema
        self._positions = {video_id: k for k, (video_id, _) in enumerate(plan.videos)}
        self._staging = store.path / "staging" / plan.name
        self._lock = FileLock(store.path / "locks" / f"{plan.name}.lock")
        self._mutex = threading.Lock()  # guards done_ids against a staging thread
        self._remote = is_remote(store.path)
        self._fetched: dict[str, Path] = {}  # during a remote commit: local copies of staged

    # ----------------------------------------------------------------------------------------
    # Lock and resume

    def __enter__(self) -> PartitionWriter:
        self._lock.acquire()
        try:
            self._resume()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Staged videos stay on disk whatever happened: they are what a rerun resumes from.
        self._lock.release()

    def _resume(self) -> None:
        if self._store.is_complete(self.name):
            self.complete = True
            self.done_ids = set(self._positions)
            if self._staging.exists():  # a commit killed after its rename, before its cleanup
                shutil.rmtree(self._staging)
            return
        if self._remote:  # one listing, not a request per video; nothing is half written
            staged = (
                {entry.name for entry in self._staging.iterdir()}
                if (self._staging.exists())
                else set()
            )
        else:
            self._staging.mkdir(parents=True, exist_ok=True)
            # We hold the lock: temporaries and a half-built commit are a dead writer's.
            if (self._staging / COMMIT_DIR).exists():
                shutil.rmtree(self._staging / COMMIT_DIR)
            for leftover in self._staging.glob(f"{TEMP_PREFIX}*"):
                leftover.unlink()
            staged = {entry.name for entry in self._staging.iterdir()}
        for video_id, _ in self.plan.videos:
            path = self._staged_path(video_id)
            if path.name in staged and self._staged_record(path, video_id) is not None:
                self.done_ids.add(video_id)

    def _staged_path(self, video_id: str) -> Path:
        return self._staging / staged_name(self._positions[video_id])

    def _staged_record(self, path: Path, video_id: str) -> dict[str, Any] | None:
        """The record of a staged video, or None (file removed) when it is unreadable."""
        try:
            with _load_staged(path) as staged:
                record = json.loads(str(staged["record"]))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning(
                "%s: unreadable staged video %s (%s); it will be redone", path, video_id, error
            )
            path.unlink()
            return None
        if record.get("id") != video_id:
            raise StoreError(
                f"{path}: staged for video {record.get('id')!r}, but the plan puts {video_id!r} "
                "there; the staging directory does not belong to this plan"
            )
        return record

    # ----------------------------------------------------------------------------------------
    # Staging

    def _check_video(self, video_id: str, source: str) -> None:
        if self._lock.owner is None:
            raise StoreError(
                f"partition {self.name}: use `with store.partition_writer(name) as writer:` "
                "(the writer must hold the partition lock)"
            )
        if self.complete:
            raise StoreError(f"partition {self.name} is already committed; nothing can be added")
        if video_id not in self._positions:
            raise StoreError(f"video {video_id!r} is not planned in partition {self.name}")
        planned = self.plan.videos[self._positions[video_id]][1]
        if normalize_source(str(source)) != planned:
            raise StoreError(f"video {video_id!r}: source {source} differs from planned {planned}")

    def add(
        self,
        video_id: str,
        source: str,
        features: Mapping[str, np.ndarray],
        info: Mapping[str, Any],
    ) -> None:
        """Stage an extracted video: every layer of the schema and its info (see INFO_KEYS).

        ``features[layer]``: (C, T, H, W) for pool layers, (clips, D) for fc7, float16/32, with
        ``T`` and ``clips`` as :meth:`StoreSchema.expected_lengths` gives for ``n_frames``.
        Converted to the store's dtype; values that become non-finite (fp16 overflow) are
        refused rather than stored.
        """
        self._check_video(video_id, source)
        record = self._info_record(video_id, info, failed=False)
        arrays = self._checked_features(video_id, features, record["n_frames"])
        record.update(id=video_id, source=self.plan.videos[self._positions[video_id]][1])
        record.update(status=OK, reason="")
        for layer, array in arrays.items():
            record[f"{layer}_length"] = array.shape[time_axis(layer)]
            # Of the bytes as stored (time first from format 2): what a read hashes as it is.
            record[f"{layer}_checksum"] = checksum(self._schema.to_stored(layer, array))
        self._stage(video_id, record, arrays)

    def add_failure(
        self,
        video_id: str,
        source: str,
        kind: str,
        reason: str,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Stage a failed video: ``kind`` (e.g. ``corrupt``) and a human-readable ``reason``.

        ``info`` may carry whatever was learnt before the failure (duration, source_fps...).
        """
        self._check_video(video_id, source)
        if not kind or kind == OK or not kind.replace("_", "").isalnum():
            raise StoreError(f"video {video_id!r}: failure kind {kind!r} must be a word, not 'ok'")
        record = self._info_record(video_id, info or {}, failed=True)
        record.update(id=video_id, source=self.plan.videos[self._positions[video_id]][1])
        record.update(status=kind, reason=str(reason))
        for layer in LAYERS:
            record[f"{layer}_length"] = 0
            record[f"{layer}_checksum"] = ""
        self._stage(video_id, record, {})

    def _stage(self, video_id: str, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        text = np.array(json.dumps(record))  # a unicode scalar: loads without pickle
        atomic_write(self._staged_path(video_id), lambda h: np.savez(h, record=text, **arrays))
        with self._mutex:
            self.done_ids.add(video_id)

    def _info_record(self, video_id: str, info: Mapping[str, Any], failed: bool) -> dict[str, Any]:
        """Validated manifest fields from ``info``; a failure may omit any of them."""
        unknown = sorted(set(info) - set(INFO_KEYS))
        missing = [] if failed else [key for key in INFO_KEYS if key not in info]
        if unknown or missing:
            raise InvalidFeatures(
                f"video {video_id!r}: info keys missing {missing}, unknown {unknown} "
                f"(expected {list(INFO_KEYS)})"
            )

        def number(key: str, default: float = math.nan) -> float:
            value = info.get(key)
            return default if value is None else float(value)

        timestamps = np.asarray(info.get("timestamps", ()), dtype=np.float64)  # (frames,)
        record = {
            "n_frames": int(info.get("n_frames", 0)),
            "n_sampled": int(info.get("n_sampled", 0)),
            "padded": bool(info.get("padded", False)),
            "subsampled": bool(info.get("subsampled", False)),
            "duration": number("duration"),
            # None means "the schema's rate" (nothing was subsampled).
            "fps": number("fps", self._schema.fps) if not failed else number("fps"),
            "source_fps": number("source_fps"),
            "timestamps": timestamps.tolist(),
            "timestamps_length": len(timestamps),
        }
        if timestamps.ndim != 1 or not np.isfinite(timestamps).all():
            raise InvalidFeatures(f"video {video_id!r}: timestamps must be finite and 1-D")
        if not failed and (record["n_frames"] < 1 or len(timestamps) == 0):
            raise InvalidFeatures(
                f"video {video_id!r}: an extracted video needs n_frames >= 1 and timestamps, "
                f"got n_frames={record['n_frames']} and {len(timestamps)} timestamps"
            )
        return record

    def _checked_features(
        self, video_id: str, features: Mapping[str, np.ndarray], n_frames: int
    ) -> dict[str, np.ndarray]:
        """Every layer in the storage dtype, after checking names, shapes and values."""
        if set(features) != set(LAYERS):
            raise InvalidFeatures(
                f"video {video_id!r}: features must have exactly the layers {LAYERS}, "
                f"got {sorted(features)}"
            )
        lengths = self._schema.expected_lengths(n_frames)
        arrays = {}
        for layer in LAYERS:
            array = np.asarray(features[layer])
            wanted = self._schema.full_shape(layer, lengths[layer])
            if array.shape != wanted or array.dtype.kind != "f":
                raise InvalidFeatures(
                    f"video {video_id!r}, {layer}: got {array.dtype} {array.shape}, expected "
                    f"a float array of shape {wanted} for n_frames={n_frames}"
                )
            with np.errstate(over="ignore"):  # overflow is reported just below, with a hint
                stored = array.astype(self._schema.dtype, copy=False)
            if not np.isfinite(stored).all():
                hint = " (fp16 overflow? use dtype float32)" if np.isfinite(array).all() else ""
                raise InvalidFeatures(f"video {video_id!r}, {layer}: non-finite values{hint}")
            arrays[layer] = stored
        return arrays

    # ----------------------------------------------------------------------------------------
    # Commit

    def commit(self) -> None:
        """Build the partition from the staged videos and publish it atomically.

        Every planned video must be staged (ok or failed); the missing ones are listed.
        """
        if self.complete:
            return
        if self._lock.owner is None:
            raise StoreError(f"partition {self.name}: commit needs the writer's `with` block")
        missing = [video_id for video_id, _ in self.plan.videos if video_id not in self.done_ids]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise StoreError(
                f"partition {self.name}: {len(missing)} video(s) not staged yet: {shown}"
            )
        records = [self._staged_record(self._staged_path(v), v) for v, _ in self.plan.videos]
        lost = [v for (v, _), record in zip(self.plan.videos, records, strict=True) if not record]
        if lost:
            self.done_ids.difference_update(lost)
            raise StoreError(
                f"partition {self.name}: staged files of {lost} were unreadable and "
                "are removed; rerun the extraction to redo them"
            )
        table = self._table(records)
        if self._remote:
            self._commit_remote(table)
            return
        build = self._staging / COMMIT_DIR
        if build.exists():
            shutil.rmtree(build)
        group = zarr.open_group(build, mode="w-", attributes={"partition": self.name})
        for layer in LAYERS:
            self._write_layer(group, layer, table)
        self._write_timestamps(group, table)
        fsync_tree(build)
        write_manifest(build / "manifest.csv", table)  # last: it makes the partition complete
        final = self._store.path / "partitions" / self.name
        if final.exists():
            raise StoreError(f"{final} exists but is not a complete partition; remove it and rerun")
        build.rename(final)
        fsync_dir(final.parent)
        shutil.rmtree(self._staging)
        self.complete = True
        self._store.refresh()

    def _commit_remote(self, table: pd.DataFrame) -> None:
        """Commit on object storage: build ``partitions/p/<attempt>/``, then create the marker
        ``commits/p.json`` only if absent (see the module docstring)."""
        attempt = f"{ATTEMPT_PREFIX}{uuid.uuid4().hex[:12]}"
        folder = self._store.path / "partitions" / self.name
        build = folder / attempt
        try:
            self._build_remote(build, table)
        except FileNotFoundError:
            # The staged videos vanished: another writer committed them and cleared staging.
            if not self._store.is_complete(self.name):
                raise
            won = False
        else:
            marker = {"partition": self.name, "attempt": attempt, "videos": len(table)}
            won = write_once(marker_path(self._store.path, self.name), json.dumps(marker).encode())
        if won:  # the attempts of writers that died, or that lose to this one, are garbage
            for entry in folder.iterdir():
                if entry.name.startswith(ATTEMPT_PREFIX) and entry.name != attempt:
                    remove_tree(entry)
        else:
            log.info(
                "partition %s: another writer committed it first; %s dropped", self.name, attempt
            )
            remove_tree(build)
        remove_tree(self._staging)
        self.complete = True
        self._store.refresh()

    def _build_remote(self, build: StorePath, table: pd.DataFrame) -> None:
        """The partition's group, manifest included, at ``build`` on object storage."""
        store = zarr_store(build, read_only=False)
        group = zarr.open_group(store=store, mode="w-", attributes={"partition": self.name})
        ok = table.loc[table["status"] == OK, "id"].tolist()
        with tempfile.TemporaryDirectory(prefix="astar-commit-") as local:
            # Each layer is written from every video's staged file: fetch them once (in one
            # concurrent call), not once a layer.
            remote = [self._staged_path(video_id) for video_id in ok]
            if remote:
                fs = self._store.path.fs
                fs.get([p.path for p in remote], [os.path.join(local, p.name) for p in remote])
                missing = [p for p in remote if not os.path.exists(os.path.join(local, p.name))]
                if missing:  # some fsspec backends skip absent sources instead of raising
                    raise FileNotFoundError(str(missing[0]))
            self._fetched = {v: Path(local, p.name) for v, p in zip(ok, remote, strict=True)}
            try:
                for layer in LAYERS:
                    self._write_layer(group, layer, table)
            finally:
                self._fetched = {}
        self._write_timestamps(group, table)
        write_manifest(build / "manifest.csv", table)

    def _table(self, records: list[dict[str, Any]]) -> pd.DataFrame:
        """Manifest rows with each video's offsets in the concatenated arrays."""
        table = pd.DataFrame.from_records(records)
        table["partition"] = self.name
        for name in SPAN_NAMES:
            lengths = table[f"{name}_length"].to_numpy(dtype=np.int64)  # (videos,)
            offsets = np.cumsum(lengths) - lengths  # (videos,)
            ok = (table["status"] == OK).to_numpy()
            table[f"{name}_offset"] = np.where(ok, offsets, MISSING)
        return table

    def _pieces(self, table: pd.DataFrame, layer: str) -> Iterator[np.ndarray]:
        for video_id in table.loc[table["status"] == OK, "id"]:
            path = self._fetched.get(video_id) or self._staged_path(video_id)
            with _load_staged(path) as staged:
                yield staged[layer]

    def _write_layer(self, group: zarr.Group, layer: str, table: pd.DataFrame) -> None:
        total = int(table[f"{layer}_length"].sum())
        length = chunk_length(self._schema, layer, total)
        shape = self._schema.stored_shape(layer, total)
        chunks = self._schema.stored_shape(layer, length)
        axis = self._schema.stored_axis(layer)
        names = list(DIMENSION_NAMES["fc7" if layer == "fc7" else "pool"])  # as read
        names.insert(axis, names.pop(time_axis(layer)))  # time moved where it is stored
        array = _new_array(
            group, layer, shape, chunks, self._schema.dtype, tuple(names), self.compression
        )
        pieces = (self._schema.to_stored(layer, piece) for piece in self._pieces(table, layer))
        _write_along(array, pieces, axis, length * CHUNKS_PER_WRITE, length)

    def _write_timestamps(self, group: zarr.Group, table: pd.DataFrame) -> None:
        ok = table["status"] == OK
        stamps = [np.asarray(t, dtype=np.float64) for t in table.loc[ok, "timestamps"]]
        total = sum(len(t) for t in stamps)
        chunk = max(1, min(TARGET_CHUNK_BYTES // 8, total))
        array = _new_array(
            group, "timestamps", (total,), (chunk,), "float64", ("frame",), self.compression
        )
        if total:
            array[:] = np.concatenate(stamps)  # (frames_total,)


def marker_path(root: StorePath, name: str) -> StorePath:
    """On object storage: the object whose existence makes partition ``name`` complete."""
    return root / COMMITS / f"{name}.json"


def _load_staged(path: StorePath) -> Any:
    """A staged video's npz, opened for reading (on object storage, fetched whole first)."""
    if is_remote(path):
        return np.load(io.BytesIO(path.read_bytes()))
    return np.load(path)


def _new_array(
    group: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    dimension_names: tuple[str, ...],
    compression: str,
) -> zarr.Array:
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=COMPRESSIONS[compression],
        # NaN, never a feature value: a lost chunk file reads as NaN, which verify catches,
        # instead of as plausible zeros. It also keeps zarr from skipping all-zero chunks.
        fill_value=np.nan,
        chunk_key_encoding={"name": "default", "separator": "."},  # flat: no folder per chunk
        dimension_names=dimension_names,
        config={"write_empty_chunks": True},
    )


def _write_along(
    array: zarr.Array, pieces: Iterator[np.ndarray], axis: int, block: int, chunk: int
) -> None:
    """Append ``pieces`` along ``axis`` of ``array``, in writes aligned to whole chunks.

    Every write but the last covers whole chunks, so each chunk is encoded exactly once (a
    write straddling a chunk would make zarr read, decode and re-encode it).
    """
    buffered: list[np.ndarray] = []
    count = cursor = 0

    def flush(upto: int) -> None:
        nonlocal buffered, count, cursor
        data = np.concatenate(buffered, axis=axis)
        head, tail = np.split(data, [upto], axis=axis)
        where = [slice(None)] * data.ndim
        where[axis] = slice(cursor, cursor + upto)
        array[tuple(where)] = head
        cursor += upto
        buffered, count = [tail], tail.shape[axis]

    # Pieces are consumed one at a time, so at most about one block is held in memory.
    for piece in pieces:
        buffered.append(piece)
        count += piece.shape[axis]
        if count >= block:
            flush(count - count % chunk)
    if count:
        flush(count)
