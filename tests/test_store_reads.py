"""The direct chunk reader (store/partition.py ChunkLayout) against zarr's own reads, both
compressions and both layouts (format 2: time first on disk; format 1: as read), and the
checksums of older stores (sha256) beside the new ones (XXH3)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from astar.store import LAYERS, CorruptVideo, FeatureStore
from astar.store.digest import algorithm_of, checksum, matches
from astar.store.errors import StoreError
from astar.store.geometry import BACKBONES
from astar.store.partition import ChunkLayout, _read_block
from astar.store.schema import FORMAT_VERSION, time_axis
from astar.store.synthetic import synthetic_schema, write_videos

SCHEMA = synthetic_schema(
    BACKBONES["c3d-tiny"].layer_shapes(), backbone="c3d-tiny", preprocessing="caffe-bgr-mean"
)
V1 = dataclasses.replace(SCHEMA, format_version=1)  # the layout of stores written before 2


def _make(video_id: str) -> tuple[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(int(video_id[1:]))
    n_frames = int(rng.integers(16, 200))
    lengths = SCHEMA.expected_lengths(n_frames)
    return n_frames, {
        name: np.maximum(rng.standard_normal(SCHEMA.full_shape(name, lengths[name])), 0)
        for name in LAYERS
    }


@pytest.fixture(params=[("zstd", 2), ("none", 2), ("zstd", 1), ("none", 1)], ids=str)
def store(request, tmp_path: Path) -> FeatureStore:
    compression, version = request.param
    schema = dataclasses.replace(SCHEMA, format_version=version)
    made = FeatureStore.create_or_open(tmp_path / "store", schema)
    videos = [(f"v{k}", f"/videos/v{k}.mp4") for k in range(9)]
    write_videos(made, videos, _make, partition_size=5, compression=compression)
    return FeatureStore.open(made.path)


def test_format_2_stores_time_first_and_format_1_as_read(store: FeatureStore):
    assert SCHEMA.format_version == FORMAT_VERSION == 2
    part = store._opened()[0]
    total = int(part.lengths["pool3"].sum())
    channels, height, width = SCHEMA.layer_shapes["pool3"]
    array = part.array("pool3")
    names = array.metadata.dimension_names
    if store.schema.format_version == 2:
        assert array.shape == (total, channels, height, width)
        assert names == ("time", "channel", "height", "width")
    else:
        assert array.shape == (channels, total, height, width)
        assert names == ("channel", "time", "height", "width")
    assert part.array("fc7").metadata.dimension_names == ("clip", "feature")
    video = store[store.ids[0]].layers["pool3"]
    assert video.shape[0] == channels and video.shape[2:] == (height, width)  # (C, T, H, W)


def test_direct_reads_equal_zarrs_for_every_span(store: FeatureStore):
    for part in store._opened():
        for name in (*LAYERS, "timestamps"):
            array = part.array(name)
            layout = part.layout(name)
            assert layout is not None, f"{name}: the store's own layout must be read directly"
            axis = part.axis(name)
            assert axis == (
                time_axis(name) if store.schema.format_version == 1 or name == "timestamps" else 0
            )
            total = array.shape[axis]
            chunk = array.chunks[axis]
            spans = [(0, total), (0, 1), (total - 1, total), (chunk - 1, chunk + 1)]
            spans += [(1, max(2, total // 2)), (chunk, min(total, 3 * chunk))]
            for low, high in spans:
                if not 0 <= low < high <= total:
                    continue
                direct, lost = layout.read(low, high)
                through_zarr, _ = _read_block(array, axis, low, high)
                assert lost == {}
                np.testing.assert_array_equal(direct, through_zarr, err_msg=f"{name} {low}:{high}")


def test_videos_read_back_exactly(store: FeatureStore):
    for video in store.read_batch(store.ids):
        n_frames, expected = _make(video.id)
        assert video.info["n_frames"] == n_frames
        for name in LAYERS:
            np.testing.assert_array_equal(
                video.layers[name], expected[name].astype(SCHEMA.dtype), err_msg=name
            )
    assert store.verify() == []


def test_uncompressed_chunks_are_raw_and_a_short_one_is_damage(tmp_path: Path):
    made = FeatureStore.create_or_open(tmp_path / "store", SCHEMA)
    write_videos(made, [("v1", "/v/1.mp4"), ("v2", "/v/2.mp4")], _make, 2, compression="none")
    folder = made.path / "partitions" / "p00000" / "fc7"
    meta = json.loads((folder / "zarr.json").read_text())
    assert [codec["name"] for codec in meta["codecs"]] == ["bytes"]
    chunk = folder / "c.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    with pytest.raises(CorruptVideo, match=r"fc7: chunk c\.0\.0 unreadable \(ValueError"):
        FeatureStore.open(made.path)["v1"]


def test_an_array_of_another_layout_is_read_through_zarr(store: FeatureStore, monkeypatch):
    part = store._opened()[0]
    array = part.array("pool3")
    other = 1 - part.axis("pool3")  # the store chunks along time only
    assert ChunkLayout.of(array, part.path / "pool3", axis=other) is None
    monkeypatch.setattr(ChunkLayout, "of", classmethod(lambda cls, *args: None))
    fresh = FeatureStore.open(store.path)
    for video in fresh.read_batch(fresh.ids):
        _, expected = _make(video.id)
        np.testing.assert_array_equal(video.layers["pool3"], expected["pool3"].astype(SCHEMA.dtype))


def test_unknown_compression_is_refused(tmp_path: Path):
    made = FeatureStore.create_or_open(tmp_path / "store", SCHEMA)
    made.plan([("v1", "/v/1.mp4")])
    with pytest.raises(StoreError, match=r"compression 'lz9' is not one of \['auto', 'zstd'"):
        made.partition_writer("p00000", compression="lz9")


def test_checksums_xxh3_for_new_videos_sha256_of_older_stores_still_checked(tmp_path: Path):
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    new = checksum(array)
    assert new.startswith("xxh3:") and len(new) == 5 + 32 and algorithm_of(new) == "xxh3"
    old = checksum(array, "sha256")
    assert len(old) == 64 and algorithm_of(old) == "sha256"
    assert matches(array, new) and matches(array, old)
    assert not matches(array + 1, old) and not matches(array + 1, new)
    # A store written before XXH3 (and format 2): <layer>_sha256 columns of bare sha256 digests.
    made = FeatureStore.create_or_open(tmp_path / "store", V1)
    write_videos(made, [("v1", "/v/1.mp4"), ("v2", "/v/2.mp4")], _make, 2)
    manifest = made.path / "partitions" / "p00000" / "manifest.csv"
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for name in LAYERS:
        table[f"{name}_checksum"] = [
            checksum(_make(v)[1][name].astype(SCHEMA.dtype), "sha256") for v in table["id"]
        ]
    table = table.rename(columns={f"{name}_checksum": f"{name}_sha256" for name in LAYERS})
    table.to_csv(manifest, index=False)
    legacy = FeatureStore.open(made.path)
    assert legacy.verify() == [] and len(legacy.read_batch(["v1", "v2"])) == 2
    table.loc[0, "pool5_sha256"] = "0" * 64
    table.to_csv(manifest, index=False)
    with pytest.raises(CorruptVideo, match="pool5: checksum mismatch"):
        FeatureStore.open(made.path)["v1"]


def test_batches_read_in_parallel_name_every_damaged_video(store: FeatureStore, monkeypatch):
    """Layers and partitions read side by side (forced even for small reads): the same arrays,
    and a lost chunk still damages exactly the videos over it."""
    from astar.store import partition

    monkeypatch.setattr(partition, "HASH_THREADS", 2)
    monkeypatch.setattr(partition, "PARALLEL_BYTES", 0)
    fresh = FeatureStore.open(store.path)
    for video in fresh.read_batch(fresh.ids):
        _, expected = _make(video.id)
        for name in LAYERS:
            np.testing.assert_array_equal(video.layers[name], expected[name].astype(SCHEMA.dtype))
    chunk = store.path / "partitions" / "p00001" / "pool4" / "c.0.0.0.0"
    chunk.unlink()
    with pytest.raises(CorruptVideo) as raised:
        FeatureStore.open(store.path).read_batch(fresh.ids)
    assert sorted(raised.value.videos) == ["v5", "v6", "v7", "v8"]
    assert all("pool4: chunk c.0.0.0.0 missing" in why for why in raised.value.videos.values())


def test_flipped_bytes_are_caught_by_the_codec_or_the_checksum(store: FeatureStore):
    """zstd refuses a damaged frame; raw bytes decode to anything, and the checksum says so."""
    part = store._opened()[1]
    chunk = part.path / "pool3" / "c.0.0.0.0"
    raw = bytearray(chunk.read_bytes())
    for k in range(8, len(raw), 5):
        raw[k] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    fresh = FeatureStore.open(store.path)
    with pytest.raises(CorruptVideo) as error:
        fresh.read_batch(fresh.ids)
    compressed = part.layout("pool3").codec is not None
    expected = "chunk c.0.0.0.0 unreadable (" if compressed else "checksum mismatch"
    assert error.value.videos and all(
        why.startswith(f"partition p00001, pool3: {expected}")
        for why in error.value.videos.values()
    )
    report = FeatureStore.open(store.path).verify_report()
    assert set(report.damaged) == set(error.value.videos)


def test_a_format_1_store_is_resumed_in_its_own_layout(tmp_path: Path):
    made = FeatureStore.create_or_open(tmp_path / "store", V1)
    videos = [(f"v{k}", f"/videos/v{k}.mp4") for k in range(4)]
    write_videos(made, videos[:2], _make, partition_size=2)
    # An extraction of today asks for the current format; the store keeps its own.
    resumed = FeatureStore.create_or_open(made.path, SCHEMA)
    assert resumed.schema.format_version == 1 and SCHEMA.differences(V1) == []
    write_videos(resumed, videos, _make, partition_size=2)
    reopened = FeatureStore.open(made.path)
    assert reopened.verify() == [] and reopened.ids == [v for v, _ in videos]
    for part in reopened._opened():
        assert part.array("pool2").metadata.dimension_names[0] == "channel"
    for video in reopened.read_batch(reopened.ids):
        for name in LAYERS:
            np.testing.assert_array_equal(
                video.layers[name], _make(video.id)[1][name].astype(SCHEMA.dtype), err_msg=name
            )
