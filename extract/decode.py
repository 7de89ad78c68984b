"""Stage one, first half: a video file -> frames sampled by time, resized, padded or capped.

``decode_video`` decodes one file in this process with decord. ``IsolatedDecoder`` runs the same
function in a persistent child process with a wall-clock timeout, because decord can hang, abort
or segfault on a bad file: the parent survives, records why, restarts the child and goes on.

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

This module must not import torch: it is what the decoder child process loads.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import logging
import math
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

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

# Frame rates a real video can have. A time base outside this range is broken, e.g. an MP4 whose
# media timescale is 0 (ffmpeg then assumes 1 tick per second: one frame every 1024 s).
PLAUSIBLE_FPS: tuple[float, float] = (0.05, 1000.0)

# decord's timestamps are float32: grid times closer than this to the end count as past it.
TIME_EPS_S = 1e-4

# A fresh interpreter importing numpy and decord needs about a second; allow for a loaded machine.
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class DecodeConfig:
    """How frames are sampled from a video; the first four fields are recorded in the store."""

    fps: float = 2.0  # frames sampled per second of video, by timestamp
    # Output frames are size x size (resized, not cropped). decord 0.6 fails on some small
    # widths (1-4, 6, 8, 12, 16, 24, 48, 72 seen): every frame then fails with decode_error.
    size: int = 112
    min_frames: int = 16  # shorter results repeat their last frame up to this count
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


class DecoderStartupError(RuntimeError):
    """The decoder child process could not start: the environment is broken, not a video."""


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
# Pure helpers: time base, sampling grid, frame choice


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


def container_shortfall(path: str | Path) -> tuple[int, int] | None:
    """``(declared, actual)`` bytes when the container says the file is longer than it is.

    Knows MP4/MOV (top-level box sizes), Matroska/WebM (the segment size) and AVI (RIFF chunk
    sizes); ``None`` for a complete file or a format it does not know.
    """
    path = Path(path)
    actual = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
        if head[4:8] in _MP4_FIRST_BOXES:
            declared = _mp4_extent(handle, actual)
        elif head[:4] == _EBML_MAGIC:
            handle.seek(0)
            declared = _matroska_extent(handle.read(4096))
        elif head[:4] == b"RIFF":
            declared = _riff_extent(handle, actual)
        else:
            declared = None
    return (declared, actual) if declared is not None and declared > actual else None


_MP4_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MATROSKA_SEGMENT = 0x18538067


def _mp4_extent(handle, actual: int) -> int | None:
    """End of the last top-level box, or of the first that runs past ``actual``."""
    position = 0
    while position + 8 <= actual:
        handle.seek(position)
        header = handle.read(16)
        size = int.from_bytes(header[:4], "big")
        if size == 1:  # a 64-bit size follows the type
            size = int.from_bytes(header[8:16], "big")
        elif size == 0:  # the box runs to the end of the file, whatever that is
            return None
        if size < 8:  # malformed; let decord judge it
            return None
        position += size
        if position > actual:
            return position
    return position


def _riff_extent(handle, actual: int) -> int | None:
    """End of the last RIFF chunk (AVI files over 1 GiB chain RIFF 'AVIX' chunks)."""
    position = 0
    while position + 8 <= actual:
        handle.seek(position)
        header = handle.read(8)
        if header[:4] != b"RIFF":
            break
        position += 8 + int.from_bytes(header[4:8], "little")
        if position > actual:
            return position
    return position


def _matroska_extent(head: bytes) -> int | None:
    """End of the Segment element, or None when its size is unknown (live streams)."""
    try:
        _, position = _ebml_vint(head, 0, keep_marker=True)  # EBML header id
        header_size, position = _ebml_vint(head, position, keep_marker=False)
        position += header_size
        segment_id, position = _ebml_vint(head, position, keep_marker=True)
        segment_size, position = _ebml_vint(head, position, keep_marker=False)
    except IndexError:
        return None
    if segment_id != _MATROSKA_SEGMENT or segment_size is None:
        return None
    return position + segment_size


def _ebml_vint(data: bytes, position: int, keep_marker: bool) -> tuple[int | None, int]:
    """An EBML variable-length integer at ``position``: (value, position after it).

    The count of leading zero bits of the first byte gives the length; sizes whose value bits
    are all ones mean "unknown" and come back as None.
    """
    length = 9 - data[position].bit_length()  # leading zero bits + 1
    if not 1 <= length <= 8 or len(data) < position + length:
        raise IndexError("not an EBML integer, or it runs past the data read")
    raw = int.from_bytes(data[position : position + length], "big")
    if keep_marker:
        return raw, position + length
    value = raw & ((1 << (7 * length)) - 1)
    return (None if value == (1 << (7 * length)) - 1 else value), position + length


def _source_size(path: Path) -> tuple[int, int]:
    """Coded width and height from the container header (PyAV reads headers, decodes nothing).

    decord has no getter for the source size once it resizes at decode; (0, 0) if PyAV cannot
    tell, since the size is informational only.
    """
    import av

    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            return int(stream.codec_context.width), int(stream.codec_context.height)
    except (av.FFmpegError, IndexError, OSError):
        return 0, 0


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


# --------------------------------------------------------------------------------------------
# Decoding in a child process


class IsolatedDecoder:
    """``decode_video`` in a persistent child process with a per-video wall-clock timeout.

    The child is a fresh interpreter (never a fork of this process, which may hold torch's
    threads). It is started with ``subprocess`` rather than multiprocessing's spawn context
    because spawn re-imports the parent's ``__main__`` in the child, which for the
    ``extract-features`` CLI would load torch there too; messages still use multiprocessing's
    pickled ``Connection`` framing over two pipes. A third pipe collects the child's stderr
    (ffmpeg's complaints about bad files) so the last lines can explain a crash.

    ``imap`` keeps ``prefetch`` videos queued beyond the one it hands out, and a thread drains
    the child's results as they come, so the child decodes ahead while the caller computes.
    A hung child is killed after ``config.timeout_s`` (kind ``timeout``), a dead one is noticed
    at once (kind ``crashed``); either way a new child takes over the videos still queued.

    ``_faults`` is a test hook: ``{str(path): action}`` with action ``"hang"``, ``"abort"``,
    ``"segfault"``, ``"raise"`` or ``"sleep:SECONDS"``, done by the child for that path.
    """

    def __init__(
        self,
        config: DecodeConfig,
        prefetch: int = 2,
        *,
        _faults: Mapping[str, str] | None = None,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.config = config
        self.prefetch = prefetch
        self._faults = dict(_faults or {})
        self._child: _Child | None = None
        self._next_seq = 0
        self._in_imap = False
        self.restarts = 0  # children replaced after a hang or a crash

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child (politely, then by force)."""
        if self._child is not None:
            self._child.close()
            self._child = None

    def decode(self, path: str | Path) -> DecodedVideo:
        """Decode one video in the child; raises ``VideoDecodeError`` (also timeout/crashed)."""
        ((_, result),) = list(self.imap([path]))
        if isinstance(result, VideoDecodeError):
            raise result
        return result

    def imap(
        self, paths: Iterable[str | Path]
    ) -> Iterator[tuple[str | Path, DecodedVideo | VideoDecodeError]]:
        """``(path, result)`` in the order given; a failed video's result is its error."""
        if self._in_imap:
            raise RuntimeError("IsolatedDecoder runs one imap at a time")
        self._in_imap = True
        pending: collections.deque[tuple[int, str | Path]] = collections.deque()
        remaining = iter(paths)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) <= self.prefetch:
                    path = next(remaining, _NO_MORE)
                    if path is _NO_MORE:
                        exhausted = True
                    else:
                        pending.append((self._next_seq, path))
                        self._next_seq += 1
                        self._send(*pending[-1])
                if not pending:
                    return
                seq, path = pending[0]
                result = self._await(seq, path, pending)
                pending.popleft()
                yield path, result
        finally:
            self._in_imap = False
            if pending and self._child is not None:
                # Abandoned mid-way: the child would decode every queued video before it read
                # a request to stop, and its results would be stale. Kill it instead.
                self._child.kill()
                self.close()

    def _send(self, seq: int, path: str | Path) -> None:
        if self._child is None:
            self._child = _Child(self.config, self._faults)
        self._child.send(seq, path)

    def _await(
        self, seq: int, path: str | Path, pending: collections.deque
    ) -> DecodedVideo | VideoDecodeError:
        """The result of the oldest queued request, or the error of a hang or a crash."""
        retried = False
        while True:
            child = self._child
            assert child is not None  # _send started it
            message = child.next_message(self._time_left(child, seq))
            if message is not None and message is not _Child.EOF:
                if message[0] == "done" and message[1] == seq:
                    child.forget(seq)
                    return message[2]
                continue  # a "start" (the collector thread noted its time) or a stale result
            if message is _Child.EOF and seq not in child.started and not retried:
                # It died between videos (killed from outside?): not this video's fault.
                log.warning("decoder process %s between videos; restarting", child.describe_exit())
                self._replace_child(list(pending))
                retried = True
                continue
            if message is None:
                problem = (
                    f"decoding took longer than {self.config.timeout_s:g} s; "
                    "the decoder process was killed"
                )
                child.kill()
            else:
                problem = (
                    f"the decoder process {child.describe_exit()} while decoding this file"
                    f"{child.last_output()}"
                )
            error = _fail(Path(path), "timeout" if message is None else "crashed", problem)
            log.warning("%s", error.reason)
            self._replace_child(list(pending)[1:])
            return error

    def _time_left(self, child: _Child, seq: int) -> float:
        """Seconds before the request ``seq`` counts as hung.

        The clock runs from when the child took the video up or, until it says so, from when
        the video became the oldest one waiting.
        """
        started = child.started.get(seq, child.clock_floor(seq))
        return max(started + self.config.timeout_s - time.monotonic(), 0.0)

    def _replace_child(self, resend: list[tuple[int, str | Path]]) -> None:
        """Stop the current child and hand the requests ``resend`` to a new one."""
        if self._child is not None:
            self._child.kill()
            self._child.close()
            self._child = None
        self.restarts += 1
        for seq, path in resend:
            self._send(seq, path)


_NO_MORE = object()


class _Child:
    """One decoder child process, the thread collecting its messages and its stderr tail."""

    EOF = ("eof",)

    def __init__(self, config: DecodeConfig, faults: Mapping[str, str]) -> None:
        request_read, request_write = os.pipe()
        result_read, result_write = os.pipe()
        log_read, log_write = os.pipe()
        command = [
            sys.executable,
            "-c",
            "from astar.extract.decode import _child_main; "
            f"_child_main({request_read}, {result_write})",
        ]
        self.process = subprocess.Popen(
            command,
            pass_fds=(request_read, result_write),
            stdin=subprocess.DEVNULL,
            stdout=log_write,
            stderr=log_write,
        )
        # Close our copies of the child's ends, so that its death reads as end-of-file here.
        for fd in (request_read, result_write, log_write):
            os.close(fd)
        self._requests = Connection(request_write, readable=False)
        self._results = Connection(result_read, writable=False)
        self._messages: queue.Queue = queue.Queue()
        self._output: collections.deque[str] = collections.deque(maxlen=64)
        self.started: dict[int, float] = {}  # seq -> when the child began it (monotonic)
        self._sent: dict[int, float] = {}  # seq -> when it was queued
        self._last_done = time.monotonic()
        self._readers = [
            threading.Thread(target=self._collect, name="decode-results", daemon=True),
            threading.Thread(target=self._drain, args=(log_read,), name="decode-log", daemon=True),
        ]
        for thread in self._readers:
            thread.start()
        self._requests.send((config, dict(faults)))
        ready = self.next_message(STARTUP_TIMEOUT_S)
        if ready is None or ready[0] != "ready":
            self.kill()
            why = "did not start in time" if ready is None else self.describe_exit()
            self.close()
            raise DecoderStartupError(f"decoder child process {why}{self.last_output()}")

    def _collect(self) -> None:
        """Move every message from the child into the queue, then EOF when the child is gone."""
        while True:
            try:
                message = self._results.recv()
            except (EOFError, OSError):
                self._messages.put(self.EOF)
                return
            now = time.monotonic()
            if message[0] == "start":
                self.started[message[1]] = now
            elif message[0] == "done":
                self._last_done = now
            self._messages.put(message)

    def _drain(self, fd: int) -> None:
        with open(fd, "rb") as stream:
            for line in stream:
                text = line.decode(errors="replace").rstrip()
                self._output.append(text)
                log.debug("decoder child: %s", text)

    def send(self, seq: int, path: str | Path) -> None:
        self._sent[seq] = time.monotonic()
        # A dead child cannot take it; its end-of-file will tell, and the request is resent.
        with contextlib.suppress(BrokenPipeError):
            self._requests.send((seq, str(path)))

    def forget(self, seq: int) -> None:
        self.started.pop(seq, None)
        self._sent.pop(seq, None)

    def clock_floor(self, seq: int) -> float:
        """When the clock of a request not yet started begins: queued, or the last one done."""
        return max(self._sent.get(seq, 0.0), self._last_done)

    def next_message(self, timeout_s: float):
        """The next message, ``EOF`` once the child is gone, or None after ``timeout_s``."""
        try:
            return self._messages.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """Ask the child to exit, kill it if it does not, and release the pipes."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):  # the child may already have closed its end
                self._requests.send(None)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._requests.close()
        for thread in self._readers:
            thread.join(timeout=5)
        self._results.close()

    def describe_exit(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def last_output(self) -> str:
        """The child's last complaints (ffmpeg's), and where faulthandler saw it die."""
        for thread in self._readers[1:]:
            thread.join(timeout=1)  # the stderr pipe closes when the child is gone
        lines = [line for line in self._output if line.strip()]
        fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python")), None)
        shown = lines[:fatal][-3:] if fatal is not None else lines[-3:]
        if fatal is not None:
            shown.append(lines[fatal])
            current = [i for i, line in enumerate(lines) if line.startswith("Current thread")]
            if current and current[0] + 1 < len(lines):
                shown.append(f"in {lines[current[0] + 1].strip()}")  # the innermost frame
        return f"; its last output: {' | '.join(shown)}" if shown else ""


def _child_main(request_fd: int, result_fd: int) -> None:
    """The child's loop: setup, then ``(seq, path)`` requests until None or end-of-file."""
    faulthandler.enable()  # a segfault or abort leaves a Python stack in the parent's log
    requests = Connection(request_fd, writable=False)
    results = Connection(result_fd, readable=False)
    config, faults = requests.recv()
    _exit_with_parent(os.getppid())
    results.send(("ready", os.getpid()))
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return
        if message is None:
            return
        seq, path = message
        results.send(("start", seq))
        results.send(("done", seq, _decode_or_error(Path(path), config, faults.get(path))))


def _decode_or_error(
    path: Path, config: DecodeConfig, fault: str | None
) -> DecodedVideo | VideoDecodeError:
    try:
        if fault is not None:
            _inject_fault(fault)
        return decode_video(path, config)
    except VideoDecodeError as error:
        return error
    except Exception as error:  # a bug or MemoryError: one video's failure, kept as data
        traceback.print_exc()  # reaches the parent's debug log through the stderr pipe
        return _fail(path, "decode_error", f"unexpected {type(error).__name__}: {error}")


def _exit_with_parent(parent_pid: int) -> None:
    """Exit when the parent dies, even while a request is in progress."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _inject_fault(action: str) -> None:
    """Test hook: misbehave the way decord does on bad files."""
    if action == "hang":
        while True:
            time.sleep(3600)
    elif action == "abort":
        os.abort()
    elif action == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif action == "raise":
        raise RuntimeError("injected failure")
    elif action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")))
    else:
        raise ValueError(f"unknown fault action {action!r}")
