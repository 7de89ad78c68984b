"""Streaming the feature store into the captioner: video-major batches, prefetched.

A batch holds a few videos and several captions of each (video-major). The expensive per-video
work (reading the features, aligning pool2..pool4) is then done once per video, and every caption
of that video reuses it through ``video_index``.

The order of an epoch is a pure function of (seed, epoch), so a run resumed at batch ``b`` of
epoch ``e`` sees exactly the batches an uninterrupted run would have seen. Under
torch.distributed every rank derives the same global order and takes its own share of each
global batch.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from astar.store import CorruptVideo, FeatureStore
from astar.store.geometry import POOL_LAYERS
from astar.train.model import FeatureBatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """One (per-rank) batch: which videos, and which of their captions."""

    video_ids: tuple[str, ...]  # distinct videos, in batch order
    captions: tuple[tuple[int, ...], ...]  # per video: indices into that video's caption list
    global_captions: int  # captions in the global batch over all ranks (the loss denominator)
    dummy: bool = False  # this rank had no share of a short last batch: compute, weight 0


@dataclass
class CaptionBatch:
    """What one training step consumes."""

    features: FeatureBatch  # B videos
    tokens: torch.Tensor  # (n_captions, T) long, padded with 0, each caption ends with eos
    video_index: torch.Tensor  # (n_captions,) long: the video of each caption, in 0..B-1
    video_ids: tuple[str, ...]  # (B,)
    # Stands in for a batch whose every video was skipped as corrupt: computed, weight 0.
    dummy: bool = False

    def to(self, device: torch.device | str) -> CaptionBatch:
        return CaptionBatch(
            self.features.to(device),
            self.tokens.to(device),
            self.video_index.to(device),
            self.video_ids,
            self.dummy,
        )


class VideoMajorSampler:
    """Epoch plans of video-major batches, deterministic in (seed, epoch), sharded by rank.

    An epoch visits every caption once: each video's captions are shuffled and cut into groups
    of at most ``captions_per_video``; the groups are shuffled and packed ``videos_per_batch`` at a
    time into global batches (a video appears at most once per batch). With ``world_size`` ranks
    a global batch holds ``videos_per_batch * world_size`` groups and rank ``r`` takes every
    ``world_size``-th one, so the global batch is the same whatever the number of ranks.
    """

    def __init__(
        self,
        caption_counts: dict[str, int],
        videos_per_batch: int,
        captions_per_video: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if not caption_counts:
            raise ValueError("no videos with captions to sample from")
        if videos_per_batch < 1 or captions_per_video < 1:
            raise ValueError("videos_per_batch and captions_per_video must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.video_ids = sorted(caption_counts)
        self.counts = np.array([caption_counts[v] for v in self.video_ids])
        self.videos_per_batch = videos_per_batch
        self.captions_per_video = captions_per_video
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last

    def _global_batches(self, epoch: int) -> list[list[tuple[int, tuple[int, ...]]]]:
        rng = np.random.default_rng([self.seed, epoch])
        groups: list[tuple[int, tuple[int, ...]]] = []
        for video, count in enumerate(self.counts):
            order = rng.permutation(count)
            for start in range(0, count, self.captions_per_video):
                chunk = order[start : start + self.captions_per_video]
                groups.append((video, tuple(int(i) for i in chunk)))
        groups = [groups[i] for i in rng.permutation(len(groups))]
        size = self.videos_per_batch * self.world_size
        batches: list[list[tuple[int, tuple[int, ...]]]] = []
        # Greedy packing keeps a video out of a batch it is already in; leftovers move on.
        waiting = groups
        while waiting:
            batch, seen, rest = [], set(), []
            for group in waiting:
                if len(batch) < size and group[0] not in seen:
                    batch.append(group)
                    seen.add(group[0])
                else:
                    rest.append(group)
            batches.append(batch)
            waiting = rest
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    def epoch(self, epoch: int) -> list[BatchPlan]:
        """This rank's batches of ``epoch``; every rank gets the same number of batches."""
        plans = []
        for batch in self._global_batches(epoch):
            mine = batch[self.rank :: self.world_size]
            # A rank with no share of a short last batch still steps (collectives must match)
            # on a stand-in group whose loss weight is zero.
            dummy = not mine
            plans.append(
                BatchPlan(
                    video_ids=tuple(self.video_ids[v] for v, _ in (batch[:1] if dummy else mine)),
                    captions=tuple(caps for _, caps in (batch[:1] if dummy else mine)),
                    global_captions=sum(len(caps) for _, caps in batch),
                    dummy=dummy,
                )
            )
        return plans

    def __len__(self) -> int:
        return len(self._global_batches(0))


def pad_captions(captions: Sequence[Sequence[int]]) -> torch.Tensor:
    """Encoded captions (each ending with eos) -> (n, T_max) long, padded with 0."""
    longest = max(len(c) for c in captions)
    tokens = torch.zeros(len(captions), longest, dtype=torch.long)  # (n, T)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.as_tensor(caption, dtype=torch.long)
    return tokens


def collate_features(videos: Sequence, layers: Sequence[str]) -> FeatureBatch:
    """Store records -> a FeatureBatch: pool layers zero-padded in time, fc7 mean over clips."""
    n_frames = torch.tensor([int(v.info["n_frames"]) for v in videos], dtype=torch.long)  # (B,)
    padded: dict[str, torch.Tensor] = {}
    for name in layers:
        if name not in POOL_LAYERS:
            continue
        arrays = [v.layers[name] for v in videos]  # each (C, T_v, H, W)
        channels, _, height, width = arrays[0].shape
        longest = max(a.shape[1] for a in arrays)
        out = torch.zeros(len(arrays), channels, longest, height, width)  # (B, C, T, H, W)
        for row, array in enumerate(arrays):  # one copy, converting as it goes (any strides:
            # the store gives (T, C, H, W) memory seen as (C, T, H, W)); half the time of
            # converting to a float32 array first (2-core Xeon, 8 paper-shaped pool2 layers)
            out[row, :, : array.shape[1]] = torch.from_numpy(np.asarray(array))
        padded[name] = out
    fc7 = torch.stack(
        [torch.from_numpy(np.asarray(v.layers["fc7"], dtype=np.float32)).mean(0) for v in videos]
    )  # (B, D)
    return FeatureBatch(layers=padded, n_frames=n_frames, fc7=fc7)


ON_CORRUPT = ("error", "skip")  # what a reader does with a video whose stored data is damaged


class FeatureSource:
    """Reads videos from the store, optionally keeping them in an in-memory LRU cache.

    The store checks every video it returns against its checksums. A damaged video raises
    :class:`~astar.store.CorruptVideo` (``on_corrupt="error"``, the default), or, with
    ``on_corrupt="skip"``, reads as None and is listed in :attr:`corrupt` (id -> what is
    wrong), so that the caller can leave it out, say so and count it.
    """

    def __init__(
        self,
        store: FeatureStore,
        layers: Sequence[str],
        cache_videos: int = 0,
        on_corrupt: str = "error",
    ):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, not {on_corrupt!r}")
        self.store = store
        self.layers = tuple(dict.fromkeys([*layers, "fc7"]))
        self.cache_videos = cache_videos
        self.on_corrupt = on_corrupt
        self.corrupt: dict[str, str] = {}  # video id -> what is wrong with its data
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, video_ids: Sequence[str]) -> list:
        """The videos' records in the order of ``video_ids`` (None: skipped as corrupt)."""
        with self._lock:
            found = {v: self._cache[v] for v in video_ids if v in self._cache}
            for v in found:
                self._cache.move_to_end(v)
        missing = [v for v in dict.fromkeys(video_ids) if v not in found and v not in self.corrupt]
        if missing:
            for record in self._read_sound(missing):
                found[record.id] = record
            if self.cache_videos:
                with self._lock:
                    for v in missing:
                        if v in found:
                            self._cache[v] = found[v]
                    while len(self._cache) > self.cache_videos:
                        self._cache.popitem(last=False)
        return [found.get(v) for v in video_ids]

    def _read_sound(self, video_ids: list[str]) -> list:
        """Read ``video_ids``; in skip mode leave out (and list) the corrupt ones."""
        while video_ids:
            try:
                return self.store.read_batch(video_ids, layers=self.layers)
            except CorruptVideo as error:
                if self.on_corrupt == "error":
                    raise
                for video_id, problem in error.videos.items():
                    log.warning(
                        "skipping video %r, its stored data is corrupt: %s", video_id, problem
                    )
                with self._lock:
                    self.corrupt.update(error.videos)
                video_ids = [v for v in video_ids if v not in error.videos]
        return []


class BatchLoader:
    """Turns batch plans into CaptionBatches, reading the next ones while the current computes."""

    def __init__(
        self,
        source: FeatureSource,
        captions: dict[str, list[list[int]]],
        prefetch: int = 2,
    ) -> None:
        self.source = source
        self.captions = captions
        self.prefetch = prefetch
        self.wait_seconds = 0.0  # time the consumer spent blocked on data, for benchmarks
        self._last: CaptionBatch | None = None  # the last batch made, for an all-corrupt one

    def make(self, plan: BatchPlan) -> CaptionBatch:
        """The batch of ``plan``, without the videos (and their captions) skipped as corrupt."""
        records = self.source.read(plan.video_ids)
        planned = zip(plan.video_ids, plan.captions, records, strict=True)
        kept = [(vid, chosen, record) for vid, chosen, record in planned if record is not None]
        if not kept:
            # Every rank must still take the step together: redo the last batch at weight 0.
            return dataclasses.replace(self._last or self._stand_in(), dummy=True)
        encoded, video_index = [], []
        for row, (vid, chosen, _) in enumerate(kept):
            encoded += [self.captions[vid][i] for i in chosen]
            video_index += [row] * len(chosen)
        batch = CaptionBatch(
            features=collate_features([record for _, _, record in kept], self.source.layers),
            tokens=pad_captions(encoded),
            video_index=torch.tensor(video_index, dtype=torch.long),
            video_ids=tuple(vid for vid, _, _ in kept),
        )
        self._last = batch
        return batch

    def _stand_in(self) -> CaptionBatch:
        """A batch of the first readable video, for an all-corrupt batch before any other."""
        for vid in sorted(self.captions):
            if self.source.read([vid])[0] is not None:
                return self.make(BatchPlan((vid,), ((0,),), global_captions=1))
        raise CorruptVideo(dict(self.source.corrupt), str(self.source.store.path))

    def __call__(self, plans: Sequence[BatchPlan]) -> Iterator[CaptionBatch]:
        """Yield the batches of ``plans`` in order; a background thread stays ahead."""
        import time

        if self.prefetch <= 0:
            yield from map(self.make, plans)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            for plan in plans:
                if stop.is_set():
                    return
                try:
                    item = self.make(plan)
                except BaseException as error:  # handed to the consumer, raised there
                    ready.put(error)
                    return
                ready.put(item)

        worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
        worker.start()
        try:
            for _ in plans:
                started = time.perf_counter()
                item = ready.get()
                self.wait_seconds += time.perf_counter() - started
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
