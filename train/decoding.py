"""Decoding captions from a trained captioner, through ``prepare`` and ``step`` only.

Every decoder here returns, per video, the words, their total log-probability and, per generated
word, the attention over locations (alpha) and over layers (beta). The first word comes from fc7
alone (eq. 1), so its attention row is NaN.

Greedy decoding takes the most likely word at every step. Beam search keeps the K best partial
captions of every video; all B videos x K beams advance as one (B K)-row batch, so a step costs
one ``step`` call whatever B and K are, and ``prepare`` runs once per video (its Context is
repeated per beam by index, never recomputed).

Beam search, precisely (per video, K = beam size):

- Step t extends each of the K live beams by every word (pad is never a word): K x V candidates,
  ranked by raw log-probability. All candidates of one step have the same length, so a length
  penalty would not change this ranking.
- An end-of-sentence candidate that ranks among the K best of the step *finishes*: it is kept for
  good (a finished caption is never lost) and counts towards K. The next live beams are the K best
  candidates that do not end (so the beam stays K wide). This is the rule of fairseq's search:
  with K = 1 it is greedy decoding exactly.
- A video stops when K captions have finished, or when no live beam can beat its best finished
  caption any more (``_BeamSearch.best_reachable``: scores only fall as words are added), or at
  ``max_length`` tokens. A stopped video's rows stay in the batch, dead, until all have stopped.
- The answer is the best *finished* caption by length-penalised score (``length_penalty_factor``).
  A beam cut at ``max_length`` is no caption of the model (eq. 3 scores every caption through its
  end-of-sentence): its score log p(prefix) is the probability of all its continuations, an upper
  bound of any caption it could become, so ranking it against finished captions would favour
  truncation. A cut beam is therefore only a fallback: the best one (by the same score) is
  returned, with ``finished=False``, when no caption of the video finished. Greedy follows the
  same rule (its one caption is cut only when it did not end), so K = 1 is still greedy. (The
  other sound choice, fairseq's, forces end-of-sentence as the max_length-th token; it would
  change greedy's last word and drop a word from every cut caption, so it is not taken.)
- For K > 1 the greedy caption is also a candidate from the start. Plain beam search can lose to
  greedy: the greedy prefix can be pushed out of the beam by K prefixes that score better so far
  but end worse (tests/test_decoding.py builds such a model). With greedy's caption in the pool,
  beam search never returns a lower-scoring caption than greedy, for one greedy pass over the B
  videos (B rows beside the B K beams) as the cost.

Pad is never generated (it only fills captions; teacher forcing would read it as the end). The
hard variant decodes with argmax layer choices; with ``hard_inference="sample"`` every row draws
its own layers, so the search is random. A model in training mode (dropout) is refused.

Notation: B videos, K beams, V vocabulary, I locations, L attended layers, S tokens (at most
``max_length``, end-of-sentence included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from astar.train.model import Captioner, Context, FeatureBatch


class DecodingError(ValueError):
    """Decoding arguments, or a model state, that cannot give meaningful captions."""


@dataclass
class DecodedCaption:
    """One video's caption."""

    tokens: list[int]  # word ids, end-of-sentence excluded
    log_prob: float  # log p(caption, eos | video), end-of-sentence included when reached
    alpha: Tensor | None  # (S, I) attention over locations per generated token; row 0 NaN
    beta: Tensor | None  # (S, L) attention over layers per generated token; row 0 NaN
    grid: tuple[int, int, int] | None  # (T5, h, w): how I unflattens (the batch's T5)
    token_log_probs: list[float]  # (S,) log p of each generated token, eos included if reached
    finished: bool  # True: ended with eos; False: cut at max_length

    @property
    def n_steps(self) -> int:
        """S: tokens generated, end-of-sentence included when reached."""
        return len(self.token_log_probs)


def length_penalty_factor(lengths: Tensor, length_penalty: float) -> Tensor:
    """GNMT's lp(n) = ((5 + n) / 6) ** length_penalty; a caption's ranking score is log p / lp(n).

    ``n`` counts generated tokens, end-of-sentence included. length_penalty 0 gives lp = 1 (raw
    log-probability, which favours short captions); larger values favour longer ones.
    """
    return ((5.0 + lengths) / 6.0) ** length_penalty


# --------------------------------------------------------------------------------------------
# Public decoders
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_decode(
    model: Captioner, features: FeatureBatch, max_length: int = 30
) -> list[DecodedCaption]:
    """The most likely word at every step, for a batch of B videos at once.

    A caption without end-of-sentence by ``max_length`` tokens is returned cut (``finished``
    False, log p of its prefix): the fallback beam search also uses when nothing finished.
    """
    _check_arguments(model, beam_size=1, max_length=max_length, length_penalty=0.0)
    return greedy_decode_prepared(model, model.prepare(features), max_length)


@torch.inference_mode()
def greedy_decode_prepared(
    model: Captioner, context: Context, max_length: int = 30
) -> list[DecodedCaption]:
    """``greedy_decode`` from a prepared Context (one row per video)."""
    _check_arguments(model, beam_size=1, max_length=max_length, length_penalty=0.0)
    return _greedy(model, context, max_length).to_captions(model.config.eos_id, context.grid)


@torch.inference_mode()
def beam_search(
    model: Captioner,
    features: FeatureBatch,
    beam_size: int = 5,
    max_length: int = 30,
    length_penalty: float = 0.0,
) -> list[DecodedCaption]:
    """The best caption of each of B videos by batched beam search (module docstring).

    Args:
        beam_size: K, live beams per video; 1 is greedy decoding
        max_length: most tokens generated per caption, end-of-sentence included
        length_penalty: exponent of ``length_penalty_factor``; 0 ranks by raw log-probability
    """
    _check_arguments(model, beam_size, max_length, length_penalty)
    return beam_search_prepared(
        model, model.prepare(features), beam_size, max_length, length_penalty
    )


@torch.inference_mode()
def beam_search_prepared(
    model: Captioner,
    context: Context,
    beam_size: int = 5,
    max_length: int = 30,
    length_penalty: float = 0.0,
) -> list[DecodedCaption]:
    """``beam_search`` from a prepared Context (one row per video)."""
    _check_arguments(model, beam_size, max_length, length_penalty)
    best = _BeamSearch(model, context, beam_size, max_length, length_penalty).run()
    return best.to_captions(model.config.eos_id, context.grid)


def _check_arguments(
    model: Captioner, beam_size: int, max_length: int, length_penalty: float
) -> None:
    problems = []
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        problems.append(f"beam_size must be an integer >= 1, got {beam_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        problems.append(f"max_length must be an integer >= 1, got {max_length!r}")
    if not math.isfinite(length_penalty):
        problems.append(f"length_penalty must be finite, got {length_penalty!r}")
    if model.training:
        problems.append(
            "the model is in training mode (dropout, sampled hard layers): call model.eval()"
        )
    if problems:
        raise DecodingError("cannot decode: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Hypotheses: partial or complete captions in padded buffers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hypotheses:
    """N captions being built (or built), one row each, padded to max_length tokens."""

    tokens: Tensor  # (N, S) long: generated tokens, eos included; pad after the end
    token_log_probs: Tensor  # (N, S): log p of each token; 0 after the end
    alpha: Tensor | None  # (N, S, I) float32: alpha per token; NaN for the first and after the end
    beta: Tensor | None  # (N, S, L) float32: beta per token (L > 1 only); NaN likewise
    length: Tensor  # (N,) long: tokens generated so far
    finished: Tensor  # (N,) bool: ended with eos

    @classmethod
    def empty(cls, model: Captioner, context: Context, rows: int, max_length: int) -> _Hypotheses:
        """``rows`` captions of no token yet, with attention buffers sized for ``context``."""
        device = context.initial_hidden.device
        score_dtype = torch.promote_types(context.initial_hidden.dtype, torch.float32)
        n_layers = len(model.config.attended_layers)

        def nan(width: int) -> Tensor:
            return torch.full((rows, max_length, width), math.nan, device=device)

        has_locations = context.mask is not None
        return cls(
            tokens=torch.full(
                (rows, max_length), model.config.pad_id, dtype=torch.long, device=device
            ),  # (N, S)
            token_log_probs=torch.zeros(rows, max_length, dtype=score_dtype, device=device),
            alpha=nan(context.mask.shape[1]) if has_locations else None,  # (N, S, I)
            beta=nan(n_layers) if has_locations and n_layers > 1 else None,  # (N, S, L)
            length=torch.zeros(rows, dtype=torch.long, device=device),  # (N,)
            finished=torch.zeros(rows, dtype=torch.bool, device=device),  # (N,)
        )

    def index_select(self, rows: Tensor) -> _Hypotheses:
        """Rows ``rows`` (N',) of these hypotheses."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, rows)

        return _Hypotheses(
            tokens=pick(self.tokens),
            token_log_probs=pick(self.token_log_probs),
            alpha=pick(self.alpha),
            beta=pick(self.beta),
            length=pick(self.length),
            finished=pick(self.finished),
        )

    def extend(
        self,
        rows: Tensor,
        words: Tensor,
        word_log_probs: Tensor,
        extras: dict[str, Tensor],
        eos_id: int,
    ) -> _Hypotheses:
        """Hypotheses ``rows`` (N',), each extended by one word at its own position.

        ``extras`` is the ``step`` output of all N rows; its alpha/beta rows ``rows`` are the
        attention that produced the words.
        """
        parent = self.index_select(rows)
        position = parent.length[:, None]  # (N', 1): where the new word goes

        def put(buffer: Tensor | None, name: str) -> Tensor | None:
            if buffer is None or name not in extras:
                return buffer  # the first word has no attention: its row stays NaN
            values = extras[name].index_select(0, rows).float()  # (N', X)
            index = position[:, :, None].expand(-1, 1, values.shape[1])  # (N', 1, X)
            return buffer.scatter(1, index, values[:, None])  # (N', S, X)

        return _Hypotheses(
            tokens=parent.tokens.scatter(1, position, words[:, None]),  # (N', S)
            token_log_probs=parent.token_log_probs.scatter(
                1, position, word_log_probs[:, None].to(parent.token_log_probs.dtype)
            ),
            alpha=put(parent.alpha, "alpha"),
            beta=put(parent.beta, "beta"),
            length=parent.length + 1,
            finished=parent.finished | (words == eos_id),
        )

    def where(self, condition: Tensor, other: _Hypotheses) -> _Hypotheses:
        """Row r from ``self`` where condition[r] (N,) bool, else from ``other``."""

        def choose(mine: Tensor | None, theirs: Tensor | None) -> Tensor | None:
            if mine is None:
                return None
            shaped = condition.reshape(-1, *([1] * (mine.ndim - 1)))  # (N, 1, ...)
            return torch.where(shaped, mine, theirs)

        return _Hypotheses(
            tokens=choose(self.tokens, other.tokens),
            token_log_probs=choose(self.token_log_probs, other.token_log_probs),
            alpha=choose(self.alpha, other.alpha),
            beta=choose(self.beta, other.beta),
            length=choose(self.length, other.length),
            finished=choose(self.finished, other.finished),
        )

    def raw_scores(self) -> Tensor:
        """(N,) log p of each hypothesis (0 after the end, so a plain sum)."""
        return self.token_log_probs.sum(dim=1)

    def to_captions(self, eos_id: int, grid: tuple[int, int, int] | None) -> list[DecodedCaption]:
        """One DecodedCaption per row, on the CPU."""
        tokens = self.tokens.tolist()
        token_log_probs = self.token_log_probs.double().tolist()
        lengths = self.length.tolist()
        finished = self.finished.tolist()
        alpha = None if self.alpha is None else self.alpha.cpu()  # (N, S, I)
        beta = None if self.beta is None else self.beta.cpu()  # (N, S, L)
        captions = []
        for row, (length, ended) in enumerate(zip(lengths, finished, strict=True)):
            step_log_probs = token_log_probs[row][:length]
            captions.append(
                DecodedCaption(
                    tokens=tokens[row][: length - 1] if ended else tokens[row][:length],
                    # fsum rounds the exact sum once: totals do not depend on summation order.
                    log_prob=math.fsum(step_log_probs),
                    alpha=None if alpha is None else alpha[row, :length],
                    beta=None if beta is None else beta[row, :length],
                    grid=grid,
                    token_log_probs=step_log_probs,
                    finished=bool(ended),
                )
            )
        return captions


def _word_log_probs(model: Captioner, log_probs: Tensor, first: bool) -> Tensor:
    """(N, V) step output with what is no caption made impossible: pad (it only fills
    captions) always, and end-of-sentence as the first word. An empty caption is in no dataset
    (eq. 3 never scores one), yet its single-term log p can beat every real caption's sum of
    many: beam search on a half-trained demo model returned it for 34 of 80 test videos."""
    banned = [model.config.pad_id, model.config.eos_id] if first else [model.config.pad_id]
    return log_probs.index_fill(1, torch.tensor(banned, device=log_probs.device), -math.inf)


# --------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------


def _greedy(model: Captioner, context: Context, max_length: int) -> _Hypotheses:
    """Greedy captions of every context row (B rows -> B hypotheses)."""
    eos = model.config.eos_id
    rows = torch.arange(len(context), device=context.initial_hidden.device)  # (B,)
    captions = _Hypotheses.empty(model, context, len(context), max_length)
    word, state = None, None
    for t in range(max_length):
        log_probs, state, extras = model.step(word, state, context)  # (B, V)
        word_log_prob, word = _word_log_probs(model, log_probs, t == 0).max(dim=-1)  # (B,), (B,)
        extended = captions.extend(rows, word, word_log_prob, extras, eos)
        captions = captions.where(captions.finished, extended)  # finished rows stay as they are
        if bool(captions.finished.all()):
            break
    return captions


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------


@dataclass
class _Results:
    """Each video's best caption so far, and where its search stands."""

    best: _Hypotheses  # B rows: the best caption found (finished, or cut at max_length)
    score: Tensor  # (B,): its ranking score (length-penalised); -inf while there is none
    n_finished: Tensor  # (B,) long: captions that finished inside the beam (fairseq's count)
    done: Tensor  # (B,) bool: the video's search has stopped

    def offer(self, candidates: _Hypotheses, scores: Tensor) -> None:
        """One candidate per video (B rows, (B,) ranking scores): kept where strictly better.

        Better: finished beats cut whatever the scores; between two finished or two cut
        captions the higher score wins, ties keep the earlier caption.
        """
        mine, theirs = candidates.finished, self.best.finished  # (B,), (B,)
        improved = torch.where(mine == theirs, scores > self.score, mine)  # (B,)
        improved &= scores > -math.inf  # a candidate of -inf is no candidate (a dead video)
        self.best = candidates.where(improved, self.best)
        self.score = torch.where(improved, scores, self.score)

    def finished_score(self) -> Tensor:
        """(B,) score of the best finished caption; -inf while only a cut one (or none) is held."""
        return self.score.where(self.best.finished, -math.inf)


class _BeamSearch:
    """The search of the module docstring over B videos x K beams, as one (B K)-row batch."""

    def __init__(
        self,
        model: Captioner,
        context: Context,
        beam_size: int,
        max_length: int,
        length_penalty: float,
        keep_greedy: bool = True,
    ):
        self.model = model
        self.context = context  # B rows
        self.beam_size = beam_size
        self.max_length = max_length
        self.length_penalty = length_penalty
        self.keep_greedy = keep_greedy  # False: plain beam search (tests show why it is kept)
        self.n_videos = len(context)
        self.device = context.initial_hidden.device
        self.eos = model.config.eos_id
        # Row of each video's first beam in the (B K) batch.
        self.first_row = torch.arange(self.n_videos, device=self.device)[:, None] * beam_size

    def penalised(self, raw: Tensor, length: int | Tensor) -> Tensor:
        """Ranking score of captions of ``length`` tokens: log p / lp(length)."""
        lengths = torch.as_tensor(length, dtype=raw.dtype, device=raw.device)
        return raw / length_penalty_factor(lengths, self.length_penalty)

    def best_reachable(self, raw: Tensor, length: int) -> Tensor:
        """An upper bound of the ranking score any continuation of live beams can reach.

        A continuation has raw score <= raw (log-probabilities are <= 0; float addition of a
        non-positive number cannot round upwards) and length n in [length + 1, max_length]; for
        raw <= 0, raw / lp(n) is largest where lp is largest, at one end as lp is monotonic.
        """
        ends = torch.tensor([length + 1, self.max_length], dtype=raw.dtype, device=raw.device)
        return raw / length_penalty_factor(ends, self.length_penalty).max()

    def run(self) -> _Hypotheses:
        """The best caption of every video (B hypotheses)."""
        model, k = self.model, self.beam_size
        # (B K) rows, video-major, K beams each; K = 1 uses the rows as they are, so its
        # arithmetic is greedy's to the last bit.
        context = self.context.repeat_interleave(k) if k > 1 else self.context
        results = self.start()
        beams = _Hypotheses.empty(model, context, self.n_videos * k, self.max_length)
        # All K beams start as the same empty caption: only the first may extend at step 1.
        scores = torch.full((self.n_videos, k), -math.inf, device=self.device)  # (B, K) log p
        scores[:, 0] = 0.0
        word, state = None, None
        for t in range(self.max_length):
            log_probs, state, extras = model.step(word, state, context)  # (B K, V)
            log_probs = _word_log_probs(model, log_probs, t == 0)  # (B K, V)
            candidates = rearrange(
                scores.to(log_probs.dtype).reshape(-1, 1) + log_probs, "(b k) v -> b k v", k=k
            )  # (B, K, V): raw log p of every one-word extension
            self.finish(results, beams, candidates, log_probs, extras, t)
            beams, scores, rows = self.go_on(beams, candidates, log_probs, extras)
            word, state = beams.tokens[:, t], state.index_select(rows)  # (B K,)
            # A video is done with K finished captions, or when no beam can beat its best
            # finished one (a cut one, greedy's, is beaten by any finished caption).
            reachable = self.best_reachable(scores, t + 1).amax(dim=1)  # (B,)
            results.done |= (results.n_finished >= k) | (results.finished_score() >= reachable)
            scores = scores.masked_fill(results.done[:, None], -math.inf)  # dead beams
            if bool(results.done.all()):
                return results.best
        # max_length reached: the best live beam, cut, is kept only where nothing finished
        # (``offer``: finished beats cut); done videos' beams are -inf, and offer nothing.
        cut_score, cut_beam = self.penalised(scores, self.max_length).max(dim=1)  # (B,)
        results.offer(beams.index_select(self.first_row[:, 0] + cut_beam), cut_score)
        return results.best

    def start(self) -> _Results:
        """The pool before the search: greedy's captions for K > 1 (so beam search never
        returns a lower-scoring caption than greedy), nothing for K = 1 (greedy itself)."""
        n_videos = self.n_videos
        if self.beam_size > 1 and self.keep_greedy:
            best = _greedy(self.model, self.context, self.max_length)  # B rows
            score = self.penalised(best.raw_scores(), best.length)  # (B,)
        else:
            best = _Hypotheses.empty(self.model, self.context, n_videos, self.max_length)
            score = torch.full((n_videos,), -math.inf, device=self.device)  # (B,)
        zeros = torch.zeros(n_videos, dtype=torch.long, device=self.device)  # (B,)
        return _Results(best, score, n_finished=zeros, done=zeros.bool())

    def finish(
        self,
        results: _Results,
        beams: _Hypotheses,
        candidates: Tensor,
        log_probs: Tensor,
        extras: dict[str, Tensor],
        t: int,
    ) -> None:
        """Endings among each video's K best candidates finish; its best one is offered."""
        k, eos, vocab = self.beam_size, self.eos, candidates.shape[2]
        top_scores, top_index = rearrange(candidates, "b k v -> b (k v)").topk(k, dim=1)
        ends = (top_index % vocab == eos) & top_scores.isfinite() & ~results.done[:, None]
        results.n_finished += ends.sum(dim=1)  # (B,)
        end_scores = self.penalised(top_scores.where(ends, -math.inf), t + 1)  # (B, K)
        end_score, end_slot = end_scores.max(dim=1)  # (B,): the best ending of each video
        end_rows = self.first_row[:, 0] + top_index.gather(1, end_slot[:, None])[:, 0] // vocab
        eos_words = torch.full_like(end_rows, eos)  # (B,)
        ended = beams.extend(end_rows, eos_words, log_probs[end_rows, eos], extras, eos)
        results.offer(ended, end_score)

    def go_on(
        self,
        beams: _Hypotheses,
        candidates: Tensor,
        log_probs: Tensor,
        extras: dict[str, Tensor],
    ) -> tuple[_Hypotheses, Tensor, Tensor]:
        """The K best candidates that do not end become the beams.

        Returns the new beams ((B K) rows), their raw scores (B, K) and their parent rows (B K,).
        """
        k, vocab = self.beam_size, candidates.shape[2]
        eos = torch.tensor([self.eos], device=self.device)
        going_on = candidates.index_fill(2, eos, -math.inf)  # (B, K, V)
        scores, index = rearrange(going_on, "b k v -> b (k v)").topk(k, dim=1)  # (B, K)
        rows = (self.first_row + index // vocab).reshape(-1)  # (B K,): each new beam's parent
        words = (index % vocab).reshape(-1)  # (B K,)
        beams = beams.extend(rows, words, log_probs[rows, words], extras, self.eos)
        return beams, scores, rows
