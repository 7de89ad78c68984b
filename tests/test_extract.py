"""extract-features end to end: inputs, the CLI, failures, workers, kill and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from astar.extract.cli import main as extract_cli
from astar.extract.runner import InputError, gather_videos
from astar.store import FeatureStore
from astar.store.schema import Weights

SMALL = ["--backbone", "c3d-small", "--quiet"]


def _store_contents(path: Path) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    store = FeatureStore.open(path)
    manifest = store.manifest.sort_values("id").reset_index(drop=True)
    arrays = {vid: dict(store[vid].layers) for vid in store.ids}
    return manifest, arrays


def _assert_same_store(a: Path, b: Path) -> None:
    manifest_a, arrays_a = _store_contents(a)
    manifest_b, arrays_b = _store_contents(b)
    columns = ["id", "status", "n_frames", "n_sampled", "padded", "duration"]
    pd.testing.assert_frame_equal(manifest_a[columns], manifest_b[columns])
    assert arrays_a.keys() == arrays_b.keys()
    for vid, layers in arrays_a.items():
        for name, array in layers.items():
            np.testing.assert_array_equal(array, arrays_b[vid][name], err_msg=f"{vid} {name}")


@pytest.fixture
def clips(make_video, tmp_path: Path) -> Path:
    """Six short lossless clips in a tree, one of them in a sub-folder."""
    for k in range(6):
        make_video(f"v{k}.mkv", n_frames=20 + 8 * k, fps=8.0, size=(40, 32), seed=k)
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    for k, path in enumerate(sorted(tmp_path.glob("v*.mkv"))):
        shutil.move(path, folder / ("sub" if k == 5 else "") / path.name)
    return folder


def test_gather_videos_walks_trees_reads_csv_and_refuses_duplicates(clips: Path, tmp_path: Path):
    videos = gather_videos([clips])
    assert [vid for vid, _ in videos] == ["sub/v5", "v0", "v1", "v2", "v3", "v4"]
    listing = tmp_path / "list.csv"
    listing.write_text("id,path\nfirst,videos/v0.mkv\nsecond,videos/v1.mkv\n")
    assert gather_videos([listing]) == [
        ("first", str(tmp_path / "videos/v0.mkv")),
        ("second", str(tmp_path / "videos/v1.mkv")),
    ]
    with pytest.raises(InputError, match=r"(?s)duplicate video id.*v0"):
        gather_videos([clips, clips / "v0.mkv"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name,file\na,b\n")
    with pytest.raises(InputError, match=r"bad\.csv.*'id' and 'path'"):
        gather_videos([bad])


def test_duplicate_ids_refused_before_any_work(clips: Path, tmp_path: Path):
    result = CliRunner().invoke(
        extract_cli, [str(clips), str(clips / "v1.mkv"), "--out", str(tmp_path / "s"), *SMALL]
    )
    assert result.exit_code == 1
    assert "duplicate video id" in result.output
    assert not (tmp_path / "s").exists()


def test_cli_extracts_records_failures_and_exit_codes(clips: Path, tmp_path: Path):
    (clips / "empty.mp4").write_bytes(b"")
    (clips / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    out = tmp_path / "store"
    args = [str(clips), "--out", str(out), *SMALL, "--partition-size", "3"]

    result = CliRunner().invoke(extract_cli, args)
    assert result.exit_code == 0, result.output
    assert "ok 6, failed 2" in result.output
    manifest = pd.read_csv(out / "manifest.csv")
    statuses = dict(zip(manifest["id"], manifest["status"], strict=True))
    assert statuses.pop("empty") == "empty_file"
    assert statuses.pop("noise") == "corrupt"
    assert set(statuses.values()) == {"ok"}
    assert manifest.loc[manifest["id"] == "empty", "reason"].item().find("empty.mp4") >= 0

    store = FeatureStore.open(out)
    assert store.schema.backbone == "c3d-small"
    assert store.schema.weights == Weights(seed=0)
    features = store["v3"]
    # v3: 44 frames at 8 fps = 5.5 s -> 11 samples at 2 fps, padded to 16.
    assert features.info["n_sampled"] == 11 and features.info["padded"]
    assert features.layers["pool2"].shape == (32, 8, 28, 28)
    assert features.layers["pool5"].shape == (128, 1, 4, 4)
    assert features.layers["fc7"].shape == (1, 1024)
    assert store.verify() == []

    # Everything is complete: a rerun skips all, and --strict still sees the earlier failures.
    rerun = CliRunner().invoke(extract_cli, [*args, "--strict"])
    assert rerun.exit_code == 1
    assert "ok 0, failed 0" in rerun.output and "skipped 8" in rerun.output


def test_nothing_succeeded_is_an_error(tmp_path: Path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    result = CliRunner().invoke(
        extract_cli, [str(tmp_path / "empty.mp4"), "--out", str(tmp_path / "s"), *SMALL]
    )
    assert result.exit_code == 1
    assert "no video was extracted successfully" in result.output


def test_schema_mismatch_refused(clips: Path, tmp_path: Path):
    out = tmp_path / "store"
    assert CliRunner().invoke(extract_cli, [str(clips), "--out", str(out), *SMALL]).exit_code == 0
    result = CliRunner().invoke(extract_cli, [str(clips), "--out", str(out), *SMALL, "--fps", "3"])
    assert result.exit_code == 1
    assert "fps" in result.output


def test_resume_or_restart_redoes_complete_or_other_stores(clips: Path, tmp_path: Path):
    """What `dvc repro` relies on: a rerun means something changed, unless the run was cut."""
    out = tmp_path / "store"
    args = [str(clips), "--out", str(out), *SMALL, "--resume-or-restart"]
    assert CliRunner().invoke(extract_cli, args).exit_code == 0
    again = CliRunner().invoke(extract_cli, args)  # complete: extracted again, not skipped
    assert again.exit_code == 0, again.output
    assert "complete" in again.output and "ok 6" in again.output and "skipped 0" in again.output
    other = CliRunner().invoke(extract_cli, [*args, "--fps", "3"])  # other settings: replaced
    assert other.exit_code == 0, other.output
    assert "other settings" in other.output and FeatureStore.open(out).schema.fps == 3.0

    # Cut short (a partition still staged): resumed, not restarted.
    store = FeatureStore.open(out)
    part = store.partitions[0]
    shutil.rmtree(out / "partitions" / part.name)
    assert [p.name for p in store.pending()] == [part.name]
    resumed = CliRunner().invoke(extract_cli, [*args, "--fps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert "from scratch" not in resumed.output
    assert f"ok {len(part.videos)}," in resumed.output

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    refused = CliRunner().invoke(
        extract_cli, [str(clips), "--out", str(tmp_path / "other"), *SMALL, "--resume-or-restart"]
    )
    assert refused.exit_code == 1 and (tmp_path / "other" / "notes.txt").exists()


def test_weights_random_or_a_file(clips: Path, tmp_path: Path):
    missing = CliRunner().invoke(
        extract_cli, [str(clips), "--out", str(tmp_path / "s"), *SMALL, "--weights", "no.pt"]
    )
    assert missing.exit_code == 2 and "no.pt" in missing.output


@pytest.mark.slow
def test_workers_give_the_same_store(clips: Path, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = [str(clips), *SMALL, "--partition-size", "2"]
    assert CliRunner().invoke(extract_cli, [*base, "--out", str(one)]).exit_code == 0
    result = CliRunner().invoke(extract_cli, [*base, "--out", str(two), "--workers", "2"])
    assert result.exit_code == 0, result.output
    _assert_same_store(one, two)


def test_compressed_store_holds_the_same_features(clips: Path, tmp_path: Path):
    plain, zstd = tmp_path / "plain", tmp_path / "zstd"
    base = [str(clips), *SMALL, "--partition-size", "4"]
    assert CliRunner().invoke(extract_cli, [*base, "--out", str(plain)]).exit_code == 0
    result = CliRunner().invoke(extract_cli, [*base, "--out", str(zstd), "--compression", "zstd"])
    assert result.exit_code == 0, result.output
    _assert_same_store(plain, zstd)

    def codecs(store: Path) -> list[str]:
        meta = json.loads((store / "partitions/p00000/pool2/zarr.json").read_text())
        return [codec["name"] for codec in meta["codecs"]]

    # auto, the default: raw on a local disk (read speed), zstd on object storage (bytes).
    assert codecs(plain) == ["bytes"] and codecs(zstd) == ["bytes", "zstd"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(make_video, tmp_path: Path):
    for k in range(10):
        make_video(f"videos/k{k}.mkv", n_frames=64, fps=8.0, size=(48, 48), seed=k)
    videos = tmp_path / "videos"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    command = [sys.executable, "-m", "astar.extract.cli", str(videos), *SMALL]
    command += ["--partition-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--out", str(reference)], check=True, env=env)

    process = subprocess.Popen([*command, "--out", str(resumed)], env=env)
    staging = resumed / "staging"
    deadline = time.monotonic() + 120
    # Kill once the first partition is committed and the second has staged work in progress.
    while time.monotonic() < deadline and process.poll() is None:
        committed = list((resumed / "partitions").glob("*/manifest*")) if resumed.exists() else []
        staged = list(staging.rglob("*.npz")) if staging.exists() else []
        if committed and staged:
            break
        time.sleep(0.05)
    assert process.poll() is None, "extraction finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = FeatureStore.open(resumed)
    assert 0 < len(interrupted.ids) < 10  # only committed partitions are visible

    result = subprocess.run(
        [*command, "--out", str(resumed)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout
    _assert_same_store(reference, resumed)
    assert FeatureStore.open(resumed).verify() == []


@pytest.mark.slow
def test_all_real_clips_extract(real_videos: list[Path], tmp_path: Path):
    out = tmp_path / "store"
    result = CliRunner().invoke(
        extract_cli, [*map(str, real_videos), "--out", str(out), *SMALL, "--max-frames", "0"]
    )
    # test.avi and test.mp4 share a stem: refused before any work, until ids keep extensions.
    assert result.exit_code == 1 and "--ids name" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        extract_cli,
        [*map(str, real_videos), "--out", str(out), *SMALL, "--max-frames", "0", "--ids", "name"],
    )
    assert result.exit_code == 0, result.output
    manifest = FeatureStore.open(out).manifest
    assert len(manifest) == len(real_videos) == 12
    assert (manifest["status"] == "ok").all(), manifest[["id", "status", "reason"]]
    # 2 fps x the real duration, +-1 (no cap: women_long_jump is 35 s = 70 frames).
    expected = np.floor(manifest["duration"] * 2 - 1e-9) + 1
    assert (np.abs(manifest["n_sampled"] - expected) <= 1).all()


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_store(clips: Path, tmp_path: Path):
    one, dasked = tmp_path / "one", tmp_path / "dask"
    base = [str(clips), *SMALL, "--partition-size", "3"]
    assert CliRunner().invoke(extract_cli, [*base, "--out", str(one)]).exit_code == 0
    result = CliRunner().invoke(
        extract_cli, [*base, "--out", str(dasked), "--dask", "local", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    _assert_same_store(one, dasked)


def test_bad_features_fail_one_video_not_the_run(clips: Path, tmp_path: Path, monkeypatch):
    """C3D raising, or returning NaN the store refuses, is recorded per video."""
    from astar.extract import runner

    real = runner.make_extractor

    class Flaky:
        def __init__(self, config):
            self.inner = real(config)
            self.info, self.layer_shapes = self.inner.info, self.inner.layer_shapes
            self.calls = 0

        def __call__(self, frames):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            features = self.inner(frames)
            if self.calls == 4:
                features["pool3"][:] = float("nan")
            return features

    monkeypatch.setattr(runner, "make_extractor", Flaky)
    config = runner.ExtractConfig(backbone="c3d-small")
    summary, store = runner.extract_features([clips], tmp_path / "s", config, progress=False)
    assert summary.ok == 4 and summary.failed == {runner.FEATURE_ERROR: 2}
    failed = store.manifest.set_index("id").loc[["sub/v5", "v0", "v1", "v2", "v3", "v4"]]
    reasons = failed.loc[failed["status"] == runner.FEATURE_ERROR, "reason"].tolist()
    assert any("out of memory" in r for r in reasons)
    assert any("pool3" in r or "NaN" in r or "finite" in r for r in reasons), reasons
    assert store.verify() == []
