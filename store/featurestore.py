"""The feature store: C3D features of many videos in a few large files, readable by id.

Layout (``STORE`` is a zarr v3 group)::

    zarr.json            root group; attributes = the StoreSchema (how the features were made)
    plan.json            partition -> ordered (id, source); stable across reruns
    manifest.csv         consolidated manifest of the complete partitions (convenience copy)
    partitions/          zarr group
      p00000/            zarr group, one per partition, written whole by one worker
        pool2 .. pool5   (T_total, C, H, W): the partition's videos concatenated along time,
                         time first (format 2; format 1: (C, T_total, H, W)); read as
                         (C, T, H, W) either way
        fc7              (clips_total, D)
        timestamps       (frames_total,) float64
        manifest.csv     per video: status, reason, info, offsets/lengths, checksums. Written
                         last: a partition exists for readers only with it
    staging/p00003/      while a partition is in progress: one file per finished video
    locks/p00003.lock    while a writer holds the partition

On object storage (any fsspec URL, e.g. ``s3://bucket/store``) a partition is committed by a
marker instead of a rename (see :mod:`astar.store.writer`)::

    commits/p00000.json  {"attempt": "a-1f2e..."}: created last, only if absent
    partitions/p00000/a-1f2e.../   the zarr group of that commit, manifest.csv included

The number of files grows with the bytes stored (chunks of about 1 MiB along time) and with the
number of partitions, never with the number of videos. The partition manifests, not the
top-level ``manifest.csv``, are the readers' source of truth, so a stale consolidated copy
never hides or invents a video.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from astar.store.errors import CorruptVideo, SchemaMismatch, StoreError, VideoNotFound
from astar.store.files import FileLock
from astar.store.geometry import LAYERS
from astar.store.location import (
    StorePath,
    forget_listings,
    is_remote,
    store_path,
    zarr_store,
)
from astar.store.manifest import OK, empty_manifest, write_manifest
from astar.store.partition import PartitionReader, damage_text, in_parallel, reader_pool
from astar.store.plan import PartitionPlan, extend_plan, read_plan, write_plan
from astar.store.report import VerifyReport, verify_store
from astar.store.schema import StoreSchema
from astar.store.writer import COMMITS, DEFAULT_COMPRESSION, PartitionWriter, marker_path

log = logging.getLogger(__name__)

PLAN_LOCK = "plan.lock"  # under locks/: held while plan.json is read, extended and rewritten
PLAN_LOCK_WAIT_S = 60.0  # planning takes milliseconds; wait this long for another planner


@dataclass
class VideoFeatures:
    """One video read from the store."""

    id: str  # video id
    layers: dict[str, np.ndarray]  # layer -> (C, T, H, W) or fc7 (clips, D), in the store dtype
    info: dict[str, Any]  # manifest fields (n_frames, padded, duration...); timestamps (frames,)


class FeatureStore:
    """A feature store on disk; see the module docstring for its layout.

    Open with :meth:`open` (read) or :meth:`create_or_open` (extraction). Reading is by id,
    ``store[video_id]``, or by batch, :meth:`read_batch`; only ok videos are readable, failed ones
    are in :attr:`manifest` with their status and reason.

    Every video read is checked: a lost chunk or undecodable chunk, or values that differ from
    the checksum recorded at write time, raise :class:`CorruptVideo` naming each damaged video of
    the request. ``verify=False`` skips the checksums (a lost chunk is still an error, never a
    fill value); their cost is measured by ``benchmarks/bench_store_read.py``.

    Lookup by id is a dict built from the partition manifests at first use; a partition's
    arrays are opened once and kept. A store object sees the partitions complete at that first
    use; :meth:`refresh` (called by itself when an unknown id is asked for) picks up later ones.

    Safe to use from several processes: complete partitions are immutable and each process opens
    its own arrays (a store object sent to a DataLoader worker is pickled without its caches).
    """

    def __init__(self, path: StorePath, schema: StoreSchema, verify: bool = True):
        self.path = path  # a local directory, or a UPath (see astar.store.location)
        self.remote = is_remote(path)
        self.schema = schema
        self.verify_reads = verify  # check each video read against its recorded checksum
        self._partitions: dict[str, PartitionReader] = {}  # complete partitions opened so far
        self._index: dict[str, tuple[PartitionReader, int]] | None = None  # id -> (partition, row)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, backbone={self.schema.backbone!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "schema": self.schema, "verify": self.verify_reads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["schema"], state.get("verify", True))

    # ----------------------------------------------------------------------------------------
    # Opening

    @classmethod
    def open(cls, path: str | Path | StorePath, verify: bool = True) -> FeatureStore:
        """Open an existing store; :class:`StoreError` if ``path`` is none or of another format.

        ``path``: a directory, or any fsspec URL (``s3://bucket/store``; see
        :mod:`astar.store.location` for credentials). ``verify=False`` reads without comparing
        checksums (benchmarks, trusted copies).
        """
        path = _location(path)
        root = path / "zarr.json"
        try:
            metadata = json.loads(root.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise StoreError(f"{path}: not a feature store (no zarr.json)") from error
        except (OSError, ValueError) as error:
            raise StoreError(f"{root}: unreadable ({error})") from error
        if metadata.get("zarr_format") != 3 or metadata.get("node_type") != "group":
            raise StoreError(f"{root}: not a zarr v3 group")
        try:
            schema = StoreSchema.from_dict(metadata.get("attributes", {}))
        except StoreError as error:
            raise StoreError(f"{path}: {error}") from error
        return cls(path, schema, verify)

    @classmethod
    def create_or_open(cls, path: str | Path, schema: StoreSchema) -> FeatureStore:
        """Open the store at ``path`` if its schema equals ``schema``, else create it there.

        Refuses (:class:`SchemaMismatch`, listing the differences) a store made otherwise, and
        a non-empty directory that is not a store.
        """
        path = _location(path)
        if not (path / "zarr.json").exists():
            if path.exists() and any(path.iterdir()):
                raise StoreError(f"{path}: exists, is not empty and is not a feature store")
            if not is_remote(path):  # on object storage a folder is only a prefix
                path.mkdir(parents=True, exist_ok=True)
                for folder in ("staging", "locks"):
                    (path / folder).mkdir(exist_ok=True)
            zarr.open_group(store=zarr_store(path / "partitions", read_only=False), mode="a")
            # The root group last: its zarr.json is what makes the directory a store.
            root = zarr_store(path, read_only=False)
            zarr.open_group(store=root, mode="a", attributes=schema.to_dict())
        store = cls.open(path)
        differences = store.schema.differences(schema)
        if differences:
            raise SchemaMismatch(
                f"{path} holds features made with other settings; use another store or the same "
                "settings:\n  " + "\n  ".join(differences)
            )
        if store.schema.versions != schema.versions:
            log.info(
                "%s: package versions differ from the store's: %s", path, store.schema.versions
            )
        return store

    # ----------------------------------------------------------------------------------------
    # Planning and writing

    @property
    def partitions(self) -> list[PartitionPlan]:
        """Every planned partition, complete or not, from ``plan.json``."""
        return read_plan(self.path / "plan.json")

    def plan(
        self, videos: Iterable[tuple[str, str]], partition_size: int = 64
    ) -> list[PartitionPlan]:
        """Plan ``(id, source)`` pairs into partitions and persist the plan; returns all of them.

        Stable: planned ids keep their partition, new ids go into new partitions. Duplicate ids,
        and planned ids given with another source, are refused. Safe from several processes at
        once: the read-extend-write of ``plan.json`` holds ``locks/plan.lock``, so no process's
        additions are lost to another's.
        """
        lock = FileLock(self.path / "locks" / PLAN_LOCK)
        if not self.remote:
            lock.path.parent.mkdir(exist_ok=True)
        lock.acquire(wait=PLAN_LOCK_WAIT_S)
        try:
            partitions, added = extend_plan(self.partitions, videos, partition_size)
            if added:
                write_plan(self.path / "plan.json", partitions)
        finally:
            lock.release()
        return partitions

    def is_complete(self, name: str) -> bool:
        if self.remote:
            forget_listings(self.path)
            return marker_path(self.path, name).exists()
        return (self.path / "partitions" / name / "manifest.csv").is_file()

    def complete_partitions(self) -> dict[str, StorePath]:
        """Complete partition -> the folder of its arrays and manifest."""
        folder = self.path / "partitions"
        if not self.remote:
            return {
                entry.name: entry
                for entry in sorted(folder.iterdir())
                if (entry / "manifest.csv").is_file()
            }
        forget_listings(self.path)
        markers = self.path / COMMITS
        if not markers.exists():
            return {}
        fs = self.path.fs
        paths = sorted(entry.path for entry in markers.iterdir() if entry.name.endswith(".json"))
        found = fs.cat(paths, on_error="raise") if paths else {}
        complete = {}
        for key in paths:
            try:
                marker = json.loads(found[key])
                complete[marker["partition"]] = folder / marker["partition"] / marker["attempt"]
            except (ValueError, KeyError, TypeError) as error:
                raise StoreError(
                    f"{self.path}/{COMMITS}/{key.rsplit('/', 1)[-1]}: "
                    f"unreadable commit marker ({error})"
                ) from error
        return complete

    def pending(self) -> list[PartitionPlan]:
        """Planned partitions not complete yet (never started, staged, or killed mid-commit)."""
        done = self.complete_partitions()  # one listing, not a request per partition
        return [part for part in self.partitions if part.name not in done]

    def partition_writer(
        self, name: str, compression: str = DEFAULT_COMPRESSION
    ) -> PartitionWriter:
        """A writer for planned partition ``name``; enter it (``with``) to take its lock.

        ``compression``: ``auto`` (none on a local disk, zstd on object storage), ``zstd`` or
        ``none``, see ``writer.COMPRESSIONS``; readers take each array as it was written, so
        partitions may differ. Works in any process that
        opened the same path. :class:`PartitionLocked` on entering while a live process holds it.
        """
        plans = {part.name: part for part in self.partitions}
        if name not in plans:
            raise StoreError(f"{self.path}: partition {name!r} is not planned (see plan.json)")
        return PartitionWriter(self, plans[name], compression)

    def consolidate(self) -> StorePath:
        """Rewrite ``manifest.csv`` from the complete partitions' manifests; return its path."""
        self.refresh()
        tables = [part.table for part in self._opened()]
        rows = pd.concat(tables, ignore_index=True) if tables else empty_manifest()
        target = self.path / "manifest.csv"
        write_manifest(target, rows)
        return target

    # ----------------------------------------------------------------------------------------
    # Index

    def refresh(self) -> None:
        """Pick up, at next use, partitions completed since the store was opened (any process)."""
        self._index = None
        forget_listings(self.path)

    def _scan(self) -> None:
        complete = self.complete_partitions()
        names = sorted(complete)
        for name in names:
            if name not in self._partitions:
                self._partitions[name] = PartitionReader(complete[name], self.schema, name)
        index: dict[str, tuple[PartitionReader, int]] = {}
        for name in names:
            part = self._partitions[name]
            index.update((video_id, (part, row)) for video_id, row in part.rows.items())
        self._index = index

    def _lookup(self) -> dict[str, tuple[PartitionReader, int]]:
        if self._index is None:
            self._scan()
        return self._index  # type: ignore[return-value]

    def _opened(self) -> list[PartitionReader]:
        """The complete partitions, in name order."""
        self._lookup()
        return [self._partitions[name] for name in sorted(self._partitions)]

    @property
    def manifest(self) -> pd.DataFrame:
        """Every video of the complete partitions, ok and failed; timestamps as lists."""
        tables = [part.table for part in self._opened()]
        if not tables:
            return empty_manifest()
        rows = pd.concat(tables, ignore_index=True)
        rows["timestamps"] = [json.loads(cell) for cell in rows["timestamps"]]
        return rows

    @property
    def ids(self) -> list[str]:
        """Ids of the readable (ok) videos, in storage order."""
        return [
            video_id
            for part in self._opened()
            for video_id, status in zip(part.table["id"], part.table["status"], strict=True)
            if status == OK
        ]

    def __len__(self) -> int:
        return sum(int((part.table["status"] == OK).sum()) for part in self._opened())

    def __contains__(self, video_id: object) -> bool:
        found = self._find(video_id)
        return found is not None and found[0].statuses[found[1]] == OK

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def _find(self, video_id: object) -> tuple[PartitionReader, int] | None:
        """Where ``video_id`` is listed, if anywhere. Video lists and datasets drop the spaces
        around an id, as a CSV typed by hand has them: " v1 " is v1 everywhere, here too."""
        lookup = self._lookup()
        found = lookup.get(video_id)  # type: ignore[call-overload]
        if found is None and isinstance(video_id, str):
            found = lookup.get(video_id.strip())
        return found

    def _locate(self, video_id: str) -> tuple[PartitionReader, int]:
        found = self._find(video_id)
        if found is None:
            self.refresh()  # completed by another process since?
            found = self._find(video_id)
        if found is None:
            raise VideoNotFound(self._missing_message(video_id))
        part, row = found
        status = part.statuses[row]
        if status != OK:
            reason = part.table["reason"].iat[row]
            raise VideoNotFound(f"video {video_id!r} failed during extraction ({status}): {reason}")
        return found

    def _missing_message(self, video_id: str) -> str:
        for part in self.partitions:
            if any(planned == video_id for planned, _ in part.videos):
                return f"video {video_id!r} is planned in partition {part.name}, not complete yet"
        close = difflib.get_close_matches(str(video_id), list(self._lookup()), n=3)
        hint = f"; similar ids: {', '.join(close)}" if close else ""
        return f"video {video_id!r} is not in the store {self.path} ({len(self)} videos){hint}"

    # ----------------------------------------------------------------------------------------
    # Reading

    @staticmethod
    def _layers(layers: Iterable[str] | None) -> tuple[str, ...]:
        if layers is None:
            return LAYERS
        chosen = tuple(layers)
        unknown = [layer for layer in chosen if layer not in LAYERS]
        if unknown:
            raise StoreError(f"unknown layer(s) {unknown}; the store holds {LAYERS}")
        return chosen

    def __getitem__(self, video_id: str) -> VideoFeatures:
        return self.get(video_id)

    def get(self, video_id: str, layers: Iterable[str] | None = None) -> VideoFeatures:
        """One video's features (only ``layers``, default all) and info; O(1) by id."""
        return self.read_batch([video_id], layers)[0]

    def read_batch(
        self, ids: Sequence[str], layers: Iterable[str] | None = None
    ) -> list[VideoFeatures]:
        """Several videos at once, in the order of ``ids``, reading each needed chunk once.

        :class:`CorruptVideo` if the data of any of them is lost or altered; it lists every
        damaged video of the request, so the others can be read again without them.
        """
        chosen = self._layers(layers)
        located = [self._locate(video_id) for video_id in ids]
        by_partition: dict[str, list[int]] = defaultdict(list)  # partition -> positions in ids
        for position, (part, _) in enumerate(located):
            by_partition[part.name].append(position)
        arrays: list[dict[str, np.ndarray]] = [{} for _ in ids]
        # (video id, partition) -> layer -> what is wrong with it
        damaged: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
        tasks = [  # (positions in ids, their partition, rows there, layer): one read each
            (positions, located[positions[0]][0], [located[p][1] for p in positions], layer)
            for positions in by_partition.values()
            for layer in chosen
        ]

        def read(task) -> tuple[list[np.ndarray | None], dict[int, str]]:
            _, part, rows, layer = task
            return part.read_layer(layer, rows, verify=self.verify_reads)

        wanted = sum(part.nbytes(layer, rows) for _, part, rows, layer in tasks)
        if len(tasks) > 1 and in_parallel(wanted):
            results = list(reader_pool().map(read, tasks))  # I/O and copies overlap
        else:
            results = [read(task) for task in tasks]
        for (positions, part, _, layer), (data, lost) in zip(tasks, results, strict=True):
            for k, why in lost.items():
                damaged[ids[positions[k]], part.name][layer] = why
            for position, array in zip(positions, data, strict=True):
                arrays[position][layer] = array  # type: ignore[assignment]  # None if lost
        if damaged:
            raise CorruptVideo(
                {video_id: damage_text(name, wrong) for (video_id, name), wrong in damaged.items()},
                str(self.path),
            )
        return [
            VideoFeatures(video_id, arrays[k], part.info(row))
            for k, (video_id, (part, row)) in enumerate(zip(ids, located, strict=True))
        ]

    def items(
        self, layers: Iterable[str] | None = None, batch_size: int = 16
    ) -> Iterator[tuple[str, VideoFeatures]]:
        """Every ok video in storage order, read ``batch_size`` at a time."""
        ids = self.ids
        for start in range(0, len(ids), batch_size):
            for video in self.read_batch(ids[start : start + batch_size], layers):
                yield video.id, video

    # ----------------------------------------------------------------------------------------
    # Checking

    def verify(self) -> list[str]:
        """Problems found by reading everything back (empty = the store is sound).

        Leftovers of unfinished work (staging, locks, pending partitions) are not problems;
        :meth:`verify_report` lists them as warnings.
        """
        report = self.verify_report()
        for warning in report.warnings:
            log.warning("%s", warning)
        return report.problems

    def verify_report(self) -> VerifyReport:
        """Problems and warnings, see :func:`~astar.store.report.verify_store`."""
        return verify_store(self)


def _location(path: str | Path | StorePath) -> StorePath:
    try:
        return store_path(path)
    except ValueError as error:
        raise StoreError(str(error)) from error
