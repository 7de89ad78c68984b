"""Which videos go into which partition: ``plan.json``, stable across reruns.

A partition is the unit of work and of files: one worker writes it whole, so its videos must
stay in it forever. Rerunning with more videos adds partitions and never reshuffles old ones,
otherwise a resumed run would redo (or worse, duplicate) finished work.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from astar.store.errors import StoreError
from astar.store.files import atomic_write_text

PLAN_VERSION = 1


@dataclass
class PartitionPlan:
    """One partition: its directory name and its videos in the order they are stored."""

    name: str  # directory name under partitions/, "p00000", "p00001", ...
    videos: list[tuple[str, str]]  # (video id, source path), in storage order


def partition_name(number: int) -> str:
    return f"p{number:05d}"


def normalize_source(source: str) -> str:
    """Absolute path of a local source (URLs as given), so a rerun from elsewhere compares equal.

    Not ``resolve()``: a symlinked data folder should keep the name the user gave it.
    """
    return source if "://" in source else os.path.abspath(source)


def read_plan(path: Path) -> list[PartitionPlan]:
    """The partitions of ``plan.json``; an absent file is an empty plan."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return [
            PartitionPlan(entry["name"], [(str(i), str(s)) for i, s in entry["videos"]])
            for entry in document["partitions"]
        ]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{path}: unreadable partition plan ({error})") from error


def write_plan(path: Path, partitions: list[PartitionPlan]) -> None:
    document = {
        "plan_version": PLAN_VERSION,
        "partitions": [{"name": p.name, "videos": [list(v) for v in p.videos]} for p in partitions],
    }
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")


def _refuse_duplicates(videos: list[tuple[str, str]]) -> None:
    counts = Counter(video_id for video_id, _ in videos)
    duplicates = sorted(video_id for video_id, count in counts.items() if count > 1)
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:10])
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise StoreError(
            f"{len(duplicates)} duplicate video id(s): {shown}{more}; ids must be unique, "
            "because each id names one entry of the store"
        )


def extend_plan(
    existing: list[PartitionPlan], videos: Iterable[tuple[str, str]], partition_size: int
) -> tuple[list[PartitionPlan], bool]:
    """``existing`` plus new partitions for the ids it lacks; also whether anything was added.

    Planned ids keep their partition. An id planned with another source is refused: its stored
    features describe the old file.
    """
    if partition_size < 1:
        raise StoreError(f"partition size must be at least 1, got {partition_size}")
    videos = [(str(video_id), normalize_source(str(source))) for video_id, source in videos]
    _refuse_duplicates(videos)
    planned = {video_id: source for part in existing for video_id, source in part.videos}
    changed = [(i, planned[i], s) for i, s in videos if i in planned and planned[i] != s]
    if changed:
        lines = [f"{i}: planned {old}, now {new}" for i, old, new in changed[:5]]
        raise StoreError(
            f"{len(changed)} video id(s) already in the store with another source; use a new "
            "store, or the same sources:\n  " + "\n  ".join(lines)
        )
    new = [(i, s) for i, s in videos if i not in planned]
    # Numbers continue after the highest existing one, so names never collide with old ones.
    start = 1 + max((int(p.name[1:]) for p in existing), default=-1)
    added = [
        PartitionPlan(partition_name(start + k), new[offset : offset + partition_size])
        for k, offset in enumerate(range(0, len(new), partition_size))
    ]
    return existing + added, bool(added)
