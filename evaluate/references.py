"""The two reference rows of a results table, for any prepared dataset split.

``leave_one_out``: each caption of a video predicts that video, scored against its other
captions; all (video, held-out caption) pairs are scored as one corpus. This is the
human-agreement level of the references, a practical ceiling (a consensus caption scored
against all of them can exceed it). ``most_common_caption``: every video gets the most frequent
training caption, scored against all its captions: what a model that ignores the video gets.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from astar.pipelines.datasets import Dataset
from astar.pipelines.metrics import TABLE_METRICS, MetricsError, score_captions

__all__ = ["most_common_caption", "reference_rows"]


def most_common_caption(dataset: Dataset, split: str = "train") -> str:
    """The most frequent normalised caption of ``split`` (ties: alphabetical first)."""
    counts = Counter(dataset.split(split).captions["normalized"])
    if not counts:
        raise MetricsError(f"no captions in the {split} split")
    return min(counts, key=lambda caption: (-counts[caption], caption))


def reference_rows(dataset_dir: str | Path, split: str = "test") -> dict[str, dict[str, float]]:
    """Scores x 100 (TABLE_METRICS, rounded to 2 decimals) of both rows on ``split``."""
    dataset = Dataset.load(dataset_dir)
    references = dataset.captions_by_video(split)
    held_out_refs: dict[str, list[str]] = {}
    held_out: dict[str, str] = {}
    for video, captions in references.items():
        if len(captions) < 2:
            continue  # nothing to score it against
        for index, caption in enumerate(captions):
            key = f"{video}#{index}"
            held_out_refs[key] = captions[:index] + captions[index + 1 :]
            held_out[key] = caption
    if not held_out:
        raise MetricsError(f"{dataset_dir}: no {split} video has two captions to leave one out")
    constant = most_common_caption(dataset)
    rows = {
        "leave_one_out": (held_out, held_out_refs),
        "most_common_caption": (dict.fromkeys(references, constant), references),
    }
    scores = {}
    for name, (predictions, refs) in rows.items():
        corpus = score_captions(predictions, refs).corpus
        scores[name] = {metric: round(float(corpus[metric]), 2) for metric in TABLE_METRICS}
    return scores
