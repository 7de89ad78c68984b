"""Extraction survives a worker process killed (SIGKILL) in the middle of a partition.

A local pool (``--workers``) starts a new pool for the unfinished partitions; Dask reruns the
task on another worker. Either way the rerun breaks the dead worker's lock, reuses what it
staged, and the store ends up exactly as a run without any kill. A partition whose worker dies
every time is given up with an error naming it, and a rerun resumes it.

The kill comes from the worker itself (tests/worker_faults.py): right after staging a chosen
video, so it always lands inside a partition, with work staged for the retry to reuse.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import worker_faults

from astar.extract import runner
from astar.store import FeatureStore, PartitionPlan

N_VIDEOS = 4
PARTITION_SIZE = 2  # p00000 = c00, c01; p00001 = c02, c03
VICTIM, VICTIM_VIDEO = "p00001", "c02"  # the first video of the partition: c03 is still to do
CONFIG = runner.ExtractConfig(backbone="c3d-small", partition_size=PARTITION_SIZE, workers=2)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Short lossless clips (as conftest's make_video writes them), c00 to c03."""
    from astar.pipelines.videoio import write_video

    folder = tmp_path_factory.mktemp("clips")
    for k in range(N_VIDEOS):
        base = np.random.default_rng(k).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        frames = np.stack([np.roll(base, 3 * j, axis=1) for j in range(48)])  # (48, 48, 48, 3)
        write_video(folder / f"c{k:02d}.mkv", frames, fps=8.0, codec="ffv1")
    return folder


@pytest.fixture(scope="module")
def reference(clips: Path, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """Every video's features from a run in this process, without any kill."""
    from dataclasses import replace

    out = tmp_path_factory.mktemp("reference") / "store"
    config = replace(CONFIG, workers=1)
    _, store = runner.extract_features([clips], out, config, progress=False)
    return {vid: dict(store[vid].layers) for vid in store.ids}


class Bar:
    """Stands in for the progress bar: counts what it is told."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.postfix = total, 0, {}

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_postfix(self, counts, refresh: bool = False) -> None:
        self.postfix = dict(counts)

    def close(self) -> None:
        pass


@pytest.fixture
def dying(tmp_path: Path, monkeypatch):
    """Arm the workers: the first ``times`` to stage ``video`` of VICTIM kill themselves right
    after (or before, with ``before``). Returns ``(marker, log, bars)``: see worker_faults;
    ``bars`` the progress bars made.
    """
    marker, log = tmp_path / "marker", tmp_path / "staged.log"
    bars: list[Bar] = []

    def arm(video: str = VICTIM_VIDEO, times: int = 1, before: bool = False):
        env = worker_faults.worker_env(VICTIM, video, marker, log, times=times, before=before)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(runner, "_worker_extract", worker_faults.worker_extract)
        monkeypatch.setattr(runner, "_progress_bar", lambda *a: bars.append(Bar(*a)) or bars[-1])
        return marker, log, bars

    return arm


def _gone(pid: int) -> bool:
    """Whether process ``pid`` is dead (no such process, or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


def _assert_died_mid_partition(marker: Path, log: Path) -> int:
    """One worker staged VICTIM_VIDEO and died before its partition was done; its pid."""
    dead = worker_faults.deaths(marker)
    assert len(dead) == 1, f"expected one worker death, the markers say {dead}"
    assert _gone(dead[0]), f"worker {dead[0]} claimed its death but is alive"
    staged = worker_faults.read_log(log)
    mine = [video for pid, part, video in staged if pid == dead[0] and part == VICTIM]
    assert mine == [VICTIM_VIDEO], staged  # its last act: the kill right after staging it
    return dead[0]


def _assert_complete_and_equal(store: FeatureStore, reference: dict) -> None:
    assert store.verify() == []
    ids = store.manifest["id"].tolist()
    assert sorted(ids) == [f"c{k:02d}" for k in range(N_VIDEOS)], ids  # each exactly once
    assert (store.manifest["status"] == "ok").all()
    for vid, layers in reference.items():
        for name, array in layers.items():
            np.testing.assert_array_equal(store[vid].layers[name], array, err_msg=f"{vid} {name}")
    assert not list((store.path / "staging").iterdir()), "staging/ is not empty"
    assert not list((store.path / "locks").glob("*.lock")), "a lock outlived its run"


def _staged_once_by_the_living(log: Path, dead: int) -> None:
    """The dead worker's staged video was reused by the retry, not extracted again."""
    staged = worker_faults.read_log(log)
    victim = [(pid, video) for pid, part, video in staged if part == VICTIM]
    assert [video for _, video in victim].count(VICTIM_VIDEO) == 1, victim
    retried = [pid for pid, video in victim if video == "c03"]
    assert len(retried) == 1 and retried[0] != dead, victim


@pytest.mark.slow
def test_a_local_worker_killed_mid_partition_is_replaced_and_the_store_is_complete(
    clips: Path, reference: dict, dying, tmp_path: Path, caplog
):
    marker, log, bars = dying()
    with caplog.at_level("WARNING", logger=runner.__name__):
        summary, store = runner.extract_features([clips], tmp_path / "s", CONFIG, progress=True)

    dead = _assert_died_mid_partition(marker, log)
    _assert_complete_and_equal(store, reference)
    _staged_once_by_the_living(log, dead)
    warnings = [r.getMessage() for r in caplog.records]
    expected = f"worker process {dead} died (signal 9, SIGKILL) during partition {VICTIM}; "
    assert any(m.startswith(expected + "retrying it (attempt 2 of 3)") for m in warnings), warnings
    # Every video counted once, as extracted by this run: the video the dead worker staged too,
    # although its retry found it staged.
    assert (summary.ok, summary.n_failed, summary.skipped) == (N_VIDEOS, 0, 0), summary
    assert summary.frames == int(store.manifest["n_frames"].sum())
    (bar,) = bars
    assert bar.done == bar.total == N_VIDEOS  # the retry's re-reports are not counted again


@pytest.mark.slow
def test_a_dask_worker_killed_mid_partition_is_rerun_elsewhere_and_the_store_is_complete(
    clips: Path, reference: dict, dying, tmp_path: Path
):
    from dataclasses import replace

    marker, log, bars = dying()
    config = replace(CONFIG, dask="local")  # 2 worker processes, 1 thread each
    summary, store = runner.extract_features([clips], tmp_path / "s", config, progress=True)

    dead = _assert_died_mid_partition(marker, log)
    _assert_complete_and_equal(store, reference)
    _staged_once_by_the_living(log, dead)
    # Dask's rerun counts what the dead worker staged as skipped (no per-video events there).
    assert summary.n_failed == 0 and summary.ok + summary.skipped == N_VIDEOS, summary
    (bar,) = bars
    assert bar.done == bar.total == N_VIDEOS


@pytest.mark.slow
def test_a_partition_whose_local_worker_always_dies_is_given_up_by_name_and_resumes_later(
    clips: Path, reference: dict, dying, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(runner, "WORKER_ATTEMPTS", 2)
    # Killed before staging c03, its second video: every attempt gets there and dies.
    marker, log, _ = dying(video="c03", times=2, before=True)
    out = tmp_path / "s"
    with pytest.raises(runner.WorkerDied, match=rf"(?s)1 partition\(s\) given up.*{VICTIM}:"):
        runner.extract_features([clips], out, CONFIG, progress=False)
    dead = worker_faults.deaths(marker)
    assert len(dead) == 2 and all(map(_gone, dead)), dead
    staged = [(pid, video) for pid, part, video in worker_faults.read_log(log) if part == VICTIM]
    assert staged == [(dead[0], "c02")], staged  # the second attempt reused it, and died
    interrupted = FeatureStore.open(out)
    assert sorted(interrupted.ids) == ["c00", "c01"]  # the other partition is stored

    # Nothing kills it any more: a rerun (in this process, one partition) resumes it.
    monkeypatch.setattr(runner, "_worker_extract", worker_faults.real_worker_extract)
    summary, store = runner.extract_features([clips], out, CONFIG, progress=False)
    assert (summary.ok, summary.skipped) == (1, 3), summary  # c02 staged by a dead worker
    _assert_complete_and_equal(store, reference)


@pytest.mark.slow
def test_a_partition_dask_gives_up_fails_the_run_by_name(
    clips: Path, reference: dict, dying, tmp_path: Path
):
    from dataclasses import replace

    import dask

    marker, log, _ = dying()
    config = replace(CONFIG, dask="local")
    out = tmp_path / "s"
    # The LocalCluster's scheduler runs in this process: no rerun after the first death.
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        pytest.raises(
            runner.WorkerDied, match=rf"(?s){VICTIM}: Dask gave it up after 1 worker death"
        ),
    ):
        runner.extract_features([clips], out, config, progress=False)
    _assert_died_mid_partition(marker, log)
    assert sorted(FeatureStore.open(out).ids) == ["c00", "c01"]


def test_only_the_partition_of_the_worker_that_died_is_blamed():
    parts = [PartitionPlan(f"p{k:05d}", []) for k in range(3)]
    running = {11: "p00000", 12: "p00001", 13: "p00002"}
    # 12 was killed; the pool then terminated 11 and 13 (SIGTERM); p00002 had finished.
    codes = {11: -15, 12: -9, 13: -15}
    assert runner._blame(parts[:2], codes, running) == {
        "p00001": "worker process 12 died (signal 9, SIGKILL)"
    }
    # The dead worker's partition is unknown (its start event was lost): each one in flight
    # counts an attempt, so that retries stay bounded.
    unknown = runner._blame(parts[:2], codes, {11: "p00000"})
    assert unknown == {"p00000": "a worker process died (signal 15, SIGTERM, signal 9, SIGKILL)"}
    assert runner._death(1) == "exit code 1" and runner._death(None) == "cause unknown"


def test_progress_is_reported_once_and_a_dead_workers_videos_count_as_this_runs():
    seen: list[tuple[str, str]] = []
    record = runner._PoolEvents(lambda vid, status: seen.append((vid, status)))
    record.new_pool()
    record.handle(("start", "p00001", 12))
    record.handle(("video", "p00001", "a", "skipped"))  # staged by an earlier run
    record.handle(("video", "p00001", "b", "ok"))
    assert record.running == {12: "p00001"}
    record.new_pool()  # the worker died after staging b and c, c's event lost with it
    record.handle(("start", "p00001", 21))
    for vid in "abc":
        record.handle(("video", "p00001", vid, "skipped"))
    record.handle(("video", "p00001", "d", "ok"))
    assert seen == [("a", "skipped"), ("b", "ok"), ("c", "skipped"), ("d", "ok")]
    assert record.redone == {"p00001": {"b", "c"}}
    assert record.staged_before["p00001"] == {"a"}
