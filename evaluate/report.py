"""The results table of evaluated models, each trained with one or more seeds.

A model's row is the mean of its seeds' scores, with the sample standard deviation (n - 1) where
there are several, and every seed's scores are kept beside it. The reference rows come from
``score-references``. A model at or below the most common caption on CIDEr-D learned nothing
from the videos (a constant caption does as well), so the report flags it, its mean and each
seed alike.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from astar.pipelines.metrics import TABLE_METRICS

__all__ = [
    "Flag",
    "ModelRow",
    "Report",
    "ReportError",
    "Run",
    "build_report",
    "group_runs",
    "markdown_table",
    "report_from_files",
]

TABLE_HEADER = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")  # TABLE_METRICS as the paper names them
FLOOR_ROW = "most_common_caption"  # the reference row a model must beat to have learned anything
FLOOR_METRIC = "CIDEr"
MARKER = "⚠"


class ReportError(Exception):
    """The evaluations cannot make one table (e.g. the same model and seed twice)."""


@dataclass(frozen=True)
class Run:
    """One evaluation: a model trained with one seed."""

    name: str  # the model's row, e.g. the variant
    seed: int | None  # its training seed; None where unknown
    scores: dict[str, float]  # TABLE_METRICS, x 100
    source: str  # the metrics file it was read from


@dataclass(frozen=True)
class ModelRow:
    """A model's row: the runs of its seeds."""

    name: str
    runs: tuple[Run, ...]

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    @property
    def mean(self) -> dict[str, float]:
        return {m: statistics.fmean(run.scores[m] for run in self.runs) for m in TABLE_METRICS}

    @property
    def std(self) -> dict[str, float] | None:
        """Sample standard deviation (n - 1) of each metric over the seeds; None for one run."""
        if len(self.runs) < 2:
            return None
        return {m: statistics.stdev(run.scores[m] for run in self.runs) for m in TABLE_METRICS}


@dataclass(frozen=True)
class Flag:
    """A model, or one of its seeds, at or below the most common caption: it learned nothing."""

    name: str
    seeds: tuple[int | None, ...]  # one seed: that run; several: the mean over them
    score: float  # its CIDEr-D
    floor: float  # the most common caption's CIDEr-D

    @property
    def label(self) -> str:
        if len(self.seeds) > 1:
            return f"{self.name} (mean of seeds {', '.join(map(str, self.seeds))})"
        return self.name if self.seeds[0] is None else f"{self.name} (seed {self.seeds[0]})"

    def message(self) -> str:
        return (
            f"{self.label} CIDEr-D {self.score:.2f} <= most common caption {self.floor:.2f}: "
            "it learned nothing"
        )

    def to_dict(self) -> dict:
        seed = self.seeds[0] if len(self.seeds) == 1 else None
        return {"name": self.name, "seed": seed, "seeds": list(self.seeds),
                FLOOR_METRIC: self.score, FLOOR_ROW: self.floor}  # fmt: skip


def group_runs(runs: Iterable[Run]) -> list[ModelRow]:
    """One row per model name, in the order of first appearance, its runs in the given order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        group = groups.setdefault(run.name, [])
        clash = [
            other for other in group if None in (other.seed, run.seed) or other.seed == run.seed
        ]
        if clash:
            seed = "" if run.seed is None else f" seed {run.seed}"
            raise ReportError(
                f"{clash[0].source} and {run.source} are both '{run.name}'{seed}: the runs of a "
                "model need distinct, known seeds (or give them distinct names)"
            )
        group.append(run)
    return [ModelRow(name, tuple(group)) for name, group in groups.items()]


def _cell(value: float | None, spread: float | None = None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}" if spread is None else f"{value:.2f} ± {spread:.2f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


@dataclass(frozen=True)
class Report:
    models: list[ModelRow]
    references: list[tuple[str, dict[str, float | None]]]  # (row name, TABLE_METRICS), in order
    flags: list[Flag]  # the models' means and runs that learned nothing

    def _flagged(self, name: str, seeds: Iterable[int | None]) -> bool:
        seeds = tuple(seeds)
        return any(flag.name == name and flag.seeds == seeds for flag in self.flags)

    def _mean_flagged(self, model: ModelRow) -> bool:
        return self._flagged(model.name, model.seeds)

    def to_markdown(self) -> str:
        rows = []
        for model in self.models:
            mean, std = model.mean, model.std
            marker = f" {MARKER}" if self._mean_flagged(model) else ""
            cells = [_cell(mean[m], std[m] if std else None) for m in TABLE_METRICS]
            rows.append([model.name + marker, *cells])
        for name, values in self.references:
            rows.append([name.replace("_", " "), *(_cell(values.get(m)) for m in TABLE_METRICS)])
        lines = _table(("model", *TABLE_HEADER), rows)
        several = any(len(model.runs) > 1 for model in self.models)
        notes = []
        if several:
            seeds = {tuple(model.seeds) for model in self.models}
            over = (
                f"seeds {', '.join(map(str, seeds.pop()))}"
                if len(seeds) == 1
                else "its seeds (below)"
            )
            notes.append(
                f"A model's row: the mean ± sample standard deviation (n - 1) over {over}."
            )
        if self.flags:
            which = "; ".join(flag.label for flag in self.flags)
            notes.append(
                f"{MARKER} learned nothing: at or below the most common caption "
                f"(CIDEr-D {self.flags[0].floor:.2f}): {which}."
            )
        for note in notes:  # paragraphs of their own
            lines += ["", note]
        if several:
            per_seed = []
            for model in self.models:
                for run in model.runs:
                    marker = f" {MARKER}" if self._flagged(model.name, (run.seed,)) else ""
                    seed = "-" if run.seed is None else str(run.seed)
                    per_seed.append(
                        [model.name, seed + marker, *(_cell(run.scores[m]) for m in TABLE_METRICS)]
                    )
            lines += ["", "Each seed:", "", *_table(("model", "seed", *TABLE_HEADER), per_seed)]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        rows = []
        for model in self.models:
            rows.append({
                "name": model.name, **model.mean, "std": model.std, "seeds": model.seeds,
                "learned_nothing": self._mean_flagged(model),
            })  # fmt: skip
        for name, values in self.references:
            rows.append({"name": name.replace("_", " "), **values})
        runs = [
            {
                "name": model.name,
                "seed": run.seed,
                **run.scores,
                "metrics_file": run.source,
                "learned_nothing": self._flagged(model.name, (run.seed,)),
            }
            for model in self.models
            for run in model.runs
        ]
        return {
            "rows": rows,
            "runs": runs,
            "learned_nothing": [flag.to_dict() for flag in self.flags],
            "metrics": list(TABLE_METRICS),
            "scale": 100,
        }

    def warnings(self) -> list[str]:
        return [f"WARNING: {flag.message()}" for flag in self.flags]


def build_report(
    runs: Iterable[Run], references: Iterable[tuple[str, dict[str, float | None]]] = ()
) -> Report:
    """Group ``runs`` by model and flag what is at or below the ``most_common_caption`` reference
    row's CIDEr-D (no check without that row)."""
    models = group_runs(runs)
    references = [(name, {m: values.get(m) for m in TABLE_METRICS}) for name, values in references]
    floors = [v[FLOOR_METRIC] for name, v in references if name.replace(" ", "_") == FLOOR_ROW]
    flags = []
    if floors and floors[-1] is not None:
        floor = floors[-1]
        for model in models:
            if len(model.runs) > 1 and model.mean[FLOOR_METRIC] <= floor:
                flags.append(Flag(model.name, tuple(model.seeds), model.mean[FLOOR_METRIC], floor))
            for run in model.runs:
                if run.scores[FLOOR_METRIC] <= floor:
                    flags.append(Flag(model.name, (run.seed,), run.scores[FLOOR_METRIC], floor))
    return Report(models, references, flags)


def markdown_table(rows: list[dict]) -> str:
    """Rows of {"name", and the TABLE_METRICS} -> the paper-style Markdown table."""
    cells = ([row["name"], *(_cell(row.get(m)) for m in TABLE_METRICS)] for row in rows)
    return "\n".join(_table(("model", *TABLE_HEADER), cells)) + "\n"


# --------------------------------------------------------------------------------------------
# Reading evaluations from their folders

SEED_FOLDER = re.compile(r"seed(\d+)")  # VARIANT/seedS: the evaluation of one training seed


def _seed_files(folder: Path, seeds: tuple[int, ...]) -> list[Path]:
    """A variant's evaluations: FOLDER/seedS/metrics.json of ``seeds`` (default: every seedS
    sub-folder), or FOLDER/metrics.json itself where it is one evaluation."""
    if seeds:
        files = [folder / f"seed{seed}" / "metrics.json" for seed in seeds]
        absent = [str(file) for file in files if not file.is_file()]
        if absent:
            raise ReportError(f"no evaluation {', '.join(absent)}")
        return files
    if (folder / "metrics.json").exists():
        return [folder / "metrics.json"]
    found = [p for p in folder.glob("seed*/metrics.json") if SEED_FOLDER.fullmatch(p.parent.name)]
    found.sort(key=lambda p: int(p.parent.name[len("seed") :]))
    return found or [folder / "metrics.json"]  # reading it says what is missing


def _metrics_files(
    runs: tuple[Path, ...], variants: tuple[str, ...], seeds: tuple[int, ...] = ()
) -> list[Path]:
    """The metrics.json of each run, a folder of runs expanded into its sub-folders (and those
    into their seedS sub-folders)."""
    from astar.train.model import VARIANTS  # lazily: torch is slow to import

    files = []
    for run in runs:
        if not run.is_dir() or (run / "metrics.json").exists():
            files.append(run / "metrics.json" if run.is_dir() else run)
            continue
        if variants:
            names = list(variants)
        else:
            found = {p.parent.name for p in run.glob("*/metrics.json")}
            found |= {p.parent.parent.name for p in run.glob("*/seed*/metrics.json")}
            order = {name: index for index, name in enumerate(VARIANTS)}
            names = sorted(found, key=lambda name: (order.get(name, len(order)), name))
        if not names:
            raise ReportError(f"{run}: no metrics.json in it or its sub-folders")
        for name in names:
            files.extend(_seed_files(run / name, seeds))
    return files


def _read_run(path: Path) -> Run:
    """An evaluation's metrics file as a report Run (its seed: recorded, or from seedS/)."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: cannot read metrics: {error}") from error
    missing = [m for m in TABLE_METRICS if m not in metrics]
    if missing:
        raise ReportError(f"{path}: no {', '.join(missing)} in the metrics")
    folder = SEED_FOLDER.fullmatch(path.parent.name) if path.name == "metrics.json" else None
    seed = metrics.get("seed")
    if seed is None and folder:
        seed = int(folder.group(1))
    evaluation = path.parent.parent if folder else path.parent
    name = metrics.get("name") or (evaluation.name if path.name == "metrics.json" else path.stem)
    return Run(name, seed, {m: metrics[m] for m in TABLE_METRICS}, str(path))


def report_from_files(
    runs: Iterable[Path],
    references: Iterable[Path] = (),
    variants: Iterable[str] = (),
    seeds: Iterable[int] = (),
) -> Report:
    """The report of evaluation folders, metrics files or folders of evaluation folders (see
    ``report --help``), with the reference rows of the JSON files ``references``."""
    evaluations = [
        _read_run(path) for path in _metrics_files(tuple(runs), tuple(variants), tuple(seeds))
    ]
    rows = []
    for reference in references:
        try:
            extra = json.loads(Path(reference).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ReportError(f"{reference}: cannot read reference rows: {error}") from error
        rows.extend(extra.items())
    return build_report(evaluations, rows)
