"""The cost at internet scale: store bytes, C3D GPU-seconds, decode cores and objects per hour.

    python benchmarks/bench_cost.py [--videos A.mp4 ...] [--achieved 0.4] [--json out.json]

Measured on this machine (every printed figure says whether it is measured or assumed):

1. bytes: the paper C3D (``c3d``; random seeded weights, since no real ones exist here)
   extracts a few real clips with ``extract_features`` into a fresh store (fp16, zstd level 1,
   chunks of about 1 MiB along time). A layer's stored bytes are the sizes of its chunk files,
   its raw bytes the fp16 bytes of its data; the ratio raw / stored is what scales to an hour.
   Random-weight activations are not trained ones (a trained C3D's ReLU maps are usually
   sparser), so the ratio measures this code path on random weights, not Sports-1M features.
2. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over exactly what ``C3DExtractor`` runs
   for N frames (one fully convolutional pass over all N frames for pool2..pool5, then every
   16-frame clip, stride 8, through the whole network again for fc7), on the meta device
   (shapes only). Convolutions and matrix products only; ReLU and pooling are not counted.
   Also this CPU's fc7-clip throughput, for reference.
3. decode: ``astar.extract.decode.decode_video`` (2 fps, 112 x 112, no frame cap) on real clips
   in a child process pinned to one core; the rate is seconds of video per CPU-second (user +
   system time of that process, so another job on the machine does not skew it).
4. objects: every file in the store, and every file seen under ``staging/`` and ``locks/``
   while it was written (polled every 50 ms).

Assumed: GPU peaks (dense bf16/fp16 tensor math, no sparsity: H100 SXM 989 TFLOP/s, A100 SXM
312 TFLOP/s), the fraction of peak C3D achieves (``--achieved``, 0.4; no GPU here to measure
it), average video lengths (MSR-VTT ~15 s, HowTo100M ~6.5 min), and that decoding costs per
second of video what it cost on the clips measured here (it grows with source resolution and
frame rate; these clips are 176x144 to 1280x720, 6 to 30 fps).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
# 10 s or more each, so that no video is padded up to 16 frames (padding would add bytes).
STORE_VIDEOS = ("bikes.mp4", "demo.mp4", "test.mp4", "v_ZNVhz7ctTq0.mp4", "women_long_jump.mp4")
FPS = 2.0  # the store's sampling rate (DecodeConfig default)
HOUR_FRAMES = 7200  # 2 fps x 3600 s
WEEK_S = 7 * 24 * 3600
GPUS = {"H100 SXM": 989e12, "A100 SXM": 312e12}  # dense bf16/fp16 peaks: assumptions
PARTITION_SIZE = 64  # extract-features --partition-size default
DEFAULT_CAP = 128  # extract-features --max-frames default
TIMESTAMP_BYTES = 8  # float64 per frame
# (name, videos, average seconds, frame cap): the "1 million videos" scenarios (assumptions).
SCENARIOS = (
    ("MSR-VTT-like: 1M x 15 s", 1_000_000, 15.0, DEFAULT_CAP),
    ("HowTo100M-like: 1M x 6.5 min, --max-frames 0", 1_000_000, 390.0, None),
    ("HowTo100M-like: 1M x 6.5 min, default cap 128", 1_000_000, 390.0, DEFAULT_CAP),
)


def cpu_model() -> tuple[str, int]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if "Model name" in line]
    return (names[0] if names else "unknown"), len(os.sched_getaffinity(0))


def frames_for(seconds: float, cap: int | None) -> int:
    """Frames fed to C3D for a video of ``seconds``: the 2 fps grid, the cap, the padding."""
    from astar.extract.sampling import sample_times
    from astar.store.geometry import MIN_FRAMES

    n = len(sample_times(seconds, FPS))
    return max(min(n, cap) if cap else n, MIN_FRAMES)


class DirWatcher:
    """Polls sub-folders of a store while it is written; remembers every file seen in them."""

    def __init__(self, root: Path, folders: tuple[str, ...], interval_s: float = 0.05):
        self.root = root
        self.folders = folders
        self.interval_s = interval_s
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for sub in self.folders:
                for folder, _, files in os.walk(self.root / sub):
                    for name in files:
                        self.seen.add(os.path.relpath(os.path.join(folder, name), self.root))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> DirWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# 1 and 4. Bytes and files of a real store


def measure_store(videos: list[Path], seed: int, out: Path) -> dict:
    import pandas as pd

    from astar.extract.decode import DecodeConfig
    from astar.extract.runner import ExtractConfig, extract_features
    from astar.store import FeatureStore
    from astar.store.geometry import LAYERS

    config = ExtractConfig(
        decode=DecodeConfig(max_frames=None),
        backbone="c3d",
        seed=seed,
        device="cpu",
        ids="name",
        partition_size=PARTITION_SIZE,
        compression="zstd",  # as on object storage, where stores of this size live
    )
    started = time.perf_counter()
    with DirWatcher(out, ("staging", "locks")) as watcher:
        summary, _ = extract_features([str(v) for v in videos], out, config, progress=False)
    seconds = time.perf_counter() - started
    if summary.n_failed:
        raise SystemExit(f"extraction failed: {summary.describe()}")
    schema = FeatureStore.open(out, verify=False).schema
    partitions = sorted(p for p in (out / "partitions").iterdir() if p.is_dir())
    manifest = pd.concat([pd.read_csv(p / "manifest.csv") for p in partitions])
    itemsize = 2 if schema.dtype == "float16" else 4
    layers = {}
    for layer in LAYERS:
        raw = stored = chunks = 0
        for part in partitions:
            meta = json.loads((part / layer / "zarr.json").read_text())
            raw += math.prod(meta["shape"]) * itemsize
            for file in (part / layer).iterdir():
                if file.name != "zarr.json":
                    stored += file.stat().st_size
                    chunks += 1
        layers[layer] = {"raw": raw, "stored": stored, "chunks": chunks}
    files = [p for p in out.rglob("*") if p.is_file()]
    part_files = [p for p in files if partitions[0] in p.parents]
    # Documents: zarr.json of the group and of each array, and manifest.csv; the rest are chunks.
    documents = [p for p in part_files if p.name in ("zarr.json", "manifest.csv")]
    seen = sorted(watcher.seen)
    return {
        "videos": [str(v) for v in videos],
        "n_videos": len(manifest),
        "n_partitions": len(partitions),
        "padded": int(manifest["padded"].astype(bool).sum()),
        "frames": int(manifest["n_frames"].sum()),
        "video_seconds": float(manifest["duration"].sum()),
        "extract_seconds": seconds,
        "layers": layers,
        "partition_files": len(part_files),
        "partition_documents": len(documents),
        "timestamp_chunks": sum(
            1 for p in part_files if p.parent.name == "timestamps" and p.name != "zarr.json"
        ),
        "top_level_files": sorted(
            str(p.relative_to(out)) for p in files if partitions[0] not in p.parents
        ),
        "transient_seen": seen,
        "schema": schema,
        "frames_by_video": dict(zip(manifest["id"], manifest["n_frames"].astype(int), strict=True)),
    }


# --------------------------------------------------------------------------------------------
# 2. C3D FLOPs (what the extractor computes) and CPU throughput


def extractor_flops(model, n_frames: int) -> dict[str, int]:
    """FLOPs of ``C3DExtractor.__call__`` on ``n_frames`` frames, counted on the meta device:
    the whole-video pass (pool2..pool5) and the fc7 clips, each run through the network."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from astar.extract.c3d import clip_starts
    from astar.store.geometry import CLIP_LENGTH, FRAME_SIZE

    video = torch.empty(1, 3, n_frames, FRAME_SIZE, FRAME_SIZE, device="meta")
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            taps = model.conv_features(video)
        whole = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            if n_frames == CLIP_LENGTH:  # the extractor reuses the one clip's pool5
                model.fc7_from_pool5(taps["pool5"])
                n = 1
            else:
                n = len(clip_starts(n_frames))
                clips = torch.empty(n, 3, CLIP_LENGTH, FRAME_SIZE, FRAME_SIZE, device="meta")
                model.fc7(clips)
        return {"whole_pass": whole, "clips": n, "clip_path": counter.get_total_flops()}


def measure_c3d_cpu(seed: int, frames, clip_batch: int, repeats: int) -> dict:
    import torch

    from astar.extract.c3d import C3DExtractor, preprocess

    extractor = C3DExtractor("c3d", None, seed, device="cpu", clip_batch=clip_batch)
    x = preprocess(frames, extractor.preprocessing, extractor.device)  # (3, N, 112, 112)
    clips = next(extractor._clips(x))  # (clip_batch, 3, 16, 112, 112), the extractor's layout
    times = []
    with torch.inference_mode():
        extractor.model.fc7(clips[:1])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            extractor.model.fc7(clips)
            times.append(time.perf_counter() - started)
    started = time.perf_counter()
    extractor(frames)
    return {
        "clips_per_s": len(clips) / statistics.median(times),
        "clip_batch": len(clips),
        "threads": torch.get_num_threads(),
        "video_frames": len(frames),
        "video_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# 3. Decoding, one core


def _decode_on_one_core(paths: list[str], repeats: int) -> list[dict]:
    """Runs in a child process pinned to one CPU: CPU time of decode_video per video."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from astar.extract.decode import DecodeConfig, VideoDecodeError, decode_video

    config = DecodeConfig(max_frames=None)
    decode_video(paths[0], config)  # warm-up: imports, codec tables
    rows = []
    for path in paths:
        cpu, wall = [], []
        try:
            for _ in range(repeats):
                before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                video = decode_video(path, config)
                after = resource.getrusage(resource.RUSAGE_SELF)
                wall.append(time.perf_counter() - started)
                cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        except VideoDecodeError as error:
            rows.append({"path": path, "error": error.kind})
            continue
        rows.append(
            {
                "path": path,
                "size": f"{video.width}x{video.height}",
                "source_fps": video.source_fps,
                "seconds": video.duration,
                "frames": video.n_sampled,
                "cpu_s": min(cpu),
                "wall_s": min(wall),
            }
        )
    return rows


def measure_decode(paths: list[Path], repeats: int) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_decode_on_one_core, [str(p) for p in paths], repeats).result()


# --------------------------------------------------------------------------------------------
# Arithmetic


def per_video(schema, ratios: dict[str, float], flops_of, n_frames: int) -> dict:
    """Raw and stored bytes and FLOPs of one video of ``n_frames`` frames."""
    from astar.store.geometry import LAYERS

    lengths = schema.expected_lengths(n_frames)
    raw = {layer: lengths[layer] * step_bytes(schema, layer) for layer in LAYERS}
    stored = {layer: raw[layer] / ratios[layer] for layer in LAYERS}
    counted = flops_of(n_frames)
    return {
        "lengths": lengths,
        "raw": sum(raw.values()) + n_frames * TIMESTAMP_BYTES,
        "stored": sum(stored.values()) + n_frames * TIMESTAMP_BYTES,
        "flops": counted["whole_pass"] + counted["clip_path"],
    }


def sig(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant figures, with thousands separators."""
    if x == 0:
        return "0"
    places = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{round(x, places):,.{places}f}"


def step_bytes(schema, layer: str) -> int:
    itemsize = 2 if schema.dtype == "float16" else 4
    return math.prod(schema.layer_shapes[layer]) * itemsize


def partition_objects(schema, n_frames: int, videos: int, documents: int) -> dict[str, int]:
    """Files of one committed partition of ``videos`` videos of ``n_frames`` frames each."""
    from astar.store.geometry import LAYERS
    from astar.store.writer import TARGET_CHUNK_BYTES, chunk_length

    lengths = schema.expected_lengths(n_frames)
    counts = {}
    for layer in LAYERS:
        total = lengths[layer] * videos
        counts[layer] = math.ceil(total / chunk_length(schema, layer, total)) if total else 0
    frames = n_frames * videos
    counts["timestamps"] = math.ceil(frames / max(1, min(TARGET_CHUNK_BYTES // 8, frames)))
    counts["documents"] = documents
    return counts


def transient_kinds(seen: list[str]) -> dict[str, int]:
    """Files seen under staging/ and locks/, by kind."""
    kinds = {
        "staged .npz": 0,
        ".npz temporaries": 0,
        "files of the partition built in staging/<p>/.commit": 0,
        "lock files (and their temporaries)": 0,
    }
    for path in seen:
        if path.startswith("locks/"):
            kinds["lock files (and their temporaries)"] += 1
        elif "/.commit/" in path:
            kinds["files of the partition built in staging/<p>/.commit"] += 1
        elif Path(path).name.startswith(".tmp-"):
            kinds[".npz temporaries"] += 1
        else:
            kinds["staged .npz"] += 1
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", nargs="+", type=Path, help="clips for the store (bytes)")
    parser.add_argument("--decode-videos", nargs="+", type=Path, help="default: all in --data")
    parser.add_argument("--data", type=Path, default=DATA, help="the real clips folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random C3D weights")
    parser.add_argument("--achieved", type=float, default=0.4, help="assumed fraction of peak")
    parser.add_argument("--clip-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="CPU C3D repeats (median)")
    parser.add_argument("--decode-repeats", type=int, default=3, help="decode repeats (min)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    videos = args.videos or [args.data / name for name in STORE_VIDEOS]
    decode_videos = args.decode_videos or sorted(
        p for p in args.data.iterdir() if p.suffix in (".mp4", ".avi")
    )
    started = time.perf_counter()
    model_name, cores = cpu_model()

    # ---- measurements ------------------------------------------------------------------
    decode_rows = measure_decode(decode_videos, args.decode_repeats)
    with tempfile.TemporaryDirectory(prefix="bench_cost_") as scratch:
        store = measure_store(videos, args.seed, Path(scratch) / "store")
        schema = store.pop("schema")
    from astar.extract.c3d import build_c3d
    from astar.extract.decode import DecodeConfig, decode_video
    from astar.store.geometry import LAYERS, TIME_STRIDES

    longest = max(videos, key=lambda v: store["frames_by_video"].get(v.name, 0))
    frames = decode_video(longest, DecodeConfig(max_frames=None)).frames  # (N, 112, 112, 3)
    cpu = measure_c3d_cpu(args.seed, frames, args.clip_batch, args.repeats)
    meta_model = build_c3d("c3d", None, args.seed)[0].to("meta")
    flop_cache: dict[int, dict[str, int]] = {}

    def flops_of(n: int) -> dict[str, int]:
        if n not in flop_cache:
            flop_cache[n] = extractor_flops(meta_model, n)
        return flop_cache[n]

    clip = flops_of(16)
    hour = flops_of(HOUR_FRAMES)
    hour_flops = hour["whole_pass"] + hour["clip_path"]
    clip_flops = clip["whole_pass"] + clip["clip_path"]
    runtime = time.perf_counter() - started

    # ---- 1. bytes per hour ------------------------------------------------------------
    ratios = {k: v["raw"] / v["stored"] for k, v in store["layers"].items()}
    hour_lengths = schema.expected_lengths(HOUR_FRAMES)
    out: list[str] = []
    say = out.append
    say(f"# bench_cost: measured on {model_name}, {cores} cores, no GPU; {runtime:.0f} s\n")
    say(
        f"Store (measured): {store['n_videos']} real clips, {store['video_seconds']:.1f} s of "
        f"video, {store['frames']} frames at 2 fps ({store['padded']} padded), backbone c3d, "
        f"random weights (seed {args.seed}), fp16, zstd 1; extraction took "
        f"{store['extract_seconds']:.0f} s on this CPU.\n"
    )
    say("## 1. Store bytes per hour of video (2 fps, 7200 frames, no cap)\n")
    say(
        "| layer | steps/h | bytes/step | raw MiB/h | ratio (measured) | stored MiB/h | "
        "measured raw / stored bytes |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|")
    tot_raw = tot_stored = 0.0
    for layer in LAYERS:
        m = store["layers"][layer]
        raw = hour_lengths[layer] * step_bytes(schema, layer)
        tot_raw += raw
        tot_stored += raw / ratios[layer]
        say(
            f"| {layer} | {hour_lengths[layer]} | {step_bytes(schema, layer):,} | "
            f"{raw / 2**20:,.1f} | {ratios[layer]:.3f} | {raw / ratios[layer] / 2**20:,.1f} | "
            f"{m['raw']:,} / {m['stored']:,} |"
        )
    measured_raw = sum(v["raw"] for v in store["layers"].values())
    measured_stored = sum(v["stored"] for v in store["layers"].values())
    say(
        f"| **total** | | | **{tot_raw / 2**20:,.1f}** | {tot_raw / tot_stored:.3f} | "
        f"**{tot_stored / 2**20:,.1f}** | {measured_raw:,} / {measured_stored:,} |"
    )
    say(
        f"\nPer hour: {tot_raw / 1e9:.2f} GB raw, {tot_stored / 1e9:.2f} GB stored "
        f"(+ timestamps {HOUR_FRAMES * TIMESTAMP_BYTES / 1e3:.1f} kB). Steps: pool_k = "
        f"7200 // {{{', '.join(str(TIME_STRIDES[k]) for k in TIME_STRIDES)}}}, fc7 clips = "
        f"(7200 - 16) / 8 + 1 = {hour_lengths['fc7']}. Random weights: a trained C3D's "
        "activations may compress differently (usually sparser, so better).\n"
    )

    # ---- 2. GPU seconds ---------------------------------------------------------------
    say("## 2. C3D compute per hour of video\n")
    say(
        f"- FLOPs (measured, FlopCounterMode, conv + linear): one 16-frame clip through "
        f"conv1..fc7 = {clip_flops / 1e9:.2f} GFLOP."
    )
    say(
        "- What the extractor runs per 7200 frames: whole-video pass "
        f"{hour['whole_pass'] / 1e12:.2f} TFLOP + {hour['clips']} fc7 clips x "
        f"{clip_flops / 1e9:.2f} GFLOP = "
        f"{hour['clip_path'] / 1e12:.2f} TFLOP; total {hour_flops / 1e12:.2f} TFLOP/h "
        f"({hour_flops / clip_flops:.0f} clip-equivalents; the clips are "
        f"{hour['clip_path'] / hour_flops:.0%})."
    )
    cpu_rate = cpu["clips_per_s"] * clip_flops
    say(
        f"- This CPU (measured): {cpu['clips_per_s']:.2f} clips/s ({cpu['clip_batch']} per "
        f"forward, {cpu['threads']} threads) = {cpu_rate / 1e9:.0f} GFLOP/s; one "
        f"{cpu['video_frames']}-frame video {cpu['video_s']:.1f} s; one hour of video would take "
        f"{hour_flops / cpu_rate / 3600:.1f} CPU-hours on these {cpu['threads']} threads.\n"
    )
    decoded = [r for r in decode_rows if "error" not in r]
    decode_rate = sum(r["seconds"] for r in decoded) / sum(r["cpu_s"] for r in decoded)
    say(
        "| GPU (peak assumed) | achieved (assumed) | GPU-s per video-hour | video-h per GPU-h |"
        " decode cores per GPU |"
    )
    say("|---|---:|---:|---:|---:|")
    gpu_s = {}
    for gpu, peak in GPUS.items():
        rate = peak * args.achieved
        gpu_s[gpu] = hour_flops / rate
        video_s_per_s = 3600 / gpu_s[gpu]
        say(
            f"| {gpu} {peak / 1e12:.0f} TFLOP/s | {args.achieved:.0%} | {gpu_s[gpu]:.3f} | "
            f"{3600 / gpu_s[gpu]:,.0f} | {video_s_per_s / decode_rate:,.0f} |"
        )
    say("")

    # ---- 3. decode ---------------------------------------------------------------------
    say("## 3. Decoding, one core (measured; decode_video, 2 fps, 112 x 112, no cap)\n")
    say("| clip | source | fps | video s | CPU s | video s per CPU-s |")
    say("|---|---|---:|---:|---:|---:|")
    for r in decode_rows:
        if "error" in r:
            say(f"| {Path(r['path']).name} | failed: {r['error']} | | | | |")
            continue
        say(
            f"| {Path(r['path']).name} | {r['size']} | {r['source_fps'] or 0:.1f} | "
            f"{r['seconds']:.1f} | {r['cpu_s']:.2f} | {r['seconds'] / r['cpu_s']:.0f} |"
        )
    say(
        f"| **all** | | | {sum(r['seconds'] for r in decoded):.1f} | "
        f"{sum(r['cpu_s'] for r in decoded):.2f} | **{decode_rate:.0f}** |"
    )
    say(
        f"\nCores per GPU = (3600 / GPU-s per video-hour) / {decode_rate:.0f}, i.e. the "
        "GPU's video-seconds per second over one core's; see the table in section 2.\n"
    )

    # ---- 4. objects --------------------------------------------------------------------
    say("## 4. Objects (files)\n")
    say(
        f"Measured store: {store['partition_files']} files in its partition "
        f"({store['partition_documents']} documents: the group's and 6 arrays' zarr.json and "
        f"manifest.csv; the rest chunks: "
        + ", ".join(f"{k} {v['chunks']}" for k, v in store["layers"].items())
        + f", timestamps {store['timestamp_chunks']}); top level "
        f"{len(store['top_level_files'])} ({', '.join(store['top_level_files'])}). "
        f"Seen transiently (polled, so short-lived temporaries can be missed): "
        + ", ".join(f"{v} {k}" for k, v in transient_kinds(store["transient_seen"]).items())
        + ".\n"
    )
    docs = store["partition_documents"]
    say(
        "| partition of 64 videos | frames/video | chunks by layer (p2,p3,p4,p5,fc7,ts) | "
        "files/partition | files per video-hour |"
    )
    say("|---|---:|---|---:|---:|")
    for label, seconds, cap in (
        ("15 s (MSR-VTT-like)", 15.0, DEFAULT_CAP),
        ("6.5 min, no cap", 390.0, None),
        ("6.5 min, cap 128", 390.0, DEFAULT_CAP),
        ("1 h, no cap", 3600.0, None),
    ):
        n = frames_for(seconds, cap)
        counts = partition_objects(schema, n, PARTITION_SIZE, docs)
        total = sum(counts.values())
        chunks = ",".join(str(counts[k]) for k in (*LAYERS, "timestamps"))
        say(
            f"| {label} | {n} | {chunks} | {total} | "
            f"{total / (PARTITION_SIZE * seconds / 3600):,.0f} |"
        )
    staging = {
        label: PARTITION_SIZE * per_video(schema, ratios, flops_of, frames_for(sec, cap))["raw"]
        for label, sec, cap in (("15 s", 15.0, DEFAULT_CAP), ("6.5 min uncapped", 390.0, None))
    }
    say(
        "\nTransient per video: 1 staged .npz (written as a temporary, then renamed); per "
        "partition: 1 lock file and the partition built in staging/<p>/.commit, then renamed. "
        "Staged videos are uncompressed, so each worker needs up to one partition's raw bytes "
        "of staging: "
        + ", ".join(f"{sig(b / 1e9)} GB at 64 x {k}" for k, b in staging.items())
        + ".\n"
    )

    # ---- 5. one million videos ---------------------------------------------------------
    say(f"## 5. One million videos (GPU at {args.achieved:.0%} of peak, assumed)\n")
    say(
        "| scenario | video h | frames fed | PFLOP | H100 GPU-h | H100s, 1 week | "
        "A100 GPU-h | A100s, 1 week | decode core-h | cores, 1 week | TB raw | TB stored | "
        "files |"
    )
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    scenarios = []
    for label, n_videos, seconds, cap in SCENARIOS:
        n = frames_for(seconds, cap)
        video = per_video(schema, ratios, flops_of, n)
        flops = video["flops"] * n_videos
        hours = n_videos * seconds / 3600
        gpu_h = {g: flops / (p * args.achieved) / 3600 for g, p in GPUS.items()}
        core_h = n_videos * seconds / decode_rate / 3600  # full decode, whatever the cap
        partitions = math.ceil(n_videos / PARTITION_SIZE)
        files = partitions * sum(partition_objects(schema, n, PARTITION_SIZE, docs).values())
        files += len(store["top_level_files"])
        row = {
            "scenario": label,
            "hours": hours,
            "frames": n * n_videos,
            "pflop": flops / 1e15,
            "gpu_h": gpu_h,
            "core_h": core_h,
            "tb_raw": video["raw"] * n_videos / 1e12,
            "tb_stored": video["stored"] * n_videos / 1e12,
            "files": files,
        }
        scenarios.append(row)
        say(
            f"| {label} | {hours:,.0f} | {n:,}/video | {sig(row['pflop'])} | "
            f"{sig(gpu_h['H100 SXM'])} | {sig(gpu_h['H100 SXM'] / 168)} | "
            f"{sig(gpu_h['A100 SXM'])} | {sig(gpu_h['A100 SXM'] / 168)} | {sig(core_h)} | "
            f"{sig(core_h * 3600 / WEEK_S)} | {sig(row['tb_raw'])} | {sig(row['tb_stored'])} | "
            f"{files:,} |"
        )
    say(
        "\nFiles: committed store only; transient staging adds 1 .npz per video "
        "(1,000,000) while its partition is open. Decode assumes the whole video is decoded "
        "even under the cap. TB = 10^12 bytes.\n"
    )
    text = "\n".join(out)
    print(text)
    if args.json:
        figures = {
            "cpu": {"model": model_name, "cores": cores, **cpu},
            "store": {k: v for k, v in store.items()},
            "ratios": ratios,
            "flops": {"clip": clip_flops, "hour": hour, "hour_total": hour_flops},
            "gpu_s_per_video_hour": gpu_s,
            "decode": decode_rows,
            "decode_rate": decode_rate,
            "scenarios": scenarios,
            "runtime_s": runtime,
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
