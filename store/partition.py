"""Reading one complete partition: its manifest, and its arrays opened on demand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from astar.store.errors import StoreError
from astar.store.manifest import parse_timestamps, read_manifest
from astar.store.schema import LAYERS, time_axis


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
            layer: self.table[f"{layer}_offset"].to_numpy(np.int64) for layer in LAYERS
        }  # layer -> (videos,)
        self.lengths = {
            layer: self.table[f"{layer}_length"].to_numpy(np.int64) for layer in LAYERS
        }  # layer -> (videos,)
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(self.path / name, mode="r")
            except (OSError, ValueError) as error:  # zarr's errors derive from ValueError
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

    def read_layer(self, layer: str, rows: Sequence[int]) -> list[np.ndarray]:
        """``layer`` of each of ``rows`` (in that order), reading every needed chunk once."""
        array = self.array(layer)
        axis = time_axis(layer)
        starts = self.offsets[layer][list(rows)]  # (n,)
        stops = starts + self.lengths[layer][list(rows)]  # (n,)
        # Videos without time steps (pool5 of a very short video) read nothing.
        empty = np.empty((*array.shape[:axis], 0, *array.shape[axis + 1 :]), array.dtype)
        results = [empty] * len(rows)
        for group in chunk_groups(starts, stops, array.chunks[axis]):
            low, high = int(starts[group].min()), int(stops[group].max())
            block = array[_along(axis, low, high)]
            for k in group:
                results[k] = block[_along(axis, int(starts[k]) - low, int(stops[k]) - low)]
        return results


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
