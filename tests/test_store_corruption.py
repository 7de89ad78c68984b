"""Damaged stores: every read is checked, and exactly the damaged videos are named.

A store whose chunk files are lost, truncated or altered must never hand out fill values or
garbage: reads raise CorruptVideo naming each damaged video of the request (and only those),
and ``inspect-store --verify`` names every damaged video of the store, whatever broke.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from astar.store import LAYERS, CorruptVideo, FeatureStore, StoreSchema
from astar.store import partition as partition_module
from astar.store import writer as writer_module
from astar.store.cli import main as inspect_cli
from astar.store.digest import checksum
from astar.store.synthetic import synthetic_schema

SHAPES = {
    "pool2": (4, 4, 4),
    "pool3": (4, 2, 2),  # 64 bytes per time step in float32
    "pool4": (8, 2, 2),
    "pool5": (8, 1, 1),
    "fc7": (6,),
}
CHUNK_BYTES = 256  # 4 pool3 steps per chunk: videos straddle chunks and share them
# Per partition, pool3 lengths 4, 6, 8, 10 at offsets 0, 4, 10, 18: its chunk 2 (steps 8..12)
# holds the end of the second video and the start of the third; chunk 0 only the first.
FRAMES = (16, 24, 32, 40)


def make_schema() -> StoreSchema:
    return synthetic_schema(SHAPES)


def make_features(schema: StoreSchema, n_frames: int, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    lengths = schema.expected_lengths(n_frames)
    features = {
        layer: np.maximum(rng.standard_normal(schema.full_shape(layer, lengths[layer])), 0).astype(
            np.float32
        )
        for layer in LAYERS
    }
    info = {
        "n_frames": n_frames, "n_sampled": n_frames, "padded": False, "subsampled": False,
        "duration": n_frames / 2, "fps": None, "source_fps": 25.0,
        "timestamps": np.arange(n_frames) / 2,
    }  # fmt: skip
    return features, info


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """8 videos in 2 partitions of 4, arrays of several small chunks, zstd-compressed (what a
    codec refuses is tested here; raw chunks in test_store_reads.py); their features."""
    schema = make_schema()
    videos = [(f"v{k}", f"/videos/v{k}.mp4") for k in range(8)]
    data = {vid: make_features(schema, FRAMES[k % 4], k) for k, (vid, _) in enumerate(videos)}
    path = tmp_path_factory.mktemp("corruption") / "store"
    store = FeatureStore.create_or_open(path, schema)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer_module, "TARGET_CHUNK_BYTES", CHUNK_BYTES)
        for part in store.plan(videos, partition_size=4):
            with store.partition_writer(part.name, compression="zstd") as writer:
                for vid, source in part.videos:
                    writer.add(vid, source, *data[vid])
                writer.commit()
    store.consolidate()
    return path, {vid: features for vid, (features, _) in data.items()}


@pytest.fixture
def damaged(template, tmp_path: Path):
    """A private copy of the template store, to damage; and the features written."""
    path, features = template
    shutil.copytree(path, tmp_path / "store")
    return tmp_path / "store", features


def chunk_file(path: Path, partition: str, layer: str, index: int) -> Path:
    key = f"c.{index}.0.0.0" if layer != "fc7" else f"c.{index}.0"
    return path / "partitions" / partition / layer / key


def touching(path: Path, partition: str, layer: str, index: int) -> set[str]:
    """Videos of ``partition`` whose ``layer`` span touches chunk ``index`` (from the manifest)."""
    store = FeatureStore.open(path)
    axis = 0  # time, first on disk (format 2)
    chunk = zarr.open_array(path / "partitions" / partition / layer, mode="r").chunks[axis]
    table = store.manifest
    table = table[table["partition"] == partition]
    start, stop = table[f"{layer}_offset"], table[f"{layer}_offset"] + table[f"{layer}_length"]
    hit = (start < (index + 1) * chunk) & (stop > index * chunk)
    return set(table.loc[hit, "id"])


def read_all(path: Path, **options) -> list:
    store = FeatureStore.open(path, **options)
    return store.read_batch(store.ids)


def test_the_test_store_has_chunks_shared_by_videos(damaged):
    path, _ = damaged
    assert touching(path, "p00000", "pool3", 0) == {"v0"}
    assert touching(path, "p00000", "pool3", 2) == {"v1", "v2"}
    assert len(list((path / "partitions" / "p00000" / "pool3").glob("c.*"))) == 7
    assert FeatureStore.open(path).verify() == []


# --------------------------------------------------------------------------------------------
# Reads


def test_deleted_chunk_raises_for_exactly_its_videos_never_nan(damaged):
    path, features = damaged
    chunk_file(path, "p00000", "pool3", 2).unlink()
    for verify in (True, False):  # a lost chunk is an error even without checksums
        with pytest.raises(CorruptVideo) as error:
            read_all(path, verify=verify)
        assert error.value.videos == {
            "v1": "partition p00000, pool3: chunk c.2.0.0.0 missing",
            "v2": "partition p00000, pool3: chunk c.2.0.0.0 missing",
        }
        assert error.value.store == str(path)
    store = FeatureStore.open(path)
    with pytest.raises(CorruptVideo, match="v1"):
        store["v1"]
    with pytest.raises(CorruptVideo, match="v2"):
        store.get("v2", layers=["pool3"])
    # The other layers of a damaged video, and every layer of the others, still read.
    np.testing.assert_array_equal(
        store.get("v1", layers=["pool2"]).layers["pool2"], features["v1"]["pool2"]
    )
    for vid in ("v0", "v3", "v4"):
        for layer in LAYERS:
            np.testing.assert_array_equal(store[vid].layers[layer], features[vid][layer])


def test_flipped_bytes_in_a_chunk_raise_corrupt_video_naming_its_videos(damaged):
    path, _ = damaged
    chunk = chunk_file(path, "p00001", "pool3", 2)
    raw = bytearray(chunk.read_bytes())
    for k in range(8, len(raw), 5):
        raw[k] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    store = FeatureStore.open(path)
    with pytest.raises(CorruptVideo) as error:
        store.read_batch(store.ids)
    assert set(error.value.videos) == {"v5", "v6"} == touching(path, "p00001", "pool3", 2)
    for why in error.value.videos.values():
        # zstd refuses the frame, so the chunk is unreadable before any checksum is reached
        assert why.startswith("partition p00001, pool3: chunk c.2.0.0.0 unreadable (")
    assert "video 'v5'" in str(error.value) and "inspect-store --verify" in str(error.value)


def test_truncated_chunk_is_corruption(damaged):
    path, _ = damaged
    chunk = chunk_file(path, "p00000", "pool4", 2)
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(CorruptVideo) as error:
        read_all(path)
    # pool4 chunks hold 2 steps; lengths 2, 3, 4, 5: chunk 2 (steps 4, 5) is v1's end, v2's start
    assert set(error.value.videos) == {"v1", "v2"} == touching(path, "p00000", "pool4", 2)
    for why in error.value.videos.values():
        assert why.startswith("partition p00000, pool4: chunk c.2.0.0.0 unreadable (")


def test_altered_values_fail_their_checksum_and_only_theirs(damaged):
    path, features = damaged
    # A valid chunk with another value inside v2's pool4 span: only the checksum can tell.
    pool4 = zarr.open_array(path / "partitions" / "p00000" / "pool4", mode="r+")
    offset = int(FeatureStore.open(path).manifest.set_index("id").at["v2", "pool4_offset"])
    pool4[offset, 0, 0, 0] = pool4[offset, 0, 0, 0] + 1.0  # (time, channel, y, x)
    with pytest.raises(CorruptVideo) as error:
        read_all(path)
    assert error.value.videos == {"v2": "partition p00000, pool4: checksum mismatch"}
    # Opted out of checksums, the same read returns the altered values.
    videos = {video.id: video for video in read_all(path, verify=False)}
    assert videos["v2"].layers["pool4"][0, 0, 0, 0] == features["v2"]["pool4"][0, 0, 0, 0] + 1


def test_mixed_batch_names_exactly_the_corrupt_videos_and_the_rest_reads(damaged):
    path, features = damaged
    chunk_file(path, "p00000", "pool3", 2).unlink()  # v1, v2
    fc7 = zarr.open_array(path / "partitions" / "p00001" / "fc7", mode="r+")
    fc7[-1, 0] = fc7[-1, 0] + 0.5  # v7 (last clip of the partition)
    pool2 = chunk_file(path, "p00000", "pool2", 0)
    pool2.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(40))  # zstd magic, garbage after: v0
    store = FeatureStore.open(path)
    request = ["v3", "v7", "v1", "v4", "v0", "v2", "v5"]  # two partitions, interleaved
    with pytest.raises(CorruptVideo) as error:
        store.read_batch(request)
    assert set(error.value.videos) == {"v0", "v1", "v2", "v7"}
    assert error.value.videos["v7"] == "partition p00001, fc7: checksum mismatch"
    assert error.value.videos["v0"].startswith(
        "partition p00000, pool2: chunk c.0.0.0.0 unreadable"
    )
    # What a loader does: read again without the corrupt ones.
    sound = [vid for vid in request if vid not in error.value.videos]
    for video in store.read_batch(sound):
        for layer in LAYERS:
            np.testing.assert_array_equal(video.layers[layer], features[video.id][layer])


def test_a_video_damaged_in_several_layers_lists_each(damaged):
    path, _ = damaged
    chunk_file(path, "p00000", "pool3", 0).unlink()
    chunk_file(path, "p00000", "pool2", 0).unlink()
    with pytest.raises(CorruptVideo) as error:
        FeatureStore.open(path)["v0"]
    why = error.value.videos["v0"]
    assert why.startswith("partition p00000, ")
    assert "pool2: chunk c.0.0.0.0 missing" in why and "pool3: chunk c.0.0.0.0 missing" in why


def test_verify_false_reads_without_hashing(damaged, monkeypatch):
    path, _ = damaged
    hashed = []

    def counting(array: np.ndarray, algorithm: str) -> str:
        hashed.append(array.shape)
        return checksum(array, algorithm)

    monkeypatch.setattr(partition_module, "checksum", counting)
    quick = FeatureStore.open(path, verify=False)
    assert len(quick.read_batch(quick.ids)) == 8 and hashed == []
    assert pickle.loads(pickle.dumps(quick)).verify_reads is False  # DataLoader workers
    checked = FeatureStore.open(path)
    checked.read_batch(["v0", "v1"])
    assert len(hashed) == 2 * len(LAYERS)


def _read_in_child(path: str, ids: list[str], done) -> None:
    done.put(len(FeatureStore.open(path).read_batch(ids)))


def test_reads_hash_on_threads_that_a_forked_child_remakes(damaged, monkeypatch):
    path, _ = damaged
    monkeypatch.setattr(partition_module, "HASH_THREADS", 2)  # threads even on one core
    monkeypatch.setattr(partition_module, "PARALLEL_BYTES", 0)  # and for these small reads
    store = FeatureStore.open(path)
    store.read_batch(["v0", "v1", "v2"])
    assert partition_module._hashers is not None  # the parent's hashing threads exist
    assert partition_module._readers is not None  # and its batch readers
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    child = context.Process(target=_read_in_child, args=(str(path), ["v0", "v1", "v2"], done))
    child.start()
    try:
        child.join(timeout=60)
        assert child.exitcode == 0 and done.get(timeout=1) == 3  # a stale pool would hang here
    finally:
        child.kill()


def test_corrupt_video_survives_pickling():
    error = CorruptVideo({"v1": "partition p00000, pool3: checksum mismatch"}, "/data/store")
    again = pickle.loads(pickle.dumps(error))
    assert again.videos == error.videos and again.store == error.store
    assert str(again) == str(error)


def test_checksum_of_a_view_equals_that_of_its_copy():
    block = np.random.default_rng(0).standard_normal((3, 10, 4, 5)).astype(np.float16)
    view = block[:, 2:7]  # what a read hands out: a time range of the partition's block
    assert not view.flags.c_contiguous
    assert checksum(view) == checksum(np.ascontiguousarray(view))
    assert checksum(view) == checksum(np.ascontiguousarray(view).astype(">f2"))
    assert checksum(block[:, 2:2]) == checksum(np.zeros((3, 0, 4, 5), np.float16))
    assert checksum(view) != checksum(block[:, 3:8])
    large = np.random.default_rng(1).standard_normal((2, 40, 28, 28)).astype(np.float16)
    view = large[:, 5:25]
    assert checksum(view) == checksum(np.ascontiguousarray(view))


# --------------------------------------------------------------------------------------------
# inspect-store --verify


def verify_cli(path: Path) -> tuple[int, dict, str]:
    runner = CliRunner()
    text = runner.invoke(inspect_cli, [str(path), "--verify"])
    data = runner.invoke(inspect_cli, [str(path), "--verify", "--json"])
    assert text.exit_code == data.exit_code, (text.output, data.output)
    return text.exit_code, json.loads(data.output)["verify"], text.output


def test_inspect_verify_names_every_video_of_a_deleted_chunk(damaged):
    path, _ = damaged
    chunk_file(path, "p00000", "pool3", 2).unlink()
    chunk_file(path, "p00001", "fc7", 0).unlink()
    code, report, output = verify_cli(path)
    assert code == 1
    lost = touching(path, "p00000", "pool3", 2) | touching(path, "p00001", "fc7", 0)
    assert set(report["damaged"]) == lost == {"v1", "v2", "v4", "v5", "v6", "v7"}
    assert report["damaged"]["v1"] == "partition p00000, pool3: chunk c.2.0.0.0 missing"
    assert report["damaged"]["v4"] == "partition p00001, fc7: chunk c.0.0 missing"
    assert report["videos_checked"] == 8 - len(lost)
    # The structural message stays, and no longer hides the videos.
    assert "partitions/p00000/pool3: 6 chunk files, 7 expected" in report["problems"]
    assert "problem: partitions/p00000, video 'v2', pool3: chunk c.2.0.0.0 missing" in output
    assert "6 damaged video(s)" in output
    for vid in lost:
        assert f"\n  {vid}\tpartition " in output


def test_inspect_verify_names_every_video_of_a_corrupted_chunk(damaged):
    path, _ = damaged
    chunk = chunk_file(path, "p00001", "pool4", 2)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)  # second half zeroed
    chunk.write_bytes(bytes(raw))
    code, report, output = verify_cli(path)
    assert code == 1
    assert set(report["damaged"]) == {"v5", "v6"} == touching(path, "p00001", "pool4", 2)
    wrong = report["damaged"].values()
    assert all(
        why.startswith("partition p00001, pool4: chunk c.2.0.0.0 unreadable (") for why in wrong
    )
    assert "2 damaged video(s)" in output and "\n  v5\tpartition p00001, pool4: " in output


def test_inspect_verify_names_every_video_of_lost_array_metadata(damaged):
    path, _ = damaged
    (path / "partitions" / "p00001" / "pool4" / "zarr.json").unlink()
    code, report, _ = verify_cli(path)
    assert code == 1
    assert set(report["damaged"]) == {"v4", "v5", "v6", "v7"}
    assert all("pool4: array unreadable" in why for why in report["damaged"].values())
    assert any(p.startswith("partitions/p00001/pool4: cannot open") for p in report["problems"])
    with pytest.raises(CorruptVideo) as error:
        read_all(path)
    assert set(error.value.videos) == {"v4", "v5", "v6", "v7"}


def test_inspect_verify_names_the_videos_of_lost_timestamps(damaged):
    path, _ = damaged
    shutil.rmtree(path / "partitions" / "p00000" / "timestamps")
    code, report, _ = verify_cli(path)
    assert code == 1
    assert set(report["damaged"]) == {"v0", "v1", "v2", "v3"}
    # Readers take timestamps from the manifest, so the videos still read.
    assert len(read_all(path)) == 8
