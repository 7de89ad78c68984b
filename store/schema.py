"""What a feature store holds and how it was made: the schema written in the root group.

A consumer (training, evaluation) reads the schema to trust the features: which frame rate and
size, which network and weights, which dtype. Two extractions with different schemas must never
share a store, so :meth:`StoreSchema.differences` names every field that differs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from astar.store.errors import StoreError
from astar.store.geometry import LAYERS, TIME_STRIDES

# 1: pool layers stored (C, T, H, W), as they are read. 2: every layer stored with time first,
# (T, C, H, W), so that a video's span of a chunk is one run of its bytes (one read, no gather).
FORMAT_VERSION = 2
STORE_KIND = "astar.feature_store"  # marks a zarr group as one of ours
DTYPES = ("float16", "float32")
# Packages whose versions are recorded; distribution names as pip knows them.
VERSIONED_PACKAGES = ("astar-captioning", "torch", "decord", "zarr", "numpy")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the features (``unknown`` when absent)."""
    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def time_axis(layer: str) -> int:
    """Axis of time in a video's array as it is read and written through the API: (C, T, H, W)
    for pool layers, (clips, D) for fc7. See :meth:`StoreSchema.stored_axis` for the disk."""
    return 1 if layer in TIME_STRIDES else 0


def n_clips(n_frames: int, clip_length: int, clip_stride: int) -> int:
    """Number of fc7 clips of ``clip_length`` frames every ``clip_stride`` frames.

    Clips start at 0, stride, 2 stride, ... and one more clip is added, if needed, so that the
    last one ends at the last frame: ``ceil((n - length) / stride) + 1`` clips for
    ``n >= length``, none for a shorter video (it cannot fill one clip).
    """
    if n_frames < clip_length:
        return 0
    return -(-(n_frames - clip_length) // clip_stride) + 1


@dataclass(frozen=True)
class Weights:
    """Where the C3D weights came from: a weights file (its SHA-256) or a seeded random init.

    Exactly one of the two is set. ``str()`` gives the short form used in messages,
    ``sha256:<hex>`` or ``random(seed=S)``, which is also how format-1 stores written before
    this class recorded it (:meth:`parse` still reads them).
    """

    sha256: str | None = None  # hex digest of the weights file
    seed: int | None = None  # seed of the random (Kaiming) init, when there is no file

    def __post_init__(self) -> None:
        if (self.sha256 is None) == (self.seed is None):
            raise StoreError(f"weights need exactly one of sha256 and seed, got {self!r}")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise StoreError(f"weights sha256 must be 64 hex digits, got {self.sha256!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise StoreError(f"weights seed must be an integer, got {self.seed!r}")

    @property
    def is_random(self) -> bool:
        return self.seed is not None

    def __str__(self) -> str:
        return f"random(seed={self.seed})" if self.is_random else f"sha256:{self.sha256}"

    @classmethod
    def parse(cls, value: Weights | dict[str, Any] | str) -> Weights:
        """A ``Weights`` from itself, its dict form, or the string form of older stores."""
        if isinstance(value, Weights):
            return value
        if isinstance(value, dict):
            return cls(**{k: value.get(k) for k in ("sha256", "seed")})
        if isinstance(value, str):
            seeded = re.fullmatch(r"random\(seed=(-?\d+)\)", value)
            if seeded:
                return cls(seed=int(seeded.group(1)))
            digest = value.removeprefix("sha256:")
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return cls(sha256=digest)
        raise StoreError(f"weights {value!r} is neither a SHA-256 nor a random seed")


@dataclass(frozen=True)
class StoreSchema:
    """How the features of a store were made, stored as the root group's attributes."""

    fps: float  # frames sampled per second of video
    size: int  # frames resized to size x size
    min_frames: int  # shorter videos padded to this many frames
    max_frames: int | None  # longer videos uniformly subsampled to this many; None = no cap
    backbone: str  # network, e.g. "c3d" or "c3d-small"
    weights: Weights  # the weights file's SHA-256, or the seed of a random init
    preprocessing: str  # pixel pipeline fed to the network, e.g. "caffe-bgr-mean"
    clip_length: int  # frames per fc7 clip (16)
    clip_stride: int  # frames between fc7 clip starts (8)
    layer_shapes: dict[str, tuple[int, ...]]  # per layer, the shape without time
    dtype: str = "float16"  # storage dtype of the features: float16 or float32
    format_version: int = FORMAT_VERSION  # layout version of the store on disk
    versions: dict[str, str] = field(default_factory=package_versions)  # package -> version

    def __post_init__(self) -> None:
        # Normalise shapes read back from JSON (lists) to tuples so equality is by value.
        shapes = {name: tuple(int(d) for d in dims) for name, dims in self.layer_shapes.items()}
        object.__setattr__(self, "layer_shapes", shapes)
        object.__setattr__(self, "weights", Weights.parse(self.weights))
        problems = self._problems()
        if problems:
            raise StoreError("invalid store schema: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if set(self.layer_shapes) != set(LAYERS):
            found = list(self.layer_shapes)
            problems.append(f"layer_shapes must have exactly {LAYERS}, got {found}")
        for name, dims in self.layer_shapes.items():
            wanted = 3 if name in TIME_STRIDES else 1
            if len(dims) != wanted or min(dims, default=0) < 1:
                problems.append(f"{name} shape {dims} must be {wanted} positive sizes (no time)")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if not (math.isfinite(self.fps) and self.fps > 0):
            problems.append(f"fps must be positive, got {self.fps}")
        if self.clip_length < 1 or self.clip_stride < 1:
            clips = f"{self.clip_length}/{self.clip_stride}"
            problems.append(f"clip length and stride must be >= 1, got {clips}")
        return problems

    def full_shape(self, layer: str, length: int) -> tuple[int, ...]:
        """Shape of ``length`` time steps (or clips) of ``layer``: (C, T, H, W) or (clips, D)."""
        return self._shape_along(layer, length, time_axis(layer))

    def stored_axis(self, layer: str) -> int:
        """Axis of time in ``layer``'s arrays on disk: first from format 2 on, else as read."""
        return 0 if self.format_version >= 2 else time_axis(layer)

    def stored_shape(self, layer: str, length: int) -> tuple[int, ...]:
        """Shape on disk of ``length`` time steps of ``layer``: (T, C, H, W) from format 2 on."""
        return self._shape_along(layer, length, self.stored_axis(layer))

    def _shape_along(self, layer: str, length: int, axis: int) -> tuple[int, ...]:
        dims = self.layer_shapes[layer]
        return (*dims[:axis], length, *dims[axis:])

    def to_stored(self, layer: str, values: np.ndarray) -> np.ndarray:
        """A video's ``layer`` in the axis order of the disk (a view where it can be)."""
        return np.moveaxis(values, time_axis(layer), self.stored_axis(layer))

    def from_stored(self, layer: str, values: np.ndarray) -> np.ndarray:
        """A video's ``layer`` read from disk, as the API gives it (C, T, H, W): a view."""
        return np.moveaxis(values, self.stored_axis(layer), time_axis(layer))

    def expected_lengths(self, n_frames: int) -> dict[str, int]:
        """Time steps per pool layer and clips of fc7 for a video of ``n_frames`` frames."""
        lengths = {name: n_frames // stride for name, stride in TIME_STRIDES.items()}
        lengths["fc7"] = n_clips(n_frames, self.clip_length, self.clip_stride)
        return lengths

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready attributes (shapes as lists), tagged with ``kind`` to recognise the store."""
        attributes = asdict(self)
        attributes["layer_shapes"] = {k: list(v) for k, v in self.layer_shapes.items()}
        return {"kind": STORE_KIND, **attributes}

    @classmethod
    def from_dict(cls, attributes: dict[str, Any]) -> StoreSchema:
        """Rebuild a schema from :meth:`to_dict`; refuse other kinds and newer format versions."""
        if attributes.get("kind") != STORE_KIND:
            kind = attributes.get("kind")
            raise StoreError(f"not an astar feature store (attribute kind={kind!r})")
        found = attributes.get("format_version")
        if not isinstance(found, int) or not 1 <= found <= FORMAT_VERSION:
            raise StoreError(
                f"store format version {found!r} is not supported (this astar reads up to "
                f"{FORMAT_VERSION}); upgrade astar"
            )
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in attributes and name != "versions"]
        if missing:
            raise StoreError(f"store schema lacks {', '.join(missing)}")
        values = {name: attributes[name] for name in names if name in attributes}
        values.setdefault("versions", {})  # unknown, rather than this machine's
        return cls(**values)

    def differences(
        self, other: StoreSchema, mine: str = "in the store", theirs: str = "asked"
    ) -> list[str]:
        """Fields that differ, as ``name: <self> <mine>, <other> <theirs>``; package versions
        and the format version ignored.

        Versions differ after any upgrade without changing what the features mean, so they are
        recorded but never block reuse of a store. Nor does the format: a store goes on being
        written (resumed) and read in the layout it was made with.
        """
        return [
            f"{f.name}: {_shown(getattr(self, f.name))} {mine}, "
            f"{_shown(getattr(other, f.name))} {theirs}"
            for f in fields(self)
            if f.name not in IGNORED and getattr(self, f.name) != getattr(other, f.name)
        ]


IGNORED = ("versions", "format_version")  # fields that never keep a store from being reused


def _shown(value: Any) -> str:
    """A field's value in a message: weights in their short form, the rest as repr."""
    return repr(str(value)) if isinstance(value, Weights) else repr(value)


__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "StoreSchema",
    "Weights",
    "n_clips",
    "package_versions",
    "time_axis",
]
