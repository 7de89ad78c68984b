"""Caption datasets: adapters for MSVD, MSR-VTT, M-VAD and generic files, one normalised form.

Every adapter returns ``Annotations`` (the annotated videos with their splits, and their captions
as given); ``prepare_dataset`` turns them into a ``Dataset``: video files located on disk,
captions sanitised and normalised, problems counted, the vocabulary built. ``Dataset.save``
writes the one form every later stage reads (its files are described in ``format``).

Nothing is dropped silently: annotated videos missing on disk, videos without captions and
captions that normalise to nothing are counted in the summary with examples (``strict`` makes
them errors), and what an adapter leaves out by design (non-English MSVD rows, clips outside
the split mapping, MSR-VTT's original test set in the paper's split) is listed there too.
Malformed input raises ``DatasetError`` naming the file and the line or key.

One module per job; each imports only the ones listed before it:

    files                          reading text, lines, CSV and JSON with line numbers;
                                   ``DatasetError``
    locate                         finding video files on disk
    format                         the normalised form: ``Annotations``, the splits,
                                   ``prepare_dataset``, ``Dataset``
    msvd, msrvtt, mvad, generic    one adapter each
    folders                        a dataset folder in its standard layout, read by its adapter
"""

from astar.pipelines.datasets.files import DatasetError
from astar.pipelines.datasets.folders import FOLDER_KINDS, FOLDER_LAYOUTS, read_folder
from astar.pipelines.datasets.format import (
    DATASET_FORMAT,
    SPLITS,
    Annotations,
    Dataset,
    PrepareConfig,
    Split,
    canonical_split,
    prepare_dataset,
    seeded_split,
)
from astar.pipelines.datasets.generic import read_generic
from astar.pipelines.datasets.locate import index_video_files
from astar.pipelines.datasets.msrvtt import read_msrvtt_official, read_msrvtt_sentences
from astar.pipelines.datasets.msvd import read_msvd_corpus, read_msvd_mapping, read_msvd_sents
from astar.pipelines.datasets.mvad import read_mvad

__all__ = [
    "DATASET_FORMAT",
    "FOLDER_KINDS",
    "FOLDER_LAYOUTS",
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
