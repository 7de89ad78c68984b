"""The DVC pipeline (dvc.yaml + params.yaml) end to end on a tiny demo, through `dvc repro`.

The repository's own dvc.yaml, .dvc/config and code folders are copied into a scratch project
(a git repository of its own), and params.yaml is the repository's with smaller sizes, so what
runs is what users run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE = ("extract", "store", "train", "evaluate", "pipelines")
VARIANTS = ["fc7", "soft", "hard"]
SEED = 0  # models.seeds: [0], so the stages are train@VARIANT-0 and the folders VARIANT/seed0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the tokenizer need Java"),
    pytest.mark.skipif(shutil.which("git") is None, reason="the pipeline runs in a git checkout"),
]


def _dvc(project: Path, *args: str) -> str:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env["DVC_NO_ANALYTICS"] = "1"
    done = subprocess.run(
        [str(Path(bin_dir) / "dvc"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _tiny_params(project: Path, **train) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["demo"].update(n_train=8, n_val=2, n_test=2)  # a dozen videos
    params["models"].update(variants=VARIANTS, seeds=[SEED])
    params["train"].update(max_epochs=1, **train)
    params["evaluate"].update(beam=2, figures=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("pipeline")
    for name in CODE:
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "weights", project / "data" / "weights")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    subprocess.run(["git", "init", "-q", str(project)], check=True)  # as in the repository
    _dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    _tiny_params(project)
    return project


@pytest.fixture(scope="module")
def first_run(project: Path) -> str:
    return _dvc(project, "repro")


def test_repro_runs_every_stage_and_reports_numbers(project: Path, first_run: str) -> None:
    expected = {"demo", "prepare", "references", "extract", "report"}
    expected |= {f"{stage}@{v}-{SEED}" for stage in ("train", "evaluate") for v in VARIANTS}
    assert _ran(first_run) == expected
    report = json.loads((project / "out/demo/report/report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == [*VARIANTS, "leave one out", "most common caption"]
    for row in report["rows"]:
        for metric in report["metrics"]:
            assert isinstance(row[metric], float) and math.isfinite(row[metric]), (row, metric)
    table = (project / "out/demo/report/report.md").read_text().split("\n\n")[0].rstrip()
    assert table.count("\n") == 1 + len(names)
    assert [(run["name"], run["seed"]) for run in report["runs"]] == [(v, SEED) for v in VARIANTS]
    # Whatever one epoch on 8 videos learned, the flags and the warnings follow the numbers.
    floor = report["rows"][-1]["CIDEr"]
    flagged = [row["name"] for row in report["rows"][:-2] if row["CIDEr"] <= floor]
    assert [flag["name"] for flag in report["learned_nothing"]] == flagged
    for name in VARIANTS:
        warned = f"WARNING: {name} (seed {SEED}) CIDEr-D" in first_run
        assert warned == (name in flagged), name
        assert (f"| {name} ⚠ |" in table) == (name in flagged), table
    for variant in VARIANTS:
        evaluation = project / f"out/demo/eval/{variant}/seed{SEED}"
        metrics = json.loads((evaluation / "metrics.json").read_text())
        assert metrics["n_videos"] == 2 and metrics["n_missing"] == 0 and metrics["seed"] == SEED
        run = project / f"out/demo/runs/{variant}/seed{SEED}"
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == SEED
        curves = (run / "curves/val.csv").read_text().splitlines()
        assert curves[0].startswith("epoch,step") and len(curves) == 2
    pictures = list((project / f"out/demo/eval/soft/seed{SEED}/figures").glob("*.png"))
    assert len(pictures) == 1
    shown = _dvc(project, "metrics", "show", "--json")
    assert "CIDEr" in shown and "leave_one_out" in shown


def test_second_repro_does_nothing(project: Path, first_run: str) -> None:
    assert _ran(_dvc(project, "repro")) == set()
    assert "up to date" in _dvc(project, "status").lower()


def test_a_training_parameter_reruns_only_training_evaluation_and_report(
    project: Path, first_run: str
) -> None:
    _tiny_params(project, learning_rate=0.001)
    rerun = _ran(_dvc(project, "repro"))
    expected = {f"{stage}@{v}-{SEED}" for stage in ("train", "evaluate") for v in VARIANTS}
    assert rerun == expected | {"report"}
    # The runs were finished, so --resume-or-restart trained them again from scratch.
    for variant in VARIANTS:
        run = project / f"out/demo/runs/{variant}/seed{SEED}"
        config = json.loads((run / "config.json").read_text())
        assert config["train"]["learning_rate"] == 0.001
        assert len((run / "metrics/val.jsonl").read_text().splitlines()) == 1


def test_the_store_on_s3_through_params(tmp_path_factory, s3_bucket: str) -> None:
    """store_root: s3://... puts the pipeline's store on object storage: extraction writes it
    there (nothing on the local disk), training reads it, and DVC tracks it as an output."""
    pytest.importorskip("dvc_s3", reason="DVC needs dvc-s3 for outputs on S3")
    from astar.store import FeatureStore

    project = tmp_path_factory.mktemp("pipeline-s3")
    for name in CODE:
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "weights", project / "data" / "weights")
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    _dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    _tiny_params(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["store_root"] = f"s3://{s3_bucket}/astar"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    ran = _ran(_dvc(project, "repro", f"train@fc7-{SEED}"))
    assert {"extract", f"train@fc7-{SEED}"} <= ran
    store = FeatureStore.open(f"s3://{s3_bucket}/astar/demo/features")
    assert len(store) == 12 and store.verify() == []
    assert not (project / "out/demo/features").exists()
    config = json.loads((project / f"out/demo/runs/fc7/seed{SEED}/config.json").read_text())
    assert config["store"] == f"s3://{s3_bucket}/astar/demo/features"
    assert _ran(_dvc(project, "repro", f"train@fc7-{SEED}")) == set()  # tracked: up to date
