"""MSR-VTT: the official ``videodatainfo.json`` files (the standard split or the paper's), or
``{video_id: {sen_id: caption}}`` JSON files, one per split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astar.pipelines.datasets.files import DatasetError, _load_json, _require
from astar.pipelines.datasets.format import (
    Annotations,
    _annotations,
    _left_out,
    canonical_split,
    seeded_split,
)

MSRVTT_PAPER_TEST = 1000  # test clips the paper draws from MSR-VTT's original training set


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
