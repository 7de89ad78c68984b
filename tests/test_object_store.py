"""Feature stores on object storage: a real S3 API on loopback (moto's server) and memory://.

Extraction, verification, training and evaluation through ``s3://`` URLs, compared array by
array with a local store; the commit protocol where rename is not atomic (a conditional write of
a marker, written last), with a half-built partition and two writers racing for one partition.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from test_extract import SMALL, _assert_same_store
from test_train import _params

from astar.extract.cli import main as extract_cli
from astar.store import LAYERS, CorruptVideo, FeatureStore
from astar.store.cli import main as inspect_cli
from astar.store.geometry import BACKBONES
from astar.store.location import is_remote, store_path, write_once
from astar.store.synthetic import plain_info, synthetic_schema, write_videos
from astar.store.writer import ATTEMPT_PREFIX, COMMITS

SCHEMA = synthetic_schema(
    BACKBONES["c3d-tiny"].layer_shapes(), backbone="c3d-tiny", preprocessing="caffe-bgr-mean"
)


def _features(seed: int):
    """``make(video_id)`` for write_videos: fixed random features per video id."""

    def make(video_id: str) -> tuple[int, dict[str, np.ndarray]]:
        rng = np.random.default_rng([seed, int(video_id[1:])])
        n_frames = int(rng.integers(16, 60))
        lengths = SCHEMA.expected_lengths(n_frames)
        return n_frames, {
            name: np.maximum(rng.standard_normal(SCHEMA.full_shape(name, lengths[name])), 0)
            for name in LAYERS
        }

    return make


VIDEOS = [(f"v{k}", f"/corpus/v{k}.mp4") for k in range(7)]
VIDEOS_3 = ("v0", "v1", "v2")


@pytest.fixture(params=["s3", "memory"])
def remote_url(request: pytest.FixtureRequest) -> str:
    """A fresh store location on the loopback S3 server or in fsspec's memory filesystem."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/features"
    return f"memory://astar-tests/{uuid.uuid4().hex}/features"


def _same_contents(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids == b.ids
    columns = [c for c in a.manifest.columns if c != "timestamps"]
    pd.testing.assert_frame_equal(a.manifest[columns], b.manifest[columns])
    for one, two in zip(a.read_batch(a.ids), b.read_batch(b.ids), strict=True):
        assert one.info["timestamps"].tolist() == two.info["timestamps"].tolist()
        for name in LAYERS:
            np.testing.assert_array_equal(one.layers[name], two.layers[name], err_msg=name)


def test_conditional_create_is_honoured(remote_url: str):
    marker = store_path(remote_url) / "marker.json"
    assert write_once(marker, b"first")
    assert not write_once(marker, b"second")  # the server refused: If-None-Match
    assert marker.read_bytes() == b"first"


def test_locks_on_object_storage_are_leases(remote_url: str, monkeypatch):
    """Another host's lock is its holder's while renewed, a dead holder's once not renewed for
    LEASE_S, and the lock is renewed while held."""
    from astar.store import files
    from astar.store.errors import PartitionLocked

    store = FeatureStore.create_or_open(remote_url, SCHEMA)
    store.plan(VIDEOS[:1], partition_size=1)
    lock = store.path / "locks" / "p00000.lock"
    elsewhere = dataclasses.replace(files.LockOwner.me(renewed=True), host="another-host")
    lock.write_text(json.dumps(dataclasses.asdict(elsewhere)))
    with pytest.raises(PartitionLocked, match="held by live"), store.partition_writer("p00000"):
        pass
    gone = dataclasses.replace(elsewhere, renewed=time.time() - files.LEASE_S - 1)
    lock.write_text(json.dumps(dataclasses.asdict(gone)))
    monkeypatch.setattr(files, "LEASE_S", 0.5)  # renewed every 0.1 s from here on
    with store.partition_writer("p00000"):
        taken = files.read_owner(lock)
        assert taken.host != "another-host" and taken.renewed is not None
        deadline = time.monotonic() + 10
        while files.read_owner(lock).renewed == taken.renewed:
            assert time.monotonic() < deadline, "the lock was not renewed"
            time.sleep(0.05)
    assert not lock.exists()


def test_a_renewal_never_overwrites_a_lock_taken_meanwhile(s3_bucket: str, monkeypatch):
    """A holder stalled past its lease renews while another writer breaks and takes its lock
    between the renewal's read and its write: S3 refuses the write (If-Match), the new holder's
    lock stays, and the stalled holder stops renewing."""
    from astar.store import files

    lock_path = store_path(f"s3://{s3_bucket}/locks/p00000.lock")
    lock = files.FileLock(lock_path)
    monkeypatch.setattr(files.FileLock, "_start_renewing", lambda self: None)  # by hand here
    lock.acquire()
    assert lock.renew_once() and files.read_owner(lock_path).renewed == lock.owner.renewed
    thief = dataclasses.replace(files.LockOwner.me(renewed=True), host="another-host")
    original = files.read_owner

    def read_then_taken(path):  # the other writer takes the lock just after this read
        seen = original(path)
        lock_path.write_text(json.dumps(dataclasses.asdict(thief)))
        return seen

    monkeypatch.setattr(files, "read_owner", read_then_taken)
    assert not lock.renew_once()  # refused by the server: lost
    monkeypatch.setattr(files, "read_owner", original)
    assert files.read_owner(lock_path) == thief
    # A takeover before the renewal's read: the version read is the thief's, so only the
    # content comparison keeps the renewal from overwriting it.
    assert not lock.renew_once() and files.read_owner(lock_path) == thief


def test_remote_store_equals_a_local_one(remote_url: str, tmp_path: Path):
    local = FeatureStore.create_or_open(tmp_path / "local", SCHEMA)
    remote = FeatureStore.create_or_open(remote_url, SCHEMA)
    assert remote.remote and is_remote(remote.path) and not local.remote
    for store in (local, remote):
        write_videos(store, VIDEOS, _features(0), partition_size=3)
        store.consolidate()
    reopened = FeatureStore.open(remote_url)
    assert len(reopened) == 7 and not reopened.pending()
    _same_contents(local, reopened)
    report = reopened.verify_report()
    assert report.problems == [] and report.warnings == [] and report.videos_checked == 7
    # Committed by markers, written last, naming each partition's one build.
    root = reopened.path
    markers = sorted(entry.name for entry in (root / COMMITS).iterdir())
    assert markers == ["p00000.json", "p00001.json", "p00002.json"]
    for name in ("p00000", "p00001", "p00002"):
        attempt = json.loads((root / COMMITS / f"{name}.json").read_text())["attempt"]
        builds = [e.name for e in (root / "partitions" / name).iterdir()]
        assert builds == [attempt] and attempt.startswith(ATTEMPT_PREFIX)
    assert not (root / "staging").exists()  # staged videos removed after each commit


def test_damage_on_object_storage_is_named(remote_url: str):
    store = FeatureStore.create_or_open(remote_url, SCHEMA)
    write_videos(store, VIDEOS[:3], _features(0), partition_size=3)
    part = store.complete_partitions()["p00000"]
    chunk = next(e for e in (part / "pool3").iterdir() if e.name.startswith("c."))
    chunk.unlink()
    problems = FeatureStore.open(remote_url).verify()
    assert problems[0] == "partitions/p00000/pool3: 0 chunk files, 1 expected"
    assert problems[1:] == [
        f"partitions/p00000, video '{v}', pool3: chunk {chunk.name} missing" for v in VIDEOS_3
    ]
    with pytest.raises(CorruptVideo, match=f"pool3: chunk {chunk.name} missing"):
        FeatureStore.open(remote_url)["v1"]


def test_a_build_without_its_marker_is_invisible_and_redone(remote_url: str):
    store = FeatureStore.create_or_open(remote_url, SCHEMA)
    store.plan(VIDEOS[:3], partition_size=3)
    make = _features(0)
    with store.partition_writer("p00000") as writer:
        for video_id, source in VIDEOS[:3]:
            n_frames, features = make(video_id)
            writer.add(video_id, source, features, plain_info(n_frames, SCHEMA.fps))
    # A writer killed after building its attempt, before the marker: data without a commit.
    dead = store.path / "partitions" / "p00000" / f"{ATTEMPT_PREFIX}dead0000"
    (dead / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    fresh = FeatureStore.open(remote_url)
    assert len(fresh) == 0 and [p.name for p in fresh.pending()] == ["p00000"]
    assert any("a-dead0000" in warning for warning in fresh.verify_report().warnings)
    with fresh.partition_writer("p00000") as writer:
        assert writer.done_ids == {"v0", "v1", "v2"}  # the staged videos are reused
        writer.commit()
    assert len(FeatureStore.open(remote_url)) == 3
    assert [e.name for e in (store.path / "partitions" / "p00000").iterdir()] != [dead.name]
    assert not dead.exists()  # the winner cleared the dead build


def test_two_writers_racing_for_a_partition_publish_one(remote_url: str):
    """Even with the lock out of the way (wrongly broken), one marker, one writer's data."""
    store = FeatureStore.create_or_open(remote_url, SCHEMA)
    store.plan(VIDEOS[:3], partition_size=3)
    make = _features(0)
    first = store.partition_writer("p00000")
    second = store.partition_writer("p00000")
    late = store.partition_writer("p00000")
    with first:
        for video_id, source in VIDEOS[:3]:
            n_frames, features = make(video_id)
            first.add(video_id, source, features, plain_info(n_frames, SCHEMA.fps))
        # The others believe they hold the lock and that they staged the same videos.
        for other in (second, late):
            other._lock.owner, other.done_ids = first._lock.owner, set(first.done_ids)
        staged = {p.name: p.read_bytes() for p in (store.path / "staging/p00000").iterdir()}
        records = [first._staged_record(first._staged_path(v), v) for v, _ in VIDEOS[:3]]
        table = first._table(records)
        first.commit()
        # ``second`` builds a whole attempt of its own from the staged videos, then loses the
        # conditional create of the marker; ``late`` finds the staged videos already gone.
        late._commit_remote(table)
        for name, data in staged.items():
            (store.path / "staging/p00000" / name).write_bytes(data)
        second._commit_remote(table)
    assert second.complete and late.complete
    marker = json.loads((store.path / COMMITS / "p00000.json").read_text())
    builds = [e.name for e in (store.path / "partitions" / "p00000").iterdir()]
    assert builds == [marker["attempt"]]  # the losers removed their builds
    reopened = FeatureStore.open(remote_url)
    assert reopened.verify() == [] and reopened.ids == ["v0", "v1", "v2"]


@pytest.fixture
def clips(make_video, tmp_path: Path) -> Path:
    for k in range(4):
        make_video(f"videos/v{k}.mkv", n_frames=20 + 8 * k, fps=8.0, size=(40, 32), seed=k)
    return tmp_path / "videos"


def test_extract_into_s3_equals_local_and_inspects(clips: Path, s3_bucket: str, tmp_path: Path):
    url = f"s3://{s3_bucket}/store"
    base = [str(clips), *SMALL, "--partition-size", "3"]
    local = CliRunner().invoke(extract_cli, [*base, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(extract_cli, [*base, "--out", url])
    assert remote.exit_code == 0, remote.output
    assert "ok 4" in remote.output
    _assert_same_store(tmp_path / "local", url)
    meta = json.loads(
        next(
            (FeatureStore.open(url).complete_partitions()["p00000"] / "pool2").glob("zarr.json")
        ).read_text()
    )
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes", "zstd"]  # auto at a URL
    _same_contents(FeatureStore.open(tmp_path / "local"), FeatureStore.open(url))
    # A rerun finds everything done, as on a local disk.
    again = CliRunner().invoke(extract_cli, [*base, "--out", url])
    assert again.exit_code == 0 and "ok 0, failed 0 (none), skipped 4" in again.output
    inspected = CliRunner().invoke(inspect_cli, [url, "--verify", "--json"])
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.output)
    assert summary["summary"]["videos"]["ok"] == 4 and summary["verify"]["problems"] == []
    assert summary["summary"]["path"] == url


@pytest.mark.slow  # trains twice and evaluates (Java tokenizer and METEOR)
def test_train_and_evaluate_from_s3_as_from_local(tiny_corpus, s3_bucket: str, tmp_path: Path):
    from astar.evaluate.cli import evaluate_captioner
    from astar.train.cli import main as train_cli

    splits = ("train", "train", "val")
    local_store, dataset = tiny_corpus(splits=splits)
    url, _ = tiny_corpus(splits=splits, store=f"s3://{s3_bucket}/store")
    assert str(url) == f"s3://{s3_bucket}/store"
    params = _params(tmp_path, videos_per_batch=2, captions_per_video=2, max_steps=4)
    losses = {}
    for name, store in {"local": local_store, "s3": url}.items():
        args = ["--store", str(store), "--dataset", str(dataset), "--variant", "soft"]
        args += ["--out", str(tmp_path / name), "--params", str(params), "--device", "cpu"]
        result = CliRunner().invoke(train_cli, args)
        assert result.exit_code == 0, (result.output, _trace(result))
        lines = (tmp_path / name / "metrics/train.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert len(losses["s3"]) == 4 and losses["s3"] == losses["local"]  # the same features
    config = json.loads((tmp_path / "s3" / "config.json").read_text())
    assert config["store"] == str(url)
    args = ["--checkpoint", str(tmp_path / "s3" / "last.pt"), "--store", str(url)]
    args += ["--dataset", str(dataset), "--split", "val", "--out", str(tmp_path / "eval"), "-q"]
    args += ["--beam", "1"]
    result = CliRunner().invoke(evaluate_captioner, args)
    assert result.exit_code == 0, (result.output, _trace(result))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "CIDEr" in json.dumps(metrics)


def test_a_url_without_its_backend_is_a_clear_error():
    result = CliRunner().invoke(inspect_cli, ["nosuchfs://bucket/store"])
    assert result.exit_code != 0 and "nosuchfs://" in result.output


def _trace(result) -> str:
    import traceback

    return "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""


def test_a_url_as_run_or_evaluation_folder_is_refused(tiny_corpus, tmp_path: Path):
    from astar.evaluate.cli import evaluate_captioner
    from astar.train.cli import main as train_cli

    store, dataset = tiny_corpus()
    common = ["--store", str(store), "--dataset", str(dataset)]
    trained = CliRunner().invoke(train_cli, [*common, "--out", "s3://bucket/run"])
    assert trained.exit_code == 2 and "only the feature store may be at a URL" in trained.output
    assert not Path("s3:").exists()
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"")
    evaluated = CliRunner().invoke(
        evaluate_captioner, ["--checkpoint", str(checkpoint), *common, "--out", "s3://b/eval"]
    )
    assert evaluated.exit_code == 2 and "a URL" in evaluated.output


@pytest.mark.slow
def test_real_clips_extracted_into_s3_equal_a_local_extraction(
    real_videos: list[Path], s3_bucket: str, tmp_path: Path
):
    """The real clips of ../shared/data, extracted into the loopback S3 server and onto the
    local disk with the same settings: the same manifest and the same arrays."""
    url = f"s3://{s3_bucket}/real"
    base = [*map(str, real_videos), "--backbone", "c3d-tiny", "--ids", "name", "--quiet"]
    base += ["--partition-size", "5"]
    for out in (str(tmp_path / "local"), url):
        result = CliRunner().invoke(extract_cli, [*base, "--out", out])
        assert result.exit_code == 0, result.output
    local, remote = FeatureStore.open(tmp_path / "local"), FeatureStore.open(url)
    assert len(remote) == len(real_videos) == 12 and remote.verify() == []
    _same_contents(local, remote)
