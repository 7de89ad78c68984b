"""Caption datasets: adapters for MSVD, MSR-VTT, M-VAD and generic files, one normalised form.

Every adapter returns ``Annotations`` (the annotated videos with their splits, and their captions
as given); ``prepare_dataset`` turns them into a ``Dataset``: video files located on disk,
captions sanitised and normalised, problems counted, the vocabulary built. ``Dataset.save``
writes the one form every later stage reads::

    DIR/videos.csv       id, path, split, start, end       every annotated video; path "" when
                                                            its file was not found
    DIR/video_files.csv  id, path                           the videos found on disk: the input
                                                            list for ``extract-features``
    DIR/captions.csv     video_id, caption, normalized, split
    DIR/vocab.json       the vocabulary (``astar.train.vocab``)
    DIR/summary.json     counts per split, missing videos, videos without captions, empty
                         captions, what the adapter left out on purpose, the vocabulary settings

Paths under DIR are stored relative to it, so a dataset directory can be moved whole.
``caption`` is the original text sanitised to one line (case and punctuation kept: the metrics
tokenise references themselves); ``normalized`` is what the model trains on.

Nothing is dropped silently: annotated videos missing on disk, videos without captions and
captions that normalise to nothing are counted in the summary with examples (``strict`` makes
them errors), and what an adapter leaves out by design (non-English MSVD rows, clips outside
the split mapping, MSR-VTT's original test set in the paper's split) is listed there too.
Malformed input raises ``DatasetError`` naming the file and the line or key.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from astar.pipelines.text import NotUTF8Error, decode_utf8, normalise_caption, sanitise_caption
from astar.train.vocab import VocabConfig, Vocabulary, VocabularyError

__all__ = [
    "DATASET_FORMAT",
    "FOLDER_KINDS",
    "SPLITS",
    "Annotations",
    "Dataset",
    "DatasetError",
    "PrepareConfig",
    "Split",
    "canonical_split",
    "index_video_files",
    "prepare_dataset",
    "read_folder",
    "read_generic",
    "read_msrvtt_official",
    "read_msrvtt_sentences",
    "read_msvd_corpus",
    "read_msvd_mapping",
    "read_msvd_sents",
    "read_mvad",
    "seeded_split",
]

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
# MSVD's standard split by clip number (Venugopalan et al. 2015): vid1-1200 / 1201-1300 / 1301-1970.
MSVD_SPLIT_ENDS = (("train", 1200), ("val", 1300), ("test", 1970))
MSRVTT_PAPER_TEST = 1000  # test clips the paper draws from MSR-VTT's original training set


class DatasetError(Exception):
    """Annotations or a prepared dataset directory are malformed or inconsistent."""


def canonical_split(name: str, where: str) -> str:
    """``train``/``val``/``test`` for a split name, or DatasetError naming ``where``."""
    split = _SPLIT_NAMES.get(str(name).strip().lower())
    if split is None:
        raise DatasetError(
            f"{where}: unknown split {name!r}; expected one of {', '.join(sorted(_SPLIT_NAMES))}"
        )
    return split


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
# Reading files with line numbers


def _read_text(path: Path) -> str:
    """A whole UTF-8 file (a byte-order mark dropped); a bad byte raises naming its line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error}") from error
    try:
        return decode_utf8(data, str(path))
    except NotUTF8Error as error:
        raise DatasetError(str(error)) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) split on "\\n" only: a stray "\\r" or U+2028 inside a caption must not
    start a new record (text-mode reading would split there)."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _csv_rows(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """The columns found and (line number, row) pairs of a CSV with a header.

    A leading unnamed column (a pandas index written with the data) is ignored. A row with the
    wrong number of fields, or a missing required column, raises naming the file and line.
    """
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise DatasetError(f"{path}, line 1: malformed CSV header: {error}") from None
    if not header:
        raise DatasetError(f"{path}: empty file, expected a CSV header with {list(required)}")
    skip_index = header[0].strip() == "" or header[0].startswith("Unnamed")
    columns = [c.strip() for c in (header[1:] if skip_index else header)]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatasetError(
            f"{path}, line 1: missing column(s) {missing}; found {columns} "
            f"(required {list(required)}, optional {list(optional)})"
        )

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        try:
            for fields in reader:
                number = reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DatasetError(
                        f"{path}, line {number}: expected {len(header)} fields, found {len(fields)}"
                    )
                values = fields[1:] if skip_index else fields
                yield number, dict(zip(columns, values, strict=True))
        except csv.Error as error:
            raise DatasetError(f"{path}, line {reader.line_num}: malformed CSV: {error}") from None

    return columns, rows()


def _load_json(path: Path) -> Any:
    """Parsed JSON; a duplicate key anywhere is an error (``json`` would keep the last)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise DatasetError(f"{path}: duplicate key {key!r}")
            seen[key] = value
        return seen

    text = _read_text(path)
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"{path}, line {error.lineno} column {error.colno}: malformed JSON: {error.msg}"
        ) from None


def _split_from_filename(path: Path) -> str | None:
    """The split a file's name announces (``sents_val_...``, ``LSMDC16_annos_training``)."""
    words = re.split(r"[^a-z]+", path.stem.lower())
    found = {_SPLIT_NAMES[w] for w in words if w in _SPLIT_NAMES}
    return found.pop() if len(found) == 1 else None


def _number_text(value: str) -> str:
    """Integral numbers without a decimal part ("5.0" from a re-saved CSV -> "5"), else as is."""
    try:
        number = float(value)
    except ValueError:
        return value.strip()
    return str(int(number)) if number.is_integer() else value.strip()


# --------------------------------------------------------------------------------------------
# MSVD


def read_msvd_mapping(path: str | Path) -> dict[str, str]:
    """``youtube_mapping.txt``: clip (``<youtubeid>_<start>_<end>``) -> ``vidN``, in file order."""
    path = Path(path)
    mapping: dict[str, str] = {}
    seen_ids: dict[str, int] = {}
    for number, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not re.fullmatch(r"vid\d+", fields[1]):
            raise DatasetError(
                f"{path}, line {number}: expected '<clip> vidN', found {line[:80]!r}"
            )
        clip, video = fields
        if clip in mapping:
            raise DatasetError(f"{path}, line {number}: clip {clip} mapped twice")
        if video in seen_ids:
            raise DatasetError(
                f"{path}, line {number}: {video} already given to another clip on line "
                f"{seen_ids[video]}"
            )
        mapping[clip] = video
        seen_ids[video] = number
    if not mapping:
        raise DatasetError(f"{path}: no clips in the mapping")
    return mapping


def _msvd_split(video: str, where: str) -> str:
    number = int(video.removeprefix("vid"))
    for split, last in MSVD_SPLIT_ENDS:
        if 1 <= number <= last:
            return split
    raise DatasetError(
        f"{where}: {video} is outside the standard MSVD split (vid1-vid{MSVD_SPLIT_ENDS[-1][1]})"
    )


def _clip_times(clip: str) -> tuple[float, float]:
    """Start and end seconds of an MSVD clip name, NaN when it does not carry them."""
    parts = clip.rsplit("_", 2)  # YouTube ids may contain "_" themselves
    try:
        return float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        return np.nan, np.nan


def _msvd_videos(mapping: dict[str, str], where: str) -> list[dict[str, Any]]:
    videos = []
    for clip, video in mapping.items():
        start, end = _clip_times(clip)
        split = _msvd_split(video, where)
        videos.append({"id": video, "split": split, "start": start, "end": end, "file_key": clip})
    videos.sort(key=lambda v: int(v["id"].removeprefix("vid")))
    return videos


def read_msvd_sents(paths: Sequence[str | Path], mapping_path: str | Path) -> Annotations:
    """MSVD in the S2VT text form: ``sents_*_lc_nopunc.txt`` (``vidN<TAB>caption``) + mapping.

    Every clip of the mapping is a video of the dataset; its split comes from its number. A
    file named for a split (``sents_val_...``) must hold only that split's clips.
    """
    mapping_path = Path(mapping_path)
    mapping = read_msvd_mapping(mapping_path)
    videos = _msvd_videos(mapping, str(mapping_path))
    split_of = {v["id"]: v["split"] for v in videos}
    captions: list[tuple[str, str]] = []
    for path in map(Path, paths):
        announced = _split_from_filename(path)
        for number, line in _lines(path):
            if not line.strip():
                continue
            video, tab, caption = line.partition("\t")
            if not tab:
                raise DatasetError(
                    f"{path}, line {number}: expected 'vidN<TAB>caption', found {line[:80]!r}"
                )
            if video not in split_of:
                raise DatasetError(f"{path}, line {number}: {video!r} is not in {mapping_path}")
            if announced and split_of[video] != announced:
                raise DatasetError(
                    f"{path}, line {number}: {video} belongs to the {split_of[video]} split, "
                    f"but the file is named for {announced}"
                )
            captions.append((video, caption))
    source = {"format": "msvd-s2vt", "files": [str(p) for p in paths], "mapping": str(mapping_path)}
    return _annotations("msvd", videos, captions, source)


def read_msvd_corpus(
    paths: Sequence[str | Path], mapping_path: str | Path, language: str = "English"
) -> Annotations:
    """MSVD from "MSR Video Description Corpus.csv" (or subsets of it) + the split mapping.

    Columns VideoID, Start, End, Language, Description (others ignored; a leading pandas index
    column is allowed). Rows in other languages, and clips outside the mapping, are left out
    and counted.
    """
    mapping_path = Path(mapping_path)
    mapping = read_msvd_mapping(mapping_path)
    videos = _msvd_videos(mapping, str(mapping_path))
    captions: list[tuple[str, str]] = []
    other_language: list[str] = []
    unmapped: dict[str, int] = {}
    for path in map(Path, paths):
        _, rows = _csv_rows(path, ("VideoID", "Start", "End", "Language", "Description"))
        for number, row in rows:
            if row["Language"].strip().lower() != language.lower():
                other_language.append(f"{path.name}:{number}")
                continue
            clip = (
                f"{row['VideoID'].strip()}_{_number_text(row['Start'])}_{_number_text(row['End'])}"
            )
            video = mapping.get(clip)
            if video is None:
                unmapped[clip] = unmapped.get(clip, 0) + 1
                continue
            captions.append((video, row["Description"]))
    left_out = {}
    if other_language:
        left_out["other_language"] = _left_out(
            other_language, f"rows whose Language is not {language} (file:line)"
        )
    if unmapped:
        left_out["unmapped_clips"] = _left_out(
            sorted(unmapped), f"clips not in {mapping_path.name}: {sum(unmapped.values())} rows"
        )
    source = {
        "format": "msvd-corpus",
        "files": [str(p) for p in paths],
        "mapping": str(mapping_path),
        "language": language,
    }
    return _annotations("msvd", videos, captions, source, left_out)


# --------------------------------------------------------------------------------------------
# MSR-VTT


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


def _require(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{where}: expected {names}, found {value!r:.80}")
    return value


def _official_videos(path: Path, entries: Any, seen: dict[str, str]) -> list[dict[str, Any]]:
    """The ``videos`` list of one videodatainfo.json; ``seen``: video id -> where first listed."""
    videos = []
    for index, video in enumerate(_require(entries, list, f"{path}: videos")):
        where = f"{path}: videos[{index}]"
        _require(video, dict, where)
        for key in ("video_id", "split"):
            if key not in video:
                raise DatasetError(f"{where}: missing key {key!r}")
        video_id = _require(video["video_id"], str, f"{where}.video_id")
        if video_id in seen:
            raise DatasetError(
                f"{where}: duplicate video_id {video_id!r} (first at {seen[video_id]})"
            )
        seen[video_id] = where
        split = _require(video["split"], str, f"{where}.split")
        start = video.get("start time", np.nan)
        end = video.get("end time", np.nan)
        videos.append(
            {
                "id": video_id,
                "split": canonical_split(split, f"{where}.split"),
                "start": _require(start, (int, float), f"{where}['start time']"),
                "end": _require(end, (int, float), f"{where}['end time']"),
                "file_key": video_id,
            }
        )
    return videos


def _official_sentences(path: Path, entries: Any, seen: dict[Any, str]) -> list[tuple[str, str]]:
    """The ``sentences`` list of one videodatainfo.json; ``seen``: sen_id -> where first given."""
    captions = []
    for index, sentence in enumerate(_require(entries, list, f"{path}: sentences")):
        where = f"{path}: sentences[{index}]"
        _require(sentence, dict, where)
        for key in ("video_id", "caption"):
            if key not in sentence:
                raise DatasetError(f"{where}: missing key {key!r}")
        sen_id = sentence.get("sen_id")
        if sen_id is not None:
            if sen_id in seen:
                raise DatasetError(f"{where}: duplicate sen_id {sen_id} (first at {seen[sen_id]})")
            seen[sen_id] = where
        video_id = _require(sentence["video_id"], str, f"{where}.video_id")
        captions.append((video_id, _require(sentence["caption"], str, f"{where}.caption")))
    return captions


def read_msrvtt_official(
    paths: Sequence[str | Path],
    scheme: str = "standard",
    seed: int = 0,
    paper_test_size: int = MSRVTT_PAPER_TEST,
) -> Annotations:
    """MSR-VTT's official ``videodatainfo.json`` files (train_val, and test when released).

    ``scheme="standard"``: the files' own splits (6513 / 497 / 2990). ``scheme="paper"``: the
    ASTAR paper's, which had no test captions: ``paper_test_size`` videos drawn from the original
    training set by a seeded permutation become the test split, the rest stay training, the
    original validation set stays validation and the original test set is left out (counted).
    """
    if scheme not in ("standard", "paper"):
        raise DatasetError(f"unknown MSR-VTT split scheme {scheme!r}: 'standard' or 'paper'")
    videos: list[dict[str, Any]] = []
    captions: list[tuple[str, str]] = []
    video_where: dict[str, str] = {}
    sentence_where: dict[Any, str] = {}
    for path in map(Path, paths):
        data = _require(_load_json(path), dict, str(path))
        for key in ("videos", "sentences"):
            if key not in data:
                raise DatasetError(f"{path}: missing key {key!r} (not a videodatainfo.json)")
        videos += _official_videos(path, data["videos"], video_where)
        captions += _official_sentences(path, data["sentences"], sentence_where)
    unknown = sorted({v for v, _ in captions} - set(video_where))
    if unknown:
        raise DatasetError(
            f"{', '.join(map(str, paths))}: {len(unknown)} sentence video_id(s) not among the "
            f"videos, e.g. {unknown[:5]}"
        )
    source = {"format": "msrvtt-official", "files": [str(p) for p in paths], "scheme": scheme}
    if scheme == "standard":
        return _annotations("msrvtt", videos, captions, source)
    originally_train = [v["id"] for v in videos if v["split"] == "train"]
    if len(originally_train) <= paper_test_size:
        raise DatasetError(
            f"the paper's split draws {paper_test_size} test videos from the training set, "
            f"which has only {len(originally_train)}"
        )
    sizes = {"train": len(originally_train) - paper_test_size, "test": paper_test_size}
    redrawn = seeded_split(originally_train, sizes, seed)
    dropped = [v["id"] for v in videos if v["split"] == "test"]
    videos = [
        {**v, "split": redrawn.get(v["id"], v["split"])} for v in videos if v["split"] != "test"
    ]
    kept = {v["id"] for v in videos}
    captions = [(video, caption) for video, caption in captions if video in kept]
    source.update(seed=seed, paper_test_size=paper_test_size)
    left_out = {}
    if dropped:
        why = "the paper's split takes its test videos from the original training set"
        left_out["original_test_set"] = _left_out(dropped, why)
    return _annotations("msrvtt", videos, captions, source, left_out)


def read_msrvtt_sentences(files: Mapping[str, str | Path]) -> Annotations:
    """MSR-VTT as ``{video_id: {sen_id: caption}}`` JSON files, one per split (split -> path)."""
    videos: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    captions: list[tuple[str, str]] = []
    for split_name, raw_path in files.items():
        path = Path(raw_path)
        split = canonical_split(split_name, str(path))
        data = _require(_load_json(path), dict, str(path))
        for video_id, sentences in data.items():
            where = f"{path}: [{video_id!r}]"
            if video_id in first_seen:
                raise DatasetError(f"{where}: video also in {first_seen[video_id]}")
            first_seen[video_id] = str(path)
            videos.append(
                {
                    "id": video_id,
                    "split": split,
                    "start": np.nan,
                    "end": np.nan,
                    "file_key": video_id,
                }
            )
            for sen_id, caption in _require(sentences, dict, where).items():
                captions.append((video_id, _require(caption, str, f"{where}[{sen_id!r}]")))
    source = {"format": "msrvtt-sentences", "files": {s: str(p) for s, p in files.items()}}
    return _annotations("msrvtt", videos, captions, source)


# --------------------------------------------------------------------------------------------
# M-VAD (LSMDC annotation files)


def _lsmdc_seconds(stamp: str, where: str) -> float:
    """Seconds of an LSMDC time stamp ``hh.mm.ss.mmm``: ``01.02.27.034`` -> 3747.034."""
    match = re.fullmatch(r"(\d+)\.(\d{1,2})\.(\d{1,2})\.(\d{1,3})", stamp.strip())
    if match is None:
        raise DatasetError(f"{where}: expected a time stamp hh.mm.ss.mmm, found {stamp!r}")
    hours, minutes, seconds, millis = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis.ljust(3, "0")) / 1000


def read_mvad(files: Mapping[str, str | Path], mvad_only: bool = False) -> Annotations:
    """LSMDC-style annotation files, one per split (split -> path).

    Each line: ``CLIP_ID START_ALIGNED END_ALIGNED START_EXTRACTED END_EXTRACTED SENTENCE``,
    tab-separated, times ``hh.mm.ss.mmm`` (the extracted clip's are kept). A clip id may repeat
    (several sentences); the blind test file has no sentences. Videos are found on disk by clip
    id. ``mvad_only`` keeps the M-VAD clips (ids ``3XXX_...``) of the mixed LSMDC files and
    counts the others.
    """
    videos: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    captions: list[tuple[str, str]] = []
    other_sources: list[str] = []
    for split_name, raw_path in files.items():
        path = Path(raw_path)
        split = canonical_split(split_name, str(path))
        for number, line in _lines(path):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            fields = line.split("\t")
            if len(fields) not in (5, 6):
                raise DatasetError(
                    f"{where}: expected 6 tab-separated fields (5 without a sentence), "
                    f"found {len(fields)}"
                )
            clip = fields[0].strip()
            if mvad_only and not clip.startswith("3"):
                other_sources.append(clip)
                continue
            if clip not in first_seen:
                first_seen[clip] = where
                videos.append(
                    {
                        "id": clip,
                        "split": split,
                        "start": _lsmdc_seconds(fields[3], where),
                        "end": _lsmdc_seconds(fields[4], where),
                        "file_key": clip,
                    }
                )
            elif not first_seen[clip].startswith(f"{path},"):
                raise DatasetError(f"{where}: clip {clip} is also in {first_seen[clip]}")
            if len(fields) == 6:
                captions.append((clip, fields[5]))
    left_out = {}
    if other_sources:
        left_out["not_mvad"] = _left_out(
            sorted(set(other_sources)), "MPII-MD clips (ids not 3XXX) with mvad_only"
        )
    source = {
        "format": "lsmdc",
        "files": {s: str(p) for s, p in files.items()},
        "mvad_only": mvad_only,
    }
    return _annotations("mvad", videos, captions, source, left_out)


# --------------------------------------------------------------------------------------------
# Generic


def read_generic(
    path: str | Path,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> Annotations:
    """A CSV (columns video_id, caption, optional split) or JSON file of captions.

    JSON: a list of objects with the same keys, or ``{video_id: [caption, ...]}``, or
    ``{video_id: {sen_id: caption}}``. Without splits, videos are split by a seeded
    permutation in ``split_fractions`` (train, val, test), recorded in the summary.
    """
    path = Path(path)
    records: list[tuple[str, str, str | None, str]] = []  # video, caption, split, where
    if path.suffix.lower() == ".json":
        records = _generic_json(path)
    elif path.suffix.lower() in (".csv", ".txt"):
        columns, rows = _csv_rows(path, ("video_id", "caption"), ("split",))
        has_split = "split" in columns
        records = [
            (
                row["video_id"].strip(),
                row["caption"],
                row["split"] if has_split else None,
                f"{path}, line {number}",
            )
            for number, row in rows
        ]
    else:
        raise DatasetError(f"{path}: generic captions must be a .csv or .json file")
    if not records:
        raise DatasetError(f"{path}: no captions")
    with_split = [r for r in records if r[2] is not None]
    if with_split and len(with_split) != len(records):
        where = next(r[3] for r in records if r[2] is None)
        raise DatasetError(f"{where}: no split, while other captions have one")
    split_of: dict[str, tuple[str, str]] = {}  # video -> (split, where first given)
    order: list[str] = []
    captions = []
    for video, caption, split_name, where in records:
        if not video:
            raise DatasetError(f"{where}: empty video_id")
        split = canonical_split(split_name, where) if split_name is not None else ""
        if video not in split_of:
            split_of[video] = (split, where)
            order.append(video)
        elif split_of[video][0] != split:
            raise DatasetError(
                f"{where}: video {video!r} is in split {split!r} here but {split_of[video][0]!r} "
                f"at {split_of[video][1]}"
            )
        captions.append((video, caption))
    source: dict[str, Any] = {"format": "generic", "file": str(path)}
    if not with_split:
        if (
            len(split_fractions) != 3
            or min(split_fractions) < 0
            or not np.isclose(sum(split_fractions), 1.0)
        ):
            raise DatasetError(
                f"split fractions must be 3 non-negative numbers summing to 1: {split_fractions}"
            )
        n_val = round(split_fractions[1] * len(order))
        n_test = round(split_fractions[2] * len(order))
        sizes = {"train": len(order) - n_val - n_test, "val": n_val, "test": n_test}
        drawn = seeded_split(order, sizes, seed)
        split_of = {v: (drawn[v], "") for v in order}
        source.update(split="seeded", split_fractions=list(split_fractions), seed=seed)
    videos = [
        {"id": v, "split": split_of[v][0], "start": np.nan, "end": np.nan, "file_key": v}
        for v in order
    ]
    return _annotations("generic", videos, captions, source)


def _generic_json(path: Path) -> list[tuple[str, str, str | None, str]]:
    data = _load_json(path)
    records: list[tuple[str, str, str | None, str]] = []
    if isinstance(data, list):
        for index, item in enumerate(data):
            where = f"{path}: [{index}]"
            _require(item, dict, where)
            for key in ("video_id", "caption"):
                if key not in item:
                    raise DatasetError(f"{where}: missing key {key!r}; found {sorted(item)}")
            split = item.get("split")
            records.append(
                (
                    str(_require(item["video_id"], (str, int), f"{where}.video_id")).strip(),
                    _require(item["caption"], str, f"{where}.caption"),
                    None if split is None else _require(split, str, f"{where}.split"),
                    where,
                )
            )
    elif isinstance(data, dict):
        for video, captions in data.items():
            where = f"{path}: [{video!r}]"
            if isinstance(captions, dict):
                items = [(f"{where}[{k!r}]", c) for k, c in captions.items()]
            else:
                items = [
                    (f"{where}[{i}]", c) for i, c in enumerate(_require(captions, list, where))
                ]
            records += [(video.strip(), _require(c, str, w), None, w) for w, c in items]
    else:
        raise DatasetError(
            f"{path}: expected a JSON list of records or an object keyed by video id"
        )
    return records


# --------------------------------------------------------------------------------------------
# Locating video files


# --------------------------------------------------------------------------------------------
# A dataset folder in its standard layout (what the DVC pipeline reads)

FOLDER_KINDS = ("msvd", "msrvtt", "mvad", "generic")
FOLDER_LAYOUTS = {
    "msvd": "youtube_mapping.txt and sents_{train,val,test}_lc_nopunc.txt (or the 'MSR Video "
    "Description Corpus.csv'), videos/ with the clips",
    "msrvtt": "train_val_videodatainfo.json [and test_videodatainfo.json] (or "
    "{train,val,test}.json of {video: {sen_id: caption}}), videos/ with the clips",
    "mvad": "LSMDC annotation files (.csv or .tsv) named for their split, videos/ with the clips",
    "generic": "annotations.csv (video_id, caption[, split]) or annotations.json, videos/",
}


def _split_files(root: Path, patterns: Sequence[str]) -> dict[str, Path]:
    """The files of ``root`` matching ``patterns`` whose names announce one split each."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            split = _split_from_filename(path)
            if split is None:
                continue
            if split in found and found[split] != path:
                raise DatasetError(
                    f"{root}: two annotation files for the {split} split: "
                    f"{found[split].name} and {path.name}"
                )
            found[split] = path
    return found


def read_folder(kind: str, root: str | Path, **options: Any) -> tuple[Annotations, Path | None]:
    """A dataset folder in its standard layout (``FOLDER_LAYOUTS``): annotations + ``videos/``.

    Returns the annotations and the videos folder (None when there is none, so captions alone
    can still be prepared and inspected). ``options`` go to the kind's reader (``scheme`` and
    ``seed`` for MSR-VTT, ``mvad_only`` for M-VAD, ``seed`` for generic splits).
    """
    root = Path(root)
    if kind not in FOLDER_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r} (known: {', '.join(FOLDER_KINDS)})")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; a {kind} folder holds {FOLDER_LAYOUTS[kind]}")
    videos = root / "videos"
    videos_dir = videos if videos.is_dir() else None

    def missing(what: str) -> DatasetError:
        return DatasetError(f"{root}: no {what}; a {kind} folder holds {FOLDER_LAYOUTS[kind]}")

    if kind == "msvd":
        mapping = root / "youtube_mapping.txt"
        if not mapping.is_file():
            raise missing("youtube_mapping.txt")
        sents = sorted(root.glob("sents_*.txt"))
        if sents:
            return read_msvd_sents(sents, mapping), videos_dir
        corpus = sorted(root.glob("*.csv"))
        if not corpus:
            raise missing("sents_*.txt or corpus CSV")
        return read_msvd_corpus(corpus, mapping), videos_dir
    if kind == "msrvtt":
        official = sorted(root.glob("*videodatainfo*.json"))
        if official:
            return read_msrvtt_official(official, **options), videos_dir
        split_files = _split_files(root, ["*.json"])
        if not split_files:
            raise missing("videodatainfo.json or per-split JSON files")
        return read_msrvtt_sentences(split_files), videos_dir
    if kind == "mvad":
        split_files = _split_files(root, ["*.csv", "*.tsv"])
        if not split_files:
            raise missing("annotation files named for their split")
        return read_mvad(split_files, **options), videos_dir
    for name in ("annotations.csv", "annotations.json"):
        if (root / name).is_file():
            return read_generic(root / name, **options), videos_dir
    raise missing("annotations.csv or annotations.json")


def index_video_files(root: str | Path) -> dict[str, list[Path]]:
    """Files under ``root`` (recursive, any extension, hidden ones skipped) by name without
    extension and by relative path without extension (``movie/clip``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: the videos directory does not exist")
    index: dict[str, list[Path]] = {}
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            relative = path.relative_to(root).with_suffix("").as_posix()
            for key in dict.fromkeys([path.stem, relative]):
                index.setdefault(key, []).append(path)
    return index


def _locate(keys: pd.Series, root: str | Path) -> list[str]:
    """Absolute path per key ("" when absent); two files for one key is an error."""
    index = index_video_files(root)
    paths = []
    for key in keys:
        found = index.get(key, [])
        if len(found) > 1:
            raise DatasetError(
                f"{root}: {len(found)} files could be video {key!r}: "
                + ", ".join(str(p) for p in found[:5])
            )
        paths.append(str(found[0].resolve()) if found else "")
    return paths


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
