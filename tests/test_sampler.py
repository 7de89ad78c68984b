"""Video-major batch plans: coverage, determinism, and sharding across ranks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from astar.train.data import VideoMajorSampler, pad_captions

COUNTS = {f"v{k}": 3 + k % 5 for k in range(23)}  # 23 videos with 3..7 captions


def _captions_of(plans) -> Counter:
    seen = Counter()
    for plan in plans:
        if plan.dummy:
            continue
        for vid, chosen in zip(plan.video_ids, plan.captions, strict=True):
            seen.update((vid, i) for i in chosen)
    return seen


def test_an_epoch_visits_every_caption_once_in_video_major_batches():
    sampler = VideoMajorSampler(COUNTS, videos_per_batch=4, captions_per_video=3, seed=1)
    plans = sampler.epoch(0)
    seen = _captions_of(plans)
    expected = Counter((vid, i) for vid, n in COUNTS.items() for i in range(n))
    assert seen == expected
    for plan in plans:
        assert len(plan.video_ids) == len(set(plan.video_ids)) <= 4  # a video once per batch
        assert all(1 <= len(chosen) <= 3 for chosen in plan.captions)
        assert plan.global_captions == sum(len(c) for c in plan.captions)


def test_order_depends_on_seed_and_epoch_only():
    make = lambda seed: VideoMajorSampler(COUNTS, 4, 3, seed=seed)  # noqa: E731
    assert make(0).epoch(2) == make(0).epoch(2)
    assert make(0).epoch(2) != make(0).epoch(3)
    assert make(0).epoch(2) != make(1).epoch(2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch_exactly(world_size: int):
    single = VideoMajorSampler(COUNTS, videos_per_batch=4 * world_size, captions_per_video=3)
    ranks = [
        VideoMajorSampler(COUNTS, 4, 3, rank=r, world_size=world_size) for r in range(world_size)
    ]
    per_rank = [sampler.epoch(0) for sampler in ranks]
    assert len({len(plans) for plans in per_rank}) == 1  # every rank steps the same number of times
    for step, global_plan in enumerate(single.epoch(0)):
        shares = [plans[step] for plans in per_rank]
        merged = Counter()
        for share in shares:
            assert share.global_captions == global_plan.global_captions
            if not share.dummy:
                merged.update(zip(share.video_ids, share.captions, strict=True))
        assert merged == Counter(zip(global_plan.video_ids, global_plan.captions, strict=True))


def test_pad_captions():
    tokens = pad_captions([[5, 6, 1], [7, 1]])
    assert torch.equal(tokens, torch.tensor([[5, 6, 1], [7, 1, 0]]))
