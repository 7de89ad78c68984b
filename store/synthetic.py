"""Stores of made-up features, for tests and benchmarks: the writing loop they all share.

A caller says, per video id, how many frames it has and what its features are; this plans the
partitions, writes and commits them, with the per-video info the manifest needs filled in as if
every frame had been sampled at the schema's rate without padding or subsampling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from astar.store.featurestore import FeatureStore
from astar.store.geometry import CLIP_LENGTH, CLIP_STRIDE, FRAME_SIZE, MIN_FRAMES
from astar.store.schema import StoreSchema, Weights


def synthetic_schema(layer_shapes: Mapping[str, tuple[int, ...]], **fields: Any) -> StoreSchema:
    """The schema of a made-up store: C3D's geometry at 2 fps, frames capped at 128, a random
    init of seed 0, float32; ``fields`` override any of it (backbone, dtype, weights, ...)."""
    defaults = {
        "fps": 2.0, "size": FRAME_SIZE, "min_frames": MIN_FRAMES, "max_frames": 128,
        "backbone": "c3d-test", "weights": Weights(seed=0), "preprocessing": "none",
        "clip_length": CLIP_LENGTH, "clip_stride": CLIP_STRIDE, "dtype": "float32",
    }  # fmt: skip
    return StoreSchema(layer_shapes=dict(layer_shapes), **{**defaults, **fields})


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
    compression: str = "zstd",
) -> None:
    """Write ``videos`` ((id, source) pairs) into ``store``: ``make(id)`` -> (n_frames,
    {layer: array}), called once a video in plan order (so a seeded generator inside it gives
    the same store every time). ``compression``: of the committed arrays (writer.COMPRESSIONS).
    Partitions already complete are kept, as an extraction resumed keeps them."""
    for plan in store.plan(videos, partition_size=partition_size):
        if store.is_complete(plan.name):
            continue
        with store.partition_writer(plan.name, compression) as writer:
            for vid, source in plan.videos:
                n_frames, features = make(vid)
                writer.add(vid, source, features, plain_info(n_frames, store.schema.fps))
            writer.commit()


__all__ = ["plain_info", "synthetic_schema", "write_videos"]
