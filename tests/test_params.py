"""Params files and flags of train-captioner, checked by type and range (astar.train.params)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml
from click.testing import CliRunner

from astar.train.cli import main as train_cli
from astar.train.loop import TrainConfig
from astar.train.model import CaptionerConfig
from astar.train.params import (
    RULES,
    ParamsError,
    at_least,
    check_value,
    field_types,
    read_params,
    read_section,
)
from astar.train.run import build_model_config

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8, "samples": 3, "dropout": 0.0}


def _invoke(tmp_path: Path, *args: str, store: Path | None = None, dataset: Path | None = None):
    """train-captioner, by default on empty store/dataset folders: what a params file or flag
    gets wrong is refused before either is opened."""
    for folder in ("store", "dataset"):
        (tmp_path / folder).mkdir(exist_ok=True)
    store, dataset = store or tmp_path / "store", dataset or tmp_path / "dataset"
    paths = ["--store", str(store), "--dataset", str(dataset), "--out", str(tmp_path / "run")]
    return CliRunner().invoke(train_cli, [*paths, *args])


def _clean_error(result, code: int = 1) -> str:
    """The output of a refused run: an exit code, one Error: line and no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no crash
    assert "Traceback" not in result.output
    return result.output


# --------------------------------------------------------------------------------------------
# Bad values in a params file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  learning_rate: fast\n",
            'train.learning_rate: expected a number > 0, got "fast"',
        ),
        ('train:\n  max_epochs: "3"\n', 'train.max_epochs: expected an integer >= 1, got "3"'),
        ('model:\n  hidden_dim: "big"\n', 'model.hidden_dim: expected an integer >= 1, got "big"'),
        ("train: [1, 2]\n", "train: expected a mapping of TrainConfig fields, got [1, 2]"),
        ("model: 3\n", "model: expected a mapping of CaptionerConfig fields, got 3"),
        ("train:\n  max_epochs: 2.5\n", "train.max_epochs: expected an integer >= 1, got 2.5"),
        ("train:\n  learning_rate: -1\n", "train.learning_rate: expected a number > 0, got -1"),
        ("train:\n  learning_rate: 0\n", "train.learning_rate: expected a number > 0, got 0"),
        ("train:\n  learning_rate: .nan\n", "train.learning_rate: expected a number > 0, got NaN"),
        ("train:\n  learning_rate: 1e-3\n", '"1e-3" (text to YAML: write 1.0e-3)'),
        ("train:\n  max_epochs: true\n", "train.max_epochs: expected an integer >= 1, got true"),
        ("train:\n  max_epochs:\n", "train.max_epochs: expected an integer >= 1, got null"),
        ("train:\n  max_steps: 0\n", "train.max_steps: expected an integer >= 1, or null, got 0"),
        ("train:\n  seed: -1\n", "train.seed: expected an integer >= 0 (of 64 bits), got -1"),
        ("train:\n  checkpoint_every: -5\n", "train.checkpoint_every: expected an integer >= 0"),
        ("train:\n  precision: fp16\n", 'train.precision: expected one of "fp32", "bf16", "auto"'),
        ("train:\n  lr_schedule: linear\n", 'expected one of "constant", "cosine", got "linear"'),
        ("train:\n  metric: BLEU\n", 'train.metric: expected one of "CIDEr", "BLEU-4", "ROUGE_L"'),
        ("train:\n  device: gpu\n", "train.device: expected a device such as cpu, cuda or cuda:1"),
        ("model:\n  dropout: 1\n", "model.dropout: expected a number in [0, 1), got 1"),
        ("model:\n  dropout: -0.1\n", "model.dropout: expected a number in [0, 1), got -0.1"),
        ("model:\n  dropout: false\n", "model.dropout: expected a number in [0, 1), got false"),
        ("model:\n  init_range: 0\n", "model.init_range: expected a number > 0, got 0"),
        ("model:\n  feature_dim: 0\n", "model.feature_dim: expected an integer >= 1, or null"),
        ("model:\n  fc7_norm: zscore\n", 'model.fc7_norm: expected one of "standardize", "none"'),
        ("model:\n  hard_inference: [argmax]\n", 'got ["argmax"]'),
        ("model:\n  samples: 0\n", "model.samples: expected an integer >= 1, got 0"),
        ("- 1\n", "expected a mapping at the top level, got [1]"),
        ("train:\n  learning_rat: 0.1\n", "unknown keys in 'train': learning_rat"),
        ("train:\n  max_epochs: [3\n", "cannot read params"),
    ],
)
def test_bad_params_are_refused_naming_file_key_and_value(tmp_path, text, message):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    output = _clean_error(_invoke(tmp_path, "--params", str(params)))
    assert f"Error: {params}: " in output
    assert message in output
    assert not (tmp_path / "run").exists()


def test_a_params_file_that_is_not_utf8_names_its_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"train:\n  metric: CIDEr\xff\n")
    output = _clean_error(_invoke(tmp_path, "--params", str(params)))
    assert f"Error: {params}, line 2: not UTF-8 (byte 0xff at column 16)" in output


def test_the_command_line_reports_without_a_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  learning_rate: fast\n")
    (tmp_path / "store").mkdir()
    (tmp_path / "dataset").mkdir()
    command = [sys.executable, "-m", "astar.train.cli", "--store", str(tmp_path / "store")]
    command += ["--dataset", str(tmp_path / "dataset"), "--out", str(tmp_path / "run")]
    result = subprocess.run(
        [*command, "--params", str(params)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f'Error: {params}: train.learning_rate: expected a number > 0, got "fast"'
    )


# --------------------------------------------------------------------------------------------
# Flags that set the same fields


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "'--epochs': expected an integer >= 1, got 0"),
        (["--epochs", "2.5"], "'--epochs': expected an integer >= 1, got 2.5"),
        (["--max-steps", "0"], "'--max-steps': expected an integer >= 1, got 0"),
        (["--max-steps", "-3"], "'--max-steps': expected an integer >= 1, got -3"),
        (["--seed", "-1"], "'--seed': expected an integer >= 0 (of 64 bits), got -1"),
        (["--seed", "x"], "'--seed': expected an integer >= 0 (of 64 bits), got x"),
        (["--device", "gpu"], "'--device': expected a device such as cpu, cuda or cuda:1"),
    ],
)
def test_bad_flags_are_refused_by_the_same_rules(tmp_path, flags, message):
    output = _clean_error(_invoke(tmp_path, *flags), code=2)
    assert message in output


# --------------------------------------------------------------------------------------------
# Good files


def test_the_repository_params_file_validates():
    path = REPO / "params.yaml"
    params = read_params(path)
    train = read_section(params, "train", TrainConfig, path)
    model = read_section(params, "model", CaptionerConfig, path)
    assert train["max_epochs"] == params["train"]["max_epochs"] and train
    config = TrainConfig(**train)
    assert isinstance(config.learning_rate, float)
    channels = {"pool2": 16, "pool3": 32, "pool4": 64, "pool5": 64}
    build_model_config(params["preset"], "soft", 50, channels, 512, model)


def test_values_are_converted_as_the_fields_take_them(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  learning_rate: 1\n  max_steps: null\n  device: cpu\nmodel:\n")
    params = read_params(path)
    train = read_section(params, "train", TrainConfig, path)
    assert train == {"learning_rate": 1.0, "max_steps": None, "device": "cpu"}
    assert type(train["learning_rate"]) is float  # an int is a fine float, and becomes one
    assert read_section(params, "model", CaptionerConfig, path) == {}  # a bare "model:"
    assert read_section({}, "train", TrainConfig, None) == {}


def test_types_of_annotations(tmp_path):
    """Every kind of annotation a config field may have, beyond those the configs use today."""
    assert check_value([1, 2], tuple[int, ...], at_least(1), "f: x") == (1, 2)
    assert check_value([1, "a"], tuple[int, str], None, "f: x") == (1, "a")
    assert check_value([0.5, 2], list[float], None, "f: x") == [0.5, 2.0]
    assert check_value({"pool5": 8}, dict[str, int], at_least(1), "f: x") == {"pool5": 8}
    assert check_value(None, list[int] | None, None, "f: x") is None
    assert check_value(True, bool, None, "f: x") is True
    assert check_value("sample", Literal["argmax", "sample"], None, "f: x") == "sample"
    refused = [
        ([1, 0], tuple[int, ...], at_least(1), "a list, each item an integer >= 1"),
        ([1], tuple[int, str], None, "a list of 2: an integer, a string"),
        ("1, 2", list[int], None, "a list, each item an integer"),
        ({"pool5": 0}, dict[str, int], at_least(1), "each value an integer >= 1"),
        ({1: 8}, dict[str, int], None, "a mapping, each key a string"),
        (True, int, None, "an integer"),  # bool is an int to Python, never here
        (True, float, None, "a number"),
        (1, bool, None, "true or false"),
        (1, Literal["1", "2"], None, 'one of "1", "2"'),
        (0, int | None, at_least(1), "an integer >= 1, or null"),
    ]
    for value, hint, rule, expected in refused:
        with pytest.raises(ParamsError, match=r"^f: x: expected ") as error:
            check_value(value, hint, rule, "f: x")
        assert expected in error.value.message, (value, hint)


@pytest.mark.parametrize("cls", [TrainConfig, CaptionerConfig])
def test_every_number_or_text_field_has_a_rule(cls):
    """A new field with no range or choices would take any value: give it one in RULES."""
    for name, hint in field_types(cls).items():
        base = {int | None: int, str | None: str}.get(hint, hint)
        if base in (int, float, str):
            assert name in RULES[cls], f"{cls.__name__}.{name} has no rule in RULES"


def test_valid_params_still_train(tiny_corpus, tmp_path):
    store, dataset = tiny_corpus()
    params = tmp_path / "params.yaml"
    train = {"videos_per_batch": 2, "captions_per_video": 2, "learning_rate": 1, "max_steps": 2}
    params.write_text(yaml.safe_dump({"train": train, "model": TINY_MODEL, "other": [1, "x"]}))
    result = CliRunner().invoke(
        train_cli,
        ["--store", str(store), "--dataset", str(dataset), "--out", str(tmp_path / "run")]
        + ["--params", str(params), "--variant", "soft", "--seed", "3", "--epochs", "2"],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["train"]["learning_rate"] == 1.0 and saved["train"]["seed"] == 3
    assert saved["train"]["max_epochs"] == 2 and saved["train"]["max_steps"] == 2
    assert saved["model"]["hidden_dim"] == 16


def test_errors_of_the_config_classes_still_surface_cleanly(tiny_corpus, tmp_path):
    """What spans several fields is the config's own check: still one Error: line."""
    store, dataset = tiny_corpus()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "samples": 1}}))
    args = ["--params", str(params), "--variant", "hard"]
    output = _clean_error(_invoke(tmp_path, *args, store=store, dataset=dataset))
    assert "Error: invalid captioner config: hard attention needs samples K >= 2" in output
    params.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "eos_id": 10_000}}))
    output = _clean_error(_invoke(tmp_path, "--params", str(params), store=store, dataset=dataset))
    assert "must hold distinct pad_id 0 and eos_id 10000" in output
