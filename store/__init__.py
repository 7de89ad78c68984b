"""The C3D feature store: many videos' features in few, large, crash-safe Zarr files.

See :mod:`astar.store.featurestore` for the layout and :mod:`astar.store.writer` for how a
partition is written, resumed and committed.
"""

from astar.store.errors import (
    CorruptVideo,
    InvalidFeatures,
    PartitionLocked,
    SchemaMismatch,
    StoreError,
    VideoNotFound,
)
from astar.store.featurestore import FeatureStore, VideoFeatures
from astar.store.geometry import LAYERS, TIME_STRIDES
from astar.store.manifest import INFO_KEYS, OK
from astar.store.plan import PartitionPlan
from astar.store.report import VerifyReport, summarize_store, verify_store
from astar.store.schema import FORMAT_VERSION, StoreSchema, n_clips, package_versions
from astar.store.writer import PartitionWriter

__all__ = [
    "FORMAT_VERSION",
    "INFO_KEYS",
    "LAYERS",
    "OK",
    "TIME_STRIDES",
    "CorruptVideo",
    "FeatureStore",
    "InvalidFeatures",
    "PartitionLocked",
    "PartitionPlan",
    "PartitionWriter",
    "SchemaMismatch",
    "StoreError",
    "StoreSchema",
    "VerifyReport",
    "VideoFeatures",
    "VideoNotFound",
    "n_clips",
    "package_versions",
    "summarize_store",
    "verify_store",
]
