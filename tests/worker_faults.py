"""A worker entry point whose process SIGKILLs itself inside a chosen partition, once.

Test-only. A test replaces ``astar.extract.runner._worker_extract`` with :func:`worker_extract`
(``monkeypatch.setattr``) and puts :func:`worker_env` in the environment. The parent then hands
this function to its workers by reference (``worker_faults.worker_extract``): local pool workers
import it through the parent's ``sys.path`` (spawn copies it), Dask workers through the
``PYTHONPATH`` set here; both inherit the environment.

In a worker the function runs the real ``_worker_extract`` with ``runner._stage`` wrapped, so
that every staged video is logged (``pid partition video`` lines in ``log``) and, right after
video ``video`` of partition ``partition`` is staged (or right before, with ``before``), the
process claims a marker file (its pid in ``<marker>.<k>``) and kills itself with SIGKILL: in the
middle of the partition, with that video's progress event not sent yet. Markers are created
exclusively, ``<marker>.1`` to ``<marker>.<times>``: the first ``times`` workers to get there
die, the retries after them run normally. Killed after staging, the video is there for the
retry to reuse (which then does not stage it again); killed before, every retry redoes it.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from astar.extract import runner
from astar.extract.runner import _worker_extract as real_worker_extract

DEATH_VARIABLE = "ASTAR_TEST_WORKER_DEATH"  # JSON: worker_env's arguments


def worker_env(
    partition: str, video: str, marker: Path, log: Path, times: int = 1, before: bool = False
) -> dict[str, str]:
    """Variables the workers need: this folder importable, and where and how often to die."""
    folder = str(Path(__file__).resolve().parent)
    python_path = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
    plan = {
        "partition": partition,
        "video": video,
        "marker": str(marker),
        "log": str(log),
        "times": times,
        "before": before,
    }
    return {"PYTHONPATH": python_path, DEATH_VARIABLE: json.dumps(plan)}


def deaths(marker: Path) -> list[int]:
    """Pids of the workers that killed themselves, in order."""
    found = []
    for k in itertools.count(1):
        path = marker.with_name(f"{marker.name}.{k}")
        if not path.exists():
            return found
        found.append(int(path.read_text()))
    return found


def read_log(log: Path) -> list[tuple[int, str, str]]:
    """``(pid, partition, video)`` of every video staged by a worker, in order."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(pid), part, video) for pid, part, video in (line.split(" ") for line in lines)]


def _claim(marker: Path, times: int) -> bool:
    """Create the first free ``<marker>.<k>`` (k <= times) holding this pid; False if none is."""
    for k in range(1, times + 1):
        try:
            descriptor = os.open(
                marker.with_name(f"{marker.name}.{k}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
        except FileExistsError:
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
            handle.flush()
            os.fsync(handle.fileno())
        return True
    return False


def _append(log: Path, line: str) -> None:
    # One short write with O_APPEND: lines of concurrent workers never interleave.
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(descriptor, (line + "\n").encode())
    finally:
        os.close(descriptor)


def worker_extract(store_path: str, partition, config, threads: int, events=None):
    """``runner._worker_extract``, dying as ``DEATH_VARIABLE`` says (see the module's doc)."""
    plan: Mapping[str, str] = json.loads(os.environ[DEATH_VARIABLE])
    marker, log = Path(plan["marker"]), Path(plan["log"])
    real_stage = runner._stage

    def die_here(video_id: str) -> None:
        armed = partition.name == plan["partition"] and video_id == plan["video"]
        if armed and _claim(marker, int(plan["times"])):
            os.kill(os.getpid(), signal.SIGKILL)

    def stage(writer, video_id: str, source: str, decoded, features) -> tuple[str, int]:
        if plan["before"]:
            die_here(video_id)
        result = real_stage(writer, video_id, source, decoded, features)
        _append(log, f"{os.getpid()} {partition.name} {video_id}")
        if not plan["before"]:
            die_here(video_id)
        return result

    runner._stage = stage
    try:
        return real_worker_extract(store_path, partition, config, threads, events)
    finally:
        runner._stage = real_stage
