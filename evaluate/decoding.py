"""Decoding captions from a trained captioner, through ``prepare`` and ``step`` only.

Every decoder here returns, per video, the words, their total log-probability and, per generated
word, the attention over locations (alpha) and over layers (beta). The first word comes from fc7
alone (eq. 1), so its attention row is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from astar.train.model import Captioner, FeatureBatch


@dataclass
class DecodedCaption:
    """One video's caption."""

    tokens: list[int]  # word ids, end-of-sentence excluded
    log_prob: float  # log p(caption, eos | video), end-of-sentence included when reached
    alpha: Tensor | None  # (S, I) attention over locations per generated token; row 0 NaN
    beta: Tensor | None  # (S, L) attention over layers per generated token; row 0 NaN
    grid: tuple[int, int, int] | None  # (T5, h, w): how I unflattens


@torch.inference_mode()
def greedy_decode(
    model: Captioner, features: FeatureBatch, max_length: int = 30
) -> list[DecodedCaption]:
    """The most likely word at every step, for a batch of B videos at once.

    Notation: B videos, V vocabulary, I locations, L attended layers, S generated tokens.
    """
    eos = model.config.eos_id
    context = model.prepare(features)  # B rows
    batch = len(context)
    words: list[Tensor] = []  # S x (B,)
    scores: list[Tensor] = []  # S x (B,)
    alphas: list[Tensor | None] = []
    betas: list[Tensor | None] = []
    finished = torch.zeros(batch, dtype=torch.bool, device=context.initial_hidden.device)  # (B,)
    word, state = None, None
    for _ in range(max_length):
        log_probs, state, extras = model.step(word, state, context)  # (B, V)
        score, word = log_probs.max(dim=-1)  # (B,), (B,)
        words.append(word)
        scores.append(score.where(~finished, 0.0))
        alphas.append(extras.get("alpha"))
        betas.append(extras.get("beta"))
        finished = finished | (word == eos)
        if bool(finished.all()):
            break
    tokens = torch.stack(words, dim=1).cpu()  # (B, S)
    total = torch.stack(scores, dim=1).sum(dim=1).cpu()  # (B,)
    alpha = _stack_attention(alphas)  # (B, S, I) or None
    beta = _stack_attention(betas)  # (B, S, L) or None
    results = []
    for row in range(batch):
        sequence = tokens[row].tolist()
        length = sequence.index(eos) if eos in sequence else len(sequence)
        steps = min(length + 1, len(sequence))  # attention rows up to the eos token
        results.append(
            DecodedCaption(
                tokens=sequence[:length],
                log_prob=float(total[row]),
                alpha=None if alpha is None else alpha[row, :steps],
                beta=None if beta is None else beta[row, :steps],
                grid=context.grid,
            )
        )
    return results


def _stack_attention(rows: list[Tensor | None]) -> Tensor | None:
    """Per-step (B, X) attention, the first step missing -> (B, S, X) with a NaN first row."""
    present = [r for r in rows if r is not None]
    if not present:
        return None
    template = present[0]
    filled = [torch.full_like(template, float("nan")) if r is None else r for r in rows]
    return torch.stack(filled, dim=1).float().cpu()  # (B, S, X)
