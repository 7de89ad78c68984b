"""Stage one, first half: a video file -> frames sampled by time, resized, padded or capped.

``decode_video`` decodes one file in this process with decord, checking the file and its
container first (``astar.extract.containers``) and choosing the frames by time
(``astar.extract.sampling``). ``astar.extract.isolation.IsolatedDecoder`` runs it in a child
process with a timeout, because decord can hang, abort or segfault on a bad file.

Sampling (ASTAR-NOTES, stage one). Each frame's presentation time comes from decord's per-frame
timestamps (variable frame rate works); only when those are unusable (missing, not increasing,
an implausible rate) do frame ``i``'s times fall back to ``i / average fps``. Times are counted
from the first frame, the duration is the end of the last frame, and the sampling grid is
``k / fps`` for ``k = 0, 1, ...`` while ``< duration``; each grid time takes the frame whose start
is nearest. A grid longer than ``max_frames`` is subsampled uniformly *before* decoding, so only
the frames used are decoded; a result shorter than ``min_frames`` repeats its last frame.

Failures are values of ``VideoDecodeError.kind`` (``FAILURE_KINDS``), each with a reason that
names the file:

- ``missing``: no such path. ``unreadable``: the path exists but is not a readable regular file
  (a directory, a FIFO, a device, no read permission). ``empty_file``: zero bytes.
- ``truncated``: the container declares more bytes than the file holds (MP4/MOV top-level boxes,
  the Matroska/WebM segment size, AVI RIFF chunks): the file was cut short, e.g. by an
  interrupted download. By default a cut file fails even when its first part decodes, because
  features of part of a video would silently stand for all of it; ``allow_truncated=True``
  decodes the intact part instead (when decord can open it).
- ``corrupt``: decord cannot open the file as a video container (e.g. random bytes).
- ``no_video_stream``: a container without a video stream (audio only).
- ``too_short``: fewer than two decodable frames (a still image is not a video).
- ``bad_fps``: neither the per-frame timestamps nor the container's average fps give a usable
  time base (NaN, zero or infinite fps, or a rate outside ``PLAUSIBLE_FPS``).
- ``decode_error``: decord fails on a frame that later frames survive, or raises otherwise.
- ``timeout`` / ``crashed``: only from ``IsolatedDecoder``, the child hung or died.

Containers often over-report their frame count. When frames at the end do not decode, the video
is taken to end before the first failing frame (recorded in ``DecodedVideo.dropped_tail``) and
the grid is rebuilt for that shorter duration.

This module must not import torch: the decoder child process (``astar.extract.isolation``)
loads it.
"""

from __future__ import annotations

import math
import re
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from astar.extract.containers import _source_size, container_shortfall
from astar.extract.sampling import (
    PLAUSIBLE_FPS,
    frame_times,
    nearest_frames,
    sample_times,
    select_indices,
)
from astar.store.geometry import FRAME_SIZE, MIN_FRAMES

FAILURE_KINDS: tuple[str, ...] = (
    "missing",
    "unreadable",
    "empty_file",
    "corrupt",
    "truncated",
    "no_video_stream",
    "too_short",
    "bad_fps",
    "decode_error",
    "timeout",
    "crashed",
)


@dataclass(frozen=True)
class DecodeConfig:
    """How frames are sampled from a video; the first four fields are recorded in the store."""

    fps: float = 2.0  # frames sampled per second of video, by timestamp
    # Output frames are size x size (resized, not cropped). decord 0.6 fails on some small
    # widths (1-4, 6, 8, 12, 16, 24, 48, 72 seen): every frame then fails with decode_error.
    size: int = FRAME_SIZE  # C3D's input
    min_frames: int = MIN_FRAMES  # shorter results repeat their last frame up to this count
    max_frames: int | None = 128  # longer sampling grids are subsampled uniformly; None = no cap
    timeout_s: float = 120.0  # wall-clock seconds IsolatedDecoder allows one video
    allow_truncated: bool = False  # decode the intact part of a cut file instead of failing

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a positive number, got {self.fps}")
        if self.size < 1:
            raise ValueError(f"size must be at least 1, got {self.size}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be at least 1, got {self.min_frames}")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(
                f"max_frames ({self.max_frames}) must be None or at least min_frames "
                f"({self.min_frames})"
            )
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")

    def to_dict(self) -> dict:
        return asdict(self)


class VideoDecodeError(Exception):
    """A video that cannot be used; ``kind`` is in ``FAILURE_KINDS``, ``reason`` names the file."""

    def __init__(self, path: str | Path, kind: str, reason: str) -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {FAILURE_KINDS}")
        super().__init__(reason)
        self.path = Path(path)
        self.kind = kind
        self.reason = reason

    def __reduce__(self):
        # Exceptions pickle their args only; rebuild from all three fields (it crosses a pipe).
        return type(self), (self.path, self.kind, self.reason)


def _fail(path: Path, kind: str, problem: str) -> VideoDecodeError:
    return VideoDecodeError(path, kind, f"{path}: {problem}")


@dataclass
class DecodedVideo:
    """Frames of one video and how they were obtained."""

    frames: np.ndarray  # (N, size, size, 3) uint8 RGB, N >= min_frames
    timestamps: np.ndarray  # (N,) float64 seconds from the first frame; padding repeats the last
    n_sampled: int  # real frames used before padding (after the max_frames cap)
    n_available: int  # frames the sampling grid produced before the cap
    padded: bool  # frames were repeated up to min_frames
    subsampled: bool  # the grid was cut down to max_frames
    duration: float  # seconds from the first frame's start to the last decodable frame's end
    source_fps: float | None  # the container's average fps (informational); None if NaN/0/inf
    width: int  # source (coded) width; 0 if the header probe could not tell
    height: int  # source (coded) height; 0 if the header probe could not tell
    source_indices: np.ndarray  # (N,) int64 index of each frame in the source, in display order
    timing: str  # "timestamps" (per-frame) or "average_fps" (fallback: i / fps)
    dropped_tail: int  # frames the container lists at the end that did not decode


# --------------------------------------------------------------------------------------------
# Checks before decord sees the file


def _check_file(path: Path) -> None:
    """Fail ``missing``, ``unreadable`` or ``empty_file`` before handing the path to decord."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _fail(path, "missing", "no such file") from None
    except OSError as error:
        raise _fail(path, "unreadable", f"cannot stat: {error.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise _fail(path, "unreadable", "is a directory, not a video file")
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO would block until a writer appears; never try.
        raise _fail(path, "unreadable", "is not a regular file (a FIFO, socket or device)")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise _fail(path, "unreadable", f"cannot be read: {error.strerror}") from None
    if info.st_size == 0:
        raise _fail(path, "empty_file", "the file is empty (0 bytes)")


# --------------------------------------------------------------------------------------------
# Decoding in this process


def decode_video(path: str | Path, config: DecodeConfig) -> DecodedVideo:
    """Decode ``config.fps`` frames per second of ``path``; raises ``VideoDecodeError``."""
    path = Path(path)
    _check_file(path)
    shortfall = container_shortfall(path)
    if shortfall is not None and not config.allow_truncated:
        declared, actual = shortfall
        raise _fail(
            path,
            "truncated",
            f"the container declares {declared} bytes but the file has {actual} "
            f"({actual / declared:.0%}): the file was cut short",
        )
    reader = _open_reader(path, config, truncated=shortfall is not None)
    n_listed = len(reader)
    if n_listed < 2:
        raise _fail(path, "too_short", f"only {n_listed} frame: a still image is not a video")
    average_fps = float(reader.get_avg_fps())
    time_base = frame_times(reader.get_frame_timestamp(range(n_listed)), average_fps)
    if time_base is None:
        raise _fail(
            path,
            "bad_fps",
            f"no usable time base: average fps {average_fps:g} and per-frame timestamps "
            f"unusable (missing, not increasing or outside {PLAUSIBLE_FPS} fps)",
        )
    bounds, timing = time_base  # (n_listed + 1,)

    # Decode the frames the grid needs; if the tail fails, the video ends before it: re-plan.
    decoded: dict[int, np.ndarray] = {}
    n_frames = n_listed
    while True:
        times = sample_times(bounds[n_frames], config.fps)  # (n_available,)
        kept = select_indices(len(times), config.max_frames)  # (n_sampled,)
        indices = nearest_frames(bounds[:n_frames], times[kept])  # (n_sampled,)
        failure = _decode_frames(reader, path, indices, decoded, bounds, config.size)
        if failure is None:
            break
        n_frames, message = failure
        if n_frames == 0:
            raise _fail(path, "decode_error", f"not even the first frame decodes: {message}")
        if n_frames < 2:
            raise _fail(path, "too_short", f"only 1 decodable frame of {n_listed} listed")

    frames = np.stack([decoded[int(i)] for i in indices])  # (n_sampled, size, size, 3)
    n_sampled = len(indices)
    n_pad = max(config.min_frames - n_sampled, 0)
    indices = np.concatenate([indices, np.repeat(indices[-1:], n_pad)])  # (N,)
    frames = np.concatenate([frames, np.repeat(frames[-1:], n_pad, axis=0)])  # (N, S, S, 3)
    width, height = _source_size(path)
    return DecodedVideo(
        frames=np.ascontiguousarray(frames),
        timestamps=bounds[indices],
        n_sampled=n_sampled,
        n_available=len(times),
        padded=n_pad > 0,
        subsampled=len(kept) < len(times),
        duration=float(bounds[n_frames]),
        source_fps=average_fps if math.isfinite(average_fps) and average_fps > 0 else None,
        width=width,
        height=height,
        source_indices=indices,
        timing=timing,
        dropped_tail=n_listed - n_frames,
    )


def _decord_errors() -> tuple[type[Exception], ...]:
    import decord

    # decord raises DECORDError from C++ checks and RuntimeError when it cannot open a file.
    return decord.DECORDError, RuntimeError


def _open_reader(path: Path, config: DecodeConfig, truncated: bool):
    import decord

    try:
        # Resizing inside decord's ffmpeg filter graph (swscale, area-aware when shrinking) costs
        # less than converting full-size RGB frames and resizing them afterwards.
        return decord.VideoReader(str(path), width=config.size, height=config.size)
    except AssertionError:  # decord asserts that the stream lists at least one frame
        raise _fail(path, "too_short", "the video stream holds no frame") from None
    except _decord_errors() as error:
        message = _decord_message(error)
        if "cannot find video stream" in message:
            raise _fail(path, "no_video_stream", "the file has no video stream") from None
        # "Error reading <path>..." says nothing more; ffmpeg's reason went to stderr.
        detail = "" if message.startswith("Error reading") else f" ({message})"
        if truncated:
            raise _fail(path, "truncated", f"cut short and undecodable{detail}") from None
        raise _fail(path, "corrupt", f"not a video container decord can open{detail}") from None


def _decode_frames(
    reader,
    path: Path,
    indices: np.ndarray,
    decoded: dict[int, np.ndarray],
    bounds: np.ndarray,
    size: int,
) -> tuple[int, str] | None:
    """Decode the frames of ``indices`` not yet in ``decoded`` into it.

    Returns the first frame that failed and decord's message when every later frame tried
    failed too (an over-reported or cut tail), else None; a failure followed by a success is
    a decode_error.
    """
    wanted = [int(i) for i in np.unique(indices) if int(i) not in decoded]
    if not wanted:
        return None
    errors = _decord_errors()
    try:
        batch = reader.get_batch(wanted).asnumpy()  # (len(wanted), S, S, 3)
        decoded.update(zip(wanted, _checked(batch, path, size), strict=True))
        return None
    except errors:
        pass  # one bad frame fails the whole batch: find which, one at a time
    failed: list[int] = []
    first_error = ""
    for index in wanted:
        try:
            decoded[index] = _checked(reader.get_batch([index]).asnumpy(), path, size)[0]
        except errors as error:
            failed.append(index)
            first_error = first_error or _decord_message(error)
    if not failed:
        return None
    recovered = [i for i in wanted if i > failed[0] and i not in failed]
    if recovered:
        raise _fail(
            path,
            "decode_error",
            f"frame {failed[0]} (at {bounds[failed[0]]:.2f} s) does not decode but frame "
            f"{recovered[0]} does: {first_error}",
        )
    return failed[0], first_error


def _checked(batch: np.ndarray, path: Path, size: int) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[1:] != (size, size, 3) or batch.dtype != np.uint8:
        raise _fail(path, "decode_error", f"decord returned frames of {batch.shape} {batch.dtype}")
    return batch


def _decord_message(error: BaseException) -> str:
    """decord's message without its ``[12:00:00] /build/path/file.cc:123:`` prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(error)).strip()
    return text.splitlines()[-1] if text else type(error).__name__
