"""``train-captioner --store STORE --dataset DIR --variant soft --out RUN``.

Data-parallel: ``torchrun --nproc-per-node N -m astar.train.cli --store ...`` (gloo on CPU,
nccl on GPU); the global batch is ``videos_per_batch x captions_per_video x N`` captions.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from astar.store.files import no_space_report
from astar.store.location import local_only, store_argument
from astar.train.loop import TrainConfig, TrainingError
from astar.train.model import VARIANTS, CaptionerConfig
from astar.train.params import FieldType, read_params, read_section


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--store",
    required=True,
    type=store_argument(exists=True),
    help="Feature store: a directory or an fsspec URL (s3://bucket/store).",
)
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    callback=local_only,
    help="Run directory (a local or mounted path).",
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
    from astar.pipelines.datasets import DatasetError
    from astar.pipelines.vocab import VocabularyError
    from astar.store import StoreError
    from astar.train.checkpoint import CheckpointError
    from astar.train.run import DERIVED_MODEL_FIELDS, RunConfig, train_captioner
    from astar.train.wordvec import WordVectorsError

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    values = read_params(params)
    train_values = read_section(values, "train", TrainConfig, params)
    model_values = read_section(values, "model", CaptionerConfig, params)
    for derived in DERIVED_MODEL_FIELDS:
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
    if word_vectors != "none" and not Path(word_vectors).is_file():
        raise click.BadParameter(f"{word_vectors}: no such file", param_hint="--word-vectors")
    start = "resume-or-restart" if resume_or_restart else "resume" if resume else "new"
    try:
        config = RunConfig(
            store=store,
            dataset=dataset,
            out=out,
            variant=variant,
            preset=preset,
            train=TrainConfig(**train_values),
            model=model_values,
            word_vectors=None if word_vectors == "none" else Path(word_vectors),
            start=start,
        )
        result = train_captioner(config, say=lambda line: click.echo(line, err=True))
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
    if result.rank == 0:
        _print_summary(out, result.state, config.train)


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
