"""One training run, as one function a notebook or the CLI calls: ``train_captioner(RunConfig)``.

It opens the store and the dataset, sizes the captioner from them, builds the validator, takes
the run directory (``OUT/run.lock``), decides between a fresh start and a resume, writes
``OUT/config.json`` and trains. ``train-captioner`` only parses flags and ``params.yaml`` into a
:class:`RunConfig`, calls this, and prints the summary::

    from astar.train import run
    result = run.train_captioner(run.RunConfig(store="out/demo/features",
                                               dataset="out/demo/dataset", out="runs/soft"))
    result.state.best_score

Under ``torchrun`` every rank calls it; rank 0 alone holds OUT and writes to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from astar.store.location import StorePath, store_path
from astar.train.loop import TrainConfig, TrainingError, TrainState, init_distributed
from astar.train.model import VARIANTS, Captioner, CaptionerConfig
from astar.train.params import VALIDATION_METRICS

log = logging.getLogger(__name__)

PRESETS = ("paper", "small")
START = ("new", "resume", "resume-or-restart")
# CaptionerConfig fields that come from the store, the dataset and the variant, never from params.
DERIVED_MODEL_FIELDS = ("vocab_size", "variant", "layer_channels", "fc_dim")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; paths are the caller's, nothing is read from globals."""

    store: StorePath  # the feature store (extract-features --out): a directory or fsspec URL
    dataset: Path  # the prepared dataset directory (prepare-dataset --out)
    out: Path  # the run directory: checkpoints, config.json, metrics, curves
    variant: str = "soft"  # one of VARIANTS: fc7, pool2..pool5, soft, hard
    preset: Literal["paper", "small"] = "paper"  # model sizes: the paper's, or CPU-sized
    train: TrainConfig = field(default_factory=TrainConfig)
    model: dict[str, Any] = field(default_factory=dict)  # CaptionerConfig fields to override
    word_vectors: Path | None = None  # word2vec/GloVe file initialising the embedding
    # "new": refuse an OUT that holds a run; "resume": continue OUT/last.pt exactly;
    # "resume-or-restart": resume an unfinished run of the same settings, else start afresh
    start: Literal["new", "resume", "resume-or-restart"] = "new"

    def __post_init__(self) -> None:
        for name in ("dataset", "out"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "store", store_path(self.store))
        if self.word_vectors is not None:
            object.__setattr__(self, "word_vectors", Path(self.word_vectors))
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.preset not in PRESETS:
            problems.append(f"preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if self.start not in START:
            problems.append(f"start {self.start!r} is not one of {', '.join(START)}")
        derived = [name for name in DERIVED_MODEL_FIELDS if name in self.model]
        if derived:
            problems.append(
                f"model.{derived[0]} comes from the store/dataset/--variant, not the settings"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RunResult:
    """What a run ended with, on this rank."""

    state: TrainState  # steps, epochs, best score, history, skipped and corrupt counts
    rank: int  # 0 on a single process; the process that printed and wrote OUT
    model_config: CaptionerConfig


def build_model_config(
    preset: str,
    variant: str,
    vocab_size: int,
    channels: dict[str, int],
    fc_dim: int,
    overrides: dict,
) -> CaptionerConfig:
    """The captioner's config: the preset's sizes, the store's layers, then ``overrides``."""
    if preset == "small":
        return CaptionerConfig.small(
            vocab_size, variant, layer_channels=channels, fc_dim=fc_dim, **overrides
        )
    return CaptionerConfig(
        vocab_size=vocab_size, variant=variant, layer_channels=channels, fc_dim=fc_dim, **overrides
    )


def make_validator(
    store,
    references: dict[str, list[str]],
    vocabulary,
    max_length: int,
    batch_videos: int = 32,
    on_corrupt="error",
    split: str = "val",
):
    """Greedy-decode the videos of ``references`` (the ``split``) and score them (BLEU, ROUGE-L,
    CIDEr-D; METEOR is left to evaluation because its Java start-up costs more than a small
    validation set).

    With ``on_corrupt="skip"``, videos whose stored data is damaged are left out of the score
    and counted in the record (``corrupt_videos``)."""
    from astar.pipelines.metrics import score_captions
    from astar.train.data import FeatureSource, collate_features
    from astar.train.decoding import greedy_decode

    ids = sorted(vid for vid in references if vid in store)
    if not ids:
        raise TrainingError(f"no {split} video of the dataset has features in {store.path}")

    def validate(model: Captioner) -> dict[str, float]:
        device = next(model.parameters()).device
        source = FeatureSource(store, model.config.attended_layers, on_corrupt=on_corrupt)
        predictions = {}
        for start in range(0, len(ids), batch_videos):
            wanted = ids[start : start + batch_videos]
            readable = [
                (v, r) for v, r in zip(wanted, source.read(wanted), strict=True) if r is not None
            ]
            if not readable:  # every one skipped as corrupt
                continue
            chunk = [vid for vid, _ in readable]
            records = [record for _, record in readable]
            features = collate_features(records, source.layers).to(device)
            for vid, decoded in zip(chunk, greedy_decode(model, features, max_length), strict=True):
                predictions[vid] = vocabulary.decode(decoded.tokens)
        scored = [vid for vid in ids if vid in predictions]
        if not scored:
            raise TrainingError(f"every {split} video's stored data is corrupt in {store.path}")
        scores = score_captions(
            predictions,
            {vid: references[vid] for vid in scored},
            metrics=("BLEU", "ROUGE_L", "CIDEr"),
        )
        kept = {k: v for k, v in scores.corpus.items() if k in VALIDATION_METRICS}
        # A model that ends every caption at once scores ~0 everywhere: say so in the record.
        return {
            **kept,
            "n_videos": len(scored),
            "empty_captions": len(scores.empty_predictions),
            "corrupt_videos": len(ids) - len(scored),
        }

    return validate


def train_captioner(config: RunConfig, say: Callable[[str], None] = log.warning) -> RunResult:
    """Train one captioner as ``config`` says; ``say`` receives the progress lines a user reads
    (word vectors found, device and precision, a restart and why).

    Raises TrainingError (and the store's, dataset's, vocabulary's, checkpoint's and word
    vectors' own errors) for what the user can fix; nothing is written before the inputs have
    been checked.
    """
    from astar.pipelines.datasets import Dataset
    from astar.store import FeatureStore
    from astar.train.loop import CaptionData, Trainer, run_directory, store_layers

    distributed = init_distributed()
    try:
        feature_store = FeatureStore.open(config.store)
        data_set = Dataset.load(config.dataset)
        channels, fc_dim = store_layers(feature_store)
        model_config = build_model_config(
            config.preset,
            config.variant,
            len(data_set.vocabulary),
            channels,
            fc_dim,
            config.model,
        )
        vectors = None
        if config.word_vectors is not None:
            from astar.train.wordvec import load_word_vectors

            loaded = load_word_vectors(
                config.word_vectors, data_set.vocabulary, dim=model_config.embed_dim
            )
            say(loaded.describe())
            vectors = torch.as_tensor(loaded.matrix)
        data = CaptionData(
            vocabulary=data_set.vocabulary.to_dict(), train=data_set.encoded_captions("train")
        )
        settings = config.train
        references = data_set.captions_by_video("val")
        validate = (
            make_validator(
                feature_store,
                references,
                data_set.vocabulary,
                settings.max_length,
                on_corrupt=settings.on_corrupt,
            )
            if references
            else None
        )
        trainer = Trainer(
            feature_store, data, model_config, settings, config.out, vectors, validate
        )
        # Rank 0 holds OUT for the run: a second run there is refused before it touches anything.
        held = run_directory(config.out) if trainer.rank == 0 else contextlib.nullcontext()
        with held:
            _start(trainer, config.start, say)
            if trainer.rank == 0:
                _write_config(trainer, model_config, config)
                say(
                    f"{config.out}: training {model_config.variant} on {trainer.device} in "
                    f"{trainer.precision} (precision {settings.precision})"
                )
            state = trainer.run()
        return RunResult(state=state, rank=trainer.rank, model_config=model_config)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def _start(trainer, start: str, say: Callable[[str], None]) -> None:
    """Resume or start afresh in the held run directory, as ``start`` says."""
    from astar.train.loop import clear_run

    out = trainer.out
    checkpoint = out / "last.pt"
    if start == "resume-or-restart":
        reason = trainer.resume_if_unfinished(checkpoint) if checkpoint.exists() else ""
        resumed = checkpoint.exists() and not reason
        if not resumed and trainer.rank == 0:
            if reason:
                say(f"{out}: {reason}: training again from scratch")
            clear_run(out)  # also the logs of a run killed before its first checkpoint
        if trainer.world_size > 1:
            torch.distributed.barrier()  # nobody reads OUT while rank 0 clears it
    elif start == "resume":
        if not checkpoint.exists():
            raise TrainingError(
                f"--resume: {out} holds no checkpoint (last.pt) to continue; run without "
                "--resume to start afresh"
            )
        trainer.resume(checkpoint)
    elif checkpoint.exists():
        raise TrainingError(
            f"{out} already holds a run (last.pt): pass --resume to continue it, or choose "
            "another --out"
        )
    out.mkdir(parents=True, exist_ok=True)


def _write_config(trainer, model_config: CaptionerConfig, config: RunConfig) -> None:
    """OUT/config.json: the settings of the run and what ``auto`` resolved to on this machine."""
    recorded = {
        "model": model_config.to_dict(),
        "train": config.train.to_dict(),
        "store": str(config.store),
        "dataset": str(config.dataset),
        "world_size": trainer.world_size,
        "precision_used": trainer.precision,  # what "auto" resolved to here
        "device": str(trainer.device),
    }
    (trainer.out / "config.json").write_text(json.dumps(recorded, indent=2, default=str) + "\n")


__all__ = [
    "DERIVED_MODEL_FIELDS",
    "PRESETS",
    "RunConfig",
    "RunResult",
    "build_model_config",
    "make_validator",
    "train_captioner",
]
