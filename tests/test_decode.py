"""Video decoding: sampling by timestamp, resize, padding and capping, bad files, isolation."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import decoder_faults
import numpy as np
import pytest

import astar.extract.decode as decode_module
from astar.extract.containers import container_shortfall
from astar.extract.decode import (
    FAILURE_KINDS,
    DecodeConfig,
    DecodedVideo,
    VideoDecodeError,
    decode_video,
)
from astar.extract.isolation import IsolatedDecoder
from astar.extract.sampling import frame_times, nearest_frames, sample_times, select_indices


def expected_nearest(true_starts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Brute force: the frame whose start is nearest each time, the earlier one on a tie."""
    distance = np.abs(true_starts[None, :] - times[:, None])  # (T, n)
    return np.argmin(distance.round(9), axis=1)  # argmin takes the first of equal minima


def assert_fails(path: Path, kind: str, config: DecodeConfig | None = None) -> VideoDecodeError:
    with pytest.raises(VideoDecodeError) as caught:
        decode_video(path, config or DecodeConfig())
    error = caught.value
    assert error.kind == kind, error.reason
    assert str(path) in error.reason and str(path) in str(error)
    assert error.path == Path(path)
    return error


# --------------------------------------------------------------------------------------------
# Files the fixture cannot write


def write_audio_only(path: Path, codec: str) -> Path:
    import av

    rate = 16000
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        planar = codec == "aac"
        samples = np.zeros((1, rate), np.float32 if planar else np.int16)  # one second
        frame = av.AudioFrame.from_ndarray(
            samples, format="fltp" if planar else "s16", layout="mono"
        )
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def write_vfr(path: Path, frames: np.ndarray, starts_ms: list[int]) -> Path:
    """Lossless Matroska whose frame ``i`` starts at ``starts_ms[i]`` (variable frame rate)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=1000)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for frame, start in zip(frames, starts_ms, strict=True):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = start, Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def remux_faststart(source: Path, target: Path) -> Path:
    """The same packets with the index (moov) moved before the data, as web videos have it."""
    import av

    with (
        av.open(str(source)) as reader,
        av.open(str(target), "w", options={"movflags": "faststart"}) as writer,
    ):
        stream = writer.add_stream_from_template(reader.streams.video[0])
        for packet in reader.demux(video=0):
            if packet.dts is not None:
                packet.stream = stream
                writer.mux(packet)
    return target


def cut(source: Path, target: Path, keep: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def zero_media_timescale(source: Path, target: Path) -> Path:
    """Patch the MP4 track's mdhd timescale to 0: ffmpeg then assumes 1 tick per second."""
    data = bytearray(source.read_bytes())
    box = data.find(b"mdhd")
    version = data[box + 4]
    offset = box + 8 + (16 if version == 1 else 8)  # after version/flags and two dates
    assert int.from_bytes(data[offset : offset + 4], "big") > 0
    data[offset : offset + 4] = bytes(4)
    target.write_bytes(bytes(data))
    return target


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_sample_times_counts_k_over_fps_below_duration():
    np.testing.assert_allclose(sample_times(4.0, 2.0), np.arange(8) / 2)
    np.testing.assert_allclose(sample_times(4.2, 2.0), np.arange(9) / 2)
    np.testing.assert_allclose(sample_times(10.0, 3.0), np.arange(30) / 3)
    np.testing.assert_allclose(sample_times(0.1, 2.0), [0.0])
    assert len(sample_times(0.0, 2.0)) == 0
    # float32 timestamps: a duration a hair over the boundary does not add a frame at the end
    assert len(sample_times(float(np.float32(4.0000002)), 2.0)) == 8


def test_select_indices_is_uniform_and_keeps_both_ends():
    np.testing.assert_array_equal(select_indices(10, 16), np.arange(10))
    np.testing.assert_array_equal(select_indices(300, None), np.arange(300))
    for n, cap in [(40, 16), (129, 128), (1000, 128), (17, 16)]:
        chosen = select_indices(n, cap)
        assert len(chosen) == cap and chosen[0] == 0 and chosen[-1] == n - 1
        gaps = np.diff(chosen)
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # evenly spread


def test_nearest_frames_matches_brute_force_on_irregular_times():
    rng = np.random.default_rng(3)
    starts = np.concatenate([[0.0], np.cumsum(rng.uniform(0.01, 0.9, 60))])
    times = sample_times(starts[-1] + 0.2, 2.0)
    np.testing.assert_array_equal(nearest_frames(starts, times), expected_nearest(starts, times))
    # 2 fps from 25 fps ties at every odd half second: the earlier frame wins even in float32
    starts25 = (np.arange(50) / 25).astype(np.float32).astype(np.float64)
    assert nearest_frames(starts25, np.array([0.5]))[0] == 12


def test_frame_times_prefers_per_frame_timestamps():
    raw = np.array([[10.0, 10.1], [10.1, 10.3], [10.3, 10.35], [10.35, 10.5]])  # VFR, offset
    bounds, timing = frame_times(raw, 25.0)
    assert timing == "timestamps"
    np.testing.assert_allclose(bounds, [0.0, 0.1, 0.3, 0.35, 0.5])


def test_frame_times_falls_back_to_average_fps_on_garbage_timestamps():
    nopts = -3.6893487e17  # what decord reports for AVI frames without a timestamp
    raw = np.array([[nopts, nopts]] * 3 + [[0.12, 0.16], [0.24, 0.28]])
    bounds, timing = frame_times(raw, 25.0)
    assert timing == "average_fps"
    np.testing.assert_allclose(bounds, np.arange(6) / 25)


@pytest.mark.parametrize("fps", [float("nan"), 0.0, float("inf"), 1 / 1024])
def test_frame_times_none_without_any_time_base(fps):
    unusable = [
        np.full((5, 2), np.nan),
        np.zeros((5, 2)),  # not increasing
        np.stack([np.arange(5) * 1024.0, np.arange(1, 6) * 1024.0], axis=1),  # 1 frame / 17 min
    ]
    for raw in unusable:
        assert frame_times(raw, fps) is None


def test_config_validates_and_serialises():
    config = DecodeConfig(fps=3.0, max_frames=None)
    assert config.to_dict()["fps"] == 3.0 and DecodeConfig(**config.to_dict()) == config
    for bad in [{"fps": 0}, {"fps": float("nan")}, {"max_frames": 8}, {"size": 0}]:
        with pytest.raises(ValueError):
            DecodeConfig(**bad)


def test_error_survives_pickling_and_checks_its_kind(tmp_path):
    error = VideoDecodeError(tmp_path / "a.mp4", "corrupt", f"{tmp_path / 'a.mp4'}: bad")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.kind, copy.reason) == (error.path, "corrupt", error.reason)
    with pytest.raises(ValueError):
        VideoDecodeError("a.mp4", "gremlins", "a.mp4: ?")


# --------------------------------------------------------------------------------------------
# Bad inputs: each its own kind, with a reason naming the file


def test_missing_file(tmp_path):
    assert_fails(tmp_path / "nope.mp4", "missing")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    assert_fails(path, "empty_file")


def test_random_bytes_named_mp4_is_corrupt(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
    assert_fails(path, "corrupt")


@pytest.mark.parametrize(("name", "codec"), [("speech.mp4", "aac"), ("pcm.mkv", "pcm_s16le")])
def test_audio_only_file_has_no_video_stream(tmp_path, name, codec):
    assert_fails(write_audio_only(tmp_path / name, codec), "no_video_stream")


def test_one_frame_video_is_too_short(make_video):
    error = assert_fails(make_video("still.mkv", n_frames=1), "too_short")
    assert "1 frame" in error.reason


def test_directory_named_like_a_video_is_unreadable(tmp_path):
    # Tests run as root, whom permission bits do not stop: a directory cannot be read as a file.
    path = tmp_path / "folder.mp4"
    path.mkdir()
    assert "directory" in assert_fails(path, "unreadable").reason


def test_fifo_is_unreadable_without_blocking(tmp_path):
    path = tmp_path / "pipe.mp4"
    os.mkfifo(path)  # opening it for reading would block forever with no writer
    assert_fails(path, "unreadable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_file_without_read_permission_is_unreadable(make_video):
    path = make_video("locked.mkv")
    path.chmod(0)
    assert_fails(path, "unreadable")


@pytest.mark.parametrize("layout", ["mp4", "mp4-faststart", "mkv", "avi"])
def test_cut_file_is_truncated(make_video, tmp_path, layout):
    if layout == "mkv":
        whole = make_video("whole.mkv", n_frames=30, codec="ffv1")
    elif layout == "avi":
        whole = make_video("whole.avi", n_frames=30, codec="mpeg4")
    else:
        whole = make_video("whole.mp4", n_frames=30, codec="libx264")
        if layout == "mp4-faststart":
            whole = remux_faststart(whole, tmp_path / "faststart.mp4")
    assert container_shortfall(whole) is None
    path = cut(whole, tmp_path / f"cut{whole.suffix}", keep=0.6)
    error = assert_fails(path, "truncated")
    declared, actual = container_shortfall(path)
    assert actual == path.stat().st_size < declared
    assert str(actual) in error.reason


def test_truncated_file_decodes_its_intact_part_when_allowed(make_video, tmp_path):
    whole = make_video("whole.mkv", n_frames=40, fps=10, size=(32, 32), codec="ffv1")
    path = cut(whole, tmp_path / "cut.mkv", keep=0.5)
    config = DecodeConfig(size=32, allow_truncated=True)
    video = decode_video(path, config)
    complete = decode_video(whole, config)
    assert 1.0 < video.duration < 0.6 * complete.duration
    n = video.n_sampled
    assert n == len(sample_times(video.duration, 2.0)) < complete.n_sampled
    np.testing.assert_array_equal(video.frames[:n], complete.frames[:n])


def test_undecodable_tail_is_dropped_and_recorded(make_video, tmp_path):
    # Cutting the last bytes of a faststart MP4 leaves its index listing frames whose data is
    # gone: the frame count is over-reported and the final frames fail to decode.
    whole = remux_faststart(
        make_video("whole.mp4", n_frames=40, fps=10, codec="libx264"), tmp_path / "fs.mp4"
    )
    path = cut(whole, tmp_path / "cut.mp4", keep=0.99)
    video = decode_video(path, DecodeConfig(fps=10, size=32, allow_truncated=True))
    assert video.dropped_tail > 0
    listed = 40
    assert video.source_indices.max() < listed - video.dropped_tail
    np.testing.assert_allclose(video.duration, (listed - video.dropped_tail) / 10, atol=1e-3)
    assert video.n_sampled == listed - video.dropped_tail  # every decodable frame at 10 fps


def test_zero_timescale_has_bad_fps(make_video, tmp_path):
    source = make_video("clip.mp4", n_frames=30, codec="libx264")
    error = assert_fails(zero_media_timescale(source, tmp_path / "zero.mp4"), "bad_fps")
    assert "fps" in error.reason


# --------------------------------------------------------------------------------------------
# Sampling on synthetic videos with known frame times


def test_lossless_frames_are_the_nearest_to_each_sample_time(make_video):
    source_fps, n = 7.5, 30  # 2 fps grid times fall between frames, never on a tie
    path = make_video("exact.mkv", n_frames=n, fps=source_fps, size=(32, 32), codec="ffv1")
    video = decode_video(path, DecodeConfig(size=32, min_frames=1))
    true_starts = np.arange(n) / source_fps
    grid = np.arange(8) / 2.0  # k / 2 while < 4 s
    expected = expected_nearest(true_starts, grid)
    assert video.timing == "timestamps" and not video.padded
    np.testing.assert_array_equal(video.source_indices, expected)
    np.testing.assert_array_equal(video.frames, make_video.frames["exact.mkv"][expected])
    np.testing.assert_allclose(video.timestamps, true_starts[expected], atol=2e-3)
    np.testing.assert_allclose(video.duration, n / source_fps, atol=2e-3)
    assert (video.width, video.height) == (32, 32)


def test_short_video_is_padded_with_its_last_frame(make_video):
    path = make_video("short.mkv", n_frames=30, fps=10, size=(32, 32))
    video = decode_video(path, DecodeConfig(size=32))
    written = make_video.frames["short.mkv"]
    assert (video.n_available, video.n_sampled, len(video.frames)) == (6, 6, 16)
    assert video.padded and not video.subsampled
    np.testing.assert_array_equal(video.frames[:6], written[0:30:5])
    np.testing.assert_array_equal(video.frames[6:], np.repeat(written[25:26], 10, axis=0))
    np.testing.assert_allclose(video.timestamps[6:], 2.5, atol=1e-3)
    np.testing.assert_array_equal(video.source_indices[6:], 25)


def test_long_video_is_subsampled_uniformly(make_video):
    path = make_video("long.mkv", n_frames=80, fps=4, size=(32, 32))  # 20 s -> 40 grid times
    video = decode_video(path, DecodeConfig(size=32, max_frames=16))
    kept = select_indices(40, 16)
    assert (video.n_available, video.n_sampled, len(video.frames)) == (40, 16, 16)
    assert video.subsampled and not video.padded
    np.testing.assert_array_equal(video.source_indices, 2 * kept)  # grid k/2 is frame 2k at 4 fps
    np.testing.assert_array_equal(video.frames, make_video.frames["long.mkv"][2 * kept])
    uncapped = decode_video(path, DecodeConfig(size=32, max_frames=None))
    assert uncapped.n_sampled == 40 and not uncapped.subsampled


def test_variable_frame_rate_uses_per_frame_timestamps(tmp_path):
    rng = np.random.default_rng(1)
    gaps_ms = rng.choice([40, 90, 400, 1000], size=23)  # bursts and pauses
    starts_ms = np.concatenate([[0], np.cumsum(gaps_ms)])
    frames = rng.integers(0, 256, (len(starts_ms), 32, 32, 3), dtype=np.uint8)
    path = write_vfr(tmp_path / "vfr.mkv", frames, starts_ms.tolist())
    video = decode_video(path, DecodeConfig(size=32, min_frames=1, max_frames=None))
    true_starts = starts_ms / 1000
    assert video.timing == "timestamps"
    assert video.duration > true_starts[-1]
    grid = sample_times(video.duration, 2.0)
    assert len(grid) >= 2 * true_starts[-1]  # not a count from an average frame rate
    expected = expected_nearest(true_starts, grid)
    np.testing.assert_array_equal(video.source_indices, expected)
    np.testing.assert_array_equal(video.frames, frames[expected])
    np.testing.assert_allclose(video.timestamps, true_starts[expected], atol=1e-3)


# --------------------------------------------------------------------------------------------
# Real clips


@pytest.fixture(scope="module")
def decoded_real(real_videos) -> dict[Path, DecodedVideo]:
    config = DecodeConfig(max_frames=None)
    return {path: decode_video(path, config) for path in real_videos}


def pyav_duration(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        return container.duration / 1e6


@pytest.mark.slow
def test_real_clips_sample_two_frames_per_second_of_video(decoded_real):
    for path, video in decoded_real.items():
        duration = pyav_duration(path)  # the container's own duration, read by another library
        assert abs(video.n_available - 2 * duration) <= 1, (path.name, video.n_available, duration)
        assert video.frames.shape[1:] == (112, 112, 3) and video.frames.dtype == np.uint8
        assert len(video.frames) == max(video.n_sampled, 16)
        # the nearest frame to each grid time: within half a frame, or inside the last frame
        grid = np.arange(video.n_sampled) / 2
        offset = np.abs(video.timestamps[: video.n_sampled] - grid)
        assert offset.max() <= 1 / video.source_fps + 1e-3, path.name


@pytest.mark.slow
def test_real_clips_agree_with_pyav(decoded_real):
    import av

    for path, video in decoded_real.items():
        with av.open(str(path)) as container:
            # swscale's bilinear filter (area-aware when shrinking) is what decord's graph uses.
            reference = np.stack(
                [
                    frame.to_ndarray(
                        width=112, height=112, format="rgb24", interpolation="BILINEAR"
                    )
                    for frame in container.decode(video=0)
                ]
            ).astype(np.float64)  # (n, 112, 112, 3), display order
        ours = video.frames[: video.n_sampled].astype(np.float64)
        same = np.abs(ours - reference[video.source_indices[: video.n_sampled]]).mean()
        neighbours = np.minimum(video.source_indices[: video.n_sampled] + 1, len(reference) - 1)
        shifted = np.abs(ours - reference[neighbours]).mean()
        assert same < 1.0, (path.name, same)
        assert same < shifted, (path.name, same, shifted)  # the right frames, not neighbours


@pytest.mark.slow
def test_resize_is_antialiased(decoded_real, real_videos):
    import av
    from PIL import Image

    path = next(p for p in real_videos if p.name == "bigbuckbunny.mp4")  # 1280x720 -> 112
    video = decoded_real[path]
    with av.open(str(path)) as container:
        full = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    index = int(video.source_indices[3])
    lanczos = np.asarray(Image.fromarray(full[index]).resize((112, 112), Image.LANCZOS))
    rows = np.arange(112) * 720 // 112
    cols = np.arange(112) * 1280 // 112
    nearest = full[index][rows][:, cols]  # point sampling: aliased
    ours = video.frames[3].astype(np.float64)
    good = np.abs(ours - lanczos).mean()
    assert good < 4.0 and good < 0.5 * np.abs(nearest.astype(np.float64) - lanczos).mean()
    assert (video.width, video.height) == (1280, 720)


# --------------------------------------------------------------------------------------------
# The isolated decoder


def test_the_decoder_child_imports_no_heavy_library():
    """The child starts once a partition and after every crash: torch, zarr and pandas (the
    store's) stay out of it."""
    code = (
        "import sys, astar.extract.isolation; "
        "print(' '.join(m for m in ('torch', 'zarr', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


@pytest.fixture
def faulty_decoder(monkeypatch):
    """``make(config, faults, prefetch)``: an IsolatedDecoder whose child does ``faults``.

    ``faults`` is ``{str(path): action}``, done by the child for that path
    (tests/decoder_faults.py); the child inherits the environment set here.
    """

    def make(config: DecodeConfig, faults: dict[str, str], prefetch: int) -> IsolatedDecoder:
        for name, value in decoder_faults.child_env(faults).items():
            monkeypatch.setenv(name, value)
        return IsolatedDecoder(config, prefetch, child_main=decoder_faults.CHILD_MAIN)

    return make


def test_isolated_results_equal_in_process_and_keep_order(make_video, tmp_path):
    good = [make_video(f"v{i}.mkv", n_frames=10 + 10 * i, fps=10, seed=i) for i in range(3)]
    empty = tmp_path / "empty.mp4"
    empty.touch()
    noise = tmp_path / "noise.avi"
    noise.write_bytes(bytes(range(256)) * 40)
    paths = [good[0], empty, good[1], tmp_path / "gone.mkv", noise, good[2]]
    config = DecodeConfig(size=32)
    with IsolatedDecoder(config, prefetch=2) as decoder:
        results = list(decoder.imap(paths))
    assert [path for path, _ in results] == paths
    kinds = [r.kind if isinstance(r, VideoDecodeError) else "ok" for _, r in results]
    assert kinds == ["ok", "empty_file", "ok", "missing", "corrupt", "ok"]
    for path, result in results:
        if not isinstance(result, VideoDecodeError):
            local = decode_video(path, config)
            np.testing.assert_array_equal(result.frames, local.frames)
            np.testing.assert_array_equal(result.timestamps, local.timestamps)
        else:
            assert str(path) in result.reason


def test_decode_raises_the_childs_error(tmp_path):
    with IsolatedDecoder(DecodeConfig()) as decoder, pytest.raises(VideoDecodeError) as caught:
        decoder.decode(tmp_path / "absent.mp4")
    assert caught.value.kind == "missing"


@pytest.mark.parametrize(
    ("fault", "kind", "why"),
    [
        ("hang", "timeout", "longer than"),
        ("abort", "crashed", "SIGABRT"),
        ("segfault", "crashed", "SIGSEGV"),
        ("raise", "decode_error", "RuntimeError"),
    ],
)
def test_child_hang_or_crash_costs_one_video(make_video, faulty_decoder, fault, kind, why):
    paths = [make_video(f"v{i}.mkv", n_frames=20, fps=10, seed=i) for i in range(4)]
    config = DecodeConfig(size=32, timeout_s=1.5)
    with faulty_decoder(config, {str(paths[1]): fault}, prefetch=2) as decoder:
        results = [result for _, result in decoder.imap(paths)]
        assert isinstance(results[1], VideoDecodeError)
        assert results[1].kind == kind and why in results[1].reason
        assert str(paths[1]) in results[1].reason
        for result in results[:1] + results[2:]:  # before and after (queued to the old child)
            assert isinstance(result, DecodedVideo) and result.n_sampled == 4
        assert decoder.restarts == (0 if kind == "decode_error" else 1)
        assert decoder.decode(paths[0]).n_sampled == 4  # still working afterwards


def test_child_killed_between_videos_blames_no_video(make_video):
    paths = [make_video(f"v{i}.mkv", n_frames=20, fps=10, seed=i) for i in range(3)]
    results = []
    with IsolatedDecoder(DecodeConfig(size=32), prefetch=0) as decoder:
        for path, result in decoder.imap(paths):
            results.append(result)
            if path == paths[0]:  # idle now (nothing prefetched): an outside kill, say OOM
                decoder._child.kill()
        assert decoder.restarts == 1
    assert all(isinstance(result, DecodedVideo) for result in results)


def test_abandoned_imap_leaves_the_decoder_usable(make_video):
    paths = [make_video(f"v{i}.mkv", n_frames=20, fps=10, seed=i) for i in range(4)]
    with IsolatedDecoder(DecodeConfig(size=32), prefetch=2) as decoder:
        for _path, _result in decoder.imap(paths):
            break
        second = list(decoder.imap(paths[2:]))
    assert [path for path, _ in second] == paths[2:]
    assert all(isinstance(result, DecodedVideo) for _, result in second)


@pytest.mark.slow
def test_prefetch_overlaps_decoding_with_the_callers_work(make_video, faulty_decoder):
    paths = [make_video(f"v{i}.mkv", n_frames=10, fps=10, seed=i) for i in range(5)]
    delay = 0.5  # the child "decodes" this long per video; the caller "computes" as long
    faults = {str(path): f"sleep:{delay}" for path in paths}
    with faulty_decoder(DecodeConfig(size=32), faults, prefetch=2) as decoder:
        decoder.decode(paths[0])  # start the child before timing
        started = time.perf_counter()
        for _ in decoder.imap(paths):
            time.sleep(delay)
        elapsed = time.perf_counter() - started
    # In turn it would take 2 * 5 * delay = 5 s; overlapped about (5 + 1) * delay = 3 s.
    assert elapsed < 4.0, elapsed


def test_every_failure_kind_is_documented():
    for kind in FAILURE_KINDS:
        assert f"``{kind}``" in decode_module.__doc__, kind
