"""``train-captioner --store STORE --dataset DIR --variant soft --out RUN``.

Data-parallel: ``torchrun --nproc-per-node N -m astar.train.cli --store ...`` (gloo on CPU,
nccl on GPU); the global batch is ``videos_per_batch x captions_per_video x N`` captions.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import click
import torch

from astar.store.files import no_space_report
from astar.train.loop import TrainConfig, TrainingError, init_distributed
from astar.train.model import VARIANTS, Captioner, CaptionerConfig
from astar.train.params import VALIDATION_METRICS, FieldType, read_params, read_section

log = logging.getLogger(__name__)


def build_model_config(
    preset: str,
    variant: str,
    vocab_size: int,
    channels: dict[str, int],
    fc_dim: int,
    overrides: dict,
) -> CaptionerConfig:
    if preset == "small":
        return CaptionerConfig.small(
            vocab_size, variant, layer_channels=channels, fc_dim=fc_dim, **overrides
        )
    return CaptionerConfig(
        vocab_size=vocab_size, variant=variant, layer_channels=channels, fc_dim=fc_dim, **overrides
    )


def make_validator(
    store, dataset, split: str, max_length: int, batch_videos: int = 32, on_corrupt="error"
):
    """Greedy-decode ``split`` and score it (BLEU, ROUGE-L, CIDEr-D; METEOR is left to evaluation
    because its Java start-up costs more than a small validation set).

    With ``on_corrupt="skip"``, videos whose stored data is damaged are left out of the score
    and counted in the record (``corrupt_videos``)."""
    from astar.evaluate.decoding import greedy_decode
    from astar.evaluate.metrics import score_captions
    from astar.train.data import FeatureSource, collate_features

    references = dataset.captions_by_video(split)
    ids = sorted(vid for vid in references if vid in store)
    if not ids:
        raise TrainingError(f"no {split} video of the dataset has features in {store.path}")
    vocabulary = dataset.vocabulary

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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory."
)
@click.option("--variant", type=click.Choice(VARIANTS), default="soft", show_default=True)
@click.option(
    "--params",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML with 'train' (TrainConfig) and 'model' (CaptionerConfig) sections.",
)
@click.option(
    "--preset",
    type=click.Choice(["paper", "small"]),
    default="paper",
    show_default=True,
    help="Model sizes: the paper's, or small for CPU demos.",
)
@click.option(
    "--word-vectors",
    default="none",
    show_default=True,
    help="word2vec binary/text or GloVe file to initialise the embedding, or 'none'.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt exactly where it stopped.")
@click.option(
    "--resume-or-restart",
    is_flag=True,
    help="For pipelines that rerun a step only when something changed (dvc repro): resume a "
    "run OUT left unfinished with the same settings and data, otherwise start OUT afresh.",
)
@click.option(
    "--device",
    type=FieldType(TrainConfig, "device"),
    default=None,
    help="cpu or cuda[:N]; default: cuda when available.",
)
@click.option("--precision", type=click.Choice(["fp32", "bf16", "auto"]), default=None)
@click.option("--epochs", "max_epochs", type=FieldType(TrainConfig, "max_epochs"), default=None)
@click.option("--max-steps", type=FieldType(TrainConfig, "max_steps"), default=None)
@click.option("--seed", type=FieldType(TrainConfig, "seed"), default=None)
@click.option(
    "--on-corrupt",
    type=click.Choice(["error", "skip"]),
    default=None,
    help="A video whose stored data fails its checksum: stop with an error naming it "
    "(default), or skip it and list it in the summary.",
)
@click.option("--verbose", "-v", is_flag=True)
def main(
    store: Path,
    dataset: Path,
    out: Path,
    variant: str,
    params: Path | None,
    preset: str,
    word_vectors: str,
    resume: bool,
    resume_or_restart: bool,
    device: str | None,
    precision: str | None,
    max_epochs: int | None,
    max_steps: int | None,
    seed: int | None,
    on_corrupt: str | None,
    verbose: bool,
) -> None:
    """Train the ASTAR captioner (or a baseline variant) on features from STORE."""
    from astar.pipelines.datasets import Dataset, DatasetError
    from astar.store import FeatureStore, StoreError
    from astar.train.checkpoint import CheckpointError
    from astar.train.loop import CaptionData, Trainer, run_directory, store_layers
    from astar.train.vocab import VocabularyError
    from astar.train.wordvec import WordVectorsError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    values = read_params(params)
    train_values = read_section(values, "train", TrainConfig, params)
    model_values = read_section(values, "model", CaptionerConfig, params)
    for derived in ("vocab_size", "variant", "layer_channels", "fc_dim"):
        if derived in model_values:
            raise click.ClickException(
                f"{params}: model.{derived} comes from the store/dataset/--variant"
            )
    flags = {
        "device": device,
        "precision": precision,
        "max_epochs": max_epochs,
        "max_steps": max_steps,
        "seed": seed,
        "on_corrupt": on_corrupt,
    }
    train_values.update({k: v for k, v in flags.items() if v is not None})
    distributed = init_distributed()
    try:
        config = TrainConfig(**train_values)
        feature_store = FeatureStore.open(store)
        data_set = Dataset.load(dataset)
        channels, fc_dim = store_layers(feature_store)
        model_config = build_model_config(
            preset, variant, len(data_set.vocabulary), channels, fc_dim, model_values
        )
        vectors = None
        if word_vectors != "none":
            from astar.train.wordvec import load_word_vectors

            if not Path(word_vectors).is_file():
                raise click.BadParameter(
                    f"{word_vectors}: no such file", param_hint="--word-vectors"
                )
            loaded = load_word_vectors(
                Path(word_vectors), data_set.vocabulary, dim=model_config.embed_dim
            )
            click.echo(loaded.describe(), err=True)
            vectors = torch.as_tensor(loaded.matrix)
        train = data_set.encoded_captions("train")
        data = CaptionData(
            vocabulary=data_set.vocabulary.to_dict(),
            train=train,
            val_references=data_set.captions_by_video("val"),
            decode=data_set.vocabulary.decode,
        )
        validate = (
            make_validator(
                feature_store, data_set, "val", config.max_length, on_corrupt=config.on_corrupt
            )
            if data.val_references
            else None
        )
        trainer = Trainer(feature_store, data, model_config, config, out, vectors, validate)
        # Rank 0 holds OUT for the run: a second run there is refused before it touches anything.
        held = run_directory(out) if trainer.rank == 0 else contextlib.nullcontext(out)
        state = _run(trainer, held, model_config, config, store, dataset, resume, resume_or_restart)
    except (
        TrainingError, CheckpointError, StoreError, DatasetError, VocabularyError,
        WordVectorsError, ValueError,
    ) as error:  # fmt: skip
        raise click.ClickException(str(error)) from error
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted: {out}/last.pt holds the last checkpoint (if one was written); "
            "rerun with --resume to continue exactly from it",
            err=True,
        )
        raise SystemExit(130) from None
    except Exception as error:  # a full disk surfaces from torch.save, the logs, ...
        message = no_space_report(
            error,
            out,
            f"Checkpoints are written whole or not at all, so {out}/last.pt (if any) is intact: "
            "free some space and rerun with --resume.",
        )
        if message is None:
            raise
        raise click.ClickException(message) from error
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if trainer.rank == 0:
        _print_summary(out, state, config)


def _run(trainer, held, model_config, config, store, dataset, resume, resume_or_restart):
    """Resume or start the run in its held directory, write config.json, train."""
    from astar.train.loop import clear_run

    out = trainer.out
    with held:
        if resume_or_restart:
            checkpoint = out / "last.pt"
            reason = trainer.resume_if_unfinished(checkpoint) if checkpoint.exists() else ""
            resumed = checkpoint.exists() and not reason
            if not resumed and trainer.rank == 0:
                if reason:
                    click.echo(f"{out}: {reason}: training again from scratch", err=True)
                clear_run(out)  # also the logs of a run killed before its first checkpoint
            if trainer.world_size > 1:
                torch.distributed.barrier()  # nobody reads OUT while rank 0 clears it
        elif resume:
            if not (out / "last.pt").exists():
                raise click.ClickException(
                    f"--resume: {out} holds no checkpoint (last.pt) to continue; run without "
                    "--resume to start afresh"
                )
            trainer.resume(out / "last.pt")
        elif (out / "last.pt").exists():
            raise click.ClickException(
                f"{out} already holds a run (last.pt): pass --resume to continue it, or choose "
                "another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        if trainer.rank == 0:
            (out / "config.json").write_text(
                json.dumps(
                    {
                        "model": model_config.to_dict(),
                        "train": config.to_dict(),
                        "store": str(store),
                        "dataset": str(dataset),
                        "world_size": trainer.world_size,
                        "precision_used": trainer.precision,  # what "auto" resolved to here
                        "device": str(trainer.device),
                    },
                    indent=2,
                    default=str,
                )
                + "\n"
            )
        if trainer.rank == 0:
            click.echo(
                f"{out}: training {model_config.variant} on {trainer.device} in "
                f"{trainer.precision} (precision {config.precision})",
                err=True,
            )
        state = trainer.run()
    return state


def _print_summary(out: Path, state, config) -> None:
    click.echo(
        f"{out}: stopped ({state.stopped}) after {state.step} steps, epoch {state.epoch}; "
        f"best {config.metric} {state.best_score:.2f} at epoch {state.best_epoch}; "
        f"{state.skipped_steps} step(s) skipped as non-finite"
    )
    if state.corrupt_videos:
        shown = "\n  ".join(f"{vid}: {why}" for vid, why in sorted(state.corrupt_videos.items()))
        click.echo(
            f"warning: {len(state.corrupt_videos)} training video(s) skipped as corrupt "
            f"(--on-corrupt skip):\n  {shown}",
            err=True,
        )
    corrupt_val = max((r.get("corrupt_videos", 0) for r in state.history), default=0)
    if corrupt_val:
        click.echo(
            f"warning: {corrupt_val} validation video(s) skipped as corrupt; validation scores "
            "are over the rest",
            err=True,
        )
    empty = state.empty_validations()
    if empty:
        click.echo(
            f"warning: {empty} of {len(state.history)} validation(s) gave every video an "
            "empty caption",
            err=True,
        )


if __name__ == "__main__":
    main()
