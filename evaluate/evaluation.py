"""Evaluating one checkpoint on a dataset split, as one library call: ``evaluate_checkpoint``.

It captions the split from its stored features, scores the captions (BLEU-4, METEOR, ROUGE-L,
CIDEr-D, x 100) and writes, into the evaluation folder::

    predictions.json   {video id: caption}
    metrics.json       the corpus scores, the settings, missing and corrupt videos
    per_video.json     every video's scores
    metrics.md         the table row
    figures/           attention pictures of the first N videos (when asked)

``evaluate-captioner`` parses its flags into an :class:`EvaluationConfig`, calls this and prints
the row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from astar.evaluate.report import markdown_table
from astar.pipelines.metrics import TABLE_METRICS
from astar.store.location import StorePath, store_path

log = logging.getLogger(__name__)


class EvaluationError(Exception):
    """The split cannot be evaluated as asked (no captions, videos without features, ...)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """One evaluation: which checkpoint on which split, decoded how, written where."""

    checkpoint: Path  # a train-captioner checkpoint (best.pt or last.pt)
    store: StorePath  # the feature store of the dataset's videos: a directory or fsspec URL
    dataset: Path  # the prepared dataset directory: references of ``split``
    out: Path  # the evaluation folder
    split: str = "test"
    beam: int = 5  # beam size; 1 = greedy
    max_length: int = 30  # words per caption at most
    length_penalty: float = 0.0
    batch_videos: int = 32  # videos decoded together
    name: str | None = None  # row name in the table; default the variant
    figures: int = 0  # attention pictures of the first N videos
    allow_missing: bool = False  # score videos without features as missing (counted)
    device: str | None = None  # default: cuda when available
    on_corrupt: Literal["error", "skip"] = "error"  # a video failing its checksum
    progress: bool = True  # show a progress bar while decoding

    def __post_init__(self) -> None:
        for name in ("checkpoint", "dataset", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "store", store_path(self.store))


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON, written whole or not at all."""
    from astar.store.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def split_references(dataset, split: str) -> dict[str, list[str]]:
    """The reference captions of ``split`` of a Dataset, by video; an empty split is an error."""
    references = dataset.captions_by_video(split)
    if not references:
        raise EvaluationError(f"{dataset.root}: the {split} split has no captions")
    return references


def evaluate_checkpoint(config: EvaluationConfig, say: Callable[[str], None] = log.warning) -> dict:
    """Caption and score ``config.split``; returns the table row {"name", TABLE_METRICS}.

    ``say`` receives the warnings a user reads (videos skipped as corrupt, videos without a
    picture). Nothing is written before the captions are scored.
    """
    from astar.evaluate.inference import caption_store, load_trained
    from astar.pipelines.datasets import Dataset
    from astar.pipelines.metrics import check_java, score_captions
    from astar.store import FeatureStore

    check_java()
    trained = load_trained(config.checkpoint, config.device)
    dataset = Dataset.load(config.dataset)
    references = split_references(dataset, config.split)
    features = FeatureStore.open(config.store)
    without = sorted(v for v in references if v not in features)
    if without and not config.allow_missing:
        raise EvaluationError(
            f"{len(without)} {config.split} video(s) have no features in {config.store} "
            f"(e.g. {', '.join(without[:5])}); pass --allow-missing to count them as missing"
        )
    ids = sorted(v for v in references if v in features)
    corrupt: dict[str, str] = {}
    decoded = caption_store(
        trained, features, ids, config.beam, config.max_length, config.length_penalty,
        config.batch_videos, config.progress, on_corrupt=config.on_corrupt, corrupt=corrupt,
    )  # fmt: skip
    predictions = {vid: trained.vocabulary.decode(d.tokens) for vid, d in decoded.items()}
    if corrupt:  # skipped, said loudly, and recorded with the scores
        ids = [vid for vid in ids if vid not in corrupt]
        references = {vid: refs for vid, refs in references.items() if vid not in corrupt}
        say(
            f"warning: {len(corrupt)} {config.split} video(s) skipped as corrupt (--on-corrupt "
            f"skip); the scores are over the other {len(references)}:\n  "
            + "\n  ".join(f"{vid}: {why}" for vid, why in sorted(corrupt.items()))
        )
    if not references:
        raise EvaluationError(f"no {config.split} video is left to score")
    scores = score_captions(predictions, references, allow_missing=config.allow_missing)
    row = {"name": config.name or trained.variant, **{m: scores.corpus[m] for m in TABLE_METRICS}}
    seed = trained.payload.get("train_config", {}).get("seed")  # the report groups by it
    out = config.out
    write_json(out / "predictions.json", predictions)
    write_json(
        out / "metrics.json",
        {
            "name": row["name"], "variant": trained.variant, "split": config.split,
            "beam": config.beam, "max_length": config.max_length,
            "length_penalty": config.length_penalty, "checkpoint": str(config.checkpoint),
            "seed": seed, **scores.corpus, "n_videos": scores.n_videos,
            "n_missing": scores.n_missing, "missing": list(scores.missing),
            "n_corrupt": len(corrupt), "corrupt": dict(sorted(corrupt.items())),
        },
    )  # fmt: skip
    write_json(out / "per_video.json", scores.per_video)
    (out / "metrics.md").write_text(markdown_table([row]))
    if config.figures:
        from astar.evaluate.figures import split_figures

        paths = dataset.videos.set_index("id")["path"].to_dict()
        shown = {vid: decoded[vid] for vid in ids[: config.figures]}
        split_figures(trained, paths, shown, out / "figures", say)
    return row


__all__ = [
    "EvaluationConfig",
    "EvaluationError",
    "evaluate_checkpoint",
    "split_references",
    "write_json",
]
