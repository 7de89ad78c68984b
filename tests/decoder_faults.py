"""A decoder child process that misbehaves on chosen files, as decord does on bad ones.

Test-only. ``IsolatedDecoder(config, child_main=CHILD_MAIN)`` started with ``child_env(faults)``
in its environment runs the real child loop (``astar.extract.isolation._child_main``), but
before decoding a path in ``faults`` (``{str(path): action}``) it does the action: ``"hang"``,
``"abort"``, ``"segfault"``, ``"raise"`` or ``"sleep:SECONDS"``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

from astar.extract.decode import DecodeConfig, DecodedVideo, decode_video
from astar.extract.isolation import _child_main

CHILD_MAIN = "decoder_faults:child_main"
FAULTS_VARIABLE = "ASTAR_TEST_DECODER_FAULTS"  # JSON {str(path): action}
ACTIONS = ("hang", "abort", "segfault", "raise")  # and "sleep:SECONDS"


def child_env(faults: Mapping[str, str]) -> dict[str, str]:
    """Variables the child needs: this folder importable, and the faults to do."""
    for action in faults.values():
        if action not in ACTIONS and not action.startswith("sleep:"):
            raise ValueError(f"unknown fault action {action!r}")
    folder = str(Path(__file__).resolve().parent)
    python_path = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": python_path, FAULTS_VARIABLE: json.dumps(dict(faults))}


def child_main(request_fd: int, result_fd: int) -> None:
    """The real child loop, decoding through ``_inject_fault`` for the paths in the faults."""
    faults: dict[str, str] = json.loads(os.environ[FAULTS_VARIABLE])

    def decode(path: Path, config: DecodeConfig) -> DecodedVideo:
        fault = faults.get(str(path))
        if fault is not None:
            _inject_fault(fault)
        return decode_video(path, config)

    _child_main(request_fd, result_fd, decode)


def _inject_fault(action: str) -> None:
    """Test hook: misbehave the way decord does on bad files."""
    if action == "hang":
        while True:
            time.sleep(3600)
    elif action == "abort":
        os.abort()
    elif action == "segfault":
        import ctypes

        ctypes.string_at(0)
    elif action == "raise":
        raise RuntimeError("injected failure")
    elif action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")))
    else:
        raise ValueError(f"unknown fault action {action!r}")
