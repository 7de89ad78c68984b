"""A dataset folder in its standard layout (what the DVC pipeline reads): its kind says which
files to look for and which adapter reads them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from astar.pipelines.datasets.files import DatasetError
from astar.pipelines.datasets.format import Annotations, _split_from_filename
from astar.pipelines.datasets.generic import read_generic
from astar.pipelines.datasets.msrvtt import read_msrvtt_official, read_msrvtt_sentences
from astar.pipelines.datasets.msvd import read_msvd_corpus, read_msvd_sents
from astar.pipelines.datasets.mvad import read_mvad

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
