"""dvc.yaml as DVC reads it with the repository's params.yaml: the stages, commands and paths
that `dvc repro` would run, without running them (tests/test_pipeline.py runs them); and each
stage's code deps against what its command imports."""

from __future__ import annotations

import configparser
import shlex
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml
from import_graph import FOLDERS, closure, files_of, folder_of

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


def _console_scripts() -> dict[str, str]:
    """Console script -> the module of its entry point, from setup.cfg [options.entry_points]."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = {}
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = line.split("=", 1)
        scripts[name.strip()] = target.split(":")[0].strip()
    return scripts


def _covers(dep: Path, path: Path) -> bool:
    return dep == path or dep in path.parents


def _code_dep_problems(stage: str, cmd: str, deps: Iterable[str]) -> list[str]:
    """What is wrong with a stage's code deps (those under a package folder): a listed path
    that does not exist, a module its command imports (transitively) that no dep covers, a
    listed path that none of those modules lies in. Data deps and params are not looked at."""
    script = shlex.split(cmd)[0]
    module = _console_scripts().get(script)
    if module is None:
        return [f"{stage}: runs {script}, which is not a console script of setup.cfg"]
    code = [Path(dep) for dep in deps if Path(dep).parts[0] in FOLDERS]
    problems = [
        f"{stage}: lists {dep}, which does not exist" for dep in code if not (ROOT / dep).exists()
    ]
    touched = {path.relative_to(ROOT) for path in files_of(closure(module))}
    for path in sorted(touched):
        if not any(_covers(dep, path) for dep in code):
            problems.append(
                f"{stage}: {script} ({module}) imports {path} and no dep covers it: "
                f"add the folder {path.parts[0]}"
            )
    for dep in code:
        if (ROOT / dep).exists() and not any(_covers(dep, path) for path in touched):
            problems.append(f"{stage}: lists {dep}, which {script} does not import")
    return problems


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    return _stages(tmp_path_factory.mktemp("dvc"))


def test_every_stage_depends_on_exactly_the_code_its_command_imports(stages):
    problems = []
    for name, stage in stages.items():
        problems += _code_dep_problems(name, stage.cmd, [dep.def_path for dep in stage.deps])
    assert not problems, "\n".join(problems)


def test_code_deps_are_whole_package_folders(stages):
    """A folder cannot drift as files move inside it; the check above would catch a file list
    going stale, but only after it had."""
    for name, stage in stages.items():
        code = [dep.def_path for dep in stage.deps if Path(dep.def_path).parts[0] in FOLDERS]
        assert code and all(dep in FOLDERS for dep in code), (name, code)
        assert code == sorted(code, key=FOLDERS.index), f"{name}: list them in layer order"


def test_the_code_dep_check_catches_a_missing_an_absent_and_an_extra_dep(stages):
    prepare = stages["prepare"]
    touched = {folder_of(module) for module in closure(_console_scripts()["prepare-dataset"])}
    assert touched == {"pipelines"}  # prepare-dataset imports nothing above its own folder
    deps = ["data/raw/demo", "pipelines/datasets.py", "evaluate"]
    problems = _code_dep_problems("prepare", prepare.cmd, deps)
    assert "prepare: lists pipelines/datasets.py, which does not exist" in problems
    assert "prepare: lists evaluate, which prepare-dataset does not import" in problems
    assert any("imports pipelines/cli.py and no dep covers it" in p for p in problems)
    assert _code_dep_problems("x", "no-such-command --out y", []) == [
        "x: runs no-such-command, which is not a console script of setup.cfg"
    ]
