"""Writing real encoded video files (demo dataset, test fixtures).

Reading is decord's job (``astar.extract.decode``); writing goes through PyAV so that the
files we generate are ordinary containers that any decoder opens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# codec -> (pixel format, encoder options). The lossless ones let tests compare decoded frames
# with what was written, bit for bit.
CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "libx264": ("yuv420p", {"crf": "18", "preset": "veryfast"}),
    "libx264rgb": ("rgb24", {"qp": "0", "preset": "veryfast"}),  # lossless
    "ffv1": ("bgr0", {}),  # lossless
    "mpeg4": ("yuv420p", {"qscale": "2"}),
    "mjpeg": ("yuvj420p", {}),
}


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
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
