"""Evaluation commands end to end on real (tiny) extracted features and a trained checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from astar.evaluate.cli import caption_video, evaluate_captioner, report, score_captions_command
from astar.evaluate.inference import extract_like_training, load_trained
from astar.extract.runner import ExtractConfig, extract_features
from astar.pipelines.datasets import Dataset, PrepareConfig, prepare_dataset, read_generic
from astar.train.checkpoint import CheckpointError, save_checkpoint
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
        dataset.vocabulary.to_dict(), dataset.encoded_captions("train")
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
    assert metrics["seed"] == 0  # the training seed, from the checkpoint
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
    assert lines[2].startswith("| pool4 ") and lines[3].startswith("| most common caption |")
    learned_nothing = metrics["CIDEr"] <= 1.5  # a few steps on four videos may well learn nothing
    assert lines[2].startswith("| pool4 ⚠ |") == learned_nothing
    assert ("WARNING: pool4 (seed 0) CIDEr-D" in table.stderr) == learned_nothing


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


def test_a_checkpoint_with_nonfinite_parameters_is_refused(trained: Path, tmp_path: Path):
    payload = torch.load(trained / "run/last.pt", weights_only=True)
    payload["model"]["output.weight"][0, 0] = float("nan")
    broken = tmp_path / "diverged.pt"
    torch.save(payload, broken)  # as a diverged run of an older astar could have
    args = ["--checkpoint", str(broken), "--store", str(trained / "store")]
    args += ["--dataset", str(trained / "dataset"), "--out", str(tmp_path / "eval"), "-q"]
    evaluated = CliRunner().invoke(evaluate_captioner, [*args, "--beam", "1"])
    captioned = CliRunner().invoke(
        caption_video, [str(trained / "videos/c4.mkv"), "--checkpoint", str(broken)]
    )
    for refused in (evaluated, captioned):
        assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit)
        assert f"{broken}: the model has non-finite values" in refused.output
        assert "in 1 tensor(s): output.weight" in refused.output
    assert not (tmp_path / "eval").exists()
    with pytest.raises(CheckpointError, match=r"output\.weight"):
        save_checkpoint(tmp_path / "again.pt", payload)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["diverged.pt"]


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


def _write_evaluation(folder: Path, name: str, seed: int | None, bleu: float, cider: float):
    folder.mkdir(parents=True)
    metrics = {"name": name, "BLEU-4": bleu, "METEOR": 20.0, "ROUGE_L": 50.0, "CIDEr": cider}
    if seed is not None:
        metrics["seed"] = seed
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def seeded_evaluations(tmp_path: Path) -> tuple[Path, Path]:
    """eval/VARIANT/seedS as the pipeline writes them, and the two reference rows (floor 37.6).

    soft: three seeds, mean above the floor, seed 2 below it; fc7: its mean and every seed at or
    below it (seed 0 exactly at it); hard: one seed, above it.
    """
    scores = {
        "soft": {0: (40.0, 50.0), 1: (42.0, 60.0), 2: (44.0, 31.0)},
        "fc7": {0: (10.0, 37.6), 1: (12.0, 30.0), 2: (14.0, 35.0)},
        "hard": {0: (41.0, 40.0)},
    }
    for variant, seeds in scores.items():
        for seed, (bleu, cider) in seeds.items():
            _write_evaluation(
                tmp_path / "eval" / variant / f"seed{seed}", variant, seed, bleu, cider
            )
    references = tmp_path / "references.json"
    rows = {
        "leave_one_out": {"BLEU-4": 45.0, "METEOR": 44.0, "ROUGE_L": 67.0, "CIDEr": 205.0},
        "most_common_caption": {"BLEU-4": 11.0, "METEOR": 18.0, "ROUGE_L": 44.0, "CIDEr": 37.6},
    }
    references.write_text(json.dumps(rows))
    return tmp_path / "eval", references


def _report(*args: str):
    result = CliRunner().invoke(report, list(args))
    assert result.exit_code == 0, result.output  # flagged models change the report, not the status
    return result


def test_report_gives_mean_and_sample_std_over_seeds_and_each_seed(seeded_evaluations, tmp_path):
    folder, references = seeded_evaluations
    out = tmp_path / "r"
    _report(str(folder), "--reference", str(references), "--out", str(out))
    saved = json.loads((out / "report.json").read_text())
    rows = {row["name"]: row for row in saved["rows"]}
    assert list(rows) == ["fc7", "soft", "hard", "leave one out", "most common caption"]
    soft = rows["soft"]
    assert soft["seeds"] == [0, 1, 2]
    assert soft["BLEU-4"] == pytest.approx(42.0) and soft["std"]["BLEU-4"] == pytest.approx(2.0)
    # CIDEr-D 50, 60, 31: mean 47, squared deviations 9 + 169 + 256 over n - 1 = 2
    assert soft["CIDEr"] == pytest.approx(47.0)
    assert soft["std"]["CIDEr"] == pytest.approx(math.sqrt(217.0))
    assert soft["std"]["METEOR"] == 0.0
    assert rows["hard"]["std"] is None and rows["hard"]["CIDEr"] == 40.0  # one seed: the value
    assert rows["most common caption"]["CIDEr"] == 37.6
    runs = [(run["name"], run["seed"], run["CIDEr"]) for run in saved["runs"]]
    assert runs == [
        ("fc7", 0, 37.6), ("fc7", 1, 30.0), ("fc7", 2, 35.0),
        ("soft", 0, 50.0), ("soft", 1, 60.0), ("soft", 2, 31.0), ("hard", 0, 40.0),
    ]  # fmt: skip

    text = (out / "report.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "| model | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |"
    assert lines[3] == "| soft | 42.00 ± 2.00 | 20.00 ± 0.00 | 50.00 ± 0.00 | 47.00 ± 14.73 |"
    assert lines[4] == "| hard | 41.00 | 20.00 | 50.00 | 40.00 |"
    assert lines[6] == "| most common caption | 11.00 | 18.00 | 44.00 | 37.60 |"
    assert "mean ± sample standard deviation (n - 1) over its seeds (below)" in text
    assert "| model | seed | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |" in lines
    assert "| soft | 1 | 42.00 | 20.00 | 50.00 | 60.00 |" in lines
    assert "| hard | 0 | 41.00 | 20.00 | 50.00 | 40.00 |" in lines


def test_report_flags_a_model_at_or_below_the_most_common_caption(seeded_evaluations, tmp_path):
    folder, references = seeded_evaluations
    out = tmp_path / "r"
    result = _report(str(folder), "--reference", str(references), "--out", str(out))
    saved = json.loads((out / "report.json").read_text())
    flagged = [(flag["name"], flag["seed"], flag["seeds"]) for flag in saved["learned_nothing"]]
    assert flagged == [
        ("fc7", None, [0, 1, 2]), ("fc7", 0, [0]), ("fc7", 1, [1]), ("fc7", 2, [2]),
        ("soft", 2, [2]),
    ]  # fmt: skip
    assert saved["learned_nothing"][0]["CIDEr"] == pytest.approx(34.2)
    assert saved["learned_nothing"][0]["most_common_caption"] == 37.6
    rows = {row["name"]: row for row in saved["rows"]}
    assert rows["fc7"]["learned_nothing"] and not rows["soft"]["learned_nothing"]
    assert not rows["hard"]["learned_nothing"]
    assert [run["learned_nothing"] for run in saved["runs"] if run["name"] == "soft"] == [
        False, False, True
    ]  # fmt: skip

    lines = (out / "report.md").read_text().splitlines()
    assert lines[2].startswith("| fc7 ⚠ | 12.00 ± 2.00 |")
    assert lines[3].startswith("| soft | ") and lines[4].startswith("| hard | ")
    assert "| soft | 2 ⚠ | 44.00 | 20.00 | 50.00 | 31.00 |" in lines
    assert "| soft | 0 | 40.00 | 20.00 | 50.00 | 50.00 |" in lines
    assert "| fc7 | 0 ⚠ | 10.00 | 20.00 | 50.00 | 37.60 |" in lines  # at the floor is not above
    note = next(line for line in lines if line.startswith("⚠ learned nothing"))
    assert "(CIDEr-D 37.60)" in note and "soft (seed 2)" in note and "hard" not in note

    warnings = result.stderr.splitlines()
    assert warnings == [
        "WARNING: fc7 (mean of seeds 0, 1, 2) CIDEr-D 34.20 <= most common caption 37.60: "
        "it learned nothing",
        "WARNING: fc7 (seed 0) CIDEr-D 37.60 <= most common caption 37.60: it learned nothing",
        "WARNING: fc7 (seed 1) CIDEr-D 30.00 <= most common caption 37.60: it learned nothing",
        "WARNING: fc7 (seed 2) CIDEr-D 35.00 <= most common caption 37.60: it learned nothing",
        "WARNING: soft (seed 2) CIDEr-D 31.00 <= most common caption 37.60: it learned nothing",
    ]
    assert "WARNING" not in result.stdout


def test_report_without_a_floor_or_with_every_model_above_it_warns_of_nothing(
    seeded_evaluations, tmp_path
):
    folder, references = seeded_evaluations
    without = _report(str(folder), "--variants", "hard", "--out", str(tmp_path / "a"))
    assert without.stderr == "" and "⚠" not in without.stdout
    above = _report(str(folder), "--variants", "hard", "--reference", str(references))
    assert above.stderr == "" and "⚠" not in above.stdout
    assert "Each seed" not in above.stdout  # one run per model: the table is the runs
    saved = json.loads((tmp_path / "a/report.json").read_text())
    assert saved["learned_nothing"] == [] and saved["runs"][0]["seed"] == 0


def test_report_selects_seeds_and_refuses_a_seed_twice(seeded_evaluations, tmp_path):
    folder, _ = seeded_evaluations
    out = tmp_path / "r"
    _report(str(folder), "--variants", "soft", "--seeds", "2", "--seeds", "0", "--out", str(out))
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["seeds"] == [2, 0] and row["CIDEr"] == pytest.approx(40.5)
    absent = CliRunner().invoke(report, [str(folder), "--variants", "hard", "--seeds", "1"])
    assert absent.exit_code == 1 and "hard/seed1/metrics.json" in absent.output
    # The folder name gives the seed where metrics.json does not record it.
    _write_evaluation(tmp_path / "old" / "soft" / "seed3", "soft", None, 1.0, 2.0)
    _report(str(tmp_path / "old"), "--out", str(out))
    assert json.loads((out / "report.json").read_text())["runs"][0]["seed"] == 3
    twice = CliRunner().invoke(report, [str(folder / "soft/seed1"), str(folder / "soft/seed1")])
    assert twice.exit_code == 1 and "seed 1" in twice.output
