"""Generic captions: one CSV or JSON file of video ids and captions, with splits or without
(then split by a seeded permutation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from astar.pipelines.datasets.files import DatasetError, _csv_rows, _load_json, _require
from astar.pipelines.datasets.format import (
    Annotations,
    _annotations,
    canonical_split,
    seeded_split,
)


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
