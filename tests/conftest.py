"""Shared fixtures. Real reference files live in ../shared/data beside the project root."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def in_ci() -> bool:
    """Whether the environment variable CI is "true" or "1" (any case), as CI services set it."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


CI_DURATIONS = 15  # slowest tests listed at the end of a CI run


def pytest_configure(config: pytest.Config) -> None:
    """Under CI, list the slowest tests (as --durations=15 would) unless --durations was given;
    a developer's run prints what it always did."""
    if in_ci() and config.option.durations is None:
        config.option.durations = CI_DURATIONS


def missing_shared_data(reason: str) -> NoReturn:
    """Skip the test on a developer's machine; fail it under CI.

    The real data is not part of the repository, so a checkout without ../shared/data skips the
    tests that need it. CI always has the data: there a missing file means a broken mount or a
    moved file, and a run that skipped those tests would pass without having checked them.
    """
    if in_ci():
        ci = os.environ["CI"]
        pytest.fail(f"{reason}; CI={ci} and CI always has the shared data", pytrace=False)
    pytest.skip(reason)


def require_shared(path: Path) -> Path:
    """``path`` (a file or folder of the shared data) if it exists, else ``missing_shared_data``."""
    if not path.exists():
        missing_shared_data(f"real reference data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: skipped without it, failed without it under CI (``missing_shared_data``)."""
    return require_shared(SHARED_DATA)


@pytest.fixture(scope="session")
def real_videos(shared_data: Path) -> list[Path]:
    videos = sorted(require_shared(shared_data / "videos").glob("*.*"))
    if not videos:
        missing_shared_data(f"no videos in {shared_data / 'videos'}")
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


TINY_SHAPES = {
    "pool2": (4, 28, 28),
    "pool3": (4, 14, 14),
    "pool4": (8, 7, 7),
    "pool5": (8, 4, 4),
    "fc7": (16,),
}


@pytest.fixture
def tiny_corpus(tmp_path: Path):
    """Factory: a prepared dataset and a matching feature store with tiny random features.

    ``tiny_corpus(n_videos=6, captions=3, seed=0)`` -> (store_path, dataset_path). Features are
    random but fixed per video; channel counts are tiny so training tests run in seconds.
    """
    from astar.pipelines.datasets import PrepareConfig, prepare_dataset, read_generic
    from astar.store import FeatureStore
    from astar.store.schema import Weights
    from astar.store.synthetic import synthetic_schema, write_videos

    def _make(n_videos: int = 6, captions: int = 3, seed: int = 0, splits=("train",), store=None):
        """``store``: where to write the features (a URL, e.g. on the test S3 server), else
        ``<root>/store``."""
        root = tmp_path / (f"corpus{seed}" + ("" if store is None else "-remote"))
        root.mkdir()
        rng = np.random.default_rng(seed)
        words = ["red", "blue", "ball", "box", "moves", "left", "right", "up", "spins"]
        rows = ["video_id,caption,split"]
        for k in range(n_videos):
            split = splits[k % len(splits)]
            for _ in range(captions):
                caption = " ".join(rng.choice(words, size=rng.integers(2, 6)))
                rows.append(f"v{k},a {caption},{split}")
        (root / "captions.csv").write_text("\n".join(rows) + "\n")
        dataset = prepare_dataset(read_generic(root / "captions.csv"), PrepareConfig())
        dataset.save(root / "dataset")

        schema = synthetic_schema(
            TINY_SHAPES, backbone="tiny", weights=Weights(seed=seed), preprocessing="unit-rgb"
        )
        location = store if store is not None else root / "store"
        store = FeatureStore.create_or_open(location, schema)

        def make(vid: str) -> tuple[int, dict[str, np.ndarray]]:
            n_frames = 16 + 8 * (int(vid[1:]) % 3)  # 16, 24, 32: variable lengths
            lengths = schema.expected_lengths(n_frames)
            return n_frames, {
                name: np.abs(rng.normal(size=schema.full_shape(name, lengths[name]))).astype(
                    np.float32
                )
                for name in TINY_SHAPES
            }

        videos = [(f"v{k}", str(root / f"v{k}.mp4")) for k in range(n_videos)]
        write_videos(store, videos, make, partition_size=4)
        store.consolidate()
        return store.path, root / "dataset"

    return _make


# --------------------------------------------------------------------------------------------
# A real S3 API on loopback: moto's server, for the stores on object storage


S3_REGION = "eu-west-1"  # buckets are created with an explicit region, as S3 wants


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), with the environment s3fs and botocore
    read (credentials, region, ``AWS_ENDPOINT_URL``) set for this process and its children."""
    pytest.importorskip("s3fs", reason="the s3 extra is not installed")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket on the loopback server; its name."""
    import re
    import uuid

    import boto3

    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", region_name=S3_REGION, endpoint_url=s3_endpoint).create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": S3_REGION}
    )
    return name
