"""Commands: ``evaluate-captioner``, ``score-captions``, ``caption-video``, ``report``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import click

from astar.evaluate.report import TABLE_HEADER
from astar.pipelines.metrics import TABLE_METRICS


def _user_errors() -> tuple[type[Exception], ...]:
    from astar.evaluate.inference import InferenceError
    from astar.pipelines.datasets import DatasetError
    from astar.pipelines.metrics import MetricsError
    from astar.store import StoreError
    from astar.train.checkpoint import CheckpointError

    return InferenceError, MetricsError, DatasetError, StoreError, CheckpointError


def _write_json(path: Path, data) -> None:
    from astar.store.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def markdown_table(rows: list[dict]) -> str:
    """Rows of {"name", and the TABLE_METRICS} -> the paper-style Markdown table."""
    lines = ["| model | " + " | ".join(TABLE_HEADER) + " |", "|---" * (len(TABLE_HEADER) + 1) + "|"]
    for row in rows:
        values = [row.get(metric) for metric in TABLE_METRICS]
        cells = [
            "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"
            for v in values
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _references(dataset_dir: Path, split: str) -> dict[str, list[str]]:
    from astar.pipelines.datasets import Dataset

    references = Dataset.load(dataset_dir).captions_by_video(split)
    if not references:
        raise click.ClickException(f"{dataset_dir}: the {split} split has no captions")
    return references


@click.command("evaluate-captioner", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--store", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option("--split", default="test", show_default=True)
@click.option("--beam", default=5, show_default=True, help="Beam size; 1 = greedy.")
@click.option("--max-length", default=30, show_default=True)
@click.option("--length-penalty", default=0.0, show_default=True)
@click.option("--batch-videos", default=32, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
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
    from astar.evaluate.inference import caption_store, load_trained
    from astar.pipelines.metrics import check_java, score_captions
    from astar.store import FeatureStore

    try:
        check_java()
        trained = load_trained(checkpoint, device)
        references = _references(dataset, split)
        features = FeatureStore.open(store)
        without = sorted(v for v in references if v not in features)
        if without and not allow_missing:
            raise click.ClickException(
                f"{len(without)} {split} video(s) have no features in {store} "
                f"(e.g. {', '.join(without[:5])}); pass --allow-missing to count them as missing"
            )
        ids = sorted(v for v in references if v in features)
        corrupt: dict[str, str] = {}
        decoded = caption_store(
            trained, features, ids, beam, max_length, length_penalty, batch_videos, not quiet,
            on_corrupt=on_corrupt, corrupt=corrupt,
        )  # fmt: skip
        predictions = {vid: trained.vocabulary.decode(d.tokens) for vid, d in decoded.items()}
        if corrupt:  # skipped, said loudly, and recorded with the scores
            ids = [vid for vid in ids if vid not in corrupt]
            references = {vid: refs for vid, refs in references.items() if vid not in corrupt}
            click.echo(
                f"warning: {len(corrupt)} {split} video(s) skipped as corrupt (--on-corrupt "
                f"skip); the scores are over the other {len(references)}:\n  "
                + "\n  ".join(f"{vid}: {why}" for vid, why in sorted(corrupt.items())),
                err=True,
            )
        if not references:
            raise click.ClickException(f"no {split} video is left to score")
        scores = score_captions(predictions, references, allow_missing=allow_missing)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    row = {"name": name or trained.variant, **{m: scores.corpus[m] for m in TABLE_METRICS}}
    seed = trained.payload.get("train_config", {}).get("seed")  # the report groups by it
    _write_json(out / "predictions.json", predictions)
    _write_json(
        out / "metrics.json",
        {
            "name": row["name"], "variant": trained.variant, "split": split, "beam": beam,
            "max_length": max_length, "length_penalty": length_penalty,
            "checkpoint": str(checkpoint), "seed": seed,
            **scores.corpus, "n_videos": scores.n_videos,
            "n_missing": scores.n_missing, "missing": list(scores.missing),
            "n_corrupt": len(corrupt), "corrupt": dict(sorted(corrupt.items())),
        },
    )  # fmt: skip
    _write_json(out / "per_video.json", scores.per_video)
    (out / "metrics.md").write_text(markdown_table([row]))
    if figures:
        _figures(trained, store, dataset, ids[:figures], decoded, out / "figures")
    click.echo(markdown_table([row]), nl=False)


def _figures(trained, store: Path, dataset: Path, ids, decoded, folder: Path) -> None:
    """Attention pictures of ``ids``: frames re-decoded from the dataset's video files."""
    from astar.evaluate.figures import attention_figure
    from astar.extract.decode import DecodeConfig, decode_video
    from astar.pipelines.datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    if not trained.model.config.attended_layers:
        note = f"{trained.variant} attends to no location: no attention pictures"
        (folder / "README.txt").write_text(note + "\n")  # the folder exists for every variant
        click.echo(note, err=True)
        return
    videos = Dataset.load(dataset).videos.set_index("id")["path"]
    schema = trained.schema
    config = DecodeConfig(fps=schema.fps, size=schema.size, min_frames=schema.min_frames,
                          max_frames=schema.max_frames)  # fmt: skip
    for vid in ids:
        path = videos.get(vid, "")
        if not path:
            click.echo(f"no video file for {vid}: no attention picture", err=True)
            continue
        caption = decoded[vid]
        words = trained.vocabulary.decode(caption.tokens).split()
        words += ["<eos>"] if caption.finished else []
        frames = decode_video(path, config).frames
        layer_names = trained.model.config.attended_layers
        safe = vid.replace("/", "_")
        attention_figure(frames, words, decoded[vid], layer_names, folder / f"{safe}.png")


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
    from astar.pipelines.metrics import score_captions

    try:
        loaded = json.loads(predictions.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{predictions}: not a JSON file: {error}") from error
    if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
        raise click.ClickException(f"{predictions}: expected a JSON object {{video id: caption}}")
    try:
        scores = score_captions(loaded, _references(dataset, split), allow_missing=allow_missing)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    row = {"name": name or predictions.stem, **{m: scores.corpus[m] for m in TABLE_METRICS}}
    if out:
        _write_json(out, {"name": row["name"], "split": split, **scores.corpus,
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
                from astar.evaluate.figures import attention_figure

                figures.mkdir(parents=True, exist_ok=True)
                words = text.split() + (["<eos>"] if caption.finished else [])
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


SEED_FOLDER = re.compile(r"seed(\d+)")  # VARIANT/seedS: the evaluation of one training seed


def _seed_files(folder: Path, seeds: tuple[int, ...]) -> list[Path]:
    """A variant's evaluations: FOLDER/seedS/metrics.json of ``seeds`` (default: every seedS
    sub-folder), or FOLDER/metrics.json itself where it is one evaluation."""
    if seeds:
        files = [folder / f"seed{seed}" / "metrics.json" for seed in seeds]
        absent = [str(file) for file in files if not file.is_file()]
        if absent:
            raise click.ClickException(f"no evaluation {', '.join(absent)}")
        return files
    if (folder / "metrics.json").exists():
        return [folder / "metrics.json"]
    found = [p for p in folder.glob("seed*/metrics.json") if SEED_FOLDER.fullmatch(p.parent.name)]
    found.sort(key=lambda p: int(p.parent.name[len("seed") :]))
    return found or [folder / "metrics.json"]  # reading it says what is missing


def _metrics_files(
    runs: tuple[Path, ...], variants: tuple[str, ...], seeds: tuple[int, ...] = ()
) -> list[Path]:
    """The metrics.json of each run, a folder of runs expanded into its sub-folders (and those
    into their seedS sub-folders)."""
    from astar.train.model import VARIANTS

    files = []
    for run in runs:
        if not run.is_dir() or (run / "metrics.json").exists():
            files.append(run / "metrics.json" if run.is_dir() else run)
            continue
        if variants:
            names = list(variants)
        else:
            found = {p.parent.name for p in run.glob("*/metrics.json")}
            found |= {p.parent.parent.name for p in run.glob("*/seed*/metrics.json")}
            order = {name: index for index, name in enumerate(VARIANTS)}
            names = sorted(found, key=lambda name: (order.get(name, len(order)), name))
        if not names:
            raise click.ClickException(f"{run}: no metrics.json in it or its sub-folders")
        for name in names:
            files.extend(_seed_files(run / name, seeds))
    return files


def _read_run(path: Path):
    """An evaluation's metrics file as a report Run (its seed: recorded, or from seedS/)."""
    from astar.evaluate.report import Run

    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise click.ClickException(f"{path}: cannot read metrics: {error}") from error
    missing = [m for m in TABLE_METRICS if m not in metrics]
    if missing:
        raise click.ClickException(f"{path}: no {', '.join(missing)} in the metrics")
    folder = SEED_FOLDER.fullmatch(path.parent.name) if path.name == "metrics.json" else None
    seed = metrics.get("seed")
    if seed is None and folder:
        seed = int(folder.group(1))
    evaluation = path.parent.parent if folder else path.parent
    name = metrics.get("name") or (evaluation.name if path.name == "metrics.json" else path.stem)
    return Run(name, seed, {m: metrics[m] for m in TABLE_METRICS}, str(path))


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
    from astar.evaluate.references import reference_rows

    try:
        rows = reference_rows(dataset, split)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    _write_json(out, rows)
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
    from astar.evaluate.report import ReportError, build_report

    evaluations = [_read_run(path) for path in _metrics_files(runs, variants, seeds)]
    rows = []
    for reference in references:
        try:
            extra = json.loads(reference.read_text())
        except (OSError, json.JSONDecodeError) as error:
            message = f"{reference}: cannot read reference rows: {error}"
            raise click.ClickException(message) from error
        rows.extend(extra.items())
    try:
        table = build_report(evaluations, rows)
    except ReportError as error:
        raise click.ClickException(str(error)) from error
    text = table.to_markdown()
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        _write_json(out / "report.json", table.to_json())
    click.echo(text, nl=False)
    for warning in table.warnings():
        click.echo(warning, err=True)
