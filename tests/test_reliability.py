"""Fault injection through the real command-line tools, each in its own process.

Every scenario is something a user or a machine does to a run: kill it, start a second one on
the same place, fill the disk, damage the stored data. What must hold: nothing is trained or
scored on garbage, no two writers share a place, and a mistake gets a message, not a traceback.

The README's Reliability section lists each scenario with its test. Scenarios an earlier tester
found to hold are kept here too (kill -9 at three moments, two extractions at once, hostile
pickles and ids, no Java, Ctrl-C, a checkpoint used with another store), next to the in-process
tests that cover parts of them: test_extract.py::test_killed_run_resumes_to_the_same_store,
test_c3d.py::test_a_pickle_that_runs_code_is_refused_without_side_effect,
test_metrics.py::test_missing_java_is_a_clear_error,
test_train.py::test_killed_and_resumed_run_ends_with_the_same_parameters.
"""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from astar.store import FeatureStore

BIN = Path(sys.executable).parent
SMALL = ["--backbone", "c3d-small", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY_MODEL = {"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8, "samples": 3, "dropout": 0.0}


# ------------------------------------------------------------------------------------------------
# Helpers


def _cli(name: str, *args: object, env=None, cwd=None, timeout: float = 300):
    command = [str(BIN / name), *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, env=env or ENV, cwd=cwd, timeout=timeout
    )


def _start(name: str, *args: object) -> subprocess.Popen:
    """A command in a session of its own, so that a Ctrl-C can reach its whole process group,
    with SIGINT at its default disposition, as in a terminal's foreground job: a test run
    started in the background of a non-interactive shell inherits SIGINT ignored (POSIX), and a
    Python program started so keeps ignoring it, as a background job should."""
    command = [str(BIN / name), *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True, preexec_fn=_default_sigint,
    )  # fmt: skip


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition, process: subprocess.Popen | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def _no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output, output


def _params(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"model": TINY_MODEL, "train": train}))
    return path


def _tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Relative path -> size of everything under ``root`` (``skip`` and below left out)."""
    found = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        found[str(path.relative_to(root))] = path.stat().st_size if path.is_file() else -1
    return found


def _assert_identical_stores(reference: Path, other: Path) -> None:
    """Same files, byte for byte: extraction is deterministic, so resuming must be invisible."""
    assert _tree(reference) == _tree(other)
    for name, size in _tree(reference).items():
        if size >= 0:
            assert filecmp.cmp(reference / name, other / name, shallow=False), name


def _assert_nothing_left_behind(out: Path) -> None:
    leftovers = [
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.name.startswith(".tmp-") or p.name == ".commit"
    ]
    assert not leftovers, leftovers
    assert not list((out / "staging").iterdir()), "staging/ is not empty"
    assert not list((out / "locks").iterdir()), "a lock outlived its run"
    verified = _cli("inspect-store", out, "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "no problems" in verified.stdout and "warning" not in verified.stdout, verified.stdout


def _tiny_store(path: Path, source: Path, fps: float) -> Path:
    """A copy of ``source`` (a tiny_corpus store) whose schema says another fps."""
    from dataclasses import replace

    original = FeatureStore.open(source)
    schema = replace(original.schema, fps=fps)
    store = FeatureStore.create_or_open(path, schema)
    videos = [(vid, original.manifest.set_index("id").loc[vid, "source"]) for vid in original.ids]
    for plan in store.plan(videos, partition_size=4):
        with store.partition_writer(plan.name) as writer:
            for vid, src in plan.videos:
                features = original[vid]
                info = {k: features.info[k] for k in
                        ("n_frames", "n_sampled", "padded", "subsampled", "duration", "fps",
                         "source_fps", "timestamps")}  # fmt: skip
                writer.add(vid, src, dict(features.layers), info)
            writer.commit()
    store.consolidate()
    return path


@pytest.fixture
def videos(make_video, tmp_path: Path):
    """Factory: ``n`` short synthetic clips in a folder of their own; the first may be longer."""

    def _make(n: int, frames: int = 48, folder: str = "videos", first: int | None = None) -> Path:
        for k in range(n):
            length = first if (k == 0 and first) else frames
            make_video(f"{folder}/c{k:02d}.mkv", n_frames=length, fps=8.0, size=(48, 48), seed=k)
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
    _no_traceback(other.stdout, other.stderr)

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


def _train(store: Path, dataset: Path, out: Path, params: Path, *extra: object):
    return _cli("train-captioner", *_training_args(store, dataset, out, params), *extra)


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
    _no_traceback(second.stdout, second.stderr)

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
    _no_traceback(refused.stdout, refused.stderr)
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
    _no_traceback(refused.stdout, refused.stderr)
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
        _no_traceback(full.stdout, full.stderr)
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


# ------------------------------------------------------------------------------------------------
# 1. kill -9 of an extraction


def _staged(out: Path) -> list[Path]:
    return list(out.glob("staging/*/v*.npz"))


def _committing(out: Path) -> list[Path]:
    return list(out.glob("staging/*/.commit"))


KILL_MOMENTS = {
    # The first partition is locked, the first (longest) video is being decoded or computed.
    "before anything is staged": lambda out: (
        (out / "locks" / "p00000.lock").exists() and not _staged(out)
    ),
    "staged videos of an unfinished partition": lambda out: (
        len(_staged(out)) >= 2 and not _committing(out)
    ),
    "during a partition commit": lambda out: bool(_committing(out)),
}


@pytest.mark.slow
def test_sigkill_of_extraction_at_three_moments_leaves_nothing_behind(videos, tmp_path: Path):
    import psutil

    clips = videos(8, frames=64, first=160)
    args = [clips, *SMALL, "--partition-size", "4"]
    reference = tmp_path / "reference"
    done = _cli("extract-features", *args, "--out", reference)
    assert done.returncode == 0, done.stderr

    for k, (moment, reached) in enumerate(KILL_MOMENTS.items()):
        out = tmp_path / f"killed{k}"
        process = _start("extract-features", *args, "--out", out)
        _wait_for(lambda out=out, reached=reached: out.is_dir() and reached(out), process)
        children = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"{moment}: orphans {[p.cmdline() for p in alive]}"
        # The kill did land at that moment (a check of the test, not of the code).
        if moment == "before anything is staged":
            assert not _staged(out) and not (out / "partitions" / "p00000").exists()
        elif moment == "staged videos of an unfinished partition":
            assert _staged(out)
        else:
            assert _committing(out) or (out / "partitions" / "p00000" / "manifest.csv").exists()
        # Whatever it left is sound, if incomplete: leftovers are warnings, never problems.
        interrupted = _cli("inspect-store", out, "--verify")
        assert interrupted.returncode == 0, f"{moment}: {interrupted.stdout}"

        rerun = _cli("extract-features", *args, "--out", out)
        assert rerun.returncode == 0, f"{moment}: {rerun.stderr}"
        _no_traceback(rerun.stderr)
        _assert_identical_stores(reference, out)
        _assert_nothing_left_behind(out)


# ------------------------------------------------------------------------------------------------
# 2. Two extractions of one store at once


@pytest.mark.slow
def test_two_extractions_of_one_store_one_is_refused_and_every_video_is_stored_once(
    videos, tmp_path: Path
):
    """What the partition locks guarantee: never two writers of one partition.

    The second run, reaching the partition the first holds, is refused naming the holder's pid
    (or, if it overtook the first, the first is refused so); the other finishes everything.
    """
    clips = videos(16, frames=96)
    out = tmp_path / "store"
    args = [clips, *SMALL, "--partition-size", "2", "--out", out]
    first = _start("extract-features", *args)
    _wait_for(lambda: (out / "partitions" / "p00000" / "manifest.csv").exists(), first)
    second = _start("extract-features", *args)
    results = {}
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=300)
        results[process.pid] = (process.returncode, stdout, stderr)
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 1], results  # one refused, the other finished
    for pid, (code, stdout, stderr) in results.items():
        _no_traceback(stdout, stderr)
        if code == 1:
            other = next(p for p in results if p != pid)
            assert f"is held by live pid {other}" in stderr, stderr

    store = FeatureStore.open(out)
    expected = [f"c{k:02d}" for k in range(16)]
    assert sorted(store.ids) == expected
    assert sorted(store.manifest["id"]) == expected  # each once
    assert store.pending() == []
    _assert_nothing_left_behind(out)


# ------------------------------------------------------------------------------------------------
# 3. Hostile pickles


class _RunsCode:
    """Unpickling this runs a shell command: stands for any code a pickle can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_pickle_that_would_run_code_is_refused_by_every_command(
    tiny_corpus, videos, tmp_path: Path
):
    store, dataset = tiny_corpus(n_videos=4)
    clip = videos(1) / "c00.mkv"
    marker = tmp_path / "pwned"
    hostile = {}
    for writer in ("torch.save", "pickle"):
        path = tmp_path / f"evil-{writer}.pt"
        payload = {"conv1.weight": _RunsCode(marker), "model": _RunsCode(marker)}
        if writer == "pickle":  # protocol 2: torch's weights-only unpickler reads it to the end
            path.write_bytes(pickle.dumps(payload, protocol=2))
        else:
            torch.save(payload, path)
        hostile[writer] = path
    # The payload is live: a plain unpickler does run it (so that this test can fail).
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "control")))
    assert (tmp_path / "control").exists()

    params = _params(tmp_path / "params.yaml", videos_per_batch=2, captions_per_video=2,
                     max_epochs=1)  # fmt: skip
    for writer, evil in hostile.items():
        run = tmp_path / f"run-{writer}"
        run.mkdir()
        shutil.copy(evil, run / "last.pt")
        attempts = {
            # The full backbone: c3d-small refuses any weights file before reading it.
            "extract-features": _cli("extract-features", clip, "--backbone", "c3d", "--quiet",
                                     "--weights", evil, "--out", tmp_path / f"s-{writer}"),
            "evaluate-captioner": _cli("evaluate-captioner", "--checkpoint", evil, "--store",
                                       store, "--dataset", dataset, "--split", "train", "--out",
                                       tmp_path / f"e-{writer}", "-q"),
            "caption-video": _cli("caption-video", clip, "--checkpoint", evil),
            "train-captioner --resume": _train(store, dataset, run, params, "--resume"),
        }  # fmt: skip
        for command, result in attempts.items():
            where = f"{command} ({writer})"
            assert result.returncode == 1, f"{where}: {result.stdout}{result.stderr}"
            _no_traceback(result.stdout, result.stderr)
            named = str(run / "last.pt") if command.startswith("train") else str(evil)
            assert f"Error: {named}: " in result.stderr, f"{where}: {result.stderr}"
            assert "refused" in result.stderr, where
            assert "system" in result.stderr, where  # the unpickler's own reason: posix.system
            # torch's advice to retry with weights_only=False must never reach the user
            assert "weights_only" not in result.stderr, f"{where}: {result.stderr}"
            assert not marker.exists(), f"{where} ran the pickle's code"
        assert not (tmp_path / f"s-{writer}").exists()
        assert not (tmp_path / f"e-{writer}" / "metrics.json").exists()
        assert (run / "last.pt").read_bytes() == evil.read_bytes()  # nothing overwritten


# ------------------------------------------------------------------------------------------------
# 4. Hostile video ids


def test_hostile_video_ids_write_nothing_outside_the_store_and_read_back(videos, tmp_path: Path):
    tag = uuid.uuid4().hex[:12]
    absolute = Path(f"/tmp/abs-{tag}")
    ids = [
        "../escape",
        "../../escape-further",
        str(absolute),
        "two\nlines",
        "\u202eright-to-left",
        "x" * 10_000,
    ]
    clips = videos(len(ids))
    listing = tmp_path / "list.csv"
    quoted = ['"' + vid.replace('"', '""') + '"' for vid in ids]
    rows = [f"{vid},{clips / f'c{k:02d}.mkv'}" for k, vid in enumerate(quoted)]
    listing.write_text("id,path\n" + "\n".join(rows) + "\n", encoding="utf-8")
    work = tmp_path / "work" / "deeper"  # the command's cwd: ../ lands inside tmp_path
    work.mkdir(parents=True)
    out = work / "store"
    before = _tree(tmp_path)

    result = _cli("extract-features", listing, *SMALL, "--partition-size", "4", "--out", out,
                  cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    _no_traceback(result.stderr)
    assert _tree(tmp_path, skip=out) == before, "written outside --out"
    assert not absolute.exists()
    assert not list(tmp_path.rglob("*escape*")), "an id became a path"

    store = FeatureStore.open(out)
    assert sorted(store.ids) == sorted(ids)
    for k, vid in enumerate(ids):
        assert store[vid].info["n_frames"] > 0, repr(vid[:40])
        assert store.manifest.set_index("id").loc[vid, "source"] == str(clips / f"c{k:02d}.mkv")
    _assert_nothing_left_behind(out)


# ------------------------------------------------------------------------------------------------
# 5. No Java


def _path_without_java(tmp_path: Path) -> str:
    """A PATH with this venv's commands and every /usr/bin tool but java."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if entry.name != "java":
            (tools / entry.name).symlink_to(entry)
    path = f"{BIN}{os.pathsep}{tools}"
    assert shutil.which("java", path=path) is None
    return path


@pytest.mark.slow
def test_without_java_scoring_commands_say_so_without_a_traceback(tiny_corpus, tmp_path: Path):
    store, dataset = tiny_corpus(n_videos=4)
    env = {**ENV, "PATH": _path_without_java(tmp_path)}
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({f"v{k}": "a red ball" for k in range(4)}))
    scored = _cli("score-captions", predictions, "--dataset", dataset, "--split", "train",
                  "--out", tmp_path / "scores.json", env=env)  # fmt: skip

    params = _params(tmp_path / "params.yaml", videos_per_batch=2, captions_per_video=2,
                     max_steps=2)  # fmt: skip
    trained = _train(store, dataset, tmp_path / "run", params)
    assert trained.returncode == 0, trained.stderr
    evaluated = _cli("evaluate-captioner", "--checkpoint", tmp_path / "run" / "last.pt",
                     "--store", store, "--dataset", dataset, "--split", "train", "--beam", "1",
                     "--out", tmp_path / "eval", "-q", env=env)  # fmt: skip
    for result in (scored, evaluated):
        assert result.returncode == 1, result.stdout + result.stderr
        _no_traceback(result.stdout, result.stderr)
        assert "Error: " in result.stderr and "Java" in result.stderr, result.stderr
        assert "java not found" in result.stderr, result.stderr
    assert not (tmp_path / "scores.json").exists()
    assert not (tmp_path / "eval" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# 6. Ctrl-C


def _ctrl_c(process: subprocess.Popen) -> tuple[str, str]:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    return process.communicate(timeout=120)


@pytest.mark.slow
def test_ctrl_c_of_extraction_exits_130_and_the_rerun_gives_the_same_store(videos, tmp_path: Path):
    clips = videos(8, frames=64)
    args = [clips, *SMALL, "--partition-size", "3"]
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    assert _cli("extract-features", *args, "--out", reference).returncode == 0

    process = _start("extract-features", *args, "--out", out)
    _wait_for(lambda: out.is_dir() and bool(_staged(out)), process)
    stdout, stderr = _ctrl_c(process)
    assert process.returncode == 130, stderr
    assert "interrupted: finished videos are kept; rerun the same command" in stderr
    _no_traceback(stdout, stderr)

    rerun = _cli("extract-features", *args, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    _assert_identical_stores(reference, out)
    _assert_nothing_left_behind(out)


def _final_parameters(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_ctrl_c_of_training_then_resume_ends_with_the_uninterrupted_parameters(
    tiny_corpus, tmp_path: Path
):
    store, dataset = tiny_corpus(n_videos=6)
    params = _params(tmp_path / "params.yaml", videos_per_batch=2, captions_per_video=2,
                     max_epochs=12, checkpoint_every=5, lr_schedule="cosine")  # fmt: skip
    reference = tmp_path / "reference"
    done = _train(store, dataset, reference, params)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "interrupted"
    process = _start("train-captioner", "--store", store, "--dataset", dataset, "--out", out,
                     "--variant", "soft", "--params", params)  # fmt: skip
    log = out / "metrics" / "train.jsonl"

    def mid_run() -> bool:
        steps = len(log.read_text().splitlines()) if log.exists() else 0
        return (out / "last.pt").exists() and steps >= 8

    _wait_for(mid_run, process)
    stdout, stderr = _ctrl_c(process)
    assert process.returncode == 130, stderr
    _no_traceback(stdout, stderr)
    assert "interrupted" in stderr and "--resume" in stderr, stderr
    stopped_at = torch.load(out / "last.pt", weights_only=True)["state"]["step"]
    final = torch.load(reference / "last.pt", weights_only=True)["state"]["step"]
    assert 0 < stopped_at < final, "interrupted too late to test a resume"

    resumed = _train(store, dataset, out, params, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _no_traceback(resumed.stderr)
    expected, actual = _final_parameters(reference), _final_parameters(out)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    reference_log = (reference / "metrics" / "train.jsonl").read_text().splitlines()
    assert losses == [json.loads(line)["loss"] for line in reference_log]
    assert not list(out.glob(".*.pt.*"))


# ------------------------------------------------------------------------------------------------
# 7. A checkpoint used with a store of other settings


@pytest.mark.slow
def test_a_checkpoint_used_with_a_store_of_other_settings_is_refused_with_each_side_labelled(
    tiny_corpus, tmp_path: Path
):
    store, dataset = tiny_corpus(n_videos=4)  # 2 fps
    other = _tiny_store(tmp_path / "other-fps", store, fps=3.0)
    params = _params(tmp_path / "params.yaml", videos_per_batch=2, captions_per_video=2,
                     max_steps=2)  # fmt: skip
    run = tmp_path / "run"
    trained = _train(store, dataset, run, params)
    assert trained.returncode == 0, trained.stderr

    evaluated = _cli("evaluate-captioner", "--checkpoint", run / "last.pt", "--store", other,
                     "--dataset", dataset, "--split", "train", "--beam", "1", "--out",
                     tmp_path / "eval", "-q")  # fmt: skip
    assert evaluated.returncode == 1, evaluated.stdout + evaluated.stderr
    _no_traceback(evaluated.stdout, evaluated.stderr)
    assert f"{other} does not match the features {run / 'last.pt'} was trained on" in (
        evaluated.stderr
    )
    assert "fps: 2.0 in training, 3.0 in the store" in evaluated.stderr, evaluated.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()

    resumed = _train(other, dataset, run, params, "--resume", "--max-steps", 4)
    assert resumed.returncode == 1, resumed.stderr
    _no_traceback(resumed.stdout, resumed.stderr)
    assert "store fps: 2.0 in the checkpoint, 3.0 in the store" in resumed.stderr, resumed.stderr
    assert torch.load(run / "last.pt", weights_only=True)["state"]["step"] == 2  # untouched
