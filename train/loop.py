"""Training the captioner: Adam, gradient clipping, early stopping, exact resume, DDP.

One run directory holds ``last.pt`` (written every ``checkpoint_every`` steps and after each
epoch), ``best.pt`` (best validation score so far), and ``metrics/train.jsonl`` and
``metrics/val.jsonl`` (one JSON object per step or epoch, for DVC plots).

Exact resume: the data order is a function of (seed, epoch) (``VideoMajorSampler``) and the
checkpoint holds the optimizer, the position in the epoch and every random state, so a run killed
at any point and resumed from its last checkpoint ends with the same parameters as a run that
never stopped (on CPU, where kernels are deterministic).

Non-finite steps: a step whose loss or gradient norm is NaN or infinite makes no update (all
ranks agree) and is logged with ``"skipped": true``; ``max_nonfinite_steps`` of them in a row end
the run with a TrainingError. A checkpoint is never written with non-finite parameters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from astar.extract.precision import cpu_has_fast_bf16, resolve_device
from astar.store import FeatureStore
from astar.store.errors import PartitionLocked, StoreError
from astar.store.files import FileLock, atomic_write_text
from astar.store.schema import StoreSchema
from astar.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    partial_checkpoints,
    random_states,
    restore_random_states,
    save_checkpoint,
)
from astar.train.data import (
    ON_CORRUPT,
    BatchLoader,
    CaptionBatch,
    FeatureSource,
    VideoMajorSampler,
)
from astar.train.model import POOL_LAYERS, Captioner, CaptionerConfig

log = logging.getLogger(__name__)


class TrainingError(Exception):
    """Training cannot start or continue (mismatching checkpoint, missing features, ...)."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the model's own sizes are in CaptionerConfig."""

    videos_per_batch: int = 8  # distinct videos per batch (per rank)
    captions_per_video: int = 4  # captions of each video in a batch; 8 x 4 = the paper's 32
    learning_rate: float = 2e-4  # Adam (ASTAR-NOTES)
    clip_norm: float = 5.0  # global gradient-norm clipping
    max_epochs: int = 50  # upper bound; early stopping usually ends sooner
    patience: int = 5  # validations without improvement before stopping
    metric: str = "CIDEr"  # validation metric for early stopping and best.pt (CIDEr-D)
    validate_every: int = 1  # epochs between validations
    max_length: int = 30  # longest caption generated at validation
    checkpoint_every: int = 200  # steps between last.pt writes (and after every epoch)
    seed: int = 0  # data order, initialisation, dropout
    device: str | None = None  # None: cuda when available
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "auto": bf16 where it is fast
    cache_videos: int = 0  # keep this many videos' features in memory (0: stream every read)
    prefetch: int = 2  # batches read ahead of the one computing
    max_steps: int | None = None  # stop after this many steps in total (tests, smoke runs)
    max_nonfinite_steps: int = 5  # non-finite loss/gradient steps in a row before giving up
    lr_schedule: str = "constant"  # or "cosine": from learning_rate down to 0 at max_epochs
    on_corrupt: str = "error"  # damaged stored video: "error" stops, "skip" leaves it out, listed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CaptionData:
    """The captions a run trains and validates on, already tied to the vocabulary."""

    vocabulary: dict[str, Any]  # Vocabulary.to_dict(), stored in checkpoints
    train: dict[str, list[list[int]]]  # video id -> encoded captions (each ends with eos)


@dataclass
class TrainState:
    """Where a run is; all of it goes into the checkpoint."""

    epoch: int = 0  # current epoch
    batch: int = 0  # next batch of the current epoch
    step: int = 0  # training steps taken (skipped non-finite ones included)
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_validations: int = 0  # consecutive validations without improvement
    stopped: str = ""  # why training ended: "early stopping", "max epochs", "max steps", ...
    history: list[dict[str, float]] = field(default_factory=list)  # validation results
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, in all
    nonfinite_in_a_row: int = 0  # the current run of such steps (0 after a good step)
    nonfinite_since: int = 0  # the step that began the current run of non-finite steps
    corrupt_videos: dict[str, str] = field(default_factory=dict)  # skipped: id -> what is wrong

    def empty_validations(self) -> int:
        """Validations in which every video's caption came out empty."""
        return sum(1 for record in self.history if all_captions_empty(record))


def all_captions_empty(record: dict[str, Any]) -> bool:
    """Whether a validation record says no video got a caption (a collapsed model)."""
    videos = record.get("n_videos", 0)
    return videos > 0 and record.get("empty_captions", 0) >= videos


@dataclass(frozen=True)
class StepResult:
    """What one training step did."""

    loss: float  # mean over the global batch's captions (NaN or inf when skipped for it)
    grad_norm: float  # total gradient norm before clipping
    skipped: bool  # non-finite loss or gradient: no optimizer update was made
    beta_entropy: float | None = None  # mean entropy of the layer attention beta (nats)


def store_layers(store: FeatureStore) -> tuple[dict[str, int], int]:
    """Channels of the pool layers and the fc7 size, from the store's schema."""
    shapes = store.schema.layer_shapes
    channels = {name: int(shapes[name][0]) for name in POOL_LAYERS if name in shapes}
    return channels, int(shapes["fc7"][0])


def compatibility_problems(
    payload: dict[str, Any], store: FeatureStore, vocabulary: dict
) -> list[str]:
    """What differs between a checkpoint and the store/vocabulary it is used with: every
    schema field but the package versions (StoreSchema.differences), and the vocabulary."""
    try:
        saved = StoreSchema.from_dict(payload.get("store_schema", {}))
    except StoreError as error:
        problems = [f"the checkpoint's store schema is unreadable ({error})"]
    else:
        differences = saved.differences(store.schema, "in the checkpoint", "in the store")
        problems = [f"store {difference}" for difference in differences]
    if payload.get("vocabulary") != vocabulary:
        problems.append("the vocabulary differs from the dataset's")
    return problems


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> "bf16" on a GPU that has it or a CPU with native bf16 kernels, else "fp32"."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise TrainingError(f"precision must be fp32, bf16 or auto, not {precision!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def fc7_vectors(source: FeatureSource, ids: list[str], chunk: int = 256) -> torch.Tensor:
    """(n, D): each video's mean fc7 vector (a_{L+1}) for the ids ``source`` can read."""
    vectors = []
    for start in range(0, len(ids), chunk):
        for record in source.read(ids[start : start + chunk]):
            if record is None:  # skipped as corrupt
                continue
            clips = torch.from_numpy(np.asarray(record.layers["fc7"], dtype=np.float32))
            vectors.append(clips.mean(dim=0))  # (D,)
    return torch.stack(vectors)  # (n, D)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


class Trainer:
    """Owns the model, optimizer, data and state of one run directory."""

    def __init__(
        self,
        store: FeatureStore,
        data: CaptionData,
        model_config: CaptionerConfig,
        config: TrainConfig,
        out: str | Path,
        word_vectors: torch.Tensor | None = None,
        validate: Callable[[Captioner], dict[str, float]] | None = None,
    ) -> None:
        self.store, self.data, self.config = store, data, config
        self.out = Path(out)
        self.rank, self.world_size = _distributed()
        self.device = resolve_device(config.device)
        missing = sorted(set(data.train) - set(store.ids))
        if missing:
            raise TrainingError(
                f"{len(missing)} training video(s) have no features in {store.path}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        if config.lr_schedule not in ("constant", "cosine"):
            raise TrainingError(
                f"lr_schedule must be 'constant' or 'cosine', not {config.lr_schedule!r}"
            )
        if config.on_corrupt not in ON_CORRUPT:
            raise TrainingError(
                f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, not {config.on_corrupt!r}"
            )
        if config.max_nonfinite_steps < 1:
            raise TrainingError(
                f"max_nonfinite_steps must be at least 1, not {config.max_nonfinite_steps}"
            )
        torch.manual_seed(config.seed)
        self.model_config = model_config
        self.precision = resolve_precision(config.precision, self.device)
        self.model = Captioner(model_config, word_vectors).to(self.device)
        self.ddp = (
            nn.parallel.DistributedDataParallel(self.model) if self.world_size > 1 else self.model
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.sampler = VideoMajorSampler(
            {vid: len(caps) for vid, caps in data.train.items()},
            config.videos_per_batch,
            config.captions_per_video,
            seed=config.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        layers = model_config.attended_layers
        self.loader = BatchLoader(
            FeatureSource(
                store, layers, cache_videos=config.cache_videos, on_corrupt=config.on_corrupt
            ),
            data.train,
            prefetch=config.prefetch,
        )
        self.validate = validate
        self.state = TrainState()

    # ---- checkpoints ------------------------------------------------------------------------

    def payload(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict(),
            "train_config": self.payload_train_config(),
            "vocabulary": self.data.vocabulary,
            "store_schema": self.store.schema.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": asdict(self.state),
            "random": random_states(),
        }

    def save(self, name: str) -> None:
        if self.rank == 0:
            save_checkpoint(self.out / name, self.payload())

    def _mismatches(self, payload: dict[str, Any]) -> list[str]:
        problems = compatibility_problems(payload, self.store, self.data.vocabulary)
        saved_config = CaptionerConfig.from_dict(payload["model_config"])
        if saved_config != self.model_config:
            problems.append(
                f"model config: checkpoint {saved_config}, requested {self.model_config}"
            )
        return problems

    def resume_if_unfinished(self, path: Path) -> str:
        """Resume ``path`` if it is a run left unfinished with the same settings and data, else
        return why not (and resume nothing).

        A pipeline reruns training only when an input, a setting or the code changed: only a
        run cut short (killed) is continued; a finished or different one is for a fresh start.
        """
        payload = load_checkpoint(path, map_location=self.device)
        if payload["state"].get("stopped"):
            return f"the run finished ({payload['state']['stopped']}), so something it used changed"
        problems = self._mismatches(payload)
        if payload.get("train_config") != self.payload_train_config():
            problems.append("the training settings differ")
        if not problems:
            self._restore(payload)
        return "; ".join(problems)

    def payload_train_config(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.config.to_dict().items()}

    def resume(self, path: Path) -> None:
        payload = load_checkpoint(path, map_location=self.device)
        problems = self._mismatches(payload)
        if problems:
            raise TrainingError(f"{path} does not match this run:\n  " + "\n  ".join(problems))
        self._restore(payload)
        log.info("resumed %s at epoch %d batch %d", path, self.state.epoch, self.state.batch)

    def _restore(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = TrainState(**payload["state"])
        restore_random_states(payload["random"])
        if self.rank == 0:  # the steps after the checkpoint are replayed: log them once
            dropped = truncate_logs(self.out / "metrics", self.state.step, self.state.epoch)
            if dropped:
                log.info("dropped %d log record(s) written after step %d", dropped, self.state.step)

    # ---- the loop ---------------------------------------------------------------------------

    def _log(self, name: str, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        path = self.out / "metrics" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")

    def train_step(self, batch: CaptionBatch, global_captions: int, weight: float) -> StepResult:
        """One optimizer step, or none when the loss or the gradient norm is not finite.

        A skipped step leaves the parameters and Adam's moments as they were (its gradients are
        dropped), so one bad batch costs one batch rather than the run.
        """
        self.ddp.train()
        batch = batch.to(self.device)
        # The forward updates normalisation statistics: a skipped step puts them back.
        buffers = [buffer.detach().clone() for buffer in self.model.buffers()]
        with _autocast(self.device, self.precision):
            result = self._loss(batch)
        # DDP averages gradients over ranks: scale so the average is the global-batch mean.
        total = result.per_caption.sum() * weight
        self.optimizer.zero_grad(set_to_none=True)
        (total * (self.world_size / global_captions)).backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        # Loss, non-finite flag and norm in one all_reduce: every rank skips the step or none.
        local = total.detach().float()
        nonfinite = ~(torch.isfinite(local) & torch.isfinite(grad_norm))
        checks = torch.stack([local, nonfinite.float(), grad_norm.float()])  # (3,)
        if self.world_size > 1:
            torch.distributed.all_reduce(checks)
        loss_sum, nonfinite_ranks, norm_sum = checks.tolist()
        skipped = nonfinite_ranks > 0
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        else:
            self.optimizer.step()
        # DDP averaged the gradients, so every rank computed the same norm.
        entropy = None if result.layer_entropy is None else float(result.layer_entropy)
        return StepResult(loss_sum / global_captions, norm_sum / self.world_size, skipped, entropy)

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): a function of the step alone,
        so a resumed run follows the schedule of one that never stopped."""
        config = self.config
        if config.lr_schedule == "constant":
            return config.learning_rate
        total = config.max_epochs * len(self.sampler)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))

    def _set_learning_rate(self, step: int) -> None:
        rate = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def _loss(self, batch: CaptionBatch):
        if self.ddp is self.model:
            return self.model.loss(batch.features, batch.tokens, batch.video_index)
        # DDP hooks run through forward(): route the loss call through it.
        return self.ddp(batch.features, batch.tokens, batch.video_index)

    def run(self) -> TrainState:
        config, state = self.config, self.state
        fresh = state.step == 0 and state.epoch == 0 and state.batch == 0
        if fresh and self.model_config.fc7_norm == "standardize":  # resumed: in the checkpoint
            source = FeatureSource(self.store, (), on_corrupt=self.config.on_corrupt)
            self.model.set_fc7_statistics(fc7_vectors(source, sorted(self.data.train)))
            self._note_corrupt(source)
        progress = _progress(len(self.sampler), enabled=self.rank == 0)
        while not state.stopped:
            if state.epoch >= config.max_epochs:
                state.stopped = "max epochs"
                break
            plans = self.sampler.epoch(state.epoch)
            progress.reset(total=len(plans))
            progress.update(state.batch)
            progress.set_description(f"epoch {state.epoch}")
            started, captions_seen = time.perf_counter(), 0
            for plan, batch in zip(
                plans[state.batch :], self.loader(plans[state.batch :]), strict=True
            ):
                self._set_learning_rate(state.step)
                self._note_corrupt(self.loader.source)
                weight = 0.0 if plan.dummy or batch.dummy else 1.0
                result = self.train_step(batch, plan.global_captions, weight)
                n_captions = plan.global_captions
                state.batch += 1
                state.step += 1
                if result.skipped:
                    self._skipped(state, result)
                else:
                    state.nonfinite_in_a_row = 0
                captions_seen += n_captions
                rate = captions_seen / max(time.perf_counter() - started, 1e-9)
                postfix = {"loss": f"{result.loss:.3f}", "captions_per_s": f"{rate:.0f}"}
                if result.beta_entropy is not None:  # layer attention: uniform is log L nats
                    postfix["beta_entropy"] = f"{result.beta_entropy:.3f}"
                progress.set_postfix(postfix, refresh=False)
                progress.update(1)
                self._log(
                    "train",
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": _json_number(result.loss),
                        "grad_norm": _json_number(result.grad_norm),
                        "captions_per_s": rate,
                        "learning_rate": self.optimizer.param_groups[0]["lr"],
                        "skipped": result.skipped,
                        **(
                            {}
                            if result.beta_entropy is None
                            else {"beta_entropy": _json_number(result.beta_entropy)}
                        ),
                    },
                )
                if state.nonfinite_in_a_row >= config.max_nonfinite_steps:
                    progress.close()
                    state.stopped = "non-finite steps"
                    raise self._diverged(state, result)
                if config.max_steps is not None and state.step >= config.max_steps:
                    state.stopped = "max steps"
                    break
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    self.save("last.pt")
            if state.stopped:
                self.save("last.pt")
                break
            state.epoch, state.batch = state.epoch + 1, 0
            if self.validate is not None and state.epoch % config.validate_every == 0:
                self._validation(state)
            self.save("last.pt")
        progress.close()
        if self.rank == 0:
            write_curves(self.out / "metrics", self.out / "curves")
        return state

    def _note_corrupt(self, source: FeatureSource) -> None:
        """Record in the state (and so in checkpoints) the videos ``source`` skipped as corrupt."""
        self.state.corrupt_videos.update(source.corrupt)

    def _skipped(self, state: TrainState, result: StepResult) -> None:
        if state.nonfinite_in_a_row == 0:
            state.nonfinite_since = state.step
        state.nonfinite_in_a_row += 1
        state.skipped_steps += 1
        if self.rank == 0:
            log.warning(
                "step %d (epoch %d) skipped, no update made: loss %s, gradient norm %s "
                "(%d non-finite step(s) in a row)",
                state.step,
                state.epoch,
                result.loss,
                result.grad_norm,
                state.nonfinite_in_a_row,
            )

    def _diverged(self, state: TrainState, result: StepResult) -> TrainingError:
        """The error ending a run whose steps stay non-finite (the model is the last good one)."""
        hint = f"lower learning_rate (now {self.config.learning_rate:g})"
        if self.precision != "fp32":
            hint += f", or precision fp32 (now {self.precision})"
        return TrainingError(
            f"{state.nonfinite_in_a_row} non-finite training steps in a row, since step "
            f"{state.nonfinite_since} (now step {state.step}, epoch {state.epoch}; last loss "
            f"{result.loss}, gradient norm {result.grad_norm}): training stopped at "
            f"max_nonfinite_steps = {self.config.max_nonfinite_steps} (those steps updated "
            f"nothing). Try a {hint}."
        )

    def _validation(self, state: TrainState) -> None:
        self.model.eval()
        scores = self.validate(self.model) if self.rank == 0 else {}
        score = float(scores.get(self.config.metric, -math.inf))
        if self.world_size > 1:  # every rank must take the same early-stopping decision
            shared = torch.tensor([score], device=self.device)
            torch.distributed.broadcast(shared, src=0)
            score = float(shared)
        record = {"epoch": state.epoch, "step": state.step, **scores}
        state.history.append(record)
        self._log("val", record)
        if all_captions_empty(record):
            log.warning(
                "epoch %d: validation captioned none of its %d videos (every caption empty)",
                state.epoch,
                record["n_videos"],
            )
        if math.isnan(score):
            log.warning("epoch %d: validation %s is NaN", state.epoch, self.config.metric)
        if not math.isnan(score) and score > state.best_score:
            state.best_score, state.best_epoch, state.bad_validations = score, state.epoch, 0
            self.save("best.pt")
        else:
            state.bad_validations += 1
            if state.bad_validations >= self.config.patience:
                state.stopped = "early stopping"
        log.info(
            "epoch %d: %s = %.2f (best %.2f)",
            state.epoch,
            self.config.metric,
            score,
            state.best_score,
        )


def _json_number(value: float) -> float | None:
    """A float for a JSON log: non-finite values as null (JSON has no NaN or infinity)."""
    return value if math.isfinite(value) else None


RUN_FILES = ("last.pt", "best.pt", "config.json", "metrics", "curves")  # what a run writes
RUN_LOCK = "run.lock"  # held by the live run writing a run directory


@contextlib.contextmanager
def run_directory(out: str | Path) -> Iterator[Path]:
    """Hold the run directory ``out`` for one training run; yield it, created.

    A second run on the same ``out`` is refused (:class:`TrainingError` naming the holder's
    pid) instead of interleaving its logs and checkpoints with the first one's. A run killed
    without cleanup (``kill -9``) leaves a lock whose pid is dead: the next run breaks it. On
    the way in, the temporaries of a checkpoint save that was killed midway are removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / RUN_LOCK)
    try:
        lock.acquire()
    except PartitionLocked as error:
        raise TrainingError(
            f"{out} is in use by another training run ({error}); wait for it to finish, stop "
            "it, or choose another --out"
        ) from None
    try:
        for leftover in partial_checkpoints(out):
            log.warning("%s: removing the partial file of an interrupted checkpoint save", leftover)
            leftover.unlink(missing_ok=True)
        yield out
    finally:
        lock.release()


def clear_run(out: str | Path) -> None:
    """Remove what a run wrote in ``out`` (and nothing else), so that it starts afresh."""
    import shutil

    out = Path(out)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def truncate_logs(metrics: Path, step: int, epoch: int) -> int:
    """Drop the records after (``step``, ``epoch``) from the JSON-lines logs in ``metrics``;
    return how many were dropped.

    A run resumed from a checkpoint taken at that point replays what came after it, so the
    records a killed run wrote past its last checkpoint would otherwise appear twice. Both
    coordinates count: a validation is logged at the step of the epoch's last batch but with
    the next epoch's number.
    """
    dropped = 0
    for log_file in sorted(metrics.glob("*.jsonl")) if metrics.is_dir() else []:
        lines = log_file.read_text().splitlines()
        kept = [line for line in lines if _logged_by(line, step, epoch)]
        if len(kept) != len(lines):
            dropped += len(lines) - len(kept)
            atomic_write_text(log_file, "".join(line + "\n" for line in kept))
    return dropped


def _logged_by(line: str, step: int, epoch: int) -> bool:
    """Whether a log line was written at or before (step, epoch); a line cut short by a kill
    was not (it is dropped)."""
    try:
        record = json.loads(line)
        return record.get("step", math.inf) <= step and record.get("epoch", -1) <= epoch
    except (ValueError, AttributeError, TypeError):
        return False


def write_curves(metrics: Path, curves: Path) -> None:
    """The JSON-lines logs as CSV tables (``dvc plots`` reads CSV, not JSON lines)."""
    import pandas as pd

    curves.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val"):
        log_file = metrics / f"{name}.jsonl"
        rows = (
            [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
            if log_file.exists()
            else []
        )
        table = pd.DataFrame(rows)
        (curves / f"{name}.csv").write_text(table.to_csv(index=False))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", disable=not enabled, dynamic_ncols=True)


def init_distributed() -> bool:
    """Join the process group torchrun describes in the environment; False when not launched so."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


__all__ = [
    "CaptionData",
    "CheckpointError",
    "StepResult",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingError",
    "all_captions_empty",
    "clear_run",
    "compatibility_problems",
    "init_distributed",
    "run_directory",
    "store_layers",
    "truncate_logs",
    "write_curves",
]
