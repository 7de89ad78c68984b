"""The feature store: round trips, manifest, crash safety, resume, locks, files, verify, CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner

from astar.store import (
    INFO_KEYS,
    LAYERS,
    CorruptVideo,
    FeatureStore,
    InvalidFeatures,
    PartitionLocked,
    SchemaMismatch,
    StoreError,
    StoreSchema,
    n_clips,
)
from astar.store.cli import main as inspect_cli
from astar.store.files import LockOwner
from astar.store.partition import chunk_groups
from astar.store.synthetic import synthetic_schema
from astar.store.writer import COMMIT_DIR

# Tiny layers: the store's logic does not depend on the sizes, only the schema does.
SHAPES = {
    "pool2": (4, 4, 4),
    "pool3": (4, 2, 2),
    "pool4": (8, 2, 2),
    "pool5": (8, 1, 1),
    "fc7": (6,),
}


def make_schema(dtype: str = "float32", **changes) -> StoreSchema:
    return replace(synthetic_schema(SHAPES, dtype=dtype), **changes)


def make_video(schema: StoreSchema, n_frames: int, seed: int) -> tuple[dict, dict]:
    """ReLU-like features (about half zeros) of the right shapes, and the video's info."""
    rng = np.random.default_rng(seed)
    lengths = schema.expected_lengths(n_frames)
    features = {}
    for layer in LAYERS:
        values = rng.standard_normal(schema.full_shape(layer, lengths[layer])).astype(np.float32)
        features[layer] = np.maximum(values, 0) * 3
    info = {
        "n_frames": n_frames,
        "n_sampled": max(n_frames - 2, 1),
        "padded": n_frames == 16,
        "subsampled": False,
        "duration": n_frames / 2 + 0.25,
        "fps": None,
        "source_fps": 29.97,
        "timestamps": np.arange(n_frames) / 2 + 0.1 * seed,
    }
    return features, info


class Corpus:
    """Videos with known features, and helpers to write them into a store."""

    def __init__(self, schema: StoreSchema, count: int, frames=lambda k: 16 + 5 * (k % 7)):
        self.videos = [(f"vid{k:03d}", f"/videos/vid{k:03d}.mp4") for k in range(count)]
        self.data = {
            vid: make_video(schema, frames(k), k) for k, (vid, _) in enumerate(self.videos)
        }

    def add(self, writer, video_id: str, source: str) -> None:
        features, info = self.data[video_id]
        writer.add(video_id, source, features, info)

    def write(
        self, store: FeatureStore, failures: dict[str, tuple[str, str]] | None = None
    ) -> None:
        failures = failures or {}
        for part in store.pending():
            with store.partition_writer(part.name) as writer:
                for video_id, source in part.videos:
                    if video_id in failures:
                        writer.add_failure(video_id, source, *failures[video_id])
                    else:
                        self.add(writer, video_id, source)
                writer.commit()


@pytest.fixture(scope="module")
def built_template(tmp_path_factory):
    """A float32 store of 7 videos in 3 partitions (3, 3, 1), one of them failed."""
    schema = make_schema()
    corpus = Corpus(schema, 7)
    path = tmp_path_factory.mktemp("template") / "store"
    store = FeatureStore.create_or_open(path, schema)
    store.plan(corpus.videos, partition_size=3)
    corpus.write(store, failures={"vid004": ("corrupt", "vid004.mp4: moov atom not found")})
    store.consolidate()
    return path, corpus


@pytest.fixture
def built(built_template, tmp_path: Path):
    """A private copy of the template store (tests corrupt it), opened afresh."""
    template, corpus = built_template
    shutil.copytree(template, tmp_path / "store")
    return FeatureStore.open(tmp_path / "store"), corpus


# --------------------------------------------------------------------------------------------
# Round trips, manifest, schema


def test_n_clips_ends_the_last_clip_at_the_last_frame():
    # 16 -> [0,16); 20 -> [0,16),[4,20); 24 -> [0,16),[8,24); 25 adds [9,25).
    assert [n_clips(n, 16, 8) for n in (15, 16, 20, 24, 25, 32, 33)] == [0, 1, 2, 2, 3, 3, 4]


def test_float32_round_trip_is_exact(built):
    store, corpus = built
    assert store.ids == [v for v, _ in corpus.videos if v != "vid004"]
    assert len(store) == 6 and "vid000" in store and "vid004" not in store
    for video_id in store:
        video = store[video_id]
        features, info = corpus.data[video_id]
        for layer in LAYERS:
            assert video.layers[layer].dtype == np.float32
            np.testing.assert_array_equal(video.layers[layer], features[layer], err_msg=layer)
        np.testing.assert_array_equal(video.info["timestamps"], info["timestamps"])
        assert video.info["n_frames"] == info["n_frames"]
        assert video.info["padded"] == info["padded"]
        assert video.info["duration"] == info["duration"]
        assert video.info["fps"] == 2.0  # None given: the schema's rate was used


def test_float16_store_is_within_half_precision_rounding(tmp_path: Path):
    schema = make_schema("float16")
    corpus = Corpus(schema, 3)
    store = FeatureStore.create_or_open(tmp_path / "s", schema)
    store.plan(corpus.videos, partition_size=2)
    corpus.write(store)
    for video_id, video in FeatureStore.open(tmp_path / "s").items():
        for layer in LAYERS:
            original = corpus.data[video_id][0][layer]
            assert video.layers[layer].dtype == np.float16
            np.testing.assert_array_equal(video.layers[layer], original.astype(np.float16))
            np.testing.assert_allclose(video.layers[layer], original, rtol=2**-11, atol=1e-7)


def test_manifest_is_plain_csv_with_every_column(built):
    store, corpus = built
    table = pd.read_csv(store.path / "manifest.csv")
    for column in ("id", "source", "status", "reason", "partition", *INFO_KEYS):
        assert column in table.columns, column
    for layer in LAYERS:
        assert {f"{layer}_offset", f"{layer}_length", f"{layer}_checksum"} <= set(table.columns)
    assert table["id"].tolist() == [v for v, _ in corpus.videos]
    assert table["partition"].tolist() == ["p00000"] * 3 + ["p00001"] * 3 + ["p00002"]
    row = table.set_index("id").loc["vid005"]
    assert json.loads(row["timestamps"]) == corpus.data["vid005"][1]["timestamps"].tolist()
    # Within a partition, each video follows the previous one along time.
    # vid003 (31 frames, 15 pool2 steps) comes first; vid004 failed and holds no data.
    assert row["pool2_offset"] == 15 and row["pool2_length"] == (16 + 25) // 2
    assert table.set_index("id").loc["vid002", "pool2_offset"] == 8 + 10  # 16 and 21 frames
    failed = table.set_index("id").loc["vid004"]
    assert failed["status"] == "corrupt" and "moov atom" in failed["reason"]
    assert failed["pool5_length"] == 0
    # The DataFrame property has the same rows, timestamps as lists.
    assert store.manifest["id"].tolist() == table["id"].tolist()
    assert store.manifest["timestamps"].iloc[5] == json.loads(row["timestamps"])
    # Readers trust the partition manifests: a stale consolidated copy changes nothing.
    (store.path / "manifest.csv").write_text("id,source\nghost,/nowhere.mp4\n")
    stale = FeatureStore.open(store.path)
    assert stale.ids == store.ids and "ghost" not in stale
    assert stale.verify_report().warnings == [
        "manifest.csv is stale or unreadable; FeatureStore.consolidate() rewrites it"
    ]


def test_schema_is_in_the_root_group_attributes(built):
    store, _ = built
    attributes = zarr.open_group(store.path, mode="r").attrs.asdict()
    for key in ("format_version", "fps", "size", "backbone", "weights", "dtype", "versions"):
        assert key in attributes, key
    assert attributes["weights"] == {"sha256": None, "seed": 0}
    assert set(attributes["versions"]) >= {"zarr", "numpy", "torch"}
    assert StoreSchema.from_dict(attributes) == store.schema
    # The partitions are ordinary zarr arrays too.
    pool3 = zarr.open_group(store.path, mode="r")["partitions/p00000/pool3"]
    # Time first (format 2), the videos one after another: vid000..002 have 16, 21, 26 frames.
    assert pool3.shape == (4 + 5 + 6, 4, 2, 2)
    assert pool3.metadata.dimension_names == ("time", "channel", "height", "width")


def test_schema_mismatch_names_each_difference(built):
    store, _ = built
    asked = replace(store.schema, fps=3.0, size=128, versions={"torch": "0.0"})
    with pytest.raises(SchemaMismatch) as caught:
        FeatureStore.create_or_open(store.path, asked)
    message = str(caught.value)
    assert "fps: 2.0 in the store, 3.0 asked" in message and "size: 112" in message
    # Each side is named for where it comes from (a checkpoint's schema against a store's).
    labelled = store.schema.differences(asked, "in training", "in the store")
    assert "fps: 2.0 in training, 3.0 in the store" in labelled
    assert "versions" not in message
    # Versions alone never block: same settings, other packages.
    same = replace(store.schema, versions={"torch": "0.0"})
    assert FeatureStore.create_or_open(store.path, same).schema.fps == 2.0


def test_open_refuses_what_is_not_a_readable_store(tmp_path: Path, built):
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path / "nowhere")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        FeatureStore.create_or_open(tmp_path / "other", make_schema())
    store, _ = built
    root = store.path / "zarr.json"
    metadata = json.loads(root.read_text())
    metadata["attributes"]["format_version"] = 99
    root.write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="upgrade astar"):
        FeatureStore.open(store.path)


# --------------------------------------------------------------------------------------------
# Reading


def test_read_batch_equals_individual_gets(built):
    store, _ = built
    ids = ["vid006", "vid001", "vid005", "vid001", "vid000", "vid003"]
    batch = store.read_batch(ids)
    assert [video.id for video in batch] == ids
    for video in batch:
        single = store.get(video.id)
        for layer in LAYERS:
            np.testing.assert_array_equal(video.layers[layer], single.layers[layer])
        assert video.info["partition"] == single.info["partition"]


def test_chunk_groups_read_each_chunk_once():
    # Chunks of 8 steps. Spans: [0,5) chunk 0; [5,20) chunks 0-2; [20,22) chunk 2; [40,41)
    # chunk 5; [24,30) chunk 3 touches chunk 2; an empty span reads nothing.
    starts = np.array([0, 5, 20, 40, 24, 30])
    stops = np.array([5, 20, 22, 41, 30, 30])
    assert chunk_groups(starts, stops, 8) == [[0, 1, 2, 4], [3]]


def test_layer_subset_reads_only_those_layers(built):
    store, corpus = built
    # Remove pool2 of the first partition: reads that skip pool2 must not notice.
    shutil.rmtree(store.path / "partitions" / "p00000" / "pool2")
    fresh = FeatureStore.open(store.path)
    video = fresh.get("vid001", layers=["pool5", "fc7"])
    assert set(video.layers) == {"pool5", "fc7"}
    np.testing.assert_array_equal(video.layers["fc7"], corpus.data["vid001"][0]["fc7"])
    with pytest.raises(CorruptVideo, match="partition p00000, pool2: array unreadable") as lost:
        fresh.get("vid001")
    assert list(lost.value.videos) == ["vid001"]
    with pytest.raises(StoreError, match="unknown layer"):
        fresh.get("vid001", layers=["pool7"])


def test_failures_and_unknown_ids_explain_themselves(built):
    store, _ = built
    with pytest.raises(KeyError) as caught:
        store["vid004"]
    assert str(caught.value) == "video 'vid004' failed during extraction (corrupt): " + (
        "vid004.mp4: moov atom not found"
    )
    with pytest.raises(KeyError, match="similar ids: vid001"):
        store["vid01"]


def test_store_pickles_for_dataloader_workers(built):
    store, _ = built
    store["vid000"]  # opens arrays, which must not travel
    copy = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(copy["vid006"].layers["pool2"], store["vid006"].layers["pool2"])


# --------------------------------------------------------------------------------------------
# Writing: validation, plan, resume, crash safety


def test_add_refuses_features_that_do_not_fit(tmp_path: Path):
    schema = make_schema("float16")
    store = FeatureStore.create_or_open(tmp_path / "s", schema)
    store.plan([("a", "/v/a.mp4")])
    features, info = make_video(schema, 20, 0)
    with store.partition_writer("p00000") as writer:
        bad_time = {**features, "pool3": features["pool3"][:, :3]}
        with pytest.raises(InvalidFeatures, match=r"pool3: got float32 \(4, 3, 2, 2\)"):
            writer.add("a", "/v/a.mp4", bad_time, info)
        with pytest.raises(InvalidFeatures, match="exactly the layers"):
            writer.add("a", "/v/a.mp4", {k: v for k, v in features.items() if k != "fc7"}, info)
        with pytest.raises(InvalidFeatures, match="float32"):  # 1e5 overflows fp16
            writer.add("a", "/v/a.mp4", {**features, "fc7": features["fc7"] + 1e5}, info)
        with pytest.raises(InvalidFeatures, match="missing \\['timestamps'\\]"):
            writer.add(
                "a", "/v/a.mp4", features, {k: v for k, v in info.items() if k != "timestamps"}
            )
        with pytest.raises(StoreError, match="not planned"):
            writer.add("b", "/v/b.mp4", features, info)
        with pytest.raises(StoreError, match="differs from planned"):
            writer.add("a", "/v/other.mp4", features, info)
        assert writer.done_ids == set()


def _plan_after(barrier, path: str, prefix: str) -> None:
    store = FeatureStore.open(path)
    barrier.wait()
    store.plan([(f"{prefix}{k}", f"/v/{prefix}{k}.mp4") for k in range(20)], partition_size=4)


def test_plans_made_at_the_same_moment_by_several_processes_are_all_kept(tmp_path: Path):
    """plan.json is read, extended and written under a lock: no process's additions are lost
    (without the lock, one of two processes released together lost its plan 30 times in 30)."""
    path = tmp_path / "s"
    FeatureStore.create_or_open(path, make_schema())
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        barrier = context.Barrier(3)
        prefixes = [f"a{attempt}_", f"b{attempt}_", f"c{attempt}_"]
        workers = [
            context.Process(target=_plan_after, args=(barrier, str(path), p)) for p in prefixes
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        planned = {vid for part in FeatureStore.open(path).partitions for vid, _ in part.videos}
        for prefix in prefixes:
            assert {f"{prefix}{k}" for k in range(20)} <= planned, f"attempt {attempt}: {prefix}"
    assert not list((path / "locks").iterdir())


def test_plan_is_stable_and_puts_new_ids_in_new_partitions(tmp_path: Path, monkeypatch):
    store = FeatureStore.create_or_open(tmp_path / "s", make_schema())
    videos = [(name, f"/v/{name}.mp4") for name in "abcde"]
    first = store.plan(videos, partition_size=2)
    assert [(p.name, [v for v, _ in p.videos]) for p in first] == [
        ("p00000", ["a", "b"]),
        ("p00001", ["c", "d"]),
        ("p00002", ["e"]),
    ]
    more = [(name, f"/v/{name}.mp4") for name in "gf"] + videos[::-1]
    again = FeatureStore.open(tmp_path / "s").plan(more, partition_size=2)
    assert again[:3] == first
    assert [(p.name, [v for v, _ in p.videos]) for p in again[3:]] == [("p00003", ["g", "f"])]
    assert FeatureStore.open(tmp_path / "s").partitions == again
    with pytest.raises(StoreError, match=r"c: planned /v/c\.mp4, now /elsewhere/c\.mp4"):
        store.plan([("c", "/elsewhere/c.mp4")])
    # A relative source is the same file as its absolute path.
    monkeypatch.chdir(tmp_path)
    store.plan([("h", "h.mp4")])
    store.plan([("h", str(tmp_path / "h.mp4"))])


def test_duplicate_ids_are_refused_by_name(tmp_path: Path):
    store = FeatureStore.create_or_open(tmp_path / "s", make_schema())
    videos = [("a", "/v/a.mp4"), ("b", "/v/b.mp4"), ("a", "/v/a2.mp4"), ("b", "/v/b.mp4")]
    with pytest.raises(StoreError, match="2 duplicate video id\\(s\\): 'a', 'b'"):
        store.plan(videos)
    assert not (store.path / "plan.json").exists()


def test_staged_partition_is_invisible_then_resumes_without_redoing(tmp_path: Path):
    schema = make_schema()
    corpus = Corpus(schema, 4)
    store = FeatureStore.create_or_open(tmp_path / "s", schema)
    (part,) = store.plan(corpus.videos, partition_size=4)
    with store.partition_writer(part.name) as writer:
        for video_id, source in part.videos[:2]:
            corpus.add(writer, video_id, source)
    # As if killed here: no commit. Readers see nothing of it.
    reader = FeatureStore.open(store.path)
    assert len(reader) == 0 and reader.ids == [] and len(reader.manifest) == 0
    with pytest.raises(KeyError, match="planned in partition p00000, not complete"):
        reader["vid000"]
    assert [p.name for p in reader.pending()] == ["p00000"]
    warnings = reader.verify_report().warnings
    assert any("staging/p00000: 2 staged video(s)" in w for w in warnings), warnings

    added = []
    with FeatureStore.open(store.path).partition_writer(part.name) as writer:
        assert writer.done_ids == {"vid000", "vid001"}
        for video_id, source in part.videos:
            if video_id not in writer.done_ids:
                corpus.add(writer, video_id, source)
                added.append(video_id)
        writer.commit()
    assert added == ["vid002", "vid003"]
    reader.refresh()  # an open reader sees new partitions after refresh (or an unknown-id miss)
    assert reader.pending() == [] and reader.ids == [v for v, _ in corpus.videos]
    for video_id in reader.ids:  # the staged videos were kept, not re-extracted
        np.testing.assert_array_equal(
            reader[video_id].layers["pool4"], corpus.data[video_id][0]["pool4"]
        )
    assert not (store.path / "staging" / part.name).exists()
    assert reader.verify_report().warnings == [
        "no manifest.csv; FeatureStore.consolidate() writes it"
    ]


def test_a_damaged_staged_video_is_redone(tmp_path: Path):
    schema = make_schema()
    corpus = Corpus(schema, 2)
    store = FeatureStore.create_or_open(tmp_path / "s", schema)
    (part,) = store.plan(corpus.videos)
    with store.partition_writer(part.name) as writer:
        for video_id, source in part.videos:
            corpus.add(writer, video_id, source)
    staged = store.path / "staging" / part.name / "v00001.npz"
    staged.write_bytes(staged.read_bytes()[:100])  # disk trouble: a torn file
    with store.partition_writer(part.name) as writer:
        assert writer.done_ids == {"vid000"}
        corpus.add(writer, "vid001", part.videos[1][1])
        writer.commit()
    assert store.verify() == []


def test_killed_commit_leaves_nothing_visible_and_is_redone(tmp_path: Path, monkeypatch):
    schema = make_schema()
    corpus = Corpus(schema, 3)
    store = FeatureStore.create_or_open(tmp_path / "s", schema)
    (part,) = store.plan(corpus.videos)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies just before the manifest is written

    monkeypatch.setattr("astar.store.writer.write_manifest", killed)
    with pytest.raises(KeyboardInterrupt), store.partition_writer(part.name) as writer:
        for video_id, source in part.videos:
            corpus.add(writer, video_id, source)
        writer.commit()
    monkeypatch.undo()
    assert (store.path / "staging" / part.name / COMMIT_DIR / "pool2").is_dir()
    assert not (store.path / "partitions" / part.name).exists()
    assert len(FeatureStore.open(store.path)) == 0

    with store.partition_writer(part.name) as writer:
        assert not (store.path / "staging" / part.name / COMMIT_DIR).exists()  # cleaned
        assert writer.done_ids == {v for v, _ in corpus.videos}
        writer.commit()
    assert store.verify() == []
    np.testing.assert_array_equal(store["vid002"].layers["fc7"], corpus.data["vid002"][0]["fc7"])

    # Killed after the rename, before the staging cleanup: the next writer finds the partition
    # complete, commits nothing and removes the leftover.
    (store.path / "staging" / part.name).mkdir()
    with store.partition_writer(part.name) as writer:
        assert writer.complete and writer.done_ids == {v for v, _ in corpus.videos}
        writer.commit()
    assert not (store.path / "staging" / part.name).exists()


def _write_everything(path: str, count: int) -> None:
    store = FeatureStore.open(path)
    Corpus(store.schema, count).write(store)


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_sound_store_that_resumes(tmp_path: Path):
    schema = make_schema("float16")
    corpus = Corpus(schema, 12)
    context = multiprocessing.get_context("fork")
    for attempt, delay in enumerate((0.05, 0.15, 0.3, 0.5, 0.8)):
        path = tmp_path / f"s{attempt}"
        store = FeatureStore.create_or_open(path, schema)
        store.plan(corpus.videos, partition_size=5)
        writer = context.Process(target=_write_everything, args=(str(path), 12))
        writer.start()
        time.sleep(delay)
        writer.kill()  # SIGKILL: no cleanup of any kind
        writer.join()
        # Whatever was visible is sound; nothing half-written is counted.
        assert store.verify() == []
        assert set(store.ids) <= {v for v, _ in corpus.videos}
        corpus.write(FeatureStore.open(path))  # the rerun finishes the rest
        resumed = FeatureStore.open(path)
        assert resumed.verify() == [] and resumed.pending() == []
        for video_id in resumed:
            np.testing.assert_array_equal(
                resumed[video_id].layers["pool2"],
                corpus.data[video_id][0]["pool2"].astype(np.float16),
            )


def _hold_lock(path: str, name: str, held, release) -> None:
    with FeatureStore.open(path).partition_writer(name):
        held.set()
        release.wait(30)


def test_live_lock_keeps_a_second_writer_out(tmp_path: Path):
    store = FeatureStore.create_or_open(tmp_path / "s", make_schema())
    store.plan([("a", "/v/a.mp4")])
    context = multiprocessing.get_context("fork")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(store.path), "p00000", held, release))
    holder.start()
    try:
        assert held.wait(30)
        locked = pytest.raises(PartitionLocked, match=f"held by live pid {holder.pid}")
        with locked, store.partition_writer("p00000"):
            pass
    finally:
        release.set()
        holder.join(30)
    with store.partition_writer("p00000") as writer:  # released on exit
        assert writer.done_ids == set()


def test_stale_locks_are_broken_and_foreign_ones_respected(tmp_path: Path):
    store = FeatureStore.create_or_open(tmp_path / "s", make_schema())
    store.plan([("a", "/v/a.mp4")])
    lock = store.path / "locks" / "p00000.lock"
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    zombie = os.fork()
    if zombie == 0:  # the child exits at once; unreaped until waitpid below, it is a zombie
        os._exit(0)
    me = LockOwner.me()
    stale_owners = [
        replace(me, pid=dead.pid),  # the holder died
        replace(me, start="1"),  # the pid is alive but was reused by another process
        replace(me, pid=zombie, start=None),  # exited, its parent has not reaped it yet
    ]
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for stale in stale_owners:
        lock.write_text(json.dumps(asdict(stale)))
        with store.partition_writer("p00000"):
            assert LockOwner(**json.loads(lock.read_text())) != stale
        assert not lock.exists()
    os.waitpid(zombie, 0)
    foreign = replace(me, host=socket.gethostname() + "-elsewhere")
    lock.write_text(json.dumps(asdict(foreign)))
    with pytest.raises(PartitionLocked, match="another host"), store.partition_writer("p00000"):
        pass
    assert lock.exists()


def test_file_count_does_not_grow_with_the_number_of_videos(tmp_path: Path):
    schema = make_schema("float16")

    def files_for(count: int) -> int:
        corpus = Corpus(schema, count, frames=lambda k: 16)
        store = FeatureStore.create_or_open(tmp_path / f"s{count}", schema)
        store.plan(corpus.videos, partition_size=count // 2)  # two partitions either way
        corpus.write(store)
        store.consolidate()
        assert len(store) == count
        return sum(len(files) for _, _, files in os.walk(store.path))

    assert files_for(10) == files_for(120) == 2 + 1 + 1 + 2 * (1 + 1 + 6 * 2)


# --------------------------------------------------------------------------------------------
# Verify and the CLI


def test_verify_finds_a_corrupt_chunk_file(built):
    store, _ = built
    assert store.verify() == []
    chunk = store.path / "partitions" / "p00001" / "pool3" / "c.0.0.0.0"
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))  # zstd magic, garbage after
    problems = FeatureStore.open(store.path).verify()
    assert problems and all("p00001" in p and "pool3" in p for p in problems)
    # The chunk holds both ok videos of that partition (vid004 failed).
    for video_id in ("vid003", "vid005"):
        assert any(f"'{video_id}', pool3: chunk c.0.0.0.0 unreadable" in p for p in problems)
    chunk.unlink()
    problems = FeatureStore.open(store.path).verify()
    assert "partitions/p00001/pool3: 0 chunk files, 1 expected" in problems
    # The structural problem no longer hides which videos are lost.
    for video_id in ("vid003", "vid005"):
        assert f"partitions/p00001, video '{video_id}', pool3: chunk c.0.0.0.0 missing" in problems


def test_verify_finds_values_that_do_not_match_their_checksum(built):
    store, _ = built
    # Valid chunks holding other values: only the checksums can tell.
    fc7 = zarr.open_array(store.path / "partitions" / "p00000" / "fc7", mode="r+")
    fc7[0, 0] = fc7[0, 0] + 1.0
    problems = FeatureStore.open(store.path).verify()
    assert problems == ["partitions/p00000, video 'vid000', fc7: checksum mismatch"]


def test_inspect_store_cli(built):
    store, _ = built
    runner = CliRunner()
    result = runner.invoke(inspect_cli, [str(store.path)])
    assert result.exit_code == 0, result.output
    assert "6 ok, 1 failed (corrupt 1), 0 pending, of 7 planned" in result.output
    assert "3 complete, 0 pending" in result.output

    result = runner.invoke(inspect_cli, [str(store.path), "--json", "--failures", "--verify"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["summary"]["videos"]["failed"] == {"corrupt": 1}
    assert data["summary"]["frames"] == sum(16 + 5 * k for k in (0, 1, 2, 3, 5, 6))
    assert data["failures"][0]["id"] == "vid004"
    assert data["verify"] == {"problems": [], "warnings": [], "videos_checked": 6, "damaged": {}}

    fc7 = zarr.open_array(store.path / "partitions" / "p00002" / "fc7", mode="r+")
    fc7[0, 0] = np.nan
    result = runner.invoke(inspect_cli, [str(store.path), "--verify"])
    assert result.exit_code == 1
    assert "problem: partitions/p00002, video 'vid006', fc7: NaN or inf values" in result.output

    result = runner.invoke(inspect_cli, [str(store.path / "partitions")])
    assert result.exit_code == 1 and "not an astar feature store" in result.output


def test_writer_accepts_adds_from_a_staging_thread(tmp_path: Path):
    """The extraction runner stages from a background thread while C3D runs."""
    schema = make_schema()
    corpus = Corpus(schema, 3)
    store = FeatureStore.create_or_open(tmp_path / "s", schema)
    (part,) = store.plan(corpus.videos)
    with store.partition_writer(part.name) as writer, ThreadPoolExecutor(1) as stager:
        futures = [stager.submit(corpus.add, writer, v, s) for v, s in part.videos]
        for future in futures:
            future.result()
        assert writer.done_ids == {v for v, _ in corpus.videos}
        writer.commit()
    assert store.ids == [v for v, _ in corpus.videos]
