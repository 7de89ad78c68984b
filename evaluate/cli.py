"""Commands: ``evaluate-captioner``, ``score-captions``, ``caption-video``, ``report``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from astar.evaluate.report import markdown_table
from astar.pipelines.metrics import TABLE_METRICS
from astar.store.location import local_only, store_argument


def _user_errors() -> tuple[type[Exception], ...]:
    from astar.evaluate.evaluation import EvaluationError
    from astar.evaluate.inference import InferenceError
    from astar.evaluate.report import ReportError
    from astar.pipelines.datasets import DatasetError
    from astar.pipelines.metrics import MetricsError
    from astar.store import StoreError
    from astar.train.checkpoint import CheckpointError

    return (
        EvaluationError, InferenceError, ReportError, MetricsError, DatasetError, StoreError,
        CheckpointError,
    )  # fmt: skip


def _say(line: str) -> None:
    click.echo(line, err=True)


@click.command("evaluate-captioner", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--store",
    required=True,
    type=store_argument(exists=True),
    help="Feature store: a directory or an fsspec URL (s3://bucket/store).",
)
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--split", default="test", show_default=True)
@click.option("--beam", default=5, show_default=True, help="Beam size; 1 = greedy.")
@click.option("--max-length", default=30, show_default=True)
@click.option("--length-penalty", default=0.0, show_default=True)
@click.option("--batch-videos", default=32, show_default=True)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), callback=local_only
)
@click.option("--name", default=None, help="Row name in the table (default: the variant).")
@click.option(
    "--figures", default=0, show_default=True, help="Attention pictures of the first N videos."
)
@click.option(
    "--allow-missing", is_flag=True, help="Score videos without features as missing, counted."
)
@click.option("--device", default=None)
@click.option(
    "--on-corrupt",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="A video whose stored data fails its checksum: stop with an error naming it, or "
    "skip it (scored over the rest; listed in metrics.json and counted).",
)
@click.option("--quiet", "-q", is_flag=True)
def evaluate_captioner(
    checkpoint: Path, store: Path, dataset: Path, split: str, beam: int, max_length: int,
    length_penalty: float, batch_videos: int, out: Path, name: str | None, figures: int,
    allow_missing: bool, device: str | None, on_corrupt: str, quiet: bool,
) -> None:  # fmt: skip
    """Caption a dataset split from its stored features and score it (x 100)."""
    from astar.evaluate.evaluation import EvaluationConfig, evaluate_checkpoint

    config = EvaluationConfig(
        checkpoint=checkpoint, store=store, dataset=dataset, out=out, split=split, beam=beam,
        max_length=max_length, length_penalty=length_penalty, batch_videos=batch_videos,
        name=name, figures=figures, allow_missing=allow_missing, device=device,
        on_corrupt=on_corrupt, progress=not quiet,
    )  # fmt: skip
    try:
        row = evaluate_checkpoint(config, say=_say)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    click.echo(markdown_table([row]), nl=False)


@click.command("score-captions", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--split", default="test", show_default=True)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Metrics JSON to write."
)
@click.option("--allow-missing", is_flag=True)
@click.option("--name", default=None)
def score_captions_command(
    predictions: Path, dataset: Path, split: str, out: Path | None, allow_missing: bool,
    name: str | None,
) -> None:  # fmt: skip
    """Score any system's PREDICTIONS (JSON {video id: caption}) against a dataset split."""
    from astar.evaluate.evaluation import split_references, write_json
    from astar.pipelines.datasets import Dataset
    from astar.pipelines.metrics import score_captions

    try:
        loaded = json.loads(predictions.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{predictions}: not a JSON file: {error}") from error
    if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
        raise click.ClickException(f"{predictions}: expected a JSON object {{video id: caption}}")
    try:
        scores = score_captions(
            loaded, split_references(Dataset.load(dataset), split), allow_missing=allow_missing
        )
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    row = {"name": name or predictions.stem, **{m: scores.corpus[m] for m in TABLE_METRICS}}
    if out:
        write_json(out, {"name": row["name"], "split": split, **scores.corpus,
                         "n_videos": scores.n_videos, "n_missing": scores.n_missing})  # fmt: skip
    click.echo(markdown_table([row]), nl=False)


@click.command("caption-video", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The C3D weights the training features were extracted with, if any.",
)
@click.option("--beam", default=5, show_default=True)
@click.option("--max-length", default=30, show_default=True)
@click.option("--device", default=None)
@click.option(
    "--figures",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write an attention picture per video into this folder.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per video.")
def caption_video(
    videos: tuple[Path, ...], checkpoint: Path, weights: Path | None, beam: int, max_length: int,
    device: str | None, figures: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """Caption raw VIDEOS with a trained checkpoint, extracting features as its training did."""
    from astar.evaluate.inference import extract_like_training, features_to_batch, load_trained

    try:
        trained = load_trained(checkpoint, device)
        done, failed = extract_like_training(trained, videos, weights, device)
    except (*_user_errors(), OSError) as error:
        raise click.ClickException(str(error)) from error
    if done:
        batch = features_to_batch([f for _, (_, f) in done], [len(d.frames) for _, (d, _) in done])
        decoded = trained.decode(batch, beam, max_length)
        for (path, (video, _)), caption in zip(done, decoded, strict=True):
            text = trained.vocabulary.decode(caption.tokens)
            if as_json:
                click.echo(json.dumps({"video": str(path), "caption": text,
                                       "log_prob": caption.log_prob}))  # fmt: skip
            else:
                click.echo(f"{path}: {text}")
            if figures and trained.model.config.attended_layers:
                from astar.evaluate.figures import attention_figure, caption_words

                figures.mkdir(parents=True, exist_ok=True)
                words = caption_words(text, caption)
                attention_figure(video.frames, words, caption,
                                 trained.model.config.attended_layers,
                                 figures / f"{path.stem}.png")  # fmt: skip
    for path, error in failed:
        kind = getattr(error, "kind", "error")
        if as_json:
            click.echo(json.dumps({"video": str(path), "error": kind, "reason": str(error)}))
        else:
            click.echo(f"{path}: cannot caption ({kind}): {error}", err=True)
    if failed:
        raise SystemExit(1)


@click.command("score-references", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--split", default="test", show_default=True)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="JSON to write."
)
def score_references(dataset: Path, split: str, out: Path) -> None:
    """The reference rows of a dataset split (x 100): its own captions scored leave-one-out
    against the others (the human-agreement ceiling) and the most common training caption
    given to every video (what a model that ignores the video can reach)."""
    from astar.evaluate.evaluation import write_json
    from astar.evaluate.references import reference_rows

    try:
        rows = reference_rows(dataset, split)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    write_json(out, rows)
    table = [{"name": name.replace("_", " "), **values} for name, values in rows.items()]
    click.echo(markdown_table(table), nl=False)


@click.command("report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--reference",
    "references",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON of extra rows {name: {metric: value}} (e.g. the demo's reference rows).",
)
@click.option(
    "--variants",
    multiple=True,
    help="Rows of a folder of evaluations: its sub-folders of these names, in this order "
    "(repeatable; default: every sub-folder with metrics.json, in the paper's order).",
)
@click.option(
    "--seeds",
    multiple=True,
    type=int,
    help="The runs of each variant of a folder of evaluations: its VARIANT/seedS sub-folders "
    "(repeatable; default: every seedS sub-folder, or VARIANT itself if it holds metrics.json).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write report.md and report.json here.",
)
def report(
    runs: tuple[Path, ...], references: tuple[Path, ...], variants: tuple[str, ...],
    seeds: tuple[int, ...], out: Path | None,
) -> None:  # fmt: skip
    """The paper-style table of evaluated RUNS: evaluation folders (with metrics.json), metrics
    files, or folders of evaluation folders (one row per sub-folder, see --variants, each the
    mean ± standard deviation over its seedS sub-folders, see --seeds). A model at or below the
    most common caption's CIDEr-D (a --reference row) is flagged, with a warning: it learned
    nothing. The exit status stays 0."""
    from astar.evaluate.evaluation import write_json
    from astar.evaluate.report import ReportError, report_from_files

    try:
        table = report_from_files(runs, references, variants, seeds)
    except ReportError as error:
        raise click.ClickException(str(error)) from error
    text = table.to_markdown()
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        write_json(out / "report.json", table.to_json())
    click.echo(text, nl=False)
    for warning in table.warnings():
        click.echo(warning, err=True)
