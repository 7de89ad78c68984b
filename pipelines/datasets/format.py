"""The normalised form: what adapters return, ``prepare_dataset``, and the ``Dataset``.

``prepare_dataset`` turns an adapter's ``Annotations`` into a ``Dataset``: video files located
on disk, captions sanitised and normalised, problems counted, the vocabulary built.
``Dataset.save`` writes the one form every later stage reads::

    DIR/videos.csv       id, path, split, start, end       every annotated video; path "" when
                                                            its file was not found
    DIR/video_files.csv  id, path                           the videos found on disk: the input
                                                            list for ``extract-features``
    DIR/captions.csv     video_id, caption, normalized, split
    DIR/vocab.json       the vocabulary (``astar.pipelines.vocab``)
    DIR/summary.json     counts per split, missing videos, videos without captions, empty
                         captions, what the adapter left out on purpose, the vocabulary settings

Paths under DIR are stored relative to it, so a dataset directory can be moved whole.
``caption`` is the original text sanitised to one line (case and punctuation kept: the metrics
tokenise references themselves); ``normalized`` is what the model trains on.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from astar.pipelines.datasets.files import DatasetError, _load_json, _read_text
from astar.pipelines.datasets.locate import _locate
from astar.pipelines.text import normalise_caption, sanitise_caption
from astar.pipelines.vocab import VocabConfig, Vocabulary, VocabularyError

SPLITS = ("train", "val", "test")
# Names that datasets use for the three splits (MSR-VTT says "validate").
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
DATASET_FORMAT = "astar-dataset"
DATASET_VERSION = 1
VIDEO_COLUMNS = ("id", "path", "split", "start", "end")
CAPTION_COLUMNS = ("video_id", "caption", "normalized", "split")
FILES = ("videos.csv", "video_files.csv", "captions.csv", "vocab.json", "summary.json")


# --------------------------------------------------------------------------------------------
# The splits


def canonical_split(name: str, where: str) -> str:
    """``train``/``val``/``test`` for a split name, or DatasetError naming ``where``."""
    split = _SPLIT_NAMES.get(str(name).strip().lower())
    if split is None:
        raise DatasetError(
            f"{where}: unknown split {name!r}; expected one of {', '.join(sorted(_SPLIT_NAMES))}"
        )
    return split


def _split_from_filename(path: Path) -> str | None:
    """The split a file's name announces (``sents_val_...``, ``LSMDC16_annos_training``)."""
    words = re.split(r"[^a-z]+", path.stem.lower())
    found = {_SPLIT_NAMES[w] for w in words if w in _SPLIT_NAMES}
    return found.pop() if len(found) == 1 else None


def seeded_split(ids: Sequence[str], sizes: Mapping[str, int], seed: int) -> dict[str, str]:
    """Assign ``ids`` to splits of the given sizes by a seeded permutation (sizes sum to len)."""
    if sum(sizes.values()) != len(ids):
        raise DatasetError(f"split sizes {dict(sizes)} do not add up to the {len(ids)} videos")
    order = np.random.default_rng(seed).permutation(len(ids))
    assigned, start = {}, 0
    for split, size in sizes.items():
        for index in order[start : start + size]:
            assigned[ids[index]] = split
        start += size
    return assigned


# --------------------------------------------------------------------------------------------
# What adapters return


@dataclass(frozen=True)
class Annotations:
    """Annotated videos and their captions as an adapter read them, before any file checks."""

    name: str  # the adapter: msvd, msrvtt, mvad, generic
    videos: pd.DataFrame  # id, split, start, end (float, NaN unknown), file_key (file stem)
    captions: pd.DataFrame  # video_id, caption (the text as given)
    source: dict[str, Any] = field(default_factory=dict)  # files read, split scheme, seed, ...
    left_out: dict[str, dict[str, Any]] = field(default_factory=dict)
    # ^ what the adapter left out by design: reason -> {"count", "examples", "why"}


def _annotations(
    name: str,
    videos: Sequence[dict[str, Any]],
    captions: Sequence[tuple[str, str]],
    source: dict[str, Any],
    left_out: dict[str, dict[str, Any]] | None = None,
) -> Annotations:
    table = pd.DataFrame(list(videos), columns=["id", "split", "start", "end", "file_key"])
    table["start"] = pd.to_numeric(table["start"], errors="raise").astype(float)
    table["end"] = pd.to_numeric(table["end"], errors="raise").astype(float)
    caption_table = pd.DataFrame(list(captions), columns=["video_id", "caption"])
    return Annotations(name, table, caption_table, source, left_out or {})


def _left_out(items: Sequence[str], why: str, examples: int = 10) -> dict[str, Any]:
    return {"count": len(items), "examples": list(items[:examples]), "why": why}


# --------------------------------------------------------------------------------------------
# The normalised dataset


@dataclass(frozen=True)
class PrepareConfig:
    """How annotations become a dataset."""

    videos_dir: Path | None = None  # where video files are searched (None: captions only)
    strict: bool = False  # missing videos, videos without captions, empty captions: errors
    vocab: VocabConfig = field(default_factory=VocabConfig)  # vocabulary settings
    examples: int = 10  # examples listed per problem in the summary


@dataclass(frozen=True)
class Split:
    """One split's videos and captions."""

    name: str  # train, val or test
    videos: pd.DataFrame  # VIDEO_COLUMNS
    captions: pd.DataFrame  # CAPTION_COLUMNS


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset: the videos and captions tables, the vocabulary, the summary."""

    videos: pd.DataFrame  # id, path (absolute, "" when not found), split, start, end
    captions: pd.DataFrame  # video_id, caption (sanitised), normalized, split
    vocabulary: Vocabulary
    summary: dict[str, Any]
    root: Path | None = None  # the directory it was loaded from or saved to

    def split(self, name: str) -> Split:
        name = canonical_split(name, "Dataset.split")
        return Split(
            name,
            self.videos[self.videos["split"] == name].reset_index(drop=True),
            self.captions[self.captions["split"] == name].reset_index(drop=True),
        )

    def captions_by_video(self, split: str, normalized: bool = False) -> dict[str, list[str]]:
        """Video id -> its captions (sanitised originals, or normalised), videos with captions."""
        part = self.split(split).captions
        column = "normalized" if normalized else "caption"
        return {video: list(group[column]) for video, group in part.groupby("video_id", sort=False)}

    def encoded_captions(self, split: str) -> dict[str, list[list[int]]]:
        """Video id -> its captions as word ids ending with eos (training input)."""
        return {
            video: [self.vocabulary.encode(c) for c in captions]
            for video, captions in self.captions_by_video(split, normalized=True).items()
        }

    def video_files(self) -> pd.DataFrame:
        """id, path of the videos found on disk (the input list for feature extraction)."""
        found = self.videos[self.videos["path"] != ""]
        return found[["id", "path"]].reset_index(drop=True)

    # --- on disk --------------------------------------------------------------------------------

    def save(self, root: str | Path) -> Path:
        """Write the dataset under ``root``; summary.json last, so its presence means complete."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        videos = self.videos.copy()
        videos["path"] = [_relative_to(p, root) for p in videos["path"]]
        _write_atomic(root / "videos.csv", videos.to_csv(index=False, lineterminator="\n"))
        _write_atomic(
            root / "video_files.csv",
            videos[videos["path"] != ""][["id", "path"]].to_csv(index=False, lineterminator="\n"),
        )
        _write_atomic(root / "captions.csv", self.captions.to_csv(index=False, lineterminator="\n"))
        _write_atomic(
            root / "vocab.json",
            json.dumps(self.vocabulary.to_dict(), ensure_ascii=False, indent=1) + "\n",
        )
        _write_atomic(root / "summary.json", json.dumps(self.summary, indent=2) + "\n")
        return root

    @classmethod
    def load(cls, root: str | Path) -> Dataset:
        """Read a prepared dataset, refusing one that is incomplete or inconsistent."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: no such dataset directory")
        missing = [name for name in FILES if not (root / name).is_file()]
        if missing:
            raise DatasetError(
                f"{root}: not a prepared dataset, missing {', '.join(missing)} "
                "(run prepare-dataset; without summary.json the preparation did not finish)"
            )
        summary = _load_json(root / "summary.json")
        if not isinstance(summary, dict) or summary.get("format") != DATASET_FORMAT:
            raise DatasetError(f"{root / 'summary.json'}: not a {DATASET_FORMAT} summary")
        if summary.get("version") != DATASET_VERSION:
            raise DatasetError(
                f"{root / 'summary.json'}: dataset format version {summary.get('version')!r}, "
                f"this code reads version {DATASET_VERSION}"
            )
        videos = _read_table(root / "videos.csv", VIDEO_COLUMNS)
        captions = _read_table(root / "captions.csv", CAPTION_COLUMNS)
        _check_tables(root, videos, captions)
        for column in ("start", "end"):
            videos[column] = pd.to_numeric(videos[column].replace("", np.nan)).astype(float)
        videos["path"] = [str((root / p).resolve()) if p else "" for p in videos["path"]]
        try:
            vocabulary = Vocabulary.load(root / "vocab.json")
        except VocabularyError as error:
            raise DatasetError(str(error)) from error
        return cls(videos, captions, vocabulary, summary, root)


def _relative_to(path: str, root: Path) -> str:
    if not path:
        return ""
    try:
        return Path(path).relative_to(root.resolve()).as_posix()
    except ValueError:
        return path


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    text = _read_text(path)  # decoded here, so that a bad byte is reported with its line
    try:
        # keep_default_na=False: a caption "NA" or "null" is text, not a missing value.
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DatasetError(f"{path}: malformed CSV: {error}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(
            f"{path}, line 1: missing column(s) {missing}; found {list(table.columns)}"
        )
    return table[list(columns)]


def _check_tables(root: Path, videos: pd.DataFrame, captions: pd.DataFrame) -> None:
    """Unique ids, known splits, every caption on a known video of the same split."""
    videos_csv, captions_csv = root / "videos.csv", root / "captions.csv"
    duplicated = videos["id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DatasetError(
            f"{videos_csv}, line {row + 2}: duplicate video id {videos['id'][row]!r}"
        )
    for table, path in ((videos, videos_csv), (captions, captions_csv)):
        unknown = ~table["split"].isin(SPLITS)
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DatasetError(
                f"{path}, line {row + 2}: unknown split {table['split'][row]!r}; expected {SPLITS}"
            )
    split_of = dict(zip(videos["id"], videos["split"], strict=True))
    expected = captions["video_id"].map(split_of)
    orphan = expected.isna()
    if orphan.any():
        row = int(np.flatnonzero(orphan.to_numpy())[0])
        raise DatasetError(
            f"{captions_csv}, line {row + 2}: video {captions['video_id'][row]!r} "
            f"is not in {videos_csv}"
        )
    wrong = expected != captions["split"]
    if wrong.any():
        row = int(np.flatnonzero(wrong.to_numpy())[0])
        raise DatasetError(
            f"{captions_csv}, line {row + 2}: split {captions['split'][row]!r} differs from the "
            f"video's {expected[row]!r} in {videos_csv}"
        )


def _problem(items: Sequence[str], examples: int) -> dict[str, Any]:
    return {"count": len(items), "examples": list(items[:examples])}


def _check_annotations(annotations: Annotations, where: str) -> None:
    videos = annotations.videos
    duplicated = videos["id"][videos["id"].duplicated()].tolist()
    if duplicated:
        raise DatasetError(f"{where}: duplicate video ids {duplicated[:5]}")
    for split in videos["split"].unique():
        canonical_split(split, where)
    orphans = sorted(set(annotations.captions["video_id"]) - set(videos["id"]))
    if orphans:
        raise DatasetError(f"{where}: captions of unknown videos {orphans[:5]}")


def _normalised_captions(annotations: Annotations) -> tuple[pd.DataFrame, list[str]]:
    """The captions table without empty captions, and the empty ones as examples."""
    videos = annotations.videos
    captions = annotations.captions.copy()
    captions["caption"] = [sanitise_caption(c) for c in captions["caption"].tolist()]
    captions["normalized"] = [normalise_caption(c) for c in captions["caption"].tolist()]
    captions["split"] = captions["video_id"].map(
        dict(zip(videos["id"], videos["split"], strict=True))
    )
    empty = (captions["normalized"] == "").to_numpy()
    raw = annotations.captions[empty]
    empty_examples = [
        f"{video}: {caption!r}"
        for video, caption in zip(raw["video_id"], raw["caption"], strict=True)
    ]
    return captions[~empty].reset_index(drop=True)[list(CAPTION_COLUMNS)], empty_examples


def _video_table(videos: pd.DataFrame, videos_dir: Path | None) -> tuple[pd.DataFrame, list[str]]:
    """The videos table with the files found, and the videos whose file is missing."""
    table = videos[["id", "split", "start", "end"]].reset_index(drop=True)
    if videos_dir is None:
        table.insert(1, "path", "")
        return table, []
    table.insert(1, "path", _locate(videos["file_key"], videos_dir))
    missing = [
        video if key == video else f"{video} ({key})"  # the file name that was looked for
        for video, key, path in zip(table["id"], videos["file_key"], table["path"], strict=True)
        if not path
    ]
    return table, missing


def prepare_dataset(annotations: Annotations, config: PrepareConfig = PrepareConfig()) -> Dataset:
    """Check and normalise adapter output, locate video files, build the vocabulary."""
    where = f"{annotations.name} annotations"
    _check_annotations(annotations, where)
    captions, empty = _normalised_captions(annotations)
    videos, missing = _video_table(annotations.videos, config.videos_dir)
    captioned = set(captions["video_id"])
    problems = {
        "missing_videos": _problem(missing, config.examples),
        "videos_without_captions": _problem(
            [v for v in videos["id"] if v not in captioned], config.examples
        ),
        "empty_captions": _problem(empty, config.examples),
    }
    if config.strict:
        found = [
            f"{name.replace('_', ' ')}: {p['count']} (e.g. {', '.join(p['examples'][:3])})"
            for name, p in problems.items()
            if p["count"]
        ]
        if found:
            raise DatasetError(f"{where}, strict: " + "; ".join(found))

    vocab_splits = SPLITS if config.vocab.source == "paper" else ("train",)
    try:
        vocabulary = Vocabulary.build(
            captions["normalized"][captions["split"].isin(vocab_splits)].tolist(),
            min_count=config.vocab.min_count,
            max_length=config.vocab.max_length,
            source=config.vocab.source,
            normalized=True,
        )
    except VocabularyError as error:
        hint = "" if config.vocab.source == "paper" else " (--vocab paper counts all splits)"
        raise DatasetError(f"{where}: {error} in the splits {vocab_splits}{hint}") from error

    summary = _summary(annotations, config, videos, captions, vocabulary, problems)
    return Dataset(videos, captions, vocabulary, summary)


def _summary(
    annotations: Annotations,
    config: PrepareConfig,
    videos: pd.DataFrame,
    captions: pd.DataFrame,
    vocabulary: Vocabulary,
    problems: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        part_videos = videos[videos["split"] == split]
        part_captions = captions[captions["split"] == split]
        splits[split] = {
            "videos": len(part_videos),
            "videos_with_captions": int(part_captions["video_id"].nunique()),
            "videos_on_disk": int((part_videos["path"] != "").sum()),
            "captions": len(part_captions),
        }
    unknown_rate = {
        split: round(
            vocabulary.unknown_rate(
                captions["normalized"][captions["split"] == split].tolist(), normalized=True
            ),
            6,
        )
        for split in SPLITS
    }
    return {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "name": annotations.name,
        "source": annotations.source,
        "videos_dir": None if config.videos_dir is None else str(config.videos_dir),
        "strict": config.strict,
        "videos": len(videos),
        "captions": len(captions),
        "splits": splits,
        **problems,
        "left_out": annotations.left_out,
        "vocabulary": {
            "size": len(vocabulary),
            "source": vocabulary.source,
            "min_count": vocabulary.min_count,
            "max_length": vocabulary.max_length,
            "unknown_rate": unknown_rate,
        },
    }
