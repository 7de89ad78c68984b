"""Training throughput: fp32 vs bf16, captions/s per variant, data wait, video- vs caption-major.

    python benchmarks/bench_train.py [--steps 6] [--repeats 3] [--skip-major] [--precision-only]

0. fp32 against bf16 autocast on the demo's batch shapes (soft and hard, c3d-tiny and
   c3d-small channels): medians of interleaved optimizer steps, and the speed-up.

1. Per variant, on a demo-sized store (c3d-small shapes, 16-32 frames per video, written to a
   temporary directory) with the small model preset: training captions/s through the real loader
   (prefetching, streaming from the store), and the fraction of step time spent waiting for data.
2. Video-major against caption-major batching with the paper-size alignment (full C3D channels):
   the same captions, once with each video prepared once and shared by its captions, once with
   every caption carrying its own copy of the video (what a caption-major loader does). Medians
   of --repeats forward+backward steps, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from astar.store import FeatureStore
from astar.store.geometry import BACKBONES, TAP_GRID, TIME_STRIDES
from astar.store.synthetic import synthetic_schema, write_videos
from astar.train.data import BatchLoader, FeatureSource, VideoMajorSampler
from astar.train.model import (
    C3D_FC_DIM,
    C3D_LAYER_CHANNELS,
    VARIANTS,
    Captioner,
    CaptionerConfig,
    FeatureBatch,
)


def demo_store(root: Path, n_videos: int, seed: int = 0) -> FeatureStore:
    """Random ReLU-like features with the c3d-small shapes, 16-32 frames per video."""
    schema = synthetic_schema(
        BACKBONES["c3d-small"].layer_shapes(), backbone="c3d-small", preprocessing="unit-rgb"
    )
    store = FeatureStore.create_or_open(root, schema)
    rng = np.random.default_rng(seed)

    def make(vid: str) -> tuple[int, dict[str, np.ndarray]]:
        n_frames = int(rng.choice([16, 24, 32]))
        lengths = schema.expected_lengths(n_frames)
        return n_frames, {
            name: np.maximum(rng.normal(size=schema.full_shape(name, lengths[name])), 0)
            for name in schema.layer_shapes
        }

    videos = [(f"v{k:04d}", f"/bench/v{k:04d}.mp4") for k in range(n_videos)]
    write_videos(store, videos, make, partition_size=64)
    return store


def variant_throughput(store: FeatureStore, steps: int, vocab: int = 400) -> None:
    rng = np.random.default_rng(1)
    captions = {
        vid: [list(rng.integers(3, vocab, size=rng.integers(5, 12))) + [1] for _ in range(5)]
        for vid in store.ids
    }
    print(f"\n{len(store.ids)}-video store, small preset, 8 videos x 4 captions per batch")
    print(f"{'variant':>8} {'captions/s':>11} {'data wait':>10}")
    for variant in VARIANTS:
        torch.manual_seed(0)
        config = CaptionerConfig.small(vocab, variant)
        model = Captioner(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        sampler = VideoMajorSampler({v: 5 for v in captions}, 8, 4, seed=0)
        source = FeatureSource(store, config.attended_layers)
        loader = BatchLoader(source, captions, prefetch=2)
        plans = sampler.epoch(0)[: steps + 1]
        batches = loader(plans)
        next(batches)  # warm-up outside the clock
        loader.wait_seconds, started, n = 0.0, time.perf_counter(), 0
        for batch in batches:
            loss = model.loss(batch.features, batch.tokens, batch.video_index).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n += batch.tokens.shape[0]
        elapsed = time.perf_counter() - started
        print(f"{variant:>8} {n / elapsed:11.1f} {loader.wait_seconds / elapsed:9.1%}")


def major_speedup(videos: int, captions_per_video: int, repeats: int) -> None:
    """Paper-size alignment (full C3D channels, F = 512): video- vs caption-major steps."""
    torch.manual_seed(0)
    vocab, n_frames = 1000, 16
    config = CaptionerConfig(vocab_size=vocab, variant="soft")
    model = Captioner(config)
    channels, fc_dim = C3D_LAYER_CHANNELS, C3D_FC_DIM
    features = FeatureBatch(
        layers={
            name: torch.relu(
                torch.randn(videos, channels[name], n_frames // TIME_STRIDES[name], grid, grid)
            )
            for name, grid in TAP_GRID.items()
        },
        n_frames=torch.full((videos,), n_frames),
        fc7=torch.relu(torch.randn(videos, fc_dim)),
    )
    n_captions = videos * captions_per_video
    tokens = torch.randint(3, vocab, (n_captions, 10))
    tokens[:, -1] = 1
    video_index = torch.arange(videos).repeat_interleave(captions_per_video)
    # Caption-major: every caption brings its own copy of its video's features.
    copied = FeatureBatch(
        layers={k: v[video_index] for k, v in features.layers.items()},
        n_frames=features.n_frames[video_index],
        fc7=features.fc7[video_index],
    )

    def step(batch: FeatureBatch, index: torch.Tensor) -> float:
        started = time.perf_counter()
        model.zero_grad()
        model.loss(batch, tokens, index).loss.backward()
        return time.perf_counter() - started

    video_major, caption_major = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        video_major.append(step(features, video_index))
        caption_major.append(step(copied, torch.arange(n_captions)))
    vm, cm = statistics.median(video_major), statistics.median(caption_major)
    print(
        f"\npaper-size soft step, {videos} videos x {captions_per_video} captions, N = {n_frames}"
    )
    print(f"  video-major   {vm:7.2f} s  ({n_captions / vm:.2f} captions/s)")
    print(f"  caption-major {cm:7.2f} s  ({n_captions / cm:.2f} captions/s)")
    print(f"  speed-up of video-major: {cm / vm:.1f}x")


def _timed_step(model: Captioner, optimizer, batch, bf16: bool) -> float:
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(*batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def precision_speedup(repeats: int, videos: int = 4, captions_per_video: int = 5) -> None:
    """fp32 against bf16 autocast, side by side: one optimizer step of the demo's batch
    (``videos`` x ``captions_per_video``, 18 frames a video), small preset, c3d-tiny and
    c3d-small channels. Medians of ``repeats`` interleaved steps after one warm-up each."""
    from astar.extract.precision import cpu_has_fast_bf16

    print(f"\nfp32 vs bf16 (autocast), {videos} videos x {captions_per_video} captions, N = 18")
    if not cpu_has_fast_bf16():
        print("  this CPU has no native bf16 (or ONEDNN_MAX_CPU_ISA caps it): bf16 is emulated,")
        print("  and precision auto trains in fp32; measuring bf16 anyway")
    print(f"{'backbone':>10} {'variant':>8} {'fp32 s':>8} {'bf16 s':>8} {'speed-up':>9}")
    for backbone in ("c3d-tiny", "c3d-small"):
        spec = BACKBONES[backbone]
        channels = spec.tap_channels()
        for variant in ("soft", "hard"):
            torch.manual_seed(0)
            config = CaptionerConfig.small(400, variant, layer_channels=channels, fc_dim=spec.fc)
            model = Captioner(config).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            features = FeatureBatch(
                layers={
                    name: torch.relu(
                        torch.randn(
                            videos, c, 18 // TIME_STRIDES[name], TAP_GRID[name], TAP_GRID[name]
                        )
                    )
                    for name, c in channels.items()
                },
                n_frames=torch.full((videos,), 18),
                fc7=torch.relu(torch.randn(videos, spec.fc)),
            )
            tokens = torch.randint(3, 400, (videos * captions_per_video, 10))
            tokens[:, -1] = 1
            index = torch.arange(videos).repeat_interleave(captions_per_video)

            batch = (features, tokens, index)
            for bf16 in (False, True):  # warm-up: oneDNN builds its kernels
                _timed_step(model, optimizer, batch, bf16)
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(repeats):  # interleaved, so both see the same machine load
                for bf16 in (False, True):
                    times[bf16].append(_timed_step(model, optimizer, batch, bf16))
            fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
            print(f"{backbone:>10} {variant:>8} {fp32:8.3f} {bf16:8.3f} {fp32 / bf16:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=120)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--major-videos", type=int, default=2)
    parser.add_argument("--captions-per-video", type=int, default=4)
    parser.add_argument("--skip-major", action="store_true")
    parser.add_argument(
        "--precision-only", action="store_true", help="Only the fp32 vs bf16 comparison."
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    precision_speedup(max(args.repeats, 5))
    if args.precision_only:
        return
    with tempfile.TemporaryDirectory() as scratch:
        variant_throughput(demo_store(Path(scratch) / "store", args.videos), args.steps)
    if not args.skip_major:
        major_speedup(args.major_videos, args.captions_per_video, args.repeats)


if __name__ == "__main__":
    main()
