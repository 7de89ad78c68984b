"""The embedded demo dataset (astar.pipelines.demo, make-demo-dataset)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from astar.pipelines.cli import make_demo_dataset as demo_cli
from astar.pipelines.cli import prepare_dataset as prepare_cli
from astar.pipelines.datasets import Dataset, PrepareConfig, prepare_dataset, read_folder
from astar.pipelines.demo import (
    COLOURS,
    SHAPE_WORDS,
    SIZE_WORDS,
    TRAVEL,
    DemoConfig,
    DemoError,
    ObjectSpec,
    VideoSpec,
    captions_for,
    draw_video_spec,
    make_demo_dataset,
    render_frames,
)

TINY = DemoConfig(seed=3, n_train=4, n_val=2, n_test=2)
RAW = ["annotations.csv", "demo.json", "videos"]  # all that make_demo_dataset writes


def prepare_folder(raw: Path, out: Path) -> Dataset:
    """What `prepare-dataset folder generic RAW --out OUT` (the prepare stage) does."""
    annotations, videos = read_folder("generic", raw)
    prepare_dataset(annotations, PrepareConfig(videos_dir=videos)).save(out)
    return Dataset.load(out)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The raw folder and the dataset prepared from it."""
    raw = tmp_path_factory.mktemp("demo")
    assert make_demo_dataset(raw, TINY) == raw / "annotations.csv"
    return prepare_folder(raw, tmp_path_factory.mktemp("prepared")), raw


def decode_all(path):
    import decord

    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()  # (T, H, W, 3)


def test_demo_layout_and_splits(tiny_demo):
    dataset, out = tiny_demo
    assert {s: v["videos"] for s, v in dataset.summary["splits"].items()} == {
        "train": 4,
        "val": 2,
        "test": 2,
    }
    assert len(dataset.captions) == 8 * TINY.captions_per_video
    assert dataset.summary["missing_videos"]["count"] == 0
    assert sorted(p.name for p in out.iterdir()) == RAW  # raw material only, nothing prepared
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        f"demo{i:04d}.mp4" for i in range(8)
    ]
    # Each video: distinct paraphrases.
    for captions in dataset.captions_by_video("train").values():
        assert len(set(captions)) == TINY.captions_per_video


def test_videos_are_real_h264_at_112(tiny_demo):
    _, out = tiny_demo
    frames = decode_all(out / "videos" / "demo0000.mp4")
    assert frames.shape == (TINY.n_frames, 112, 112, 3)
    assert len(frames) / TINY.fps * 2 >= 16  # sampled at 2 fps: at least C3D's 16 frames
    spec = json.loads((out / "demo.json").read_text())["videos"]["demo0000"]
    rendered = render_frames(_spec_from_json(spec), TINY)
    np.testing.assert_array_equal(frames, rendered)  # lossless: the pixels drawn


def _spec_from_json(data):
    return VideoSpec(
        ObjectSpec(**data["target"]),
        data["action"],
        tuple(ObjectSpec(**d) for d in data["distractors"]),
    )


def test_same_seed_same_dataset_other_seed_other(tiny_demo, tmp_path):
    _, out = tiny_demo
    again = tmp_path / "again"
    make_demo_dataset(again, TINY, workers=2)  # the worker count does not matter
    for name in ("annotations.csv", "demo.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    for name in ("demo0000.mp4", "demo0007.mp4"):
        np.testing.assert_array_equal(
            decode_all(again / "videos" / name), decode_all(out / "videos" / name)
        )
    other = tmp_path / "other"
    make_demo_dataset(other, DemoConfig(seed=4, n_train=4, n_val=2, n_test=2))
    assert (other / "annotations.csv").read_bytes() != (out / "annotations.csv").read_bytes()


def test_captions_describe_the_target_not_the_distractors():
    config = DemoConfig()
    for index in range(40):
        rng = np.random.default_rng([0, index])
        spec = draw_video_spec(rng, config)
        target = spec.target
        pairs = {(d.shape, d.colour) for d in spec.distractors}
        assert (target.shape, target.colour) not in pairs  # the target is unambiguous
        assert 1 <= len(spec.distractors) <= config.max_distractors
        for caption in captions_for(spec, 5, rng):
            words = caption.split()
            assert target.colour in words
            assert set(words) & set(SHAPE_WORDS[target.shape])
            assert set(words) & set(SIZE_WORDS[target.size])
            assert not set(words) & (set(COLOURS) - {target.colour})


def _mask(frames, colour):
    """(T, H, W) pixels close to ``colour``."""
    return (np.abs(frames.astype(int) - np.array(colour)).sum(-1) < 30).astype(float)


def _centroid_x(mask):
    cols = np.arange(mask.shape[2])
    return (mask.sum(1) * cols).sum(-1) / mask.sum((1, 2))  # (T,)


def test_rendered_motion_matches_the_action():
    config = DemoConfig()
    red, blue = COLOURS["red"], COLOURS["blue"]
    distractor = ObjectSpec("square", "blue", "big", 30.0, 85.0, 0.3)

    def render(action, shape="circle", x=80.0):
        target = ObjectSpec(shape, "red", "small", x, 30.0, 0.0)
        return render_frames(VideoSpec(target, action, (distractor,)), config)

    left = render("left")
    moved = _centroid_x(_mask(left, red))
    assert moved[0] - moved[-1] == pytest.approx(TRAVEL * config.size, abs=1.0)
    assert np.all(np.diff(moved) < 0)
    still = _mask(left, blue)
    assert np.array_equal(still[0], still[-1]) and still[0].sum() > 100  # the distractor stays
    right = _centroid_x(_mask(render("right", x=30.0), red))
    assert right[-1] - right[0] == pytest.approx(TRAVEL * config.size, abs=1.0)
    area = _mask(render("grow"), red).sum((1, 2))
    assert area[-1] / area[0] == pytest.approx(1.9**2, rel=0.15)
    area = _mask(render("shrink"), red).sum((1, 2))
    assert area[-1] / area[0] == pytest.approx(0.45**2, rel=0.25)
    spin = _mask(render("spin", shape="square"), red)
    areas = spin.sum((1, 2))
    assert areas.std() / areas.mean() < 0.1  # same size ...
    assert not np.array_equal(spin[0], spin[3])  # ... different orientation
    static = _mask(render("static"), red)
    assert np.array_equal(static[0], static[-1])


def test_config_is_validated():
    with pytest.raises(DemoError, match="captions_per_video"):
        DemoConfig(captions_per_video=1)
    with pytest.raises(DemoError, match="n_train"):
        DemoConfig(n_train=0)


def test_make_demo_dataset_cli_writes_the_folder_prepare_dataset_reads(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    args = ["--out", str(out), "--seed", "1", "--n-train", "3", "--n-val", "1", "--n-test", "1"]
    result = runner.invoke(demo_cli, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "5 videos (3 train, 1 val, 1 test), 25 captions" in result.output
    assert sorted(p.name for p in out.iterdir()) == RAW
    # The prepare stage's command gives the same dataset as the library call the tests use.
    prepared = tmp_path / "prepared"
    result = runner.invoke(prepare_cli, ["folder", "generic", str(out), "--out", str(prepared)])
    assert result.exit_code == 0, result.output
    assert "5 videos, 25 captions" in result.output
    library = prepare_folder(out, tmp_path / "library")
    for name in ("videos.csv", "captions.csv", "vocab.json", "summary.json"):
        assert (prepared / name).read_bytes() == (tmp_path / "library" / name).read_bytes()
    for problem in ("missing_videos", "videos_without_captions", "empty_captions"):
        assert library.summary[problem]["count"] == 0
    # Scoring the reference rows is score-references' job (the references stage), not this one's.
    result = runner.invoke(demo_cli, [*args, "--score"])
    assert result.exit_code == 2 and "No such option" in result.output, result.output


@pytest.mark.slow
def test_reference_rows(tmp_path):
    from astar.evaluate.references import reference_rows

    """Videos whose captions are one sentence said three times: leaving one out is exact, and
    the constant most common training caption (which no test video has) scores lower."""
    from astar.pipelines.datasets import prepare_dataset, read_generic

    test = ["a red ball rolls to the left", "two cats sleep on a sofa", "the blue car turns"]
    rows = [f"v{i},{c},test" for i, c in enumerate(test) for _ in range(3)]
    rows += ["t1,a red ball rolls away,train", "t2,a red ball rolls away,train", "t3,x,train"]
    (tmp_path / "c.csv").write_text("video_id,caption,split\n" + "\n".join(rows) + "\n")
    prepare_dataset(read_generic(tmp_path / "c.csv")).save(tmp_path / "data")
    scores = reference_rows(tmp_path / "data", "test")
    assert set(scores) == {"leave_one_out", "most_common_caption"}
    exact = scores["leave_one_out"]
    # CIDEr-D is x 10 in coco-caption: an exact match of every reference scores 10 (1000 here).
    assert exact == pytest.approx({"BLEU-4": 100, "METEOR": 100, "ROUGE_L": 100, "CIDEr": 1000})
    constant = scores["most_common_caption"]  # "a red ball rolls away": partly right for v0
    for metric in exact:
        assert 0 < constant[metric] < exact[metric] / 2


def test_a_seed_gives_the_same_pixels_in_every_run(tmp_path):
    """Two runs of the command (two processes, as in the pipeline) write identical captions and
    videos that decode to exactly the frames rendered for the seed.

    Pixels, not bytes: x264's bytes for the same frames varied between runs now and then (about
    1 video in 100), so the demo is lossless and its decoded frames are what is compared.
    """
    import subprocess
    import sys

    import decord

    command = Path(sys.executable).parent / "make-demo-dataset"
    digests = []
    for run in ("a", "b"):
        subprocess.run(
            [str(command), "--out", str(tmp_path / run), "--n-train", "6", "--n-val", "1"]
            + ["--n-test", "1", "--workers", "2"],
            check=True, capture_output=True,
        )  # fmt: skip
        videos = sorted((tmp_path / run / "videos").glob("*.mp4"))
        assert len(videos) == 8
        config = DemoConfig()
        for index, path in enumerate(videos):
            rng = np.random.default_rng([0, index])
            frames = render_frames(draw_video_spec(rng, config), config)
            decoded = decord.VideoReader(str(path))
            back = decoded.get_batch(range(len(decoded))).asnumpy()
            np.testing.assert_array_equal(back, frames, err_msg=f"run {run}, {path.name}")
        digests.append(hashlib.md5((tmp_path / run / "annotations.csv").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
