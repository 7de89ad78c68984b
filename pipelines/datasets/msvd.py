"""MSVD: the S2VT sentence files or the original corpus CSV, with ``youtube_mapping.txt``
(clip -> ``vidN``); a clip's split comes from its number."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astar.pipelines.datasets.files import DatasetError, _csv_rows, _lines, _number_text
from astar.pipelines.datasets.format import (
    Annotations,
    _annotations,
    _left_out,
    _split_from_filename,
)

# MSVD's standard split by clip number (Venugopalan et al. 2015): vid1-1200 / 1201-1300 / 1301-1970.
MSVD_SPLIT_ENDS = (("train", 1200), ("val", 1300), ("test", 1970))


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
