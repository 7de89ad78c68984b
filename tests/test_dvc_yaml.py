"""dvc.yaml as DVC reads it with the repository's params.yaml: the stages, commands and paths
that `dvc repro` would run, without running them (tests/test_pipeline.py runs them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _stages(tmp_path: Path, **models) -> dict:
    from configobj import ConfigObj
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True)
    config = ConfigObj(str(tmp_path / ".dvc" / "config"))
    config.merge(ConfigObj(str(ROOT / ".dvc" / "config")))  # the repository's parsing.list: append
    config.write()
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"].update(models)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with Repo(str(tmp_path)) as repo:
        return {stage.name: stage for stage in repo.index.stages}


def test_default_params_train_each_variant_with_seed_0():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["models"]["seeds"] == [0]


def test_every_variant_is_trained_and_evaluated_with_every_seed(tmp_path: Path):
    stages = _stages(tmp_path, variants=["fc7", "soft"], seeds=[0, 7])
    pairs = [(v, s) for v in ("fc7", "soft") for s in (0, 7)]
    for stage in ("train", "evaluate"):
        assert sorted(n for n in stages if n.startswith(stage + "@")) == sorted(
            f"{stage}@{v}-{s}" for v, s in pairs
        )
    train = stages["train@soft-7"]
    assert "--variant soft --seed 7 " in train.cmd
    assert "--out out/demo/runs/soft/seed7 --resume-or-restart" in train.cmd
    assert {str(out) for out in train.outs} >= {
        "out/demo/runs/soft/seed7/best.pt", "out/demo/runs/soft/seed7/curves/val.csv",
    }  # fmt: skip
    evaluate = stages["evaluate@fc7-0"]
    assert "--checkpoint out/demo/runs/fc7/seed0/best.pt" in evaluate.cmd
    assert "--out out/demo/eval/fc7/seed0 " in evaluate.cmd
    metrics = [out for out in evaluate.outs if out.metric]
    assert [str(out) for out in metrics] == ["out/demo/eval/fc7/seed0/metrics.json"]
    report = stages["report"].cmd
    assert "--variants fc7 --variants soft --seeds 0 --seeds 7 " in report


@pytest.mark.parametrize("seeds", [[0], [3]])
def test_one_seed_gives_one_stage_per_variant(tmp_path: Path, seeds: list[int]):
    stages = _stages(tmp_path, variants=["hard"], seeds=seeds)
    assert [n for n in stages if "@" in n] == [
        f"train@hard-{seeds[0]}",
        f"evaluate@hard-{seeds[0]}",
    ]
