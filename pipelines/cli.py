"""``prepare-dataset KIND ... --out DIR`` and ``make-demo-dataset --out DIR``.

Thin commands: parse, build the config, call one function of ``astar.pipelines.datasets`` or
``astar.pipelines.demo``, print the summary. Bad input becomes one clear error message. The demo
command only renders the raw folder; ``prepare-dataset folder generic`` prepares it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from astar.pipelines.datasets import (
    FOLDER_KINDS,
    FOLDER_LAYOUTS,
    Annotations,
    Dataset,
    DatasetError,
    PrepareConfig,
    read_folder,
    read_generic,
    read_msrvtt_official,
    read_msrvtt_sentences,
    read_msvd_corpus,
    read_msvd_sents,
    read_mvad,
)
from astar.pipelines.datasets import prepare_dataset as build_dataset
from astar.pipelines.demo import DemoConfig, DemoError
from astar.pipelines.demo import make_demo_dataset as build_demo
from astar.pipelines.vocab import VocabConfig, VocabularyError

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _describe(dataset: Dataset, out: Path) -> str:
    summary = dataset.summary
    lines = [f"{out}: {summary['videos']} videos, {summary['captions']} captions"]
    for split, counts in summary["splits"].items():
        lines.append(
            f"  {split:5s} {counts['videos']:6d} videos ({counts['videos_on_disk']} on disk, "
            f"{counts['videos_with_captions']} with captions), {counts['captions']} captions"
        )
    vocabulary = summary["vocabulary"]
    lines.append(
        f"  vocabulary {vocabulary['size']} tokens ({vocabulary['source']}, min count "
        f"{vocabulary['min_count']}), max length {vocabulary['max_length']} words"
    )
    for key in ("missing_videos", "videos_without_captions", "empty_captions"):
        problem = summary[key]
        if problem["count"]:
            examples = ", ".join(map(str, problem["examples"][:3]))
            lines.append(f"  {key.replace('_', ' ')}: {problem['count']} (e.g. {examples})")
    if summary["videos_dir"] is None:
        lines.append("  no --videos given: video files were not located")
    for key, item in summary["left_out"].items():
        lines.append(f"  left out ({key}): {item['count']}: {item['why']}")
    return "\n".join(lines)


def _prepare_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every ``prepare-dataset`` kind shares, turned into one PrepareConfig."""

    @click.option(
        "--out",
        "-o",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Dataset directory to write.",
    )
    @click.option(
        "--videos",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Directory searched (recursively, any extension) for videos.",
    )
    @click.option(
        "--strict",
        is_flag=True,
        help="Missing videos, videos without captions, empty captions: errors.",
    )
    @click.option(
        "--min-count", default=1, show_default=True, help="Words seen fewer times become <unk>."
    )
    @click.option(
        "--vocab",
        "vocab_source",
        type=click.Choice(["train", "paper"]),
        default="train",
        show_default=True,
        help="Count words of the training split, or of all splits (the paper's vocabulary sizes).",
    )
    @click.option(
        "--max-length",
        type=int,
        default=None,
        help="Words kept per caption; default: the longest caption.",
    )
    @functools.wraps(command)
    def wrapper(
        out: Path,
        videos: Path | None,
        strict: bool,
        min_count: int,
        vocab_source: str,
        max_length: int | None,
        **kwargs: Any,
    ) -> None:
        try:
            annotations = command(**kwargs)
            if isinstance(annotations, tuple):  # a folder: its own videos/ unless --videos
                annotations, found = annotations
                videos = videos or found
            config = PrepareConfig(
                videos_dir=videos,
                strict=strict,
                vocab=VocabConfig(min_count=min_count, source=vocab_source, max_length=max_length),
            )
            dataset = build_dataset(annotations, config)
            dataset.save(out)
        except (DatasetError, VocabularyError) as error:
            raise click.ClickException(str(error)) from error
        click.echo(_describe(dataset, out))

    return wrapper


@click.group(context_settings=_CONTEXT)
def prepare_dataset() -> None:
    """Turn a captioning dataset's annotations into the one normalised form (videos.csv,
    video_files.csv, captions.csv, vocab.json, summary.json) that every later stage reads."""


@prepare_dataset.command(context_settings=_CONTEXT)
@click.option("--mapping", required=True, type=_FILE, help="youtube_mapping.txt (clip -> vidN).")
@click.option("--sents", multiple=True, type=_FILE, help="S2VT sents_*_lc_nopunc.txt (repeatable).")
@click.option(
    "--corpus",
    multiple=True,
    type=_FILE,
    help="MSR Video Description Corpus CSV, or subsets of it (repeatable).",
)
@click.option("--language", default="English", show_default=True, help="Corpus rows kept.")
@_prepare_options
def msvd(
    mapping: Path, sents: tuple[Path, ...], corpus: tuple[Path, ...], language: str
) -> Annotations:
    """MSVD (YouTube2Text): the standard split 1200 / 100 / 670 from the mapping."""
    if bool(sents) == bool(corpus):
        raise click.UsageError("give either --sents files or --corpus files")
    if sents:
        return read_msvd_sents(sents, mapping)
    return read_msvd_corpus(corpus, mapping, language=language)


@prepare_dataset.command(context_settings=_CONTEXT)
@click.argument("videodatainfo", nargs=-1, type=_FILE)
@click.option(
    "--scheme",
    type=click.Choice(["standard", "paper"]),
    default="standard",
    show_default=True,
    help="standard: 6513 / 497 / 2990; paper: 5513 train and 1000 "
    "test drawn from the original training videos.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the paper split's draw.")
@click.option("--train", "train_json", type=_FILE, help="{video: {sen_id: caption}} training file.")
@click.option("--val", "val_json", type=_FILE, help="{video: {sen_id: caption}} validation file.")
@click.option("--test", "test_json", type=_FILE, help="{video: {sen_id: caption}} test file.")
@_prepare_options
def msrvtt(
    videodatainfo: tuple[Path, ...],
    scheme: str,
    seed: int,
    train_json: Path | None,
    val_json: Path | None,
    test_json: Path | None,
) -> Annotations:
    """MSR-VTT from the official videodatainfo.json files, or per-split sentence files."""
    given = (("train", train_json), ("val", val_json), ("test", test_json))
    split_files = {split: path for split, path in given if path is not None}
    if bool(videodatainfo) == bool(split_files):
        raise click.UsageError("give either videodatainfo.json files or --train/--val/--test files")
    if videodatainfo:
        return read_msrvtt_official(videodatainfo, scheme=scheme, seed=seed)
    return read_msrvtt_sentences(split_files)


@prepare_dataset.command(context_settings=_CONTEXT)
@click.option(
    "--train", "train_file", type=_FILE, help="LSMDC annotation file of the training split."
)
@click.option(
    "--val", "val_file", type=_FILE, help="LSMDC annotation file of the validation split."
)
@click.option("--test", "test_file", type=_FILE, help="LSMDC annotation file of the test split.")
@click.option("--mvad-only", is_flag=True, help="Keep M-VAD clips (3XXX_...) of mixed LSMDC files.")
@_prepare_options
def mvad(
    train_file: Path | None, val_file: Path | None, test_file: Path | None, mvad_only: bool
) -> Annotations:
    """M-VAD from LSMDC-style tab-separated annotation files, one per split."""
    given = (("train", train_file), ("val", val_file), ("test", test_file))
    files = {split: path for split, path in given if path is not None}
    if not files:
        raise click.UsageError("give at least one of --train, --val, --test")
    return read_mvad(files, mvad_only=mvad_only)


@prepare_dataset.command(context_settings=_CONTEXT)
@click.argument("captions", type=_FILE)
@click.option(
    "--split-seed",
    default=0,
    show_default=True,
    help="Seed of the 80/10/10 split when the file has no split column.",
)
@_prepare_options
def generic(captions: Path, split_seed: int) -> Annotations:
    """Your own captions: CSV (video_id, caption[, split]) or JSON; videos are found by id."""
    return read_generic(captions, seed=split_seed)


_FOLDER_HELP = (
    "A dataset FOLDER in the standard layout of KIND: its annotation files under their usual "
    "names and the videos in FOLDER/videos/ (any sub-folders). What `dvc repro` runs.\n\n\b\n"
    + "\n".join(f"{kind}: {layout}" for kind, layout in FOLDER_LAYOUTS.items())
)


@prepare_dataset.command(context_settings=_CONTEXT, help=_FOLDER_HELP)
@click.argument("kind", type=click.Choice(FOLDER_KINDS))
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--scheme",
    type=click.Choice(["standard", "paper"]),
    default="standard",
    show_default=True,
    help="MSR-VTT from videodatainfo.json: the official splits or the paper's.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of drawn splits (paper, generic).")
@_prepare_options
def folder(kind: str, folder: Path, scheme: str, seed: int) -> tuple[Annotations, Path | None]:
    options = {"msrvtt": {"scheme": scheme, "seed": seed}, "generic": {"seed": seed}}
    return read_folder(kind, folder, **options.get(kind, {}))


@click.command(context_settings=_CONTEXT)
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the videos and the captions file (a generic dataset folder).",
)
@click.option("--seed", default=0, show_default=True, help="Everything is a function of it.")
@click.option("--n-train", default=DemoConfig.n_train, show_default=True, help="Training videos.")
@click.option("--n-val", default=DemoConfig.n_val, show_default=True, help="Validation videos.")
@click.option("--n-test", default=DemoConfig.n_test, show_default=True, help="Test videos.")
@click.option("--captions-per-video", default=DemoConfig.captions_per_video, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Processes rendering videos.")
def make_demo_dataset(
    out: Path,
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    captions_per_video: int,
    workers: int,
) -> None:
    """Render the synthetic demo dataset (H.264 videos, paraphrased captions) into OUT, a
    generic dataset folder: `prepare-dataset folder generic OUT --out DIR` prepares it."""
    try:
        config = DemoConfig(
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            n_test=n_test,
            captions_per_video=captions_per_video,
        )
        captions = build_demo(out, config, workers=workers)
    except DemoError as error:
        raise click.ClickException(str(error)) from error
    videos = n_train + n_val + n_test
    click.echo(
        f"{out}: {videos} videos ({n_train} train, {n_val} val, {n_test} test), "
        f"{videos * captions_per_video} captions in {captions.name}"
    )
