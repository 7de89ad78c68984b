"""The library calls the commands are thin over, called as a notebook would: train_captioner,
evaluate_checkpoint, report_from_files, and the figures of a split through the isolated decoder."""

from __future__ import annotations

import json
import shutil

import pytest
from test_train import TINY_MODEL

from astar.evaluate.evaluation import EvaluationConfig, EvaluationError, evaluate_checkpoint
from astar.evaluate.figures import split_figures
from astar.evaluate.inference import load_trained
from astar.evaluate.report import report_from_files
from astar.train.loop import TrainConfig
from astar.train.run import RunConfig, train_captioner

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the metrics need Java")
SETTINGS = TrainConfig(
    videos_per_batch=2, captions_per_video=2, max_steps=3, precision="fp32", device="cpu"
)


@pytest.fixture
def trained(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus(splits=("train", "train", "test"))
    said: list[str] = []
    config = RunConfig(store, dataset, tmp_path / "run", variant="soft", train=SETTINGS,
                       model={**TINY_MODEL, "dropout": 0.0})  # fmt: skip
    result = train_captioner(config, say=said.append)
    return store, dataset, tmp_path / "run", result, said


def test_train_captioner_is_one_call(trained):
    _, _, out, result, said = trained
    assert result.rank == 0 and result.state.step == 3 and result.model_config.variant == "soft"
    assert (out / "last.pt").is_file()
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["train"]["max_steps"] == 3 and recorded["precision_used"] == "fp32"
    assert any("training soft on cpu in fp32" in line for line in said), said


def test_run_config_refuses_what_comes_from_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"model\.vocab_size comes from the store"):
        RunConfig(tmp_path, tmp_path, tmp_path, model={"vocab_size": 3})
    with pytest.raises(ValueError, match="start 'again' is not one of"):
        RunConfig(tmp_path, tmp_path, tmp_path, start="again")


@needs_java
def test_evaluate_checkpoint_then_report(trained, tmp_path):
    store, dataset, out, _, _ = trained
    config = EvaluationConfig(out / "last.pt", store, dataset, tmp_path / "eval", split="test",
                              beam=2, progress=False)  # fmt: skip
    row = evaluate_checkpoint(config)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert row["name"] == "soft" and row["CIDEr"] == written["CIDEr"]
    assert written["n_videos"] == 2 and written["n_missing"] == 0
    report = report_from_files([tmp_path / "eval"])
    assert [model.name for model in report.models] == ["soft"]
    with pytest.raises(EvaluationError, match="the val split has no captions"):
        evaluate_checkpoint(EvaluationConfig(out / "last.pt", store, dataset, tmp_path / "e2",
                                             split="val", progress=False))  # fmt: skip


def test_a_video_the_decoder_refuses_costs_its_picture_only(trained, tmp_path, make_video):
    _, _, out, _, _ = trained
    model = load_trained(out / "last.pt", "cpu")
    good = make_video("good.mkv", n_frames=40)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    captions = {
        vid: caption for vid, caption in zip(("v0", "v1", "v2"), _captions(model, 3), strict=True)
    }
    said: list[str] = []
    paths = {"v0": str(bad), "v1": str(good)}  # v2: no file
    written = split_figures(model, paths, captions, tmp_path / "figures", said.append)
    assert written == [tmp_path / "figures" / "v1.png"] and written[0].stat().st_size > 0
    assert any(line.startswith("v0: no attention picture (") for line in said), said
    assert "no video file for v2: no attention picture" in said


def _captions(model, count: int):
    """Greedy captions of ``count`` made-up videos (the figures only need their attention)."""
    import torch

    from astar.store.geometry import TAP_GRID, TIME_STRIDES
    from astar.train.model import FeatureBatch

    channels = model.model.config.layer_channels
    layers = {
        name: torch.rand(count, c, 16 // TIME_STRIDES[name], TAP_GRID[name], TAP_GRID[name])
        for name, c in channels.items()
    }
    features = FeatureBatch(layers=layers, n_frames=torch.full((count,), 16),
                            fc7=torch.rand(count, model.model.config.fc_dim))  # fmt: skip
    return model.decode(features, 1, 5)
