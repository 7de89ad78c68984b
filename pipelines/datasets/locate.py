"""Finding video files on disk: an annotated video's file is found by its name without
extension, or by its path relative to the videos folder (``movie/clip``)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from astar.pipelines.datasets.files import DatasetError


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
