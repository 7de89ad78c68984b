"""Stores of made-up features, for tests and benchmarks: the writing loop they all share.

A caller says, per video id, how many frames it has and what its features are; this plans the
partitions, writes and commits them, with the per-video info the manifest needs filled in as if
every frame had been sampled at the schema's rate without padding or subsampling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from astar.store.featurestore import FeatureStore


def plain_info(n_frames: int, fps: float, source_fps: float = 25.0) -> dict:
    """The manifest info of a video of ``n_frames`` frames sampled at ``fps``, nothing padded."""
    return {
        "n_frames": n_frames, "n_sampled": n_frames, "padded": False, "subsampled": False,
        "duration": n_frames / fps, "fps": None, "source_fps": source_fps,
        "timestamps": np.arange(n_frames) / fps,
    }  # fmt: skip


def write_videos(
    store: FeatureStore,
    videos: Sequence[tuple[str, str]],
    make: Callable[[str], tuple[int, dict[str, np.ndarray]]],
    partition_size: int,
) -> None:
    """Write ``videos`` ((id, source) pairs) into ``store``: ``make(id)`` -> (n_frames,
    {layer: array}), called once a video in plan order (so a seeded generator inside it gives
    the same store every time)."""
    for plan in store.plan(videos, partition_size=partition_size):
        with store.partition_writer(plan.name) as writer:
            for vid, source in plan.videos:
                n_frames, features = make(vid)
                writer.add(vid, source, features, plain_info(n_frames, store.schema.fps))
            writer.commit()


__all__ = ["plain_info", "write_videos"]
