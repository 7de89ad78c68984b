"""Stage one end to end: video files -> decoded frames -> C3D taps -> the feature store.

The work is cut into the store's partitions. One worker owns a partition from start to commit, so
no two processes ever write the same chunk. Inside a worker three things overlap:

- decoding runs in a child process (``IsolatedDecoder``) that prefetches the next videos, so a
  hanging or crashing decoder costs one video, never the run;
- C3D runs in the worker's main thread;
- staging writes (fp16 conversion and the atomic staging file) run on one background thread.

Every finished video is staged at once, so a killed run loses at most the videos in flight, and
rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from astar.extract.decode import DecodeConfig, VideoDecodeError
from astar.extract.isolation import IsolatedDecoder
from astar.pipelines.text import NotUTF8Error, decode_utf8
from astar.store import (
    OK,
    FeatureStore,
    InvalidFeatures,
    PartitionPlan,
    StoreError,
    StoreSchema,
)
from astar.store.holders import live_holders, registered_writer
from astar.store.location import remove_tree, store_path

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".avi",
        ".mkv",
        ".mov",
        ".webm",
        ".m4v",
        ".mpg",
        ".mpeg",
        ".wmv",
        ".flv",
        ".3gp",
        ".ts",
    }
)

# Failure kind for a video that decoded but whose C3D pass raised (e.g. out of GPU memory).
FEATURE_ERROR = "feature_error"


class InputError(ValueError):
    """The list of videos to extract is unusable (unreadable CSV, duplicate ids, nothing found)."""


class WorkerDied(StoreError):
    """Partitions were given up because their worker process kept dying (killed, out of memory,
    crashed) while extracting them; the message names each one.

    Raised once every other partition is done. What the dead workers staged is kept, so a rerun
    resumes those partitions. A StoreError, so that the CLI prints it as a message: the store is
    left unfinished, not damaged.
    """


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract: the settings recorded in the store schema plus how to run."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)  # sampling, size, padding, timeout
    backbone: str = "c3d"  # "c3d" (the paper's) or "c3d-small" (a quarter of the channels)
    weights: Path | None = None  # Sports-1M state dict; None = seeded random init
    seed: int = 0  # seed of the random init when there are no weights
    device: str | None = None  # "cpu", "cuda", None = cuda when available
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    clip_batch: int = 8  # fc7 clips per C3D forward
    dtype: str = "float16"  # storage dtype of the features
    partition_size: int = 64  # videos per partition (a partition is written whole by one worker)
    # Of the stored arrays: auto (none on a local disk, zstd on object storage), zstd, none.
    compression: str = "auto"
    ids: str = "stem"  # video ids from file names: "stem" (no extension) or "name"
    workers: int = 1  # local worker processes; 1 = extract in this process
    dask: str | None = None  # Dask scheduler address, or "local" for a local Dask cluster
    prefetch: int = 2  # videos decoded ahead of C3D in each worker


@dataclass
class ExtractSummary:
    """What one run did, counted over the videos it was given."""

    ok: int = 0  # extracted by this run
    failed: dict[str, int] = field(default_factory=dict)  # failure kind -> count, this run
    skipped: int = 0  # already complete in the store (ok or failed) before this run
    skipped_failed: int = 0  # of the skipped, how many had failed earlier
    seconds: float = 0.0
    frames: int = 0  # frames fed to C3D by this run
    restarted: str = ""  # why an earlier store at the output was deleted first (restart_changed)

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def merge(self, other: ExtractSummary) -> None:
        self.ok += other.ok
        self.skipped += other.skipped
        self.skipped_failed += other.skipped_failed
        self.frames += other.frames
        for kind, count in other.failed.items():
            self.failed[kind] = self.failed.get(kind, 0) + count

    def describe(self) -> str:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (
            f"ok {self.ok}, failed {self.n_failed} ({failed}), skipped {self.skipped} "
            f"(already in the store; {self.skipped_failed} of them failed earlier) "
            f"in {self.seconds:.1f} s, {rate:.1f} frames/s"
        )


# --------------------------------------------------------------------------------------------
# Inputs


ID_STYLES = ("stem", "name")


def _id_for(path: Path, root: Path | None, style: str) -> str:
    """A video's id: its file name without (``stem``) or with (``name``) the extension, with
    the sub-folders below ``root`` when found in a tree."""
    relative = path.name if root is None else path.relative_to(root).as_posix()
    return relative.rsplit(".", 1)[0] if style == "stem" and "." in path.name else relative


def _read_csv_list(path: Path) -> list[tuple[str, str]]:
    """A CSV of ``id,path`` (header required); relative paths are relative to the CSV.

    Errors name the file and line; the whole file is decoded first, so that a bad byte is
    reported at its own line (a reader decoding in blocks knows only where the block began).
    """
    try:
        text = decode_utf8(path.read_bytes(), str(path))
    except OSError as error:
        raise InputError(f"{path}: cannot read the video list: {error}") from error
    except NotUTF8Error as error:
        raise InputError(str(error)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None or not {"id", "path"} <= set(reader.fieldnames):
            raise InputError(
                f"{path}: expected a header with columns 'id' and 'path', found {reader.fieldnames}"
            )
        videos = []
        for row in reader:
            video_id, video_path = (row["id"] or "").strip(), (row["path"] or "").strip()
            if not video_id or not video_path:
                raise InputError(f"{path}, line {reader.line_num}: empty id or path")
            source = Path(video_path)
            if not source.is_absolute():
                source = path.parent / source
            videos.append((video_id, str(source)))
    except csv.Error as error:
        raise InputError(f"{path}, line {reader.line_num}: malformed CSV: {error}") from None
    return videos


def gather_videos(inputs: Sequence[str | Path], ids: str = "stem") -> list[tuple[str, str]]:
    """Expand directories (recursive, video extensions), files and CSV lists into (id, path).

    Ids must be unique over everything given: duplicates are refused before any work, with the
    colliding paths, because two videos under one id would silently overwrite each other.
    """
    videos: list[tuple[str, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
            )
            if not found:
                log.warning(
                    "%s: no video files found (extensions %s)", item, sorted(VIDEO_EXTENSIONS)
                )
            videos += [(_id_for(p, item, ids), str(p)) for p in found]
        elif item.suffix.lower() == ".csv":
            if not item.is_file():
                raise InputError(f"{item}: no such video list")
            videos += _read_csv_list(item)
        else:
            # A missing or unreadable file is not refused here: it gets its own failure record.
            videos.append((_id_for(item, None, ids), str(item)))
    if not videos:
        raise InputError(f"no videos found in {', '.join(map(str, inputs))}")
    counts = Counter(video_id for video_id, _ in videos)
    duplicates = sorted(video_id for video_id, count in counts.items() if count > 1)
    if duplicates:
        examples = [
            f"{video_id}: " + ", ".join(p for i, p in videos if i == video_id)
            for video_id in duplicates[:5]
        ]
        raise InputError(
            f"{len(duplicates)} duplicate video id(s); ids must be unique:\n  "
            + "\n  ".join(examples)
            + (
                "\n(files that differ only by extension: --ids name keeps it in the id)"
                if ids == "stem"
                else ""
            )
        )
    return videos


# --------------------------------------------------------------------------------------------
# Schema


def build_schema(config: ExtractConfig, extractor) -> StoreSchema:
    """The store schema of this extraction: everything a consumer needs to trust the features."""
    info = extractor.info
    return StoreSchema(
        fps=config.decode.fps,
        size=config.decode.size,
        min_frames=config.decode.min_frames,
        max_frames=config.decode.max_frames,
        backbone=info["backbone"],
        weights=info["weights"],
        preprocessing=info["preprocessing"],
        clip_length=info["clip_length"],
        clip_stride=info["clip_stride"],
        layer_shapes={name: tuple(shape) for name, shape in extractor.layer_shapes().items()},
        dtype=config.dtype,
    )


def make_extractor(config: ExtractConfig):
    from astar.extract.c3d import C3DExtractor

    return C3DExtractor(
        backbone=config.backbone,
        weights=config.weights,
        seed=config.seed,
        device=config.device,
        precision=config.precision,
        clip_batch=config.clip_batch,
    )


# --------------------------------------------------------------------------------------------
# One partition


def _video_info(decoded) -> dict:
    return {
        "n_frames": len(decoded.frames),
        "n_sampled": decoded.n_sampled,
        "padded": decoded.padded,
        "subsampled": decoded.subsampled,
        "duration": decoded.duration,
        "fps": decoded.n_sampled / decoded.duration if decoded.subsampled else None,
        "source_fps": decoded.source_fps,
        "timestamps": decoded.timestamps,
    }


def _stage(writer, video_id: str, source: str, decoded, features) -> tuple[str, int]:
    """Stage one video's outcome (runs on the staging thread); returns (status, frames).

    ``decoded`` is a DecodedVideo, or the VideoDecodeError that replaced it; ``features`` the
    C3D output, or the exception C3D raised. Features the store refuses (NaN, fp16 overflow,
    wrong shape) become a failure of that video, not of the run.
    """
    if isinstance(decoded, VideoDecodeError):
        writer.add_failure(video_id, source, decoded.kind, decoded.reason)
        return decoded.kind, 0
    if isinstance(features, Exception):
        reason = f"{source}: C3D failed on {len(decoded.frames)} frames: {features}"
        writer.add_failure(video_id, source, FEATURE_ERROR, reason)
        return FEATURE_ERROR, 0
    try:
        writer.add(video_id, source, features, _video_info(decoded))
    except InvalidFeatures as error:
        writer.add_failure(video_id, source, FEATURE_ERROR, f"{source}: {error}")
        return FEATURE_ERROR, 0
    return "ok", len(decoded.frames)


def extract_partition(
    store: FeatureStore,
    partition: PartitionPlan,
    extractor,
    config: ExtractConfig,
    on_video: Callable[[str, str], None] = lambda video_id, status: None,
) -> ExtractSummary:
    """Extract the videos of one partition not yet staged, then commit the partition.

    ``on_video(video_id, status)`` is called once per video of the partition when it is staged
    (``skipped`` for those already staged by an earlier, interrupted run).
    """
    summary = ExtractSummary()
    started = time.perf_counter()

    def finish(video_id: str, future) -> None:
        status, frames = future.result()
        if status == "ok":
            summary.ok += 1
            summary.frames += frames
        else:
            summary.failed[status] = summary.failed.get(status, 0) + 1
        on_video(video_id, status)

    with store.partition_writer(partition.name, config.compression) as writer:
        todo = [(vid, src) for vid, src in partition.videos if vid not in writer.done_ids]
        for vid, _ in partition.videos:
            if vid in writer.done_ids:
                summary.skipped += 1
                on_video(vid, "skipped")
        # Decoding runs ahead in a child process, and one background thread stages results in
        # order, while C3D computes in this thread.
        with (
            IsolatedDecoder(config.decode, prefetch=config.prefetch) as decoder,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage") as stager,
        ):
            pending: list = []
            for (vid, src), (_, decoded) in zip(
                todo, decoder.imap([s for _, s in todo]), strict=True
            ):
                features = None
                if not isinstance(decoded, VideoDecodeError):
                    try:
                        features = extractor(decoded.frames)
                    except (RuntimeError, ValueError) as error:  # e.g. out of memory
                        features = error
                pending.append((vid, stager.submit(_stage, writer, vid, src, decoded, features)))
                while pending and pending[0][1].done():
                    finish(*pending.pop(0))
            for vid, future in pending:
                finish(vid, future)
        writer.commit()
    summary.seconds = time.perf_counter() - started
    return summary


# --------------------------------------------------------------------------------------------
# Worker processes


_EXTRACTORS: dict = {}  # per worker process: C3D built once, reused for every partition


def _worker_extract(
    store_path: str, partition: PartitionPlan, config: ExtractConfig, threads: int, events=None
) -> ExtractSummary:
    """Entry point of a worker process (local pool or Dask): one partition.

    ``events`` is a queue for progress; in a local pool it comes from the worker's initializer
    (:func:`_init_worker`); on Dask it is None (Dask reports whole partitions). The worker puts
    ``("start", partition, pid)`` first, so that the parent can tell which partition a worker
    that dies was in, then ``("video", partition, video_id, status)`` per video.
    """
    import torch

    torch.set_num_threads(threads)
    events = events if events is not None else _WORKER_EVENTS.get("queue")
    if events is not None:
        events.put(("start", partition.name, os.getpid()))
    store = FeatureStore.open(store_path)
    if config not in _EXTRACTORS:
        _EXTRACTORS[config] = make_extractor(config)

    def report(video_id: str, status: str) -> None:
        if events is not None:
            events.put(("video", partition.name, video_id, status))

    return extract_partition(store, partition, _EXTRACTORS[config], config, report)


_WORKER_EVENTS: dict = {}  # per local worker process: the parent's progress queue
PARENT_POLL_S = 0.5  # how often a local worker checks that the process that started it lives


def _init_worker(events, parent: int) -> None:
    """Initializer of a local worker process: progress queue, and exit when the parent dies.

    A worker whose parent was killed (``kill -9`` included, which runs no cleanup) would finish
    its partition for nobody and then wait forever on its pool's pipe. It exits at once
    instead; what it had staged stays on disk, and its partition lock is stale (its pid is
    dead), so a rerun resumes the partition.
    """
    _WORKER_EVENTS["queue"] = events

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(3)  # no cleanup: the staged files are already atomic

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="video", disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def extract_features(
    inputs: Sequence[str | Path],
    out: str | Path,
    config: ExtractConfig,
    progress: bool = True,
    restart_changed: bool = False,
) -> tuple[ExtractSummary, FeatureStore]:
    """Extract every video of ``inputs`` into the store at ``out``; resume what is unfinished.

    ``restart_changed`` (pipelines): a store at ``out`` that is complete or was made with other
    settings is deleted and extracted again (see ``restart_reason``); the reason is logged.
    """
    started = time.perf_counter()
    videos = gather_videos(inputs, config.ids)
    extractor = make_extractor(config)
    schema = build_schema(config, extractor)
    out = store_path(out)  # a directory or an fsspec URL
    reason = restart_reason(out, schema) if restart_changed else ""
    if reason:
        holders = live_holders(out / "locks")
        if holders:
            raise StoreError(
                f"{out}: {reason}, but it is not deleted: a live process is writing it "
                f"({'; '.join(holders)}). Wait for it to finish or stop it, or choose another "
                "--out"
            )
        remove_tree(out)
    store = FeatureStore.create_or_open(out, schema)
    owned = [extractor]  # handed over, so that the workers' branches can free it
    del extractor
    with registered_writer(out):  # seen by a --resume-or-restart about to delete the store
        summary = _extract_todo(store, videos, config, owned, progress, reason)
    summary.seconds = time.perf_counter() - started
    return summary, store


def _extract_todo(
    store: FeatureStore,
    videos: list[tuple[str, str]],
    config: ExtractConfig,
    owned: list,
    progress: bool,
    reason: str,
) -> ExtractSummary:
    """Plan ``videos`` into ``store`` and extract what is not complete yet.

    ``owned`` holds the extractor, taken out of it here: the branches whose workers build their
    own free it before they start.
    """
    extractor = owned.pop()
    store.plan(videos, partition_size=config.partition_size)
    wanted = {vid for vid, _ in videos}
    # Partitions already complete hold videos this run does not redo.
    pending = store.pending()
    pending_ids = {vid for part in pending for vid, _ in part.videos}
    summary = ExtractSummary(restarted=reason)
    manifest = store.manifest
    if len(manifest):
        done = manifest[manifest["id"].isin(wanted - pending_ids)]
        summary.skipped = len(done)
        summary.skipped_failed = int((done["status"] != "ok").sum())
    todo = [part for part in pending if any(vid in wanted for vid, _ in part.videos)]
    total = sum(len(part.videos) for part in todo)
    log.info(
        "%d videos: %d already complete, %d in %d partition(s) to do",
        len(videos),
        summary.skipped,
        total,
        len(todo),
    )
    bar = _progress_bar(total, progress)
    counts: Counter[str] = Counter()

    def on_video(video_id: str, status: str) -> None:
        counts["ok" if status == "ok" else "skipped" if status == "skipped" else "failed"] += 1
        bar.set_postfix(counts, refresh=False)
        bar.update(1)

    try:
        if config.dask is not None:
            del extractor  # each Dask worker builds its own
            summary.merge(_extract_on_dask(store, todo, config, bar))
        elif config.workers <= 1 or len(todo) <= 1:
            for part in todo:
                summary.merge(extract_partition(store, part, extractor, config, on_video))
        else:
            del extractor  # each worker builds its own
            summary.merge(_extract_in_workers(store, todo, config, on_video))
    finally:
        bar.close()
        store.consolidate()
    return summary


def _extract_on_dask(store: FeatureStore, todo: list[PartitionPlan], config: ExtractConfig, bar):
    """One Dask task per partition; the store must be on storage every worker sees.

    A task whose worker process dies is rerun by Dask's scheduler on another worker, up to
    ``distributed.scheduler.allowed-failures`` times (default 3), and a LocalCluster's nanny
    restarts the dead worker. The rerun resumes the partition from what the dead worker staged:
    its partition lock names a pid of this host that the nanny reaped at once (a thread waits on
    it), so the rerun breaks it. (A rerun on another host cannot check that pid and is refused
    with PartitionLocked, which says so.) A partition Dask gave up (``KilledWorker``) fails the
    run with :class:`WorkerDied` naming it, once the other partitions are done.
    """
    from dask.distributed import Client, KilledWorker, LocalCluster, as_completed

    if config.dask == "local":
        cluster = LocalCluster(
            n_workers=max(1, config.workers), threads_per_worker=1, processes=True
        )
        client = Client(cluster)
    else:
        cluster, client = None, Client(config.dask)
    threads = 1 if cluster is not None else max(1, os.cpu_count() or 1)
    summary = ExtractSummary()
    given_up: dict[str, list[str]] = {}
    try:
        futures = {
            client.submit(
                _worker_extract,
                str(store.path),
                part,
                config,
                threads,
                key=f"astar-extract-{store.path.name}-{part.name}",
                pure=False,
            ): part
            for part in todo
        }
        for future in as_completed(futures):
            part = futures[future]
            try:
                result = future.result()
            except KilledWorker as error:
                log.error("partition %s: given up by Dask: %s", part.name, error)
                given_up[part.name] = [
                    f"Dask gave it up after {error.allowed_failures + 1} worker death(s) while "
                    f"extracting it (the last on {error.last_worker.address})"
                ]
                continue
            summary.merge(result)
            bar.update(len(part.videos))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if given_up:
        raise WorkerDied(_given_up_message(store, given_up))
    return summary


WORKER_ATTEMPTS = 3  # tries of a partition whose local worker process dies, before it is given up


def _given_up_message(store: FeatureStore, given_up: dict[str, list[str]]) -> str:
    listed = "\n  ".join(f"{name}: {'; '.join(why)}" for name, why in sorted(given_up.items()))
    return (
        f"{store.path}: {len(given_up)} partition(s) given up, their worker process died each "
        f"time it extracted them:\n  {listed}\nEvery other partition is stored, and what the "
        "dead workers staged is kept: once the cause is found (the kernel's out-of-memory killer "
        "shows in dmesg), rerunning the same command resumes these partitions."
    )


def _death(exitcode: int | None) -> str:
    """How a worker process ended, for messages: ``signal 9, SIGKILL`` or ``exit code 1``."""
    if exitcode is None:
        return "cause unknown"
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        return f"signal {-exitcode}, {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"signal {-exitcode}"


class _PoolEvents:
    """The parent's record of its local workers' events, over the successive pools of one run.

    It passes each video's progress to ``on_video`` once, although a retried partition reports
    again, as ``skipped``, the videos a dead worker staged for it; it knows which partition each
    worker process of the current pool started last, to tell which one a dead worker was in;
    and it collects the videos this run staged in an attempt whose worker died, which the retry
    counts as skipped (see :func:`_count_redone`).
    """

    def __init__(self, on_video: Callable[[str, str], None]):
        self.on_video = on_video
        self.pool = 0  # the current pool, counted from 1
        self.running: dict[int, str] = {}  # pid -> the partition it started last (this pool)
        self.first_pool: dict[str, int] = {}  # partition -> the pool that first started it
        # Partition -> the videos its first start skipped: staged before this run.
        self.staged_before: defaultdict[str, set[str]] = defaultdict(set)
        # Partition -> videos a later start skipped that were not staged before this run.
        self.redone: defaultdict[str, set[str]] = defaultdict(set)
        self._reported: set[str] = set()

    def new_pool(self) -> None:
        self.pool += 1
        self.running = {}

    def handle(self, event: tuple) -> None:
        """One event of :func:`_worker_extract` (runs on the parent's progress thread)."""
        kind, partition, *rest = event
        if kind == "start":
            (pid,) = rest
            self.running[pid] = partition
            self.first_pool.setdefault(partition, self.pool)
            return
        video_id, status = rest
        if status == "skipped":
            # A worker's events arrive in order, its start first: first_pool is set.
            if self.first_pool.get(partition) == self.pool:
                self.staged_before[partition].add(video_id)
            elif video_id not in self.staged_before[partition]:
                self.redone[partition].add(video_id)
        if video_id not in self._reported:
            self._reported.add(video_id)
            self.on_video(video_id, status)


def _drain(events, stop: threading.Event, handle: Callable[[tuple], None]) -> None:
    """Hand every event of ``events`` to ``handle`` until ``stop`` is set and none is left."""
    while not stop.is_set() or not events.empty():
        try:
            handle(events.get(timeout=0.1))
        except queue.Empty:
            continue


def _pool_processes(pool: ProcessPoolExecutor) -> dict:
    """The pool's worker processes by pid (kept live, so later ones are seen too).

    ProcessPoolExecutor keeps them in its private ``_processes`` (CPython 3.8 to 3.13); their
    exit codes tell the worker that died apart from those the broken pool terminated after it.
    Without them, which partition a dead worker was in is unknown (see :func:`_blame`).
    """
    processes = getattr(pool, "_processes", None)
    return processes if isinstance(processes, dict) else {}


def _run_pool(
    context,
    store: FeatureStore,
    parts: list[PartitionPlan],
    config: ExtractConfig,
    record: _PoolEvents,
) -> tuple[list[tuple[PartitionPlan, ExtractSummary]], list[PartitionPlan], dict[int, int | None]]:
    """Extract ``parts`` in one pool of local workers.

    Returns the finished partitions with their summaries, the partitions left unfinished because
    a worker process died (which breaks the whole pool), and then the exit code of each of the
    pool's processes by pid. Any other error of a partition is raised.
    """
    workers = min(config.workers, len(parts))
    threads = max(1, (os.cpu_count() or 1) // workers)
    # A plain queue, handed to the workers as they start (inheritance), rather than a manager:
    # a manager is one more process that would outlive a killed parent. A new one for every
    # pool: a worker killed while writing to it may have left its write lock taken.
    events = context.Queue()
    stop = threading.Event()
    record.new_pool()
    reporter = threading.Thread(
        target=_drain, args=(events, stop, record.handle), name="progress", daemon=True
    )
    reporter.start()
    finished: list[tuple[PartitionPlan, ExtractSummary]] = []
    unfinished: list[PartitionPlan] = []
    processes: dict = {}
    try:
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(events, os.getpid()),
        ) as pool:
            futures = [
                pool.submit(_worker_extract, str(store.path), part, config, threads)
                for part in parts
            ]
            processes = _pool_processes(pool)
            for part, future in zip(parts, futures, strict=True):
                try:
                    finished.append((part, future.result()))
                except BrokenProcessPool:
                    unfinished.append(part)
        # Leaving the pool joined its processes: the dead ones are reaped, so their partition
        # locks now name pids that no longer exist, which the next pool's workers break.
    finally:
        stop.set()
        reporter.join()  # every event of this pool is handled before its deaths are judged
    exit_codes = {pid: process.exitcode for pid, process in processes.items()}
    return finished, unfinished, exit_codes


def _blame(
    unfinished: list[PartitionPlan], exit_codes: dict[int, int | None], running: dict[int, str]
) -> dict[str, str]:
    """The unfinished partitions whose worker died -> how, after a pool broke."""
    names = {part.name for part in unfinished}
    blamed: dict[str, str] = {}
    for pid, code in sorted(exit_codes.items()):
        # Once one worker died, the pool terminates the others with SIGTERM: not their fault.
        if code == -signal.SIGTERM or code == 0:
            continue
        partition = running.get(pid)
        if partition in names:
            blamed[partition] = f"worker process {pid} died ({_death(code)})"
    if blamed:
        return blamed
    # The dead worker's partition is unknown (it died before its start event got through, or
    # by a SIGTERM from elsewhere): every partition in flight counts an attempt, so that one
    # killing its worker every time is still given up, never retried forever.
    in_flight = sorted(names & set(running.values())) or sorted(names)
    codes = sorted({_death(code) for code in exit_codes.values() if code != 0})
    why = f"a worker process died ({', '.join(codes) or 'cause unknown'})"
    return dict.fromkeys(in_flight, why)


def _count_redone(
    store: FeatureStore,
    summary: ExtractSummary,
    redone: dict[str, set[str]],
    counted: set[str],
) -> None:
    """Count as extracted by this run the videos a dead worker staged, which its retry skipped.

    The dead worker's summary died with it; its staged videos reach the run's summary only
    through the retry's, as ``skipped`` (staged when it started), whereas ``skipped`` means
    complete before this run. So they move to ok or failed, with their frames, as the committed
    manifest records them. Only partitions whose summary was ``counted`` are corrected.
    """
    videos = {video_id for name in counted & set(redone) for video_id in redone[name]}
    if not videos:
        return
    store.refresh()
    manifest = store.manifest.set_index("id")
    for video_id in sorted(videos & set(manifest.index)):
        status = str(manifest.at[video_id, "status"])
        summary.skipped -= 1
        if status == OK:
            summary.ok += 1
            summary.frames += int(manifest.at[video_id, "n_frames"])
        else:
            summary.failed[status] = summary.failed.get(status, 0) + 1


def _extract_in_workers(
    store: FeatureStore,
    todo: list[PartitionPlan],
    config: ExtractConfig,
    on_video: Callable[[str, str], None],
) -> ExtractSummary:
    """Extract ``todo`` in local worker processes, surviving workers that die.

    A worker that dies (SIGKILL, the out-of-memory killer, a crash) breaks the whole pool:
    ProcessPoolExecutor fails every unfinished partition and terminates the other workers. So a
    new pool takes the unfinished partitions, which resume from what was staged; the dead
    workers' locks name dead pids of this host, so the new workers break them. Only the
    partition the dead worker was in counts an attempt: one whose worker died WORKER_ATTEMPTS
    times is given up, and once every other partition is done the run raises
    :class:`WorkerDied` naming it. A warning is logged at every death.
    """
    context = multiprocessing.get_context("spawn")
    record = _PoolEvents(on_video)
    summary = ExtractSummary()
    deaths: defaultdict[str, list[str]] = defaultdict(list)  # partition -> how its workers died
    given_up: dict[str, list[str]] = {}
    counted: set[str] = set()  # partitions whose summary is merged
    remaining = list(todo)
    while remaining:
        finished, unfinished, exit_codes = _run_pool(context, store, remaining, config, record)
        for part, result in finished:
            summary.merge(result)
            counted.add(part.name)
        blamed = _blame(unfinished, exit_codes, record.running) if unfinished else {}
        for name, why in sorted(blamed.items()):
            deaths[name].append(why)
            attempt = len(deaths[name])
            if attempt >= WORKER_ATTEMPTS:
                log.error(
                    "%s during partition %s; giving it up after %d attempts",
                    why,
                    name,
                    attempt,
                )
                given_up[name] = deaths[name]
            else:
                log.warning(
                    "%s during partition %s; retrying it (attempt %d of %d)",
                    why,
                    name,
                    attempt + 1,
                    WORKER_ATTEMPTS,
                )
        others = [part.name for part in unfinished if part.name not in blamed]
        if others:
            log.warning(
                "partition(s) %s stopped with the pool after a worker died; resuming them",
                ", ".join(others),
            )
        remaining = [part for part in unfinished if part.name not in given_up]
    _count_redone(store, summary, record.redone, counted)
    if given_up:
        raise WorkerDied(_given_up_message(store, given_up))
    return summary


def restart_reason(out: Path, schema: StoreSchema) -> str:
    """Why a pipeline's rerun should not resume the store at ``out`` ("" to resume it).

    A pipeline reruns extraction only when an input, a setting or the code changed, so only a
    store left unfinished (a killed run) with the very same settings is resumed; a complete one
    or one made otherwise is redone.
    """
    if not (out / "zarr.json").exists():
        return ""
    store = FeatureStore.open(out)  # raises StoreError unless it is a store
    differences = store.schema.differences(schema)
    if differences:
        return "the store was made with other settings (" + "; ".join(differences) + ")"
    if not store.pending():
        return "the store is complete, so something it was made from changed"
    return ""


__all__ = [
    "FEATURE_ERROR",
    "VIDEO_EXTENSIONS",
    "ExtractConfig",
    "ExtractSummary",
    "InputError",
    "WorkerDied",
    "build_schema",
    "extract_features",
    "extract_partition",
    "gather_videos",
    "restart_reason",
]
