"""Shared fixtures. Real reference files live in ../shared/data beside the project root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: the real videos and captions are not part of the repository."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_videos(shared_data: Path) -> list[Path]:
    videos = sorted((shared_data / "videos").glob("*.*"))
    if not videos:
        pytest.skip(f"no videos in {shared_data / 'videos'}")
    return videos


@pytest.fixture
def make_video(tmp_path: Path):
    """Factory: write a synthetic video and return its path.

    ``make_video("a.mkv", n_frames=40, fps=10, size=(64, 48), codec="ffv1", seed=0)``; the frames
    written are kept in ``make_video.frames[name]`` for exact comparisons (lossless codecs).
    """
    from astar.pipelines.videoio import write_video

    written: dict[str, np.ndarray] = {}

    def _make(
        name: str = "clip.mkv",
        n_frames: int = 40,
        fps: float = 10.0,
        size: tuple[int, int] = (64, 48),
        codec: str = "ffv1",
        seed: int = 0,
    ) -> Path:
        rng = np.random.default_rng(seed)
        width, height = size
        # A moving gradient plus noise: frames differ from each other, so sampling errors show.
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        frames = np.stack([np.roll(base, 3 * k, axis=1) for k in range(n_frames)])
        frames[:, :4, :4] = np.arange(n_frames, dtype=np.uint8)[:, None, None, None] * 5
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        path = write_video(tmp_path / name, frames, fps=fps, codec=codec)
        written[name] = frames
        return path

    _make.frames = written
    return _make
