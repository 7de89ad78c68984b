"""Batched beam search against decoding the videos one at a time, with the same beam.

    python benchmarks/bench_decoding.py [--videos 80] [--beam 5] [--repeats 3]

Input: a demo-sized test split of random features with the c3d-small shapes (--min-frames to
--max-frames sampled frames per video) and a ``CaptionerConfig.small`` soft model (vocabulary
--vocab). An untrained model's captions are unlike real ones (each is either empty or never ends),
so the model is first fitted for --fit-steps Adam steps to one random caption of 4 to 12 words
per video (its decoder only: ``prepare`` stays random); --fit-steps 0 keeps it untrained.

Batched: ``beam_search`` over chunks of --batch-videos videos, all their beams one (B K)-row
batch. One at a time: ``beam_search`` per video. Both must return the same captions (tokens
equal, log-probs within 1e-4).

Two timings, each the median of --repeats alternating runs:
- search: ``beam_search_prepared`` on contexts prepared beforehand, the part that batching
  changes (one ``step`` call per word for all beams of all videos, instead of one per video);
- end to end: ``beam_search`` on features, ``prepare`` included. ``prepare`` runs once per video
  in both, but on a CPU its pool2 alignment conv dominates the whole, and in a batch it also
  convolves the time padding of the shorter videos, so this ratio is lower.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from astar.train.decoding import (
    DecodedCaption,
    beam_search,
    beam_search_prepared,
)
from astar.train.model import (
    ALIGNMENT,
    C3D_SMALL_FC_DIM,
    C3D_SMALL_LAYER_CHANNELS,
    Captioner,
    CaptionerConfig,
    Context,
    FeatureBatch,
)

SPATIAL = {"pool2": 28, "pool3": 14, "pool4": 7, "pool5": 4}  # 112-pixel frames


def demo_split(n_videos: int, min_frames: int, max_frames: int, seed: int) -> list[FeatureBatch]:
    """One FeatureBatch per video, random ReLU-like features at the video's own length."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_frames, max_frames + 1, (n_videos,), generator=generator)
    split = []
    for n_frames in lengths.tolist():
        layers = {
            name: torch.rand(
                1,
                channels,
                n_frames // ALIGNMENT[name].frame_stride,
                SPATIAL[name],
                SPATIAL[name],
                generator=generator,
            )
            for name, channels in C3D_SMALL_LAYER_CHANNELS.items()
        }
        fc7 = torch.rand(1, C3D_SMALL_FC_DIM, generator=generator)
        split.append(FeatureBatch(layers, torch.tensor([n_frames]), fc7))
    return split


def collate(videos: list[FeatureBatch]) -> FeatureBatch:
    """Zero-pad in time to the longest video, as the loader does."""
    layers = {}
    for name in videos[0].layers:
        longest = max(v.layers[name].shape[2] for v in videos)
        layers[name] = torch.cat(
            [
                torch.nn.functional.pad(
                    v.layers[name], (0, 0, 0, 0, 0, longest - v.layers[name].shape[2])
                )
                for v in videos
            ]
        )
    n_frames = torch.cat([v.n_frames for v in videos])
    return FeatureBatch(layers, n_frames, torch.cat([v.fc7 for v in videos]))


def fit_to_random_captions(
    model: Captioner, contexts: list[Context], steps: int, seed: int
) -> list[int]:
    """Fit the decoder to one random caption per video so decoding ends like a trained model's.

    ``contexts`` (prepared once, with no gradient) stay valid: only ``step``'s weights change.
    Returns the fitted captions' lengths in words.
    """
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    targets = []
    for context in contexts:
        words = torch.randint(4, 13, (len(context),), generator=generator)  # (B,)
        tokens = torch.randint(2, config.vocab_size, (len(context), 13), generator=generator)
        position = torch.arange(13)[None]  # (1, 13)
        tokens[position == words[:, None]] = config.eos_id
        tokens[position > words[:, None]] = config.pad_id
        targets.append(tokens)  # (B, 13): words, eos, padding
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = sum(
            -model.teacher_force(context, tokens).token_log_probs.sum(dim=1).mean()
            for context, tokens in zip(contexts, targets, strict=True)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    return [int(n) for t in targets for n in (t != config.pad_id).sum(dim=1) - 1]


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def timed(run: Callable[[], list[DecodedCaption]]) -> tuple[float, list[DecodedCaption]]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def check_same(batched: list[DecodedCaption], alone: list[DecodedCaption]) -> None:
    for index, (mine, theirs) in enumerate(zip(batched, alone, strict=True)):
        if mine.tokens != theirs.tokens or abs(mine.log_prob - theirs.log_prob) > 1e-4:
            raise SystemExit(
                f"video {index}: batched {mine.tokens} ({mine.log_prob:.6f}) differs from "
                f"alone {theirs.tokens} ({theirs.log_prob:.6f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=80)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=30)
    parser.add_argument("--batch-videos", type=int, default=32)
    parser.add_argument("--min-frames", type=int, default=16)
    parser.add_argument("--max-frames", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--fit-steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = CaptionerConfig.small(args.vocab, "soft")
    model = Captioner(config).eval()
    split = demo_split(args.videos, args.min_frames, args.max_frames, args.seed)
    groups = [collate(group) for group in chunks(split, args.batch_videos)]
    decode = {"beam_size": args.beam, "max_length": args.max_length}
    print(
        f"{args.videos} videos ({args.min_frames}-{args.max_frames} frames), soft small model "
        f"(V {args.vocab}), beam {args.beam}, max_length {args.max_length}, batches of "
        f"{args.batch_videos}, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)"
    )

    with torch.no_grad():  # prepare's weights are not fitted: these contexts stay valid
        started = time.perf_counter()
        group_contexts = [model.prepare(group) for group in groups]
        prepare_s = time.perf_counter() - started
        video_contexts = [model.prepare(video) for video in split]
    started = time.perf_counter()
    fitted = fit_to_random_captions(model, group_contexts, args.fit_steps, args.seed)
    print(
        f"fitted to captions of {min(fitted)}-{max(fitted)} words in {args.fit_steps} steps "
        f"({time.perf_counter() - started:.1f} s); prepare of all videos {prepare_s:.2f} s"
    )

    def search_batched() -> list[DecodedCaption]:
        return [c for ctx in group_contexts for c in beam_search_prepared(model, ctx, **decode)]

    def search_alone() -> list[DecodedCaption]:
        return [c for ctx in video_contexts for c in beam_search_prepared(model, ctx, **decode)]

    def full_batched() -> list[DecodedCaption]:
        return [c for group in groups for c in beam_search(model, group, **decode)]

    def full_alone() -> list[DecodedCaption]:
        return [c for video in split for c in beam_search(model, video, **decode)]

    times: dict[str, list[float]] = {name: [] for name in ("sb", "sa", "fb", "fa")}
    for _ in range(args.repeats):
        for name, run in (
            ("sb", search_batched),
            ("sa", search_alone),
            ("fb", full_batched),
            ("fa", full_alone),
        ):
            seconds, captions = timed(run)
            times[name].append(seconds)
            if name == "sb":
                reference = captions
            else:
                check_same(reference, captions)
    median = {name: statistics.median(values) for name, values in times.items()}
    lengths = [len(c.tokens) for c in reference]
    print(
        f"captions: all equal; {sum(c.finished for c in reference)}/{len(reference)} finished, "
        f"{min(lengths)}-{max(lengths)} words (median {statistics.median(lengths)})"
    )
    print(f"search      batched {median['sb']:7.3f} s   one at a time {median['sa']:7.3f} s   "
          f"speed-up {median['sa'] / median['sb']:5.1f}x")  # fmt: skip
    print(f"end to end  batched {median['fb']:7.3f} s   one at a time {median['fa']:7.3f} s   "
          f"speed-up {median['fa'] / median['fb']:5.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
