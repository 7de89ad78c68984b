"""The sampling arithmetic of stage one: frame times, the sampling grid, which frames to take.

Pure functions on numbers and arrays (ASTAR-NOTES, stage one). Frame ``i``'s presentation time
comes from decord's per-frame timestamps when those are usable, else from ``i / average fps``;
the grid is ``k / fps`` while ``< duration``; each grid time takes the frame whose start is
nearest; a grid longer than the cap is subsampled uniformly.
"""

from __future__ import annotations

import math

import numpy as np

# Frame rates a real video can have. A time base outside this range is broken, e.g. an MP4 whose
# media timescale is 0 (ffmpeg then assumes 1 tick per second: one frame every 1024 s).
PLAUSIBLE_FPS: tuple[float, float] = (0.05, 1000.0)

# decord's timestamps are float32: grid times closer than this to the end count as past it.
TIME_EPS_S = 1e-4


def frame_times(raw_timestamps: np.ndarray, average_fps: float) -> tuple[np.ndarray, str] | None:
    """Frame boundaries in seconds from decord's ``(n, 2)`` (start, end) timestamps.

    Returns ``(bounds, timing)``: ``bounds`` is ``(n + 1,)``, frame ``i`` spans
    ``[bounds[i], bounds[i + 1])`` counted from the first frame's start, and ``timing`` says
    where the times came from. Per-frame timestamps win when finite, strictly increasing and
    at a plausible rate; otherwise frame ``i`` starts at ``i / average_fps``. ``None`` when
    neither is usable.
    """
    raw = np.asarray(raw_timestamps, dtype=np.float64)  # (n, 2)
    n = len(raw)
    if n >= 2 and np.isfinite(raw).all():
        starts = raw[:, 0] - raw[0, 0]  # (n,)
        steps = np.diff(starts)  # (n - 1,)
        if (steps > 0).all() and _plausible_fps(1.0 / float(np.median(steps))):
            # The last frame lasts as the container says, unless that is missing or absurd
            # (an end far past the last start would stretch the sampling grid over nothing).
            last = raw[-1, 1] - raw[-1, 0]
            if not 0 < last <= 10 * float(np.median(steps)):
                last = float(np.median(steps))
            return np.append(starts, starts[-1] + last), "timestamps"
    if n >= 1 and _plausible_fps(average_fps):
        return np.arange(n + 1, dtype=np.float64) / average_fps, "average_fps"
    return None


def _plausible_fps(fps: float) -> bool:
    return bool(math.isfinite(fps) and PLAUSIBLE_FPS[0] <= fps <= PLAUSIBLE_FPS[1])


def sample_times(duration: float, fps: float) -> np.ndarray:
    """The sampling grid ``k / fps`` for ``k = 0, 1, ...`` while ``< duration`` (float64)."""
    if not duration > 0:
        return np.zeros(0)
    times = np.arange(math.ceil(duration * fps) + 1) / fps  # a superset of the grid
    inside = times < duration - TIME_EPS_S
    inside[0] = True  # any positive duration holds the frame at time 0
    return times[inside]


def select_indices(n: int, max_frames: int | None) -> np.ndarray:
    """Indices of at most ``max_frames`` of ``n`` items, uniformly spread, first and last kept."""
    if max_frames is None or n <= max_frames:
        return np.arange(n)
    # Steps of (n - 1) / (max_frames - 1) >= 1, so rounding keeps the indices distinct.
    return np.round(np.linspace(0, n - 1, max_frames)).astype(np.int64)


def nearest_frames(starts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """For each time, the index of the frame whose start is nearest.

    Ties (within ``TIME_EPS_S``, as float32 timestamps blur them: 2 fps from 25 fps ties every
    other sample) go to the earlier frame.
    """
    if len(starts) == 1:
        return np.zeros(len(times), dtype=np.int64)
    right = np.searchsorted(starts, times).clip(1, len(starts) - 1)  # first start >= t
    left = right - 1
    take_right = starts[right] - times < times - starts[left] - TIME_EPS_S
    return np.where(take_right, right, left).astype(np.int64)
