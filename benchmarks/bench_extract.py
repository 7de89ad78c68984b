"""Stage-one throughput: decode only, C3D only, end to end, and bf16 against fp32.

    python benchmarks/bench_extract.py [--videos ../shared/data/videos] [--backbone c3d-small]

All figures are frames fed to C3D per second (padding included), medians over --repeats runs
measured side by side in one process, so the ratios hold on a noisy shared machine. End to end
overlaps decoding (a child process) and staging writes (a thread) with C3D, so its ratio to
C3D-only says how much of the I/O is hidden: 1.0 would be all of it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from astar.extract.decode import DecodeConfig
from astar.extract.isolation import IsolatedDecoder
from astar.extract.runner import ExtractConfig, extract_features, gather_videos, make_extractor

DEFAULT_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def _median_rate(run, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        frames = run()
        rates.append(frames / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=Path, default=DEFAULT_VIDEOS)
    parser.add_argument("--backbone", default="c3d-small", choices=["c3d", "c3d-small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-frames", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="Measure bf16 even without support.")
    args = parser.parse_args()

    paths = [path for _, path in gather_videos([args.videos], ids="name")]
    decode = DecodeConfig(max_frames=args.max_frames)
    config = ExtractConfig(decode=decode, backbone=args.backbone, ids="name")
    from astar.extract.precision import cpu_has_fast_bf16

    # bf16 without native support (AVX2-only CPUs) falls back to reference kernels, ~100x slower.
    precisions = ["fp32", "bf16"] if args.bf16 or cpu_has_fast_bf16() else ["fp32"]

    with IsolatedDecoder(decode) as decoder:
        decoded = [result for _, result in decoder.imap(paths)]
    clips = [video.frames for video in decoded if not isinstance(video, Exception)]
    n_frames = sum(len(frames) for frames in clips)
    print(
        f"{len(paths)} videos, {len(clips)} decodable, {n_frames} frames fed to C3D, "
        f"backbone {args.backbone}, {args.repeats} repeats (medians)"
    )

    def decode_only() -> int:
        with IsolatedDecoder(decode) as decoder:
            return sum(
                len(v.frames) for _, v in decoder.imap(paths) if not isinstance(v, Exception)
            )

    rates = {"decode only": _median_rate(decode_only, args.repeats)}
    for precision in precisions:
        extractor = make_extractor(ExtractConfig(backbone=args.backbone, precision=precision))
        extractor(clips[0])  # warm-up

        def c3d_only(extractor=extractor) -> int:
            for frames in clips:
                extractor(frames)
            return n_frames

        rates[f"C3D only {precision}"] = _median_rate(c3d_only, args.repeats)

    def end_to_end() -> int:
        with tempfile.TemporaryDirectory() as scratch:
            summary, _ = extract_features(
                [args.videos], Path(scratch) / "s", config, progress=False
            )
            return summary.frames

    rates["end to end fp32"] = _median_rate(end_to_end, args.repeats)
    for name, rate in rates.items():
        print(f"{name:>18}: {rate:8.1f} frames/s")
    print(f"end to end / C3D only (fp32): {rates['end to end fp32'] / rates['C3D only fp32']:.2f}")
    if "bf16" in precisions:
        print(f"bf16 / fp32 C3D speed: {rates['C3D only bf16'] / rates['C3D only fp32']:.2f}")
    else:
        print("bf16 skipped: this CPU has no native bf16 convolutions (--bf16 forces it)")


if __name__ == "__main__":
    main()
