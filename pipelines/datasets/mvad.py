"""M-VAD from LSMDC annotation files: tab-separated, one file per split."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astar.pipelines.datasets.files import DatasetError, _lines
from astar.pipelines.datasets.format import Annotations, _annotations, _left_out, canonical_split


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
