"""Fault injection through the real command-line tools, each in its own process.

Every scenario is something a user or a machine does to a run: kill it, start a second one on
the same place, fill the disk, damage the stored data. What must hold: nothing is trained or
scored on garbage, no two writers share a place, and a mistake gets a message, not a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from astar.store import FeatureStore

BIN = Path(sys.executable).parent
SMALL = ["--backbone", "c3d-small", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY_MODEL = {"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8, "samples": 3, "dropout": 0.0}


def _cli(name: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(BIN / name), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)


def _start(name: str, *args: object) -> subprocess.Popen:
    command = [str(BIN / name), *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


def _wait_for(condition, process: subprocess.Popen | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


def _params(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": train}))
    return path


@pytest.fixture
def videos(make_video, tmp_path: Path):
    """Factory: ``n`` short synthetic clips in a folder of their own."""

    def _make(n: int, frames: int = 48, folder: str = "videos") -> Path:
        for k in range(n):
            make_video(f"{folder}/c{k:02d}.mkv", n_frames=frames, fps=8.0, size=(48, 48), seed=k)
        return tmp_path / folder

    return _make


# ------------------------------------------------------------------------------------------------
# One writer per place


@pytest.mark.slow
def test_killed_parent_takes_its_workers_along_and_the_rerun_resumes(videos, tmp_path: Path):
    """kill -9 of `extract-features --workers 2`: no orphan keeps working or waits forever."""
    import psutil

    clips = videos(8, frames=64)
    out = tmp_path / "store"
    args = [clips, *SMALL, "--partition-size", "2", "--workers", "2", "--out", out]
    process = _start("extract-features", *args)
    parent = psutil.Process(process.pid)

    def workers_busy() -> bool:  # both pool workers exist and one has staged a video
        staged = list((out / "staging").rglob("*.npz")) if out.exists() else []
        return len(parent.children()) >= 3 and bool(staged)  # 2 workers + resource tracker

    _wait_for(workers_busy, process)
    children = parent.children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"orphaned after the parent was killed: {[p.cmdline() for p in alive]}"

    result = _cli("extract-features", *args)
    assert result.returncode == 0, result.stderr
    store = FeatureStore.open(out)
    assert sorted(store.ids) == [f"c{k:02d}" for k in range(8)]
    assert store.verify() == []


@pytest.mark.slow
def test_restart_never_deletes_a_store_a_live_run_is_writing(videos, tmp_path: Path):
    clips = videos(40, frames=96)  # long enough to outlast the second command's start-up
    out = tmp_path / "store"
    first = _start("extract-features", clips, *SMALL, "--partition-size", "2", "--out", out)
    _wait_for(lambda: list((out / "locks").glob("run-*.lock")) if out.exists() else [], first)

    other = _cli(
        "extract-features", clips, *SMALL, "--fps", "3", "--out", out, "--resume-or-restart"
    )
    assert first.poll() is None, "the first run ended before the second could see it"
    assert other.returncode == 1
    assert f"pid {first.pid}" in other.stderr and "not deleted" in other.stderr, other.stderr
    _no_traceback(other)

    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    store = FeatureStore.open(out)
    assert len(store.ids) == 40 and store.verify() == []
    assert not list((out / "locks").iterdir())  # the run lock went with the run

    # Once nobody writes it, the restart does what it is for.
    again = _cli(
        "extract-features", clips, *SMALL, "--fps", "3", "--out", out, "--resume-or-restart"
    )
    assert again.returncode == 0, again.stderr
    assert FeatureStore.open(out).schema.fps == 3.0


def _training_args(store: Path, dataset: Path, out: Path, params: Path) -> list:
    return ["--store", store, "--dataset", dataset, "--out", out, "--variant", "soft",
            "--params", params]  # fmt: skip


@pytest.mark.slow
def test_second_training_run_on_one_out_is_refused_and_a_killed_run_leaves_nothing_behind(
    tiny_corpus, tmp_path: Path
):
    store, dataset = tiny_corpus(n_videos=6)
    out = tmp_path / "run"
    params = _params(
        tmp_path / "params.yaml", videos_per_batch=2, captions_per_video=2, max_epochs=400,
        checkpoint_every=3,
    )  # fmt: skip
    args = _training_args(store, dataset, out, params)
    first = _start("train-captioner", *args)
    log = out / "metrics" / "train.jsonl"

    def steps_logged() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    _wait_for(lambda: (out / "last.pt").exists() and steps_logged() >= 8, first)
    second = _cli("train-captioner", *args, "--resume")
    assert second.returncode == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr and "another training run" in second.stderr
    _no_traceback(second)

    first.send_signal(signal.SIGKILL)
    first.wait()
    # What a kill in the middle of a checkpoint save leaves: a partial temporary.
    (out / ".last.pt.k1ll3d").write_bytes(b"\0" * 4096)

    stopped_at = _checkpoint_step(out / "last.pt")
    resumed = _cli("train-captioner", *args, "--resume", "--max-steps", stopped_at + 4)
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / ".last.pt.k1ll3d").exists()
    assert not list(out.glob(".*.pt.*"))
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 5)), "replayed steps are logged once"


def _checkpoint_step(checkpoint: Path) -> int:
    from astar.train.checkpoint import load_checkpoint

    return int(load_checkpoint(checkpoint)["state"]["step"])


# ------------------------------------------------------------------------------------------------
# Damaged data


def _chunk_files(store: Path, layer: str) -> list[Path]:
    return sorted(store.glob(f"partitions/*/{layer}/c.*"))


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 3, len(data) // 3 + 16):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_training_and_evaluation_refuse_or_skip_corrupt_videos(tiny_corpus, tmp_path: Path):
    # Three partitions of 4 videos; validation videos v0, v4, v8.
    store, dataset = tiny_corpus(n_videos=12, splits=("val", "train", "train", "train"))
    pool3 = _chunk_files(store, "pool3")
    _flip_bytes(pool3[0])  # partition p00000
    pool2 = _chunk_files(store, "pool2")
    pool2[-1].unlink()  # the last partition
    params = _params(tmp_path / "params.yaml", videos_per_batch=2, captions_per_video=2,
                     max_epochs=1)  # fmt: skip
    out = tmp_path / "run"
    args = _training_args(store, dataset, out, params)

    refused = _cli("train-captioner", *args)
    assert refused.returncode == 1, refused.stderr
    assert "corrupt" in refused.stderr and "partition p0000" in refused.stderr
    _no_traceback(refused)
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()

    listing = _cli("inspect-store", store, "--verify")
    assert listing.returncode != 0
    lost = {vid for vid in (f"v{k}" for k in range(12)) if f"'{vid}'" in listing.stdout}
    assert lost, listing.stdout

    skipped = _cli("train-captioner", *args, "--on-corrupt", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped as corrupt" in skipped.stderr
    named = {vid for vid in lost if f"{vid}:" in skipped.stderr}
    assert named, skipped.stderr  # the skipped training videos are listed by id
    assert not (named - lost)  # and only damaged ones

    evaluate = ["--checkpoint", out / "best.pt", "--store", store, "--dataset", dataset,
                "--split", "val", "--beam", "1", "--out", tmp_path / "eval"]  # fmt: skip
    refused = _cli("evaluate-captioner", *evaluate)
    assert refused.returncode == 1 and "'v8'" in refused.stderr, refused.stderr
    _no_traceback(refused)
    assert not (tmp_path / "eval" / "metrics.json").exists()
    scored = _cli("evaluate-captioner", *evaluate, "--on-corrupt", "skip")
    assert scored.returncode == 0, scored.stderr
    assert "1 val video(s) skipped as corrupt" in scored.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_corrupt"] == 1 and list(metrics["corrupt"]) == ["v8"]
    assert metrics["n_videos"] == 2  # v0 and v4, said in the record, not hidden


# ------------------------------------------------------------------------------------------------
# A full disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True)  # fmt: skip
    return result.returncode == 0


@pytest.mark.slow
def test_a_full_disk_during_extraction_is_a_message_and_the_rerun_resumes(videos, tmp_path: Path):
    small = tmp_path / "small-disk"
    if not _mount_tmpfs(small, "1m"):
        pytest.skip("needs root and tmpfs to fill a disk (mount -t tmpfs)")
    try:
        clips = videos(6, frames=64)
        out = small / "store"
        full = _cli("extract-features", clips, *SMALL, "--partition-size", "2", "--out", out)
        assert full.returncode == 1, full.stderr
        _no_traceback(full)
        assert "no space left on the device" in full.stderr
        assert "MiB free there now" in full.stderr and "intact" in full.stderr
        assert "rerunning the same command" in full.stderr
        moved = tmp_path / "store"
        shutil.copytree(out, moved, symlinks=True)
    finally:
        subprocess.run(["umount", str(small)], check=False)
    again = _cli("extract-features", clips, *SMALL, "--partition-size", "2", "--out", moved)
    assert again.returncode == 0, again.stderr
    store = FeatureStore.open(moved)
    assert len(store.ids) == 6 and store.verify() == []


def test_an_id_with_spaces_around_it_reads_back_by_what_the_user_wrote(videos, tmp_path: Path):
    clips = videos(1)
    listing = tmp_path / "list.csv"
    listing.write_text(f'id,path\n"  spaced  ",{clips / "c00.mkv"}\n')
    result = _cli("extract-features", listing, *SMALL, "--out", tmp_path / "store")
    assert result.returncode == 0, result.stderr
    store = FeatureStore.open(tmp_path / "store")
    assert store.ids == ["spaced"]  # as the datasets' readers strip the caption files' ids
    assert "  spaced  " in store
    for layer, array in store["spaced"].layers.items():
        assert (store["  spaced  "].layers[layer] == array).all(), layer
