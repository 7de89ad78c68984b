"""The manifest: one row per video, ok or failed, as CSV that ``pandas.read_csv`` reads as is.

Each complete partition holds its own ``manifest.csv`` (the source of truth, written last when
the partition is committed); the store's top-level ``manifest.csv`` concatenates them for people
and tools that want one file. Timestamps are a JSON list in their cell.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import numpy as np
import pandas as pd

from astar.store.errors import StoreError
from astar.store.files import atomic_write_text
from astar.store.geometry import LAYERS

OK = "ok"  # status of a video whose features are stored; any other status is a failure kind

# What the extractor tells the store about a video, beside its features.
INFO_KEYS = (
    "n_frames",  # frames fed to C3D, padding included
    "n_sampled",  # frames sampled from the video before padding or subsampling
    "padded",  # the last frame was repeated up to the minimum
    "subsampled",  # uniformly subsampled down to the maximum
    "duration",  # seconds of video, from the decoded frame times
    "fps",  # sampling rate actually used (lower than the schema's when subsampled)
    "source_fps",  # frame rate of the source file
    "timestamps",  # seconds of every frame fed to C3D
)
TEXT_COLUMNS = ("id", "source", "status", "reason", "partition", "timestamps")
INT_COLUMNS = ("n_frames", "n_sampled")
BOOL_COLUMNS = ("padded", "subsampled")
FLOAT_COLUMNS = ("duration", "fps", "source_fps")
# Where each video's data lies in its partition's arrays; checksums of its stored bytes.
SPAN_NAMES = ("timestamps", *LAYERS)
OFFSET_COLUMNS = tuple(f"{name}_offset" for name in SPAN_NAMES)
LENGTH_COLUMNS = tuple(f"{name}_length" for name in SPAN_NAMES)
# Checksums (see astar.store.digest); stores written before XXH3 named them <layer>_sha256.
CHECKSUM_COLUMNS = tuple(f"{layer}_checksum" for layer in LAYERS)
LEGACY_CHECKSUM_COLUMNS = {f"{layer}_sha256": f"{layer}_checksum" for layer in LAYERS}
COLUMNS = (
    "id",
    "source",
    "status",
    "reason",
    "partition",
    *INFO_KEYS,
    *(column for name in SPAN_NAMES for column in (f"{name}_offset", f"{name}_length")),
    *CHECKSUM_COLUMNS,
)
MISSING = -1  # offset of a failed video, which has no data


def to_csv_text(rows: pd.DataFrame) -> str:
    """CSV of manifest rows; timestamps given as lists or arrays are written as JSON lists."""
    rows = rows.copy()
    rows["timestamps"] = [
        cell if isinstance(cell, str) else json.dumps([float(t) for t in cell])
        for cell in rows["timestamps"]
    ]
    return rows.loc[:, list(COLUMNS)].to_csv(index=False)


def write_manifest(path: Path, rows: pd.DataFrame) -> None:
    atomic_write_text(path, to_csv_text(rows))


def read_manifest(path: Path) -> pd.DataFrame:
    """A manifest CSV with its column types; timestamps stay JSON text (see ``parse_timestamps``).

    Ids such as ``0001`` or ``NA`` stay strings (pandas >= 2 parses floats round-trip exact).
    """
    dtypes = {
        **dict.fromkeys(TEXT_COLUMNS + CHECKSUM_COLUMNS, str),
        **dict.fromkeys(LEGACY_CHECKSUM_COLUMNS, str),
        **dict.fromkeys(INT_COLUMNS + OFFSET_COLUMNS + LENGTH_COLUMNS, "int64"),
        **dict.fromkeys(BOOL_COLUMNS, bool),
        **dict.fromkeys(FLOAT_COLUMNS, "float64"),
    }
    try:
        text = path.read_text(encoding="utf-8")
        table = pd.read_csv(
            StringIO(text),
            dtype=dtypes,
            keep_default_na=False,
            na_values={column: [""] for column in FLOAT_COLUMNS},
        )
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise StoreError(f"{path}: unreadable manifest ({error})") from error
    if not set(CHECKSUM_COLUMNS) & set(table.columns):
        table = table.rename(columns=LEGACY_CHECKSUM_COLUMNS)
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise StoreError(f"{path}: manifest lacks columns {missing}")
    return table


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in COLUMNS})


def parse_timestamps(cell: str) -> np.ndarray:
    """(frames,) float64 seconds from a manifest cell."""
    return np.asarray(json.loads(cell), dtype=np.float64)
