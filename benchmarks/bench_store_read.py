"""Random reads from the feature store against ``np.load`` of the same arrays from ``.npy`` files.

    python benchmarks/bench_store_read.py [--videos 24] [--repeats 5] [--batch 8] [--s3]
                                          [--format-version 2]

Builds stores with the paper's C3D shapes in float16 (pool2 (128, T/2, 28, 28) ... fc7 (clips,
4096)), 32-128 frames per video, ReLU-like random values (half zeros, so zstd compresses them
about as it does real features), once zstd-compressed (the default at a URL) and once uncompressed
(the default on a local disk), and writes every video's every layer to its own ``.npy`` file on the
same disk. Then, interleaved in one process so that the ratios hold on a noisy shared machine:

* one video's layer at a time, in random order: ``store.get(id, [layer])`` against
  ``np.load(<id>.<layer>.npy)``;
* a whole video at a time (its 5 layers);
* training-order batches: the shuffled order an epoch visits, ``--batch`` videos a
  ``read_batch``, against ``np.load`` of each of their layers;

each with checksums verified (the default) and without (``verify=False``), each read's
result dropped before the next (a batch's held together), on both sides alike. Prints medians
over --repeats passes and the ratio np.load time / store time (>= 1: the store is as fast or
faster). ``--format-version 1`` builds the stores in format 1's layout (pool layers (C, T, H,
W) on disk) instead of the current one (time first). ``--s3`` repeats it with the stores on
moto's S3 server on 127.0.0.1 (a separate process; the .npy files stay on the local disk),
which measures this code's request pattern
over loopback HTTP, not a real S3 service's latency.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from astar.store import LAYERS, FeatureStore
from astar.store.geometry import BACKBONES
from astar.store.schema import FORMAT_VERSION
from astar.store.synthetic import synthetic_schema, write_videos

PAPER_SHAPES = BACKBONES["c3d"].layer_shapes()  # C3D on 112 x 112 frames, without time


def build_store(
    location: str | Path,
    n_videos: int,
    partition_size: int,
    seed: int = 0,
    compression: str = "zstd",
    format_version: int = FORMAT_VERSION,
) -> FeatureStore:
    """A store of ``n_videos`` random videos of 32-128 frames with the paper's shapes."""
    schema = synthetic_schema(
        PAPER_SHAPES, backbone="c3d", preprocessing="caffe-bgr-mean", dtype="float16"
    )
    schema = dataclasses.replace(schema, format_version=format_version)
    store = FeatureStore.create_or_open(location, schema)
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
    write_videos(store, videos, make, partition_size, compression=compression)
    return store


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in its own process on a free loopback port; its endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.1)
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="eu-west-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        import boto3

        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket="bench", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        yield "s3://bench"
    finally:
        server.terminate()
        server.wait(10)


def run(root: Path, places: dict[str, str], args: argparse.Namespace) -> None:
    """Build the stores at ``places`` (name -> location) and the .npy files, then measure."""
    started = time.perf_counter()
    stores = {}
    for compression in ("zstd", "none"):
        location = places[compression]
        stores[compression] = build_store(
            location,
            args.videos,
            args.partition_size,
            compression=compression,
            format_version=args.format_version,
        )
    reference = FeatureStore.open(stores["none"].path)
    ids = reference.ids
    npy = root / "npy"
    npy.mkdir()
    raw = 0
    for video in reference.read_batch(ids):
        for layer, array in video.layers.items():
            np.save(npy / f"{video.id}.{layer}.npy", array)
            raw += array.nbytes
    print(
        f"{len(ids)} videos, paper C3D shapes, float16, store format {args.format_version}: "
        f"{raw / 1e6:.0f} MB of features; "
        f"stores at {places['zstd']} and {places['none']}; built in "
        f"{time.perf_counter() - started:.0f} s"
    )
    rng = np.random.default_rng(1)
    order = [ids[k] for k in rng.permutation(len(ids))]  # shuffled, as an epoch visits them
    batches = [order[k : k + args.batch] for k in range(0, len(order), args.batch)]
    readers = {
        f"{compression}, {'checked' if verify else 'unchecked'}": FeatureStore.open(
            stores[compression].path, verify=verify
        )
        for compression in ("zstd", "none")
        for verify in (True, False)
    }

    def npy_layers(video_id: str, layers: tuple[str, ...]) -> list[np.ndarray]:
        return [np.load(npy / f"{video_id}.{layer}.npy") for layer in layers]

    def each(read: Callable[[object], object], items: list) -> None:
        """``read`` every item, dropping each result before the next as a training loop does
        with its batches (both sides alike: a whole pass's results kept alive would make every
        read fault in fresh pages; a batch's are held together on both sides)."""
        for item in items:
            read(item)

    passes: dict[str, tuple[Callable, Callable]] = {}  # name -> (np.load pass, store pass)
    for layer in LAYERS:
        passes[f"one {layer}"] = (
            lambda layer=layer: each(lambda v: npy_layers(v, (layer,)), order),
            lambda store, layer=layer: each(lambda v: store.get(v, [layer]), order),
        )
    passes["one video"] = (
        lambda: each(lambda v: npy_layers(v, LAYERS), order),
        lambda store: each(store.get, order),
    )
    passes[f"batch of {args.batch}"] = (
        lambda: each(lambda batch: [npy_layers(v, LAYERS) for v in batch], batches),
        lambda store: each(store.read_batch, batches),
    )
    times: dict[tuple[str, str], list[float]] = {}
    for round in range(args.repeats + 1):  # round 0 warms up: arrays opened, page cache filled
        for name, (baseline, through_store) in passes.items():
            took = {"np.load": _seconds(baseline)}
            for mode, store in readers.items():
                took[mode] = _seconds(lambda s=store, f=through_store: f(s))
            if round:
                for mode, seconds in took.items():
                    times.setdefault((name, mode), []).append(seconds)
    modes = ["np.load", *readers]
    print(
        f"\nmedians of {args.repeats} passes, ms per video; in brackets np.load time / store "
        "time (>= 1: as fast as np.load)"
    )
    print(f"{'read':>12} " + " ".join(f"{mode:>19}" for mode in modes))
    for name in passes:
        base = statistics.median(times[name, "np.load"])
        cells = []
        for mode in modes:
            took = statistics.median(times[name, mode])
            ratio = "" if mode == "np.load" else f" ({base / took:4.2f})"
            cells.append(f"{took / len(ids) * 1e3:>12.2f}{ratio:>7}")
        print(f"{name:>12} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--partition-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="Videos per training batch.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--format-version", type=int, default=FORMAT_VERSION, choices=(1, 2))
    parser.add_argument("--s3", action="store_true", help="Also with the stores on moto S3.")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {_cpu_name()}")
    with tempfile.TemporaryDirectory(prefix="bench_store_read_") as folder:
        root = Path(folder)
        print("\n== stores on the local disk")
        run(root, {c: str(root / f"store-{c}") for c in ("zstd", "none")}, args)
        if args.s3:
            shutil.rmtree(root / "npy")
            print("\n== stores on moto's S3 server (loopback), .npy files on the local disk")
            with moto_server() as bucket:
                run(root, {c: f"{bucket}/store-{c}" for c in ("zstd", "none")}, args)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
