"""Feature store reads: what verifying every video against its sha256 costs.

    python benchmarks/bench_store_read.py [--videos 24] [--repeats 5] [--batch 8]

Builds a store in a temporary directory with the paper's C3D shapes in float16 (pool2
(128, T/2, 28, 28) ... fc7 (clips, 4096)), 32-128 frames per video, ReLU-like random values
(half zeros, so zstd compresses them as it does real features). Then reads every video, one at
a time and in shuffled batches as training visits them, with checksums on (the default) and off
(``FeatureStore.open(path, verify=False)``), interleaved in one process so that the ratios hold
on a noisy shared machine. Prints medians over --repeats passes, the cost of verification in %
and in ms per video (hashing on the reader's threads, and on one), and the hash throughput that
bounds it.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from astar.store import LAYERS, FeatureStore, partition
from astar.store.digest import checksum
from astar.store.geometry import BACKBONES
from astar.store.synthetic import synthetic_schema, write_videos

PAPER_SHAPES = BACKBONES["c3d"].layer_shapes()  # C3D on 112 x 112 frames, without time


def build_store(root: Path, n_videos: int, partition_size: int, seed: int = 0) -> FeatureStore:
    """A store of ``n_videos`` random videos of 32-128 frames with the paper's shapes."""
    schema = synthetic_schema(
        PAPER_SHAPES, backbone="c3d", preprocessing="caffe-bgr-mean", dtype="float16"
    )
    store = FeatureStore.create_or_open(root, schema)
    rng = np.random.default_rng(seed)

    def make(vid: str) -> tuple[int, dict[str, np.ndarray]]:
        n_frames = int(rng.integers(32, 129))
        lengths = schema.expected_lengths(n_frames)
        return n_frames, {
            name: np.maximum(
                rng.standard_normal(schema.full_shape(name, lengths[name]), np.float32), 0
            )
            for name in LAYERS
        }  # layer -> (C, T, H, W) or (clips, D)

    videos = [(f"v{k:04d}", f"/bench/v{k:04d}.mp4") for k in range(n_videos)]
    write_videos(store, videos, make, partition_size)
    return store


def _seconds(run: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    run(*args)
    return time.perf_counter() - started


def _one_at_a_time(store: FeatureStore, ids: list[str]) -> None:
    for video_id in ids:
        store[video_id]


def _batches(store: FeatureStore, batches: list[list[str]]) -> None:
    for batch in batches:
        store.read_batch(batch)


def measure(
    passes: dict[str, Callable[[FeatureStore], None]],
    modes: dict[str, tuple[FeatureStore, int]],
    repeats: int,
) -> dict[tuple[str, str], list[float]]:
    """Seconds of each pass in each mode (a store, and the threads hashing), interleaved."""
    times: dict[tuple[str, str], list[float]] = {(p, m): [] for p in passes for m in modes}
    default = partition.HASH_THREADS
    try:
        for round in range(repeats + 1):  # round 0 warms up: arrays opened, page cache filled
            for name, run in passes.items():
                for mode, (store, threads) in modes.items():
                    partition.HASH_THREADS = threads
                    took = _seconds(run, store)
                    if round:
                        times[name, mode].append(took)
    finally:
        partition.HASH_THREADS = default
    return times


def hash_throughput(store: FeatureStore, ids: list[str], repeats: int) -> tuple[float, float]:
    """GB/s of ``checksum`` on the views a read hands out, and of bare sha256 on one buffer."""
    views = [array for video in store.read_batch(ids) for array in video.layers.values()]
    total = sum(view.nbytes for view in views)
    checksums = statistics.median(
        _seconds(lambda: [checksum(view) for view in views]) for _ in range(repeats)
    )
    buffer = np.ascontiguousarray(views[0])
    bare = statistics.median(
        _seconds(lambda: hashlib.sha256(buffer.data).digest()) for _ in range(repeats)
    )
    return total / checksums / 1e9, buffer.nbytes / bare / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--partition-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="Videos per training batch.")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_store_read_") as folder:
        started = time.perf_counter()
        path = build_store(Path(folder) / "store", args.videos, args.partition_size).path
        checked, unchecked = FeatureStore.open(path), FeatureStore.open(path, verify=False)
        ids = checked.ids
        raw = sum(
            video.layers[layer].nbytes for video in checked.read_batch(ids) for layer in LAYERS
        )
        on_disk = sum(f.stat().st_size for f in (path / "partitions").rglob("c.*"))
        print(
            f"{len(ids)} videos, paper C3D shapes, float16: {raw / 1e6:.0f} MB of features, "
            f"{on_disk / 1e6:.0f} MB on disk (zstd); built in {time.perf_counter() - started:.1f} s"
        )
        rng = np.random.default_rng(1)
        order = [ids[k] for k in rng.permutation(len(ids))]  # shuffled, as an epoch visits them
        batches = [order[k : k + args.batch] for k in range(0, len(order), args.batch)]
        passes = {
            "one at a time": lambda store: _one_at_a_time(store, order),
            f"batches of {args.batch}": lambda store: _batches(store, batches),
        }
        modes = {
            "off": (unchecked, partition.HASH_THREADS),
            "on": (checked, partition.HASH_THREADS),
            "on, 1 thread": (checked, 1),
        }
        times = measure(passes, modes, args.repeats)

        print(
            f"\nmedians of {args.repeats} passes over the {len(ids)} videos (all layers), "
            f"ms per video; hashing on {partition.HASH_THREADS} threads unless said"
        )
        print(
            f"{'read':>16} {'verify':>13} {'ms/video':>9} {'MB/s':>6} {'cost':>7} {'ms/video':>9}"
        )
        for name in passes:
            off = statistics.median(times[name, "off"])
            for mode in modes:
                took = statistics.median(times[name, mode])
                cost = "" if mode == "off" else f"{(took / off - 1) * 100:+6.1f}%"
                extra = "" if mode == "off" else f"{(took - off) / len(ids) * 1e3:+8.2f}"
                print(
                    f"{name:>16} {mode:>13} {took / len(ids) * 1e3:>9.1f} "
                    f"{raw / took / 1e6:>6.0f} {cost:>7} {extra:>9}"
                )
        views, bare = hash_throughput(checked, ids, args.repeats)
        print(
            f"\nhash throughput (one core): checksum of the read views {views:.2f} GB/s, "
            f"bare sha256 {bare:.2f} GB/s; {raw / len(ids) / 1e6:.1f} MB per video"
        )


if __name__ == "__main__":
    main()
