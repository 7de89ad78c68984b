"""The C3D feature store: many videos' features in few, large, crash-safe Zarr files.

See :mod:`astar.store.featurestore` for the layout and :mod:`astar.store.writer` for how a
partition is written, resumed and committed.

The names below are imported on first use, so that ``import astar.store.geometry`` (the decoder
child, the model) does not pay for zarr and pandas; ``from astar.store import FeatureStore``
works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {  # name -> the module of the store that defines it
    "CorruptVideo": "errors",
    "InvalidFeatures": "errors",
    "PartitionLocked": "errors",
    "SchemaMismatch": "errors",
    "StoreError": "errors",
    "VideoNotFound": "errors",
    "FeatureStore": "featurestore",
    "VideoFeatures": "featurestore",
    "LAYERS": "geometry",
    "TIME_STRIDES": "geometry",
    "INFO_KEYS": "manifest",
    "OK": "manifest",
    "PartitionPlan": "plan",
    "VerifyReport": "report",
    "summarize_store": "report",
    "verify_store": "report",
    "FORMAT_VERSION": "schema",
    "StoreSchema": "schema",
    "n_clips": "schema",
    "package_versions": "schema",
    "PartitionWriter": "writer",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names for type checkers and tests/import_graph.py
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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
