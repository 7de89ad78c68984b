"""Evaluation commands end to end on real (tiny) extracted features and a trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from astar.evaluate.cli import caption_video, evaluate_captioner, report, score_captions_command
from astar.evaluate.inference import extract_like_training, load_trained
from astar.extract.runner import ExtractConfig, extract_features
from astar.pipelines.datasets import Dataset, PrepareConfig, prepare_dataset, read_generic
from astar.train.loop import CaptionData, TrainConfig, Trainer, store_layers
from astar.train.model import CaptionerConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Six synthetic videos -> c3d-small store -> dataset -> a pool4 model trained a few steps."""
    from astar.pipelines.videoio import write_video

    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    (root / "videos").mkdir()
    rows = ["video_id,caption,split"]
    for k in range(6):
        frames = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
        write_video(root / "videos" / f"c{k}.mkv", frames, fps=4.0, codec="ffv1")
        split = "train" if k < 4 else "test"
        rows += [
            f"c{k},a {'red' if k % 2 else 'blue'} box moves {s},{split}" for s in ("up", "down")
        ]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    dataset = prepare_dataset(read_generic(root / "captions.csv"), PrepareConfig(root / "videos"))
    dataset.save(root / "dataset")
    _, store = extract_features(
        [root / "videos"], root / "store", ExtractConfig(backbone="c3d-small"), progress=False
    )
    channels, fc_dim = store_layers(store)
    model = CaptionerConfig.small(len(dataset.vocabulary), "pool4", channels, fc_dim, dropout=0.0)
    data = CaptionData(
        dataset.vocabulary.to_dict(), dataset.encoded_captions("train"), {},
        dataset.vocabulary.decode,
    )  # fmt: skip
    Trainer(store, data, model, TrainConfig(max_epochs=3), root / "run").run()
    return root


def _evaluate(root: Path, out: Path, *extra: str):
    args = ["--checkpoint", str(root / "run/last.pt"), "--store", str(root / "store")]
    args += ["--dataset", str(root / "dataset"), "--out", str(out), "-q", *extra]
    return CliRunner().invoke(evaluate_captioner, args)


def test_raw_video_features_equal_the_stored_ones(trained: Path):
    """caption-video reuses the extraction exactly: no drift from what training saw."""
    from astar.store import FeatureStore

    model = load_trained(trained / "run/last.pt")
    done, failed = extract_like_training(model, [trained / "videos/c4.mkv"])
    assert not failed
    _, (_, features) = done[0]
    stored = FeatureStore.open(trained / "store")["c4"].layers
    for name, array in features.items():
        np.testing.assert_array_equal(array, stored[name].astype(np.float32), err_msg=name)


@pytest.mark.slow  # METEOR's Java start-up, twice
def test_evaluate_score_and_report(trained: Path, tmp_path: Path):
    result = _evaluate(trained, tmp_path / "eval", "--beam", "1")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["n_videos"] == 2 and metrics["variant"] == "pool4"
    assert all(0 <= metrics[m] <= 1000 for m in ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr"))
    predictions = json.loads((tmp_path / "eval/predictions.json").read_text())
    assert sorted(predictions) == ["c4", "c5"]
    assert "| pool4 |" in (tmp_path / "eval/metrics.md").read_text()

    # score-captions on the same predictions gives the same numbers.
    rescored = CliRunner().invoke(
        score_captions_command,
        [str(tmp_path / "eval/predictions.json"), "--dataset", str(trained / "dataset")]
        + ["--out", str(tmp_path / "again.json")],
    )
    assert rescored.exit_code == 0, rescored.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["CIDEr"] == pytest.approx(metrics["CIDEr"])

    extra = tmp_path / "reference.json"
    extra.write_text(json.dumps({"most_common_caption": {"CIDEr": 1.5, "BLEU-4": 2.0}}))
    table = CliRunner().invoke(
        report, [str(tmp_path / "eval"), "--reference", str(extra), "--out", str(tmp_path / "r")]
    )
    assert table.exit_code == 0, table.output
    lines = (tmp_path / "r/report.md").read_text().splitlines()
    assert lines[0].startswith("| model | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |")
    assert lines[2].startswith("| pool4 |") and lines[3].startswith("| most common caption |")


@pytest.mark.slow
def test_missing_features_are_an_error_unless_allowed(trained: Path, tmp_path: Path):
    dataset = Dataset.load(trained / "dataset")
    captions = dataset.captions.copy()
    extra = captions[captions["split"] == "test"].head(1).assign(video_id="ghost")
    videos = dataset.videos
    ghost_row = videos.head(1).assign(id="ghost", split="test", path="")
    altered = Dataset(
        videos=pd.concat([videos, ghost_row], ignore_index=True),
        captions=pd.concat([captions, extra], ignore_index=True),
        vocabulary=dataset.vocabulary,
        summary=dataset.summary,
    )
    altered.save(tmp_path / "dataset")
    args = ["--checkpoint", str(trained / "run/last.pt"), "--store", str(trained / "store")]
    args += ["--dataset", str(tmp_path / "dataset"), "--out", str(tmp_path / "e"), "-q"]
    refused = CliRunner().invoke(evaluate_captioner, [*args, "--beam", "1"])
    assert refused.exit_code == 1 and "ghost" in refused.output
    allowed = CliRunner().invoke(evaluate_captioner, [*args, "--beam", "1", "--allow-missing"])
    assert allowed.exit_code == 0, allowed.output
    metrics = json.loads((tmp_path / "e/metrics.json").read_text())
    assert metrics["n_missing"] == 1 and metrics["missing"] == ["ghost"]


@pytest.mark.slow
def test_caption_video_cli(trained: Path, tmp_path: Path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    args = [str(trained / "videos/c4.mkv"), str(bad), "--checkpoint", str(trained / "run/last.pt")]
    result = CliRunner().invoke(caption_video, [*args, "--beam", "1", "--json"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[0]["video"].endswith("c4.mkv") and isinstance(lines[0]["caption"], str)
    assert lines[1]["error"] == "corrupt" and "broken.mp4" in lines[1]["reason"]

    # Same caption as evaluating from the store.
    evaluated = _evaluate(trained, tmp_path / "eval", "--beam", "1")
    assert evaluated.exit_code == 0, evaluated.output
    predictions = json.loads((tmp_path / "eval/predictions.json").read_text())
    assert lines[0]["caption"] == predictions["c4"]

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    refused = CliRunner().invoke(caption_video, [*args[:1], *args[2:], "--weights", str(weights)])
    assert refused.exit_code == 1 and "random C3D" in refused.output


def test_report_of_a_folder_of_evaluations_and_of_files(tmp_path: Path):
    values = {"BLEU-4": 1.0, "METEOR": 2.0, "ROUGE_L": 3.0, "CIDEr": 4.0}
    for variant in ("soft", "fc7", "pool5"):
        (tmp_path / "eval" / variant).mkdir(parents=True)
        (tmp_path / "eval" / variant / "metrics.json").write_text(json.dumps(values))
    (tmp_path / "baseline.json").write_text(json.dumps(values))

    def names(*args: str) -> list[str]:
        result = CliRunner().invoke(report, [*args, "--out", str(tmp_path / "r")])
        assert result.exit_code == 0, result.output
        rows = json.loads((tmp_path / "r" / "report.json").read_text())["rows"]
        return [row["name"] for row in rows]

    folder = str(tmp_path / "eval")
    assert names(folder) == ["fc7", "pool5", "soft"]  # the paper's order
    assert names(folder, "--variants", "soft", "--variants", "fc7") == ["soft", "fc7"]
    assert names(str(tmp_path / "baseline.json")) == ["baseline"]  # a file: its own name
    missing = CliRunner().invoke(report, [folder, "--variants", "hard"])
    assert missing.exit_code == 1 and "hard" in missing.output
