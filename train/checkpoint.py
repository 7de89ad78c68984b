"""Self-describing checkpoints, written atomically.

A checkpoint carries everything needed to rebuild and trust the model without the run that made
it: the model config, the vocabulary, the feature store's schema, and (for ``--resume``) the
optimizer, the position in the data and every random state. It is loaded with
``weights_only=True``, so only plain containers, numbers, strings and tensors are stored.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astar.store.files import unpickler_reason

CHECKPOINT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is unreadable or does not fit what it is used with."""


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [
        name
        for name, tensor in state.items()
        if torch.is_tensor(tensor)
        and (tensor.is_floating_point() or tensor.is_complex())
        and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(state: dict[str, Any], origin: str | Path) -> None:
    """Refuse model parameters or buffers with NaN or infinite values, naming the tensors.

    Training never writes such a checkpoint and inference never uses one: a diverged model
    would only produce garbage captions (or none) with nothing saying why.
    """
    bad = nonfinite_tensors(state)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(
            f"{origin}: the model has non-finite values (NaN or inf) in {len(bad)} tensor(s): "
            f"{shown}"
        )


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def partial_checkpoints(out: str | Path) -> list[Path]:
    """Temporaries in ``out`` of checkpoint saves that were killed before their rename."""
    return sorted(
        entry
        for name in ("last.pt", "best.pt")
        for entry in Path(out).glob(_temporary_prefix(Path(name)) + "*")
        if entry.is_file()
    )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a reader sees the old file or the new, whole.

    A payload whose model is not finite everywhere is refused (CheckpointError) and nothing is
    written, so a good ``last.pt`` or ``best.pt`` is never replaced by a diverged one.
    """
    path = Path(path)
    if "model" in payload:
        check_finite(payload["model"], f"refusing to write {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save({"checkpoint_version": CHECKPOINT_VERSION, **payload}, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of ``path``; CheckpointError if unreadable, too new or not finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # a global weights_only does not allow: code
        raise CheckpointError(
            f"{path}: not a readable astar checkpoint (refused: {unpickler_reason(error)})"
        ) from error
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable astar checkpoint: {error}") from error
    if not isinstance(payload, dict) or "checkpoint_version" not in payload:
        raise CheckpointError(f"{path}: not an astar checkpoint (no checkpoint_version)")
    if payload["checkpoint_version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {payload['checkpoint_version']} is newer than this "
            f"astar ({CHECKPOINT_VERSION}); upgrade astar"
        )
    if isinstance(payload.get("model"), dict):
        check_finite(payload["model"], path)
    return payload


def random_states() -> dict[str, Any]:
    """Every global random state a training step may touch (python, numpy, torch CPU/CUDA)."""
    python_version, python_state, python_gauss = random.getstate()
    numpy_state = np.random.get_state()
    states = {
        "python": [python_version, list(python_state), python_gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
