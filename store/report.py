"""Checking and summarising a store: what ``inspect-store`` prints.

``verify_store`` reads every stored byte back. It separates *problems* (the store is wrong:
unreadable or missing chunks, checksums or lengths that disagree with the manifest, NaN/inf)
from *warnings* (work left unfinished: staged videos, locks, partitions not complete yet), which
a rerun of the extraction resolves. Whatever broke, it names every video whose data is lost or
altered (:attr:`VerifyReport.damaged`): the data is read as the readers read it, so a lost
chunk damages exactly the videos whose spans touch it.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from astar.store.errors import StoreError
from astar.store.files import TEMP_PREFIX, read_owner
from astar.store.geometry import LAYERS
from astar.store.location import StorePath, is_remote
from astar.store.manifest import MISSING, OK, SPAN_NAMES, parse_timestamps, read_manifest
from astar.store.partition import PartitionReader, damage_text
from astar.store.plan import PartitionPlan
from astar.store.schema import StoreSchema

VERIFY_BATCH = 16  # videos read per call while verifying (consecutive, so chunks are shared)


class CheckedStore(Protocol):
    """What checking and summarising read of a store (a :class:`~astar.store.FeatureStore`):
    the store's ``verify`` calls :func:`verify_store`, so this module may not import it back."""

    path: StorePath  # the store's root directory or URL
    schema: StoreSchema  # how every video of the store is shaped and typed
    remote: bool  # on object storage (commit markers), not a local disk (renamed folders)

    @property
    def partitions(self) -> list[PartitionPlan]: ...  # every planned partition

    @property
    def manifest(self) -> pd.DataFrame: ...  # every video of the complete partitions

    def is_complete(self, name: str) -> bool: ...  # partition ``name`` is committed

    def complete_partitions(self) -> dict[str, StorePath]: ...  # name -> folder of its arrays


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_store`."""

    problems: list[str] = field(default_factory=list)  # the store is inconsistent or corrupt
    warnings: list[str] = field(default_factory=list)  # unfinished work a rerun completes
    videos_checked: int = 0  # ok videos whose every layer was read and checked
    # video id -> what is wrong with its data, as CorruptVideo words it ("partition p00002,
    # pool3: chunk c.1.0.0.0 missing; fc7: checksum mismatch")
    damaged: dict[str, str] = field(default_factory=dict)


def verify_store(store: CheckedStore) -> VerifyReport:
    """Read every complete partition back and compare it with its manifest and the schema."""
    report = VerifyReport()
    try:
        planned = {part.name: part for part in store.partitions}
    except StoreError as error:
        report.problems.append(str(error))
        planned = {}
    owners: dict[str, str] = {}  # video id -> partition holding it
    try:
        complete = store.complete_partitions()
    except StoreError as error:
        report.problems.append(str(error))
        complete = {}
    _check_uncommitted(store, complete, report)
    for name, entry in sorted(complete.items()):
        try:
            part = PartitionReader(entry, store.schema, name)
        except StoreError as error:
            report.problems.append(str(error))
            continue
        for video_id in part.table["id"]:
            if video_id in owners:
                report.problems.append(
                    f"video {video_id!r} is in partitions {owners[video_id]} and {part.name}"
                )
            owners[video_id] = part.name
        _check_partition(store.schema, part, planned.get(part.name), report)
    _check_leftovers(store, planned, set(complete), report)
    return report


def _check_uncommitted(
    store: CheckedStore, complete: dict[str, StorePath], report: VerifyReport
) -> None:
    """Folders under partitions/ that are no complete partition.

    On a local disk a partition appears by rename, whole, so such a folder is a problem. On
    object storage the builds of writers that died before their commit marker, or lost the race
    for it, are left behind: garbage, never read, so only a warning.
    """
    folder = store.path / "partitions"
    for entry in sorted(folder.iterdir(), key=str) if folder.is_dir() else []:
        if not store.remote:
            if entry.is_dir() and entry.name not in complete:
                report.problems.append(
                    f"partitions/{entry.name}: no manifest.csv, so not a complete partition; "
                    "remove the directory and rerun the extraction"
                )
            continue
        for attempt in entry.iterdir() if entry.is_dir() else []:
            if attempt.name == "zarr.json" or attempt == complete.get(entry.name):
                continue
            report.warnings.append(
                f"partitions/{entry.name}/{attempt.name}: build of a writer that did not commit "
                "(killed, or another committed first); unused, safe to delete"
            )


def _check_partition(
    schema: StoreSchema, part: PartitionReader, plan: PartitionPlan | None, report: VerifyReport
) -> None:
    where = f"partitions/{part.name}"
    table = part.table
    if plan is None:
        report.problems.append(f"{where}: not in plan.json")
    elif list(zip(table["id"], table["source"], strict=True)) != plan.videos:
        report.problems.append(f"{where}: its videos differ from the plan's (ids, sources, order)")
    if not table["id"].is_unique:
        report.problems.append(f"{where}: duplicate ids in its manifest")
    ok = (table["status"] == OK).to_numpy()  # (videos,)
    report.problems += _check_lengths(schema, table, ok, where)
    report.problems += _check_arrays(schema, part, table, ok, where)
    # Even after a structural problem: the readers go by the manifest's spans and checksums,
    # so reading them tells exactly which videos a reader would find damaged.
    _check_values(part, table, ok, where, report)


def _check_lengths(
    schema: StoreSchema, table: pd.DataFrame, ok: np.ndarray, where: str
) -> list[str]:
    """Lengths agree with n_frames; offsets are the running sums of lengths; failures empty."""
    problems = []
    for row in np.flatnonzero(ok):
        record = table.iloc[row]
        expected = schema.expected_lengths(int(record["n_frames"]))
        wrong = {
            layer: int(record[f"{layer}_length"])
            for layer in LAYERS
            if record[f"{layer}_length"] != expected[layer]
        }
        if wrong:
            problems.append(
                f"{where}, video {record['id']!r}: lengths {wrong} disagree with "
                f"n_frames={record['n_frames']} (expected {expected})"
            )
        stamps = parse_timestamps(record["timestamps"])
        if len(stamps) != record["timestamps_length"]:
            problems.append(f"{where}, video {record['id']!r}: timestamps length mismatch")
    for name in SPAN_NAMES:
        lengths = table[f"{name}_length"].to_numpy(np.int64)[ok]  # (ok videos,)
        offsets = table[f"{name}_offset"].to_numpy(np.int64)[ok]  # (ok videos,)
        if not np.array_equal(offsets, np.cumsum(lengths) - lengths):
            problems.append(f"{where}: {name} offsets are not contiguous in storage order")
        failed_spans = table.loc[~ok, [f"{name}_offset", f"{name}_length"]].to_numpy()
        if (failed_spans != [MISSING, 0]).any():
            problems.append(f"{where}: failed videos with {name} data")
    return problems


def _check_arrays(
    schema: StoreSchema, part: PartitionReader, table: pd.DataFrame, ok: np.ndarray, where: str
) -> list[str]:
    """Each array has the shape, dtype and every chunk file the manifest implies."""
    problems = []
    for name in SPAN_NAMES:
        total = int(table[f"{name}_length"].to_numpy(np.int64)[ok].sum())
        if name == "timestamps":
            shape, dtype = (total,), np.dtype("float64")
        else:
            shape, dtype = schema.stored_shape(name, total), np.dtype(schema.dtype)
        axis = part.axis(name)  # of time, on disk
        try:
            array = part.array(name)
        except Exception as error:  # any zarr or JSON error means the same: unreadable
            problems.append(f"{where}/{name}: cannot open ({type(error).__name__}: {error})")
            continue
        if array.shape != shape or array.dtype != dtype:
            problems.append(
                f"{where}/{name}: {array.dtype} {array.shape}, manifest and schema say "
                f"{dtype} {shape}"
            )
            continue
        expected = math.ceil(total / array.chunks[axis]) if total else 0
        found = sum(1 for f in (part.path / name).iterdir() if f.name.startswith("c."))
        if found != expected:
            problems.append(f"{where}/{name}: {found} chunk files, {expected} expected")
    return problems


def _check_values(
    part: PartitionReader, table: pd.DataFrame, ok: np.ndarray, where: str, report: VerifyReport
) -> None:
    """Every ok video's data: readable, finite, matching its checksum; timestamps as listed."""
    rows = np.flatnonzero(ok).tolist()
    ids = table["id"].to_numpy()
    damaged: dict[int, dict[str, str]] = defaultdict(dict)  # row -> array -> what is wrong
    for start in range(0, len(rows), VERIFY_BATCH):
        batch = rows[start : start + VERIFY_BATCH]
        for layer in LAYERS:
            for row, why in _layer_damage(part, layer, batch):
                damaged[row][layer] = why
        for row, why in _timestamps_damage(part, table, batch):
            damaged[row]["timestamps"] = why
    for row, wrong in sorted(damaged.items()):
        report.problems += [
            f"{where}, video {ids[row]!r}, {name}: {why}" for name, why in wrong.items()
        ]
        report.damaged[ids[row]] = damage_text(part.name, wrong)
    report.videos_checked += len(rows) - len(damaged)


def _layer_damage(part: PartitionReader, layer: str, rows: list[int]) -> Iterator[tuple[int, str]]:
    """(row, what is wrong) for each of ``rows`` whose ``layer`` is lost, non-finite or altered."""
    _, damaged = part.read_layer(layer, rows)
    for k, why in sorted(damaged.items()):
        yield rows[k], why


def _timestamps_damage(
    part: PartitionReader, table: pd.DataFrame, rows: list[int]
) -> Iterator[tuple[int, str]]:
    """(row, what is wrong) for each of ``rows`` whose stored timestamps are lost or differ."""
    data, lost = part.read_spans("timestamps", rows)
    for k, row in enumerate(rows):
        if k in lost:
            yield row, lost[k]
        elif not np.array_equal(data[k], parse_timestamps(table["timestamps"].iat[row])):
            yield row, "values differ from the manifest's"


def _check_leftovers(
    store: CheckedStore, planned: dict[str, PartitionPlan], complete: set[str], report: VerifyReport
) -> None:
    """Warnings of unfinished work; ``complete``: the complete partitions' names (listed once:
    on object storage a request per partition would cost a round trip each)."""
    pending = [name for name in planned if name not in complete]
    if pending:
        shown = ", ".join(pending[:5]) + (" ..." if len(pending) > 5 else "")
        report.warnings.append(
            f"{len(pending)} planned partition(s) not complete ({shown}); rerun the extraction"
        )
    staging = store.path / "staging"
    for entry in sorted(staging.iterdir(), key=str) if staging.is_dir() else []:
        staged = 0
        if entry.is_dir():
            staged = sum(1 for f in entry.iterdir() if f.name.endswith(".npz"))
        report.warnings.append(
            f"staging/{entry.name}: {staged} staged video(s) of an unfinished partition"
        )
    locks = store.path / "locks"
    for entry in sorted(locks.iterdir(), key=str) if locks.is_dir() else []:
        if entry.name.startswith(TEMP_PREFIX):
            report.warnings.append(f"locks/{entry.name}: temporary left by a killed writer")
            continue
        try:
            owner = read_owner(entry)
        except StoreError as error:
            report.warnings.append(str(error))
            continue
        state = {True: "alive", False: "dead, stale", None: "on another host"}[owner.alive()]
        report.warnings.append(f"locks/{entry.name}: held by {owner.describe()} ({state})")
    consolidated = store.path / "manifest.csv"
    if consolidated.is_file():
        try:
            listed = read_manifest(consolidated)["id"].tolist()
        except StoreError:
            listed = None
        if listed != store.manifest["id"].tolist():
            report.warnings.append(
                "manifest.csv is stale or unreadable; FeatureStore.consolidate() rewrites it"
            )
    elif complete & set(planned):
        report.warnings.append("no manifest.csv; FeatureStore.consolidate() writes it")


def _disk_usage(root: StorePath) -> tuple[int, int]:
    """(bytes, files) under ``root``; on object storage, objects."""
    if is_remote(root):
        found = root.fs.find(root.path, detail=True)
        return sum(int(info.get("size") or 0) for info in found.values()), len(found)
    size = files = 0
    for directory, _, names in os.walk(root):
        for name in names:
            size += os.path.getsize(os.path.join(directory, name))
            files += 1
    return size, files


def summarize_store(store: CheckedStore) -> dict[str, Any]:
    """What the store holds, as JSON-ready data: schema, counts, sizes, progress."""
    manifest = store.manifest
    statuses = Counter(manifest["status"]) if len(manifest) else Counter()
    ok_rows = manifest[manifest["status"] == OK] if len(manifest) else manifest
    partitions = store.partitions
    done = set(store.complete_partitions())  # one listing, not a request per partition
    complete = [part for part in partitions if part.name in done]
    size, files = _disk_usage(store.path)
    return {
        "path": str(store.path),
        "schema": store.schema.to_dict(),
        "videos": {
            "planned": sum(len(part.videos) for part in partitions),
            "ok": statuses.pop(OK, 0),
            "failed": dict(sorted(statuses.items())),
            "pending": sum(len(p.videos) for p in partitions) - len(manifest),
        },
        "frames": int(ok_rows["n_frames"].sum()) if len(ok_rows) else 0,
        "partitions": {
            "planned": len(partitions),
            "complete": len(complete),
            "pending": len(partitions) - len(complete),
        },
        "bytes": size,
        "files": files,
    }


def failures_table(store: CheckedStore) -> pd.DataFrame:
    """The failed videos: id, status (the failure kind), reason, source, partition."""
    manifest = store.manifest
    if not len(manifest):
        return manifest.loc[:, ["id", "status", "reason", "source", "partition"]]
    failed = manifest[manifest["status"] != OK]
    return failed.loc[:, ["id", "status", "reason", "source", "partition"]].reset_index(drop=True)
