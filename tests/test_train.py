"""Training: exact resume, self-describing checkpoints, refusals, the CLI, torch.distributed."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from astar.pipelines.datasets import Dataset
from astar.store import FeatureStore
from astar.train.checkpoint import CheckpointError, load_checkpoint, nonfinite_tensors
from astar.train.cli import main as train_cli
from astar.train.loop import CaptionData, TrainConfig, Trainer, TrainingError, store_layers
from astar.train.model import CaptionerConfig, CaptionLoss

TINY_MODEL = {"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8, "samples": 3}


def _trainer(store_path: Path, dataset_path: Path, out: Path, variant: str, **train) -> Trainer:
    store, dataset = FeatureStore.open(store_path), Dataset.load(dataset_path)
    channels, fc_dim = store_layers(store)
    model = CaptionerConfig(
        vocab_size=len(dataset.vocabulary),
        variant=variant,
        layer_channels=channels,
        fc_dim=fc_dim,
        **TINY_MODEL,
    )
    data = CaptionData(
        vocabulary=dataset.vocabulary.to_dict(),
        train=dataset.encoded_captions("train"),
    )
    config = TrainConfig(videos_per_batch=2, captions_per_video=2, **train)
    return Trainer(store, data, model, config, out)


@pytest.mark.parametrize("variant", ["soft", "hard"])
def test_killed_and_resumed_run_ends_with_the_same_parameters(tiny_corpus, tmp_path, variant):
    store, dataset = tiny_corpus()
    settings = {"max_epochs": 2, "checkpoint_every": 2, "lr_schedule": "cosine"}
    reference = _trainer(store, dataset, tmp_path / "a", variant, **settings)
    reference.run()

    crashed = _trainer(store, dataset, tmp_path / "b", variant, **settings)
    real_step, calls = crashed.train_step, []

    def dying_step(*args):
        calls.append(1)
        if len(calls) == 5:  # mid-epoch (6 batches per epoch), one step after a checkpoint
            raise KeyboardInterrupt("killed")
        return real_step(*args)

    crashed.train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    assert load_checkpoint(tmp_path / "b" / "last.pt")["state"]["step"] == 4

    resumed = _trainer(store, dataset, tmp_path / "b", variant, **settings)
    resumed.resume(tmp_path / "b" / "last.pt")
    state = resumed.run()
    assert state.step == reference.state.step == 12
    for (name, expected), actual in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual), name
    # And the parameters did move: the comparison is not between two untouched models.
    untouched = _trainer(store, dataset, tmp_path / "c", variant, **settings)
    assert not torch.equal(untouched.model.output.weight, resumed.model.output.weight)


def test_checkpoint_is_self_describing_and_mismatches_are_refused(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus(seed=0)
    trainer = _trainer(store, dataset, tmp_path / "run", "pool4", max_epochs=1)
    trainer.run()
    payload = load_checkpoint(tmp_path / "run" / "last.pt")
    assert CaptionerConfig.from_dict(payload["model_config"]) == trainer.model_config
    assert payload["vocabulary"] == Dataset.load(dataset).vocabulary.to_dict()
    assert payload["store_schema"]["weights"] == {"sha256": None, "seed": 0}
    assert {"optimizer", "random", "state", "model"} <= set(payload)

    other_store, _ = tiny_corpus(seed=1)  # same shapes, other weights
    stranger = _trainer(other_store, dataset, tmp_path / "run", "pool4", max_epochs=1)
    wrong = r"store weights: 'random\(seed=0\)' in the checkpoint, 'random\(seed=1\)' in the store"
    with pytest.raises(TrainingError, match=wrong):
        stranger.resume(tmp_path / "run" / "last.pt")
    # A checkpoint of before structured weights holds their string form: it still resumes.
    payload["store_schema"]["weights"] = "random(seed=0)"
    torch.save(payload, tmp_path / "old.pt")
    _trainer(store, dataset, tmp_path / "again", "pool4", max_epochs=1).resume(tmp_path / "old.pt")
    bigger = _trainer(store, dataset, tmp_path / "run", "pool5", max_epochs=1)
    with pytest.raises(TrainingError, match="model config"):
        bigger.resume(tmp_path / "run" / "last.pt")


def test_missing_features_refused_before_training(tiny_corpus, tmp_path):
    _, dataset = tiny_corpus(n_videos=6)
    small_store, _ = tiny_corpus(n_videos=3, seed=1)
    with pytest.raises(TrainingError, match=r"3 training video.*no features.*v3"):
        _trainer(small_store, dataset, tmp_path / "run", "soft")


def _params(tmp_path: Path, **train) -> Path:
    path = tmp_path / "params.yaml"
    model = {**TINY_MODEL, "dropout": 0.0}
    path.write_text(yaml.safe_dump({"model": model, "train": train}))
    return path


def test_cli_trains_logs_and_refuses_to_overwrite(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus(splits=("train", "train", "val"))
    params = _params(tmp_path, videos_per_batch=2, captions_per_video=3, max_epochs=2)
    args = ["--store", str(store), "--dataset", str(dataset), "--out", str(tmp_path / "run")]
    args += ["--variant", "soft", "--params", str(params)]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (tmp_path / "run/metrics/train.jsonl").open()]
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert all(s["loss"] > 0 for s in steps)
    validations = [json.loads(line) for line in (tmp_path / "run/metrics/val.jsonl").open()]
    assert [v["epoch"] for v in validations] == [1, 2]
    assert all(isinstance(v["CIDEr"], float) for v in validations)
    assert (tmp_path / "run/best.pt").is_file()

    again = CliRunner().invoke(train_cli, args)
    assert again.exit_code == 1 and "--resume" in again.output
    # --resume where nothing was saved is an error, never a silent fresh start.
    empty = ["--out", str(tmp_path / "nothing")]
    nothing = CliRunner().invoke(train_cli, [*args[:4], *empty, *args[6:], "--resume"])
    assert nothing.exit_code == 1 and "holds no checkpoint (last.pt)" in nothing.output
    assert not (tmp_path / "nothing" / "metrics").exists()
    unknown = tmp_path / "bad.yaml"
    unknown.write_text("train:\n  learning_rat: 0.1\n")
    bad = CliRunner().invoke(train_cli, [*args[:-2], "--params", str(unknown)])
    assert bad.exit_code == 1 and "learning_rat" in bad.output


def test_resume_or_restart_continues_only_unfinished_runs(tiny_corpus, tmp_path):
    """What `dvc repro` relies on: a rerun means something changed, unless the run was cut."""
    store, dataset = tiny_corpus()
    run = tmp_path / "run"
    params = _params(tmp_path, videos_per_batch=2, captions_per_video=2, max_epochs=1)
    args = ["--store", str(store), "--dataset", str(dataset), "--out", str(run)]
    args += ["--variant", "pool5", "--params", str(params), "--resume-or-restart"]

    cut = CliRunner().invoke(train_cli, [*args, "--max-steps", "2"])  # stopped: max steps
    assert cut.exit_code == 0, cut.output
    # Same settings but "max steps" is a finish too: changing max_steps is a change.
    finished = CliRunner().invoke(train_cli, args)
    assert finished.exit_code == 0, finished.output
    assert "finished (max steps)" in finished.output and "from scratch" in finished.output
    steps = [json.loads(line)["step"] for line in (run / "metrics/train.jsonl").open()]
    assert steps == list(range(1, len(steps) + 1))  # one fresh log, not appended to

    # Killed mid-run: last.pt says not stopped; the rerun resumes it.
    payload = load_checkpoint(run / "last.pt")
    payload["state"].update(stopped="", epoch=0, batch=1, step=1)
    torch.save(payload, run / "last.pt")
    resumed = CliRunner().invoke(train_cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert "from scratch" not in resumed.output
    assert load_checkpoint(run / "last.pt")["state"]["step"] == len(steps)

    # Unfinished but with other settings: restarted.
    payload = load_checkpoint(run / "last.pt")
    payload["state"].update(stopped="", epoch=0, batch=1, step=1)
    torch.save(payload, run / "last.pt")
    other = _params(tmp_path / "run", videos_per_batch=2, captions_per_video=2, max_epochs=1,
                    learning_rate=0.01)  # fmt: skip
    changed = CliRunner().invoke(train_cli, [*args[:-2], str(other), "--resume-or-restart"])
    assert changed.exit_code == 0, changed.output
    assert "training settings differ" in changed.output
    assert (run / "curves/train.csv").read_text().startswith("step,epoch,loss")


def test_trainer_standardises_fc7_with_the_training_videos(tiny_corpus, tmp_path):
    from astar.train.data import FeatureSource
    from astar.train.loop import fc7_vectors

    store, dataset = tiny_corpus(splits=("train", "train", "val"))
    trainer = _trainer(store, dataset, tmp_path / "run", "fc7", max_steps=1)
    trainer.run()  # a fresh run sets them before its first step
    train_ids = sorted(Dataset.load(dataset).encoded_captions("train"))
    vectors = fc7_vectors(FeatureSource(FeatureStore.open(store), ()), train_ids)  # (n, D)
    assert vectors.shape[0] == len(train_ids) == 4
    torch.testing.assert_close(trainer.model.fc7_mean, vectors.mean(0))
    torch.testing.assert_close(trainer.model.fc7_std, vectors.std(0))
    resumed = _trainer(store, dataset, tmp_path / "run", "fc7", max_steps=1)
    assert torch.equal(resumed.model.fc7_mean, torch.zeros_like(resumed.model.fc7_mean))
    resumed.resume(tmp_path / "run" / "last.pt")  # the statistics come with the checkpoint
    assert torch.equal(resumed.model.fc7_mean, trainer.model.fc7_mean)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_loss_trajectory(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus(n_videos=8)
    common = ["--store", str(store), "--dataset", str(dataset), "--variant", "soft"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    single = tmp_path / "single"
    params = _params(tmp_path, videos_per_batch=4, captions_per_video=2, max_steps=5)
    subprocess.run(
        [sys.executable, "-m", "astar.train.cli", *common, "--out", str(single)]
        + ["--params", str(params), "--device", "cpu"],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    double = tmp_path / "double"
    (tmp_path / "two").mkdir()
    params = _params(tmp_path / "two", videos_per_batch=2, captions_per_video=2, max_steps=5)
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        + ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
        + ["-m", "astar.train.cli", *common, "--out", str(double), "--params", str(params)]
        + ["--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics/train.jsonl").open()]

    one, two = losses(single), losses(double)
    assert len(one) == len(two) == 5
    assert one[0] != one[-1]  # training moved
    assert two == pytest.approx(one, rel=1e-4)
    assert json.loads((double / "config.json").read_text())["world_size"] == 2


def test_cli_word_vectors_none_or_a_file(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus()
    params = _params(tmp_path, videos_per_batch=2, captions_per_video=2, max_steps=1)
    args = ["--store", str(store), "--dataset", str(dataset), "--variant", "fc7"]
    args += ["--params", str(params)]
    vectors = tmp_path / "glove.txt"
    vectors.write_text("red " + " ".join(["0.5"] * 8) + "\nball " + " ".join(["-0.25"] * 8) + "\n")
    result = CliRunner().invoke(
        train_cli, [*args, "--out", str(tmp_path / "a"), "--word-vectors", str(vectors)]
    )
    assert result.exit_code == 0, result.output
    assert "2/13 vocabulary rows found" in result.output
    missing = CliRunner().invoke(
        train_cli, [*args, "--out", str(tmp_path / "b"), "--word-vectors", "absent.bin"]
    )
    assert missing.exit_code == 2 and "absent.bin" in missing.output


# ---- non-finite steps, checkpoints and validations ------------------------------------------


def _train_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics/train.jsonl").open()]


def test_a_diverging_run_stops_with_a_clear_error_and_no_nonfinite_checkpoint(
    tiny_corpus, tmp_path
):
    store, dataset = tiny_corpus()
    run = tmp_path / "run"
    trainer = _trainer(store, dataset, run, "soft", learning_rate=1e30, max_epochs=3,
                       max_nonfinite_steps=3, checkpoint_every=1)  # fmt: skip
    with pytest.raises(TrainingError, match="non-finite") as stopped:
        trainer.run()
    steps = _train_log(run)
    first_bad = next(s["step"] for s in steps if s["skipped"])
    assert [s["skipped"] for s in steps] == [False] * (first_bad - 1) + [True] * 3
    message = str(stopped.value)
    assert f"3 non-finite training steps in a row, since step {first_bad}" in message
    assert "learning_rate (now 1e+30)" in message
    state = trainer.state
    assert (state.skipped_steps, state.nonfinite_in_a_row) == (3, 3)
    assert state.step == len(steps) == first_bad + 2
    assert all(s["loss"] is None and s["grad_norm"] is None for s in steps if s["skipped"])
    assert nonfinite_tensors(trainer.model.state_dict()) == []  # skipped steps wrote nothing
    saved = torch.load(run / "last.pt", weights_only=True)  # checkpoint_every=1
    assert saved["state"]["step"] == state.step - 1 and nonfinite_tensors(saved["model"]) == []
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(saved["model"][name], value), name  # as the last good step left it
    assert not (run / "best.pt").exists()


def test_a_single_nonfinite_step_is_skipped_and_training_goes_on(tiny_corpus, tmp_path, caplog):
    store, dataset = tiny_corpus()
    run = tmp_path / "run"
    trainer = _trainer(store, dataset, run, "soft", max_steps=4)
    real_loss, calls = trainer.model.loss, []

    def loss_nan_once(*args):
        result = real_loss(*args)
        calls.append(1)
        if len(calls) == 2:  # through the graph, so that the gradients are NaN too
            nan = result.per_caption * math.nan
            return CaptionLoss(nan.mean(), nan, result.n_tokens)
        return result

    real_step, snapshots = trainer.train_step, []

    def snapshot():
        return copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()))

    def recording_step(*args):
        snapshots.append(snapshot())
        return real_step(*args)

    trainer.model.loss, trainer.train_step = loss_nan_once, recording_step
    state = trainer.run()
    snapshots.append(snapshot())
    assert (state.step, state.skipped_steps, state.nonfinite_in_a_row) == (4, 1, 0)
    (model_before, adam_before), (model_after, adam_after) = snapshots[1], snapshots[2]
    for name, value in model_before.items():  # parameters and normalisation statistics
        assert torch.equal(value, model_after[name]), name
    assert adam_before["state"].keys() == adam_after["state"].keys() != set()
    for index, moments in adam_before["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, adam_after["state"][index][key]), (index, key)
    # The steps before and after it did update.
    for before, after in ((0, 1), (2, 3)):
        weights = [snapshots[k][0]["output.weight"] for k in (before, after)]
        assert not torch.equal(*weights)
    steps = _train_log(run)
    assert [s["skipped"] for s in steps] == [False, True, False, False]
    assert steps[1]["loss"] is None and steps[1]["grad_norm"] is None
    assert all(s["loss"] > 0 and s["grad_norm"] > 0 for s in steps if not s["skipped"])
    assert "step 2 (epoch 0) skipped" in caplog.text
    assert load_checkpoint(run / "last.pt")["state"]["skipped_steps"] == 1


def test_a_checkpoint_with_nonfinite_parameters_is_never_written(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus()
    run = tmp_path / "run"
    trainer = _trainer(store, dataset, run, "pool4", max_steps=1)
    trainer.run()
    good = (run / "last.pt").read_bytes()
    with torch.no_grad():
        trainer.model.output.bias[3] = math.inf
    with pytest.raises(CheckpointError, match=r"last\.pt.*1 tensor\(s\): output\.bias$"):
        trainer.save("last.pt")
    assert (run / "last.pt").read_bytes() == good
    assert sorted(path.name for path in run.iterdir()) == ["curves", "last.pt", "metrics"]


def test_nan_validation_scores_never_become_best(tiny_corpus, tmp_path, caplog):
    store, dataset = tiny_corpus()
    run = tmp_path / "run"
    trainer = _trainer(store, dataset, run, "pool4", max_epochs=2)
    trainer.validate = lambda model: {"CIDEr": math.nan}
    state = trainer.run()
    assert (state.best_epoch, state.bad_validations) == (-1, 2)
    assert not (run / "best.pt").exists()
    assert "epoch 1: validation CIDEr is NaN" in caplog.text


def test_cli_reports_a_diverging_run_without_a_traceback(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus()
    params = _params(tmp_path, videos_per_batch=2, captions_per_video=2, max_epochs=2,
                     learning_rate=1e30, max_nonfinite_steps=2)  # fmt: skip
    args = ["--store", str(store), "--dataset", str(dataset), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(train_cli, [*args, "--variant", "soft", "--params", str(params)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a crash
    assert "Error: 2 non-finite training steps in a row" in result.output
    assert "lower learning_rate (now 1e+30)" in result.output
    assert "Traceback" not in result.output


def test_validation_without_any_caption_is_a_warning(tiny_corpus, tmp_path, monkeypatch, caplog):
    """Every validation caption empty (decoding no longer ends a caption before its first word,
    so here every caption decodes to no text): a warning, in the record and in the summary."""
    from astar.pipelines.vocab import Vocabulary

    monkeypatch.setattr(Vocabulary, "decode", lambda self, ids: "")
    store, dataset = tiny_corpus(splits=("train", "train", "val"))
    run = tmp_path / "run"
    params = _params(tmp_path, videos_per_batch=2, captions_per_video=2, max_epochs=1)
    args = ["--store", str(store), "--dataset", str(dataset), "--out", str(run)]
    result = CliRunner().invoke(train_cli, [*args, "--variant", "fc7", "--params", str(params)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (run / "metrics/val.jsonl").open()]
    assert record["n_videos"] == record["empty_captions"] == 2
    assert "epoch 1: validation captioned none of its 2 videos" in caplog.text
    assert "; 0 step(s) skipped as non-finite" in result.output
    assert "warning: 1 of 1 validation(s) gave every video an empty caption" in result.output


def test_cosine_schedule_and_layer_attention_entropy_are_logged(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus()
    trainer = _trainer(store, dataset, tmp_path / "run", "hard", max_epochs=2, lr_schedule="cosine")
    steps = 2 * len(trainer.sampler)
    assert trainer.learning_rate(0) == pytest.approx(2e-4)
    assert trainer.learning_rate(steps // 2) == pytest.approx(1e-4)
    assert trainer.learning_rate(steps) == pytest.approx(0.0, abs=1e-12)
    trainer.run()
    log = _train_log(tmp_path / "run")
    rates = [record["learning_rate"] for record in log]
    assert rates[0] == pytest.approx(2e-4) and rates == sorted(rates, reverse=True)
    assert rates[-1] < 0.1 * rates[0]
    # beta's entropy (nats): at most log L, the uniform choice over the L = 4 layers.
    entropies = [record["beta_entropy"] for record in log]
    assert all(0.0 < h <= math.log(4) + 1e-6 for h in entropies)
    constant = _trainer(store, dataset, tmp_path / "c", "fc7", max_epochs=1)
    assert {constant.learning_rate(k) for k in range(5)} == {2e-4}
    constant.run()
    assert all("beta_entropy" not in record for record in _train_log(tmp_path / "c"))
    with pytest.raises(TrainingError, match="lr_schedule"):
        _trainer(store, dataset, tmp_path / "d", "fc7", lr_schedule="linear")
