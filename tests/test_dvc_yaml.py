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


def _py_files(path: Path) -> set[Path]:
    """The .py files at or under ``path`` (relative to the repository)."""
    if (ROOT / path).is_file():
        return {path} if path.suffix == ".py" else set()
    return {p.relative_to(ROOT) for p in (ROOT / path).rglob("*.py")}


def _coarsest(folder: Path, touched: set[Path]) -> list[str]:
    """The fewest paths under ``folder`` that cover exactly the files of it in ``touched``: the
    folder itself when every .py file under it is touched, else its touched files and the
    coarsest cover of each subfolder, sorted by name."""
    files = _py_files(folder)
    if not files & touched:
        return []
    if files <= touched:
        return [folder.as_posix()]
    found = []
    for entry in sorted((ROOT / folder).iterdir(), key=lambda entry: entry.name):
        path = entry.relative_to(ROOT)
        if entry.is_dir():
            found += _coarsest(path, touched)
        elif path in touched:
            found.append(path.as_posix())
    return found


def _imported_files(module: str) -> set[Path]:
    return {path.relative_to(ROOT) for path in files_of(closure(module))}


def code_deps(module: str) -> list[str]:
    """A command's code deps, as dvc.yaml lists them: exactly the files its module imports
    (transitively), a whole folder (or subfolder) where it imports every .py file of it; in layer
    order (FOLDERS), sorted by name within a folder."""
    touched = _imported_files(module)
    return [dep for folder in FOLDERS for dep in _coarsest(Path(folder), touched)]


def _paste(stage: str, deps: Iterable[str]) -> str:
    """The YAML lines of a stage's code deps, indented as in dvc.yaml, to paste there."""
    lines = "".join(f"\n      - {dep}" for dep in deps)
    head = f"{stage}: its code deps should be, in place of the listed ones (after its data deps):"
    return head + lines


def _code_dep_problems(stage: str, cmd: str, deps: Iterable[str]) -> list[str]:
    """What is wrong with a stage's code deps (those under a package folder): a listed path
    that does not exist, a module its command imports (transitively) that no dep covers, a
    listed path that none of those modules lies in, a listed folder holding a .py file the command
    does not import, and a list that covers the right files but is not ``code_deps`` (a folder
    listed file by file, another order, a path twice). If any, the last entry is the YAML lines
    to paste in their place. Data deps and params are not looked at."""
    script = shlex.split(cmd)[0]
    module = _console_scripts().get(script)
    if module is None:
        return [f"{stage}: runs {script}, which is not a console script of setup.cfg"]
    code = [Path(dep) for dep in deps if Path(dep).parts[0] in FOLDERS]
    problems = [
        f"{stage}: lists {dep}, which does not exist" for dep in code if not (ROOT / dep).exists()
    ]
    touched = _imported_files(module)
    for path in sorted(touched):
        if not any(_covers(dep, path) for dep in code):
            problems.append(f"{stage}: {script} ({module}) imports {path} and no dep covers it")
    for dep in code:
        if not (ROOT / dep).exists():
            continue
        if not any(_covers(dep, path) for path in touched):
            problems.append(f"{stage}: lists {dep}, which {script} does not import")
        elif unimported := sorted(_py_files(dep) - touched):
            problems.append(
                f"{stage}: lists {dep}, which holds "
                f"{', '.join(str(path) for path in unimported)} that {script} does not import"
            )
    expected = code_deps(module)
    if not problems and [dep.as_posix() for dep in code] != expected:
        problems.append(
            f"{stage}: its code deps cover the right files, but not as code_deps lists them "
            "(a folder whose every file is imported, layer order, sorted, once each)"
        )
    if problems:
        problems.append(_paste(stage, expected))
    return problems


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> dict:
    return _stages(tmp_path_factory.mktemp("dvc"))


def test_every_stage_depends_on_exactly_the_code_its_command_imports(stages):
    """Each stage's code deps are code_deps of its command: a stale list, a missing or an extra
    file and a folder with a file the command does not import all fail, and the message gives the
    lines to paste into dvc.yaml (once for a matrix's stages, under the name dvc.yaml gives)."""
    problems = {}
    for name, stage in stages.items():
        deps = [dep.def_path for dep in stage.deps]
        problems.update(dict.fromkeys(_code_dep_problems(name.split("@")[0], stage.cmd, deps)))
    if problems:  # also on stdout, where pytest shows it verbatim (no "E" before each line)
        print("\n".join(problems))
    assert not problems, "\n".join(problems)


def test_code_deps_are_the_coarsest_exact_cover():
    prepare = code_deps(_console_scripts()["prepare-dataset"])
    # prepare-dataset imports all of pipelines/datasets, not pipelines/metrics.py: the subfolder
    # is one dep, the rest of pipelines file by file
    assert "pipelines/datasets" in prepare and "pipelines" not in prepare
    assert not any(dep.startswith("pipelines/datasets/") for dep in prepare)
    assert "pipelines/metrics.py" not in prepare
    for script, module in _console_scripts().items():
        deps, touched = code_deps(module), _imported_files(module)
        assert deps, script
        covered = set().union(*(_py_files(Path(dep)) for dep in deps))
        assert covered == touched, script  # exactly the closure
        for dep in deps:  # and coarsest: no listed path's folder could stand for it
            parent = Path(dep).parent
            assert parent == Path(".") or not _py_files(parent) <= touched, (script, dep)
        assert deps == sorted(
            deps, key=lambda dep: (FOLDERS.index(Path(dep).parts[0]), Path(dep).parts)
        ), script  # layer order, then by name


def test_the_code_dep_check_catches_a_missing_an_absent_and_an_extra_dep(stages):
    prepare = stages["prepare"]
    prepare_module = _console_scripts()["prepare-dataset"]
    touched = {folder_of(module) for module in closure(prepare_module)}
    assert touched == {"pipelines"}  # prepare-dataset imports nothing above its own folder
    canonical = code_deps(prepare_module)
    assert _code_dep_problems("prepare", prepare.cmd, ["data/raw/demo", *canonical]) == []

    def problems_of(*code: str) -> list[str]:
        found = _code_dep_problems("prepare", prepare.cmd, ["data/raw/demo", *code])
        assert found[-1] == _paste("prepare", canonical)  # the lines to paste
        return found[:-1]

    missing = [dep for dep in canonical if dep != "pipelines/cli.py"]
    assert problems_of(*missing) == [
        "prepare: prepare-dataset (astar.pipelines.cli) imports pipelines/cli.py "
        "and no dep covers it"
    ]
    problems = problems_of(*canonical, "pipelines/datasets.py", "pipelines/metrics.py", "evaluate")
    assert problems == [
        "prepare: lists pipelines/datasets.py, which does not exist",
        "prepare: lists pipelines/metrics.py, which prepare-dataset does not import",
        "prepare: lists evaluate, which prepare-dataset does not import",
    ]
    unimported = sorted(_py_files(Path("pipelines")) - _imported_files(prepare_module))
    assert Path("pipelines/metrics.py") in unimported  # prepare-dataset scores no captions
    assert problems_of("pipelines") == [  # the whole folder: over-broad
        f"prepare: lists pipelines, which holds {', '.join(map(str, unimported))} "
        "that prepare-dataset does not import"
    ]
    datasets = sorted(str(path) for path in _py_files(Path("pipelines/datasets")))
    file_by_file = [
        f for dep in canonical for f in (datasets if dep == "pipelines/datasets" else [dep])
    ]
    for right_files in (file_by_file, canonical[::-1], [*canonical, canonical[0]]):
        assert problems_of(*right_files) == [
            "prepare: its code deps cover the right files, but not as code_deps lists them "
            "(a folder whose every file is imported, layer order, sorted, once each)"
        ]
    assert _code_dep_problems("x", "no-such-command --out y", []) == [
        "x: runs no-such-command, which is not a console script of setup.cfg"
    ]
