"""Greedy decoding and batched beam search over prepare/step, for every variant."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from astar.store.geometry import TAP_GRID
from astar.train.decoding import (
    DecodedCaption,
    DecodingError,
    _BeamSearch,
    beam_search,
    beam_search_prepared,
    greedy_decode,
    greedy_decode_prepared,
    length_penalty_factor,
)
from astar.train.model import (
    ALIGNMENT,
    VARIANTS,
    Captioner,
    CaptionerConfig,
    Context,
    DecoderState,
    FeatureBatch,
)

SPATIAL = TAP_GRID  # 112-pixel frames
TINY_CHANNELS = {"pool2": 3, "pool3": 4, "pool4": 5, "pool5": 6}
FC_DIM = 7
PAD, EOS = 0, 1


def tiny_model(variant: str, seed: int, vocab_size: int = 12, **overrides) -> Captioner:
    """A random tiny captioner in eval mode; a wide init makes its word choices decisive."""
    torch.manual_seed(seed)
    sizes = {"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8, "samples": 3}
    config = CaptionerConfig.small(
        vocab_size=vocab_size,
        variant=variant,
        layer_channels=TINY_CHANNELS,
        fc_dim=FC_DIM,
        **{**sizes, "init_range": 0.5, **overrides},
    )
    return Captioner(config).eval()


def videos(n_frames: list[int], seed: int) -> FeatureBatch:
    """Random features of videos of ``n_frames``, zero-padded in time like the loader's."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(n_frames)
    layers = {}
    for name, channels in TINY_CHANNELS.items():
        stride, size = ALIGNMENT[name].frame_stride, SPATIAL[name]
        x = torch.rand(len(n_frames), channels, longest // stride, size, size, generator=generator)
        valid = torch.arange(longest // stride)[None] < torch.tensor(n_frames)[:, None] // stride
        layers[name] = x * valid[:, None, :, None, None]
    fc7 = torch.randn(len(n_frames), FC_DIM, generator=generator)
    return FeatureBatch(layers, torch.tensor(n_frames), fc7)


def one_video(features: FeatureBatch, row: int) -> FeatureBatch:
    """Video ``row`` alone, cut to its own length."""
    n = int(features.n_frames[row])
    layers = {
        name: x[row : row + 1, :, : n // ALIGNMENT[name].frame_stride]
        for name, x in features.layers.items()
    }
    return FeatureBatch(layers, features.n_frames[row : row + 1], features.fc7[row : row + 1])


def generated(caption: DecodedCaption) -> list[int]:
    """The tokens the decoder produced: the words, then eos when it reached it."""
    return caption.tokens + ([EOS] if caption.finished else [])


def padded(captions: list[list[int]]) -> Tensor:
    longest = max(len(c) for c in captions)
    return torch.tensor([c + [PAD] * (longest - len(c)) for c in captions])


def assert_same_caption(a: DecodedCaption, b: DecodedCaption) -> None:
    """Bit-for-bit the same caption, attention included."""
    assert (a.tokens, a.finished, a.grid) == (b.tokens, b.finished, b.grid)
    assert a.log_prob == b.log_prob and a.token_log_probs == b.token_log_probs
    for mine, theirs in ((a.alpha, b.alpha), (a.beta, b.beta)):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)


# ---- beam size 1, and beam against greedy ----------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_of_one_is_greedy_exactly(variant: str) -> None:
    features = videos([16, 40, 33, 20], seed=1)
    for seed in range(3):
        model = tiny_model(variant, seed)
        greedy = greedy_decode(model, features, max_length=8)
        beam = beam_search(model, features, beam_size=1, max_length=8)
        for g, b in zip(greedy, beam, strict=True):
            assert_same_caption(g, b)
            assert g.n_steps == len(g.tokens) + g.finished <= 8


def test_beam_never_scores_below_greedy_and_often_above() -> None:
    """Over many random models and videos; the greedy caption competes from the start. "Worse"
    is the search's own order: a finished caption beats a cut one, then the higher log p."""
    above = total = 0
    for variant, seed in itertools.product(("fc7", "pool4", "soft", "hard"), range(8)):
        model = tiny_model(variant, seed, vocab_size=9)
        features = videos([16, 40, 33], seed=seed)
        context = model.prepare(features)
        greedy = greedy_decode_prepared(model, context, max_length=8)
        for beam_size in (2, 4):
            beam = beam_search_prepared(model, context, beam_size, max_length=8)
            for g, b in zip(greedy, beam, strict=True):
                assert b.finished >= g.finished, (variant, seed, beam_size, g, b)
                if b.finished == g.finished:
                    assert b.log_prob >= g.log_prob - 1e-5, (variant, seed, beam_size, g, b)
                above += b.finished > g.finished or b.log_prob > g.log_prob + 1e-4
                total += 1
    assert above > total // 4  # the search does find better captions, not just greedy's


class TableCaptioner(nn.Module):
    """A stand-in with the captioner's prepare/step whose next word depends on the previous only.

    ``table[previous]`` maps words to probabilities (``None``: the first word); words not listed
    share a tiny remainder. Lets a test build the exact situations that trip beam search.
    """

    def __init__(self, table: dict[int | None, dict[int, float]], vocab_size: int):
        super().__init__()
        self.config = CaptionerConfig(vocab_size=vocab_size, variant="fc7")
        start = vocab_size  # the row of the first word
        probs = torch.full((vocab_size + 1, vocab_size), 1e-6, dtype=torch.float64)
        for previous, row in table.items():
            for word, p in row.items():
                probs[start if previous is None else previous, word] = p
        probs[:, PAD] = 0.0
        self.log_table = (probs / probs.sum(dim=1, keepdim=True)).log().float()  # (V + 1, V)
        self.start = start
        self.eval()

    def prepare(self, features: FeatureBatch) -> Context:
        return Context(torch.zeros(features.batch_size, 1), None, None, None, None)

    def step(self, word, state, context, layer=None):
        previous = torch.full((len(context),), self.start) if word is None else word  # (N,)
        blank = torch.zeros(len(context), 1)
        return self.log_table[previous], DecoderState(blank, blank), {}


A, B, X, Y = 2, 3, 4, 5  # words of the table models


def test_plain_beam_search_can_lose_to_greedy_ours_cannot() -> None:
    """Greedy: "a <eos>" (0.4 x 0.4 = 0.16). With K = 2, "b x" and "b y" (0.35 x 0.5 = 0.175)
    push both "a ..." out at step 2, "a <eos>" never ranks in the top 2, and every continuation
    of "b" ends below 0.16: plain beam search returns a worse caption than greedy."""
    model = TableCaptioner(
        {
            None: {A: 0.40, B: 0.35, X: 0.125, Y: 0.125},
            A: {EOS: 0.40, X: 0.30, Y: 0.30},
            B: {X: 0.5, Y: 0.5},
            X: {EOS: 0.05, X: 0.475, Y: 0.475},
            Y: {EOS: 0.05, X: 0.475, Y: 0.475},
        },
        vocab_size=6,
    )
    context = model.prepare(videos([16], seed=0))
    with torch.inference_mode():
        plain = _BeamSearch(model, context, 2, 6, 0.0, keep_greedy=False).run()
    plain_caption = plain.to_captions(EOS, None)[0]
    (greedy,) = greedy_decode_prepared(model, context, max_length=6)
    (ours,) = beam_search_prepared(model, context, beam_size=2, max_length=6)
    assert greedy.tokens == [A] and greedy.log_prob == pytest.approx(math.log(0.16), abs=1e-4)
    assert plain_caption.log_prob < greedy.log_prob - 1.0
    assert ours.tokens == [A] and ours.log_prob >= greedy.log_prob


def test_a_finished_caption_is_never_lost() -> None:
    """ "a <eos>" (0.5 x 0.6 = 0.3) finishes at step 2 while "b x" (0.45) goes on and ends worse;
    greedy takes "b x ..." too, so only a kept finished caption gives the answer."""
    model = TableCaptioner(
        {
            None: {A: 0.499, B: 0.501},
            A: {EOS: 0.6, X: 0.2, Y: 0.2},
            B: {X: 0.9, Y: 0.1},
            X: {EOS: 0.1, X: 0.9},
            Y: {EOS: 0.1, Y: 0.9},
        },
        vocab_size=6,
    )
    context = model.prepare(videos([16], seed=0))
    (greedy,) = greedy_decode_prepared(model, context, max_length=10)
    (beam,) = beam_search_prepared(model, context, beam_size=2, max_length=10)
    assert greedy.tokens[:2] == [B, X] and greedy.log_prob < math.log(0.3)
    assert beam.tokens == [A] and beam.finished
    assert beam.log_prob == pytest.approx(math.log(0.499 * 0.6), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_caption_cut_at_max_length_never_outranks_a_finished_one(length_penalty: float) -> None:
    """ "a <eos>" (0.45 x 0.5 = 0.225) finishes at step 2; "b x x" (0.55 x 0.95 x 0.95 = 0.50)
    is cut at max_length 3 without its end-of-sentence: a higher partial score, but no caption.
    Greedy takes "b x x" too, so it is cut; beam search must return the finished caption."""
    model = TableCaptioner(
        {
            None: {A: 0.45, B: 0.55},
            A: {EOS: 0.5, X: 0.25, Y: 0.25},
            B: {X: 0.95, Y: 0.05},
            X: {X: 0.95, Y: 0.05},
            Y: {X: 0.95, Y: 0.05},
        },
        vocab_size=6,
    )
    context = model.prepare(videos([16, 16], seed=0))  # two videos: the batched path too
    (greedy, _) = greedy_decode_prepared(model, context, max_length=3)
    assert greedy.tokens == [B, X, X] and not greedy.finished  # nothing finished: the fallback
    assert greedy.log_prob > math.log(0.225) + 0.5
    for keep_greedy in (True, False):
        with torch.inference_mode():
            found = _BeamSearch(model, context, 2, 3, length_penalty, keep_greedy).run()
        for beam in found.to_captions(EOS, None):
            assert beam.tokens == [A] and beam.finished
            assert beam.log_prob == pytest.approx(math.log(0.225), abs=1e-4)
    for beam in beam_search_prepared(model, context, 2, 3, length_penalty):
        assert beam.tokens == [A] and beam.finished
    # K = 1 finds no finished caption: it returns the cut one, exactly as greedy does.
    (single, _) = beam_search_prepared(model, context, 1, max_length=3)
    assert_same_caption(single, greedy)


# ---- exactness ---------------------------------------------------------------------------


def all_captions(words: list[int], max_length: int) -> list[list[int]]:
    """Every caption of at most max_length tokens: ended by eos, or cut at max_length; none
    empty (a caption has at least one word)."""
    ended = [
        [*prefix, EOS]
        for n in range(1, max_length)
        for prefix in itertools.product(words, repeat=n)
    ]
    cut = [list(prefix) for prefix in itertools.product(words, repeat=max_length)]
    return ended + cut


@pytest.mark.parametrize("length_penalty", [0.0, 1.5])
@pytest.mark.parametrize("variant", ["fc7", "pool3", "soft", "hard"])
def test_a_wide_enough_beam_finds_the_best_caption(variant: str, length_penalty: float) -> None:
    """With K at least the candidates of any step nothing is pruned: the answer must be the best
    of all finished captions, each scored by teacher forcing (a finished caption lost, a wrong
    stopping bound, a wrong length penalty or a cut caption outranking finished ones would
    show)."""
    vocab_size, max_length = 5, 3
    words = list(range(2, vocab_size))
    beam_size = (vocab_size - 1) * len(words) ** (max_length - 1)  # every candidate of a step
    model = tiny_model(variant, seed=3, vocab_size=vocab_size, init_range=1.0)
    features = videos([16, 35], seed=4)
    context = model.prepare(features)
    captions = all_captions(words, max_length)
    decoded = beam_search_prepared(model, context, beam_size, max_length, length_penalty)
    for row, caption in enumerate(decoded):
        rows = torch.full((len(captions),), row)
        with torch.inference_mode():
            forced = model.teacher_force(context.index_select(rows), padded(captions))
        raw = forced.token_log_probs.sum(dim=1).double()  # (n,)
        lengths = torch.tensor([len(c) for c in captions], dtype=torch.float64)
        ended = torch.tensor([c[-1] == EOS for c in captions])  # (n,): cut ones rank below
        score = (raw / length_penalty_factor(lengths, length_penalty)).where(ended, -math.inf)
        best = int(score.argmax())
        assert caption.finished and generated(caption) == captions[best]
        assert caption.log_prob == pytest.approx(float(raw[best]), abs=1e-5)


@pytest.mark.parametrize("variant", ["fc7", "pool2", "soft", "hard"])
def test_batched_beam_equals_each_video_alone(variant: str) -> None:
    model = tiny_model(variant, seed=5)
    features = videos([16, 48, 33, 16], seed=6)
    batched = beam_search(model, features, beam_size=3, max_length=10)
    for row, together in enumerate(batched):
        (alone,) = beam_search(model, one_video(features, row), beam_size=3, max_length=10)
        assert (together.tokens, together.finished) == (alone.tokens, alone.finished)
        assert together.log_prob == pytest.approx(alone.log_prob, abs=1e-5)
        torch.testing.assert_close(
            torch.tensor(together.token_log_probs), torch.tensor(alone.token_log_probs)
        )
        if alone.alpha is None:
            assert together.alpha is None and together.beta is None
            continue
        own = alone.alpha.shape[1]  # this video's locations; the batch's grid is longer
        torch.testing.assert_close(together.alpha[:, :own], alone.alpha, equal_nan=True)
        assert not together.alpha[1:, own:].any()  # no attention past the video's end
        if alone.beta is not None:
            torch.testing.assert_close(together.beta, alone.beta, equal_nan=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_log_probs_and_attention_replay_through_the_model(variant: str) -> None:
    """Teacher forcing the returned captions gives their log-probs; stepping through them again
    gives their attention: alpha and beta were reordered along with the beams."""
    model = tiny_model(variant, seed=7)
    features = videos([16, 40, 33, 27], seed=8)
    decoded = beam_search(model, features, beam_size=4, max_length=9, length_penalty=0.8)
    tokens = padded([generated(c) for c in decoded])  # (B, S)
    with torch.inference_mode():
        context = model.prepare(features)
        forced = model.teacher_force(context, tokens).token_log_probs  # (B, S)
        replayed = replay_attention(model, context, tokens)
    for row, caption in enumerate(decoded):
        steps = caption.n_steps
        assert caption.log_prob == pytest.approx(float(forced[row].sum()), abs=1e-5)
        torch.testing.assert_close(
            torch.tensor(caption.token_log_probs, dtype=torch.float32), forced[row, :steps]
        )
        for name in ("alpha", "beta"):
            mine = getattr(caption, name)
            if name not in replayed:
                assert mine is None
                continue
            assert mine.shape[0] == steps and bool(mine[0].isnan().all())  # first word: fc7
            torch.testing.assert_close(mine[1:], replayed[name][row, 1:steps])


def replay_attention(model: Captioner, context: Context, tokens: Tensor) -> dict[str, Tensor]:
    """alpha/beta of every step of the given captions: name -> (B, S, X), NaN at step 0."""
    found: dict[str, list[Tensor]] = {}
    word, state = None, None
    for t in range(tokens.shape[1]):
        _, state, extras = model.step(word, state, context)
        for name in ("alpha", "beta"):
            if name in extras:
                found.setdefault(name, []).append(extras[name].float())
        word = tokens[:, t]
    return {
        name: torch.stack([torch.full_like(rows[0], math.nan), *rows], dim=1)
        for name, rows in found.items()
    }


# ---- end of sentence, max_length, pad ------------------------------------------------------


def rigged(variant: str, token: int, bias: float) -> Captioner:
    model = tiny_model(variant, seed=9)
    with torch.no_grad():
        model.output.bias[token] = bias
    return model


@pytest.mark.parametrize("beam_size", [1, 3])
def test_end_of_sentence_and_max_length(beam_size: int) -> None:
    features = videos([16, 40, 33], seed=10)
    # eos certain: no caption is empty (eos cannot be the first word); each ends right after
    # its one word, log p = log p(word) + log p(eos) ~ -40.
    for caption in beam_search(rigged("soft", EOS, 40.0), features, beam_size, max_length=7):
        assert len(caption.tokens) == 1 and caption.finished and caption.n_steps == 2
        assert -45 < caption.log_prob < -35
        assert caption.alpha.shape == (2, 2 * 16) and bool(caption.alpha[0].isnan().all())
    # eos impossible: every caption is cut at max_length, as greedy's would be.
    never_ends = rigged("soft", EOS, -40.0)
    cut = beam_search(never_ends, features, beam_size, max_length=7)
    for caption, g in zip(cut, greedy_decode(never_ends, features, 7), strict=True):
        assert len(caption.tokens) == caption.n_steps == 7 and not caption.finished
        assert EOS not in caption.tokens and caption.log_prob >= g.log_prob - 1e-5
    # pad is never a word, however likely the model makes it.
    for caption in beam_search(rigged("soft", PAD, 40.0), features, beam_size, max_length=7):
        assert PAD not in caption.tokens and caption.log_prob < -20


@pytest.mark.parametrize("beam_size", [1, 4])
def test_one_token_is_the_best_first_word(beam_size: int) -> None:
    model = tiny_model("pool5", seed=11)
    features = videos([16, 40], seed=12)
    with torch.inference_mode():
        first, _, _ = model.step(None, None, model.prepare(features))  # (B, V)
    best_lp, best_word = first[:, 2:].max(dim=1)  # pad (0) and eos (1, no empty caption) excluded
    for row, caption in enumerate(beam_search(model, features, beam_size, max_length=1)):
        word = int(best_word[row]) + 2
        assert generated(caption) == [word] and not caption.finished
        assert caption.log_prob == pytest.approx(float(best_lp[row]), abs=1e-6)


def test_length_penalty_factor_is_gnmts() -> None:
    lengths = torch.tensor([1.0, 7.0, 13.0])
    torch.testing.assert_close(length_penalty_factor(lengths, 0.0), torch.ones(3))
    torch.testing.assert_close(length_penalty_factor(lengths, 1.0), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(length_penalty_factor(lengths, 2.0), torch.tensor([1.0, 4.0, 9.0]))


def test_a_length_penalty_lengthens_captions() -> None:
    """Raw log-probability favours short captions; a strong penalty exponent must not."""
    model = tiny_model("soft", seed=13)
    features = videos([16, 40, 33, 20, 48], seed=14)
    raw = beam_search(model, features, beam_size=4, max_length=10)
    long = beam_search(model, features, beam_size=4, max_length=10, length_penalty=3.0)
    assert sum(c.n_steps for c in long) > sum(c.n_steps for c in raw)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2.0}, "beam_size"),
        ({"max_length": 0}, "max_length"),
        ({"length_penalty": math.nan}, "length_penalty"),
    ],
)
def test_bad_arguments_are_refused(arguments: dict, message: str) -> None:
    model = tiny_model("fc7", seed=0)
    with pytest.raises(DecodingError, match=message):
        beam_search(model, videos([16], seed=0), **arguments)


def test_a_model_in_training_mode_is_refused() -> None:
    model = tiny_model("soft", seed=0).train()
    for decode in (greedy_decode, beam_search):
        with pytest.raises(DecodingError, match="training mode"):
            decode(model, videos([16], seed=0))
