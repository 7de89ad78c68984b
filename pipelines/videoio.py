"""Writing real encoded video files (demo dataset, test fixtures).

Reading is decord's job (``astar.extract.decode``); writing goes through PyAV so that the
files we generate are ordinary containers that any decoder opens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# codec -> (pixel format, encoder options). The lossless ones let tests compare decoded frames
# with what was written, bit for bit. x264 runs on one thread: with several, the same frames
# were seen to encode to different bytes (and decode to different pixels) from run to run. Even
# on one thread its lossy output varies now and then (about 1 demo video in 100 a run): where
# the pixels must be a function of the input, use a lossless codec.
CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "libx264": ("yuv420p", {"crf": "18", "preset": "veryfast", "threads": "1"}),
    "libx264rgb": ("rgb24", {"qp": "0", "preset": "veryfast", "threads": "1"}),  # lossless
    "ffv1": ("bgr0", {}),  # lossless
    "mpeg4": ("yuv420p", {"qscale": "2"}),
    "mjpeg": ("yuvj420p", {}),
}


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the (3H/2, W) planar yuv420p layout, BT.601 limited range.

    Done here rather than by libswscale, whose conversion of the same frame was seen to differ
    from run to run (its code path depends on buffer alignment), so that a seed always gives
    the same video bytes.
    """
    rgb = frame.astype(np.float64) / 255.0  # (H, W, 3)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + 65.481 * r + 128.553 * g + 24.966 * b  # (H, W)
    cb = 128.0 - 37.797 * r - 74.203 * g + 112.0 * b
    cr = 128.0 + 112.0 * r - 93.786 * g - 18.214 * b
    height, width = y.shape

    def subsample(plane: np.ndarray) -> np.ndarray:  # (H, W) -> (H/2, W/2), 2 x 2 means
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    chroma = [subsample(c).reshape(height // 4, width) for c in (cb, cr)]  # (H/4, W) each
    planes = np.concatenate([y, *chroma])  # (3H/2, W)
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
) -> Path:
    """Encode ``frames`` (N, H, W, 3) uint8 RGB at ``fps`` into ``path`` (container from suffix)."""
    import av  # imported here: only writers need it

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if len(frames) == 0:
        raise ValueError("cannot write a video with no frames")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    pix_fmt, options = CODECS[codec]
    path = Path(path)
    height, width = frames.shape[1:3]
    if pix_fmt.endswith("420p") and (height % 2 or width % 2):
        raise ValueError(f"{codec} with {pix_fmt} needs even frame sizes, got {width}x{height}")
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = dict(options)
        stream.thread_count = 1  # see CODECS: one encoder thread, the same bytes every run
        for index, frame in enumerate(frames):
            if pix_fmt == "yuv420p":
                picture = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            else:
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = index  # explicit timestamps, in frames (the stream's time base)
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
