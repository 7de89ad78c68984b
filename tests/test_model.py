"""The captioner: config, alignment (eq. 4), attention (eqs. 5-8), decoder (eqs. 1-3), loss."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from astar.store.geometry import TAP_GRID
from astar.train.model import (
    ALIGNMENT,
    C3D_LAYER_CHANNELS,
    C3D_SMALL_LAYER_CHANNELS,
    VARIANTS,
    Captioner,
    CaptionerConfig,
    CaptionerConfigError,
    CaptionerInputError,
    Context,
    FeatureBatch,
)

SPATIAL = TAP_GRID  # 112-pixel frames
TINY_CHANNELS = {"pool2": 3, "pool3": 4, "pool4": 5, "pool5": 6}
FC_DIM = 7


def tiny_config(variant: str = "soft", **overrides) -> CaptionerConfig:
    sizes = {"hidden_dim": 16, "embed_dim": 8, "attention_dim": 8, "samples": 3}
    return CaptionerConfig.small(
        vocab_size=12,
        variant=variant,
        layer_channels=overrides.pop("layer_channels", TINY_CHANNELS),
        fc_dim=FC_DIM,
        **{**sizes, **overrides},
    )


def video(n_frames: int, seed: int, channels: dict[str, int] = TINY_CHANNELS) -> FeatureBatch:
    """One video's features at their exact lengths: layer poolk has n_frames // 2^(k-1) steps."""
    generator = torch.Generator().manual_seed(seed)
    layers = {
        name: torch.rand(
            1,
            c,
            n_frames // ALIGNMENT[name].frame_stride,
            SPATIAL[name],
            SPATIAL[name],
            generator=generator,
        )
        for name, c in channels.items()
    }
    fc7 = torch.randn(1, FC_DIM, generator=generator)
    return FeatureBatch(layers, torch.tensor([n_frames]), fc7)


def collate(videos: list[FeatureBatch], fill: float = 0.0) -> FeatureBatch:
    """Pad in time to the longest; ``fill`` != 0 puts junk where the loader puts zeros."""
    layers = {}
    for name in videos[0].layers:
        longest = max(v.layers[name].shape[2] for v in videos)
        padded = []
        for v in videos:
            x = v.layers[name]
            junk = torch.full((*x.shape[:2], longest - x.shape[2], *x.shape[3:]), fill)
            padded.append(torch.cat([x, junk], dim=2))
        layers[name] = torch.cat(padded)
    n_frames = torch.cat([v.n_frames for v in videos])
    return FeatureBatch(layers, n_frames, torch.cat([v.fc7 for v in videos]))


def greedy(
    model: Captioner, features: FeatureBatch, max_length: int, first: torch.Tensor | None = None
) -> list[list[int]]:
    """Greedy decoding through prepare/step only; ``first`` forces the first words."""
    eos, pad = model.config.eos_id, model.config.pad_id
    context = model.prepare(features)
    log_probs, state, _ = model.step(None, None, context)
    word = log_probs.argmax(dim=-1) if first is None else first
    words, done = [word], word == eos
    while len(words) < max_length and not bool(done.all()):
        log_probs, state, _ = model.step(word, state, context)
        word = log_probs.argmax(dim=-1).masked_fill(done, pad)
        words.append(word)
        done = done | (word == eos)
    rows = torch.stack(words, dim=1).tolist()
    return [[w for w in row if w != pad] for row in rows]


# ---- config ----------------------------------------------------------------------------------


def test_config_defaults_are_the_papers() -> None:
    config = CaptionerConfig(vocab_size=100)
    assert (config.hidden_dim, config.embed_dim, config.dropout, config.samples) == (
        512,
        300,
        0.5,
        10,
    )
    assert config.layer_channels == C3D_LAYER_CHANNELS and config.fc_dim == 4096
    assert config.feature_dim == 512 and config.hard_inference == "argmax"
    assert config.attended_layers == ("pool2", "pool3", "pool4", "pool5")
    assert CaptionerConfig(vocab_size=9, variant="pool3").attended_layers == ("pool3",)
    assert CaptionerConfig(vocab_size=9, variant="fc7").attended_layers == ()
    small = CaptionerConfig.small(vocab_size=50, variant="hard")
    assert small.layer_channels == C3D_SMALL_LAYER_CHANNELS and small.fc_dim == 1024
    assert small.feature_dim == 128 and small.hard
    assert CaptionerConfig.from_dict(small.to_dict()) == small


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"variant": "attention"}, "not one of"),
        ({"feature_dim": 256}, "identity"),
        ({"variant": "hard", "samples": 1}, "K >= 2"),
        ({"variant": "pool3", "layer_channels": {"pool5": 8}}, "needs pool3"),
        ({"layer_channels": {"pool6": 8, "pool5": 8}}, "unknown layers"),
        ({"layer_channels": {"pool4": 8}}, "feature_dim must be given"),
        ({"vocab_size": 1}, "vocab_size"),
    ],
)
def test_config_refuses_contradictions(values: dict, message: str) -> None:
    with pytest.raises(CaptionerConfigError, match=message):
        CaptionerConfig(**{"vocab_size": 10, **values})


def test_config_from_dict_refuses_unknown_keys_and_keeps_its_own_channels() -> None:
    with pytest.raises(CaptionerConfigError, match="unknown captioner config keys"):
        CaptionerConfig.from_dict({"vocab_size": 10, "heads": 8})
    channels = {"pool5": 8}
    config = CaptionerConfig(vocab_size=10, variant="pool5", layer_channels=channels)
    channels["pool5"] = 16
    assert config.layer_channels == {"pool5": 8} and config.feature_dim == 8


# ---- alignment (eq. 4) -----------------------------------------------------------------------


def test_alignment_reproduces_pool5_windows() -> None:
    """With delta kernels the branch is maxpool(ReLU(a_l)): check each cell's window by hand."""
    model = Captioner(tiny_config("soft", feature_norm="none")).eval()
    with torch.no_grad():
        for name, conv in model.alignment.convs.items():
            conv.weight.zero_()
            conv.bias.zero_()
            centre = ALIGNMENT[name].kernel // 2
            for c in range(min(conv.in_channels, conv.out_channels)):
                conv.weight[c, c, centre, centre, centre] = 1.0
    features = video(48, seed=0)
    features.layers = {k: v - 0.5 for k, v in features.layers.items()}  # so ReLU matters
    context = model.prepare(features)
    assert context.grid == (3, 4, 4)
    aligned = rearrange(
        context.locations, "b (t h w) l f -> b l f t h w", t=3, h=4, w=4
    )  # (1, L, F, 3, 4, 4)
    for index, name in enumerate(model.config.attended_layers):
        layer = features.layers[name][0]  # (C, T, h, w)
        steps = 16 // ALIGNMENT[name].frame_stride  # layer steps per pool5 step
        # C3D's pool5 (padding 1) takes pool4 cells 2i-1, 2i, so pool5 cell i covers pool4
        # [2i-1, 2i+1), pool3 [4i-2, 4i+2) and pool2 [8i-4, 8i+4).
        side = {"pool2": 8, "pool3": 4, "pool4": 2, "pool5": 1}[name]
        shift = side // 2
        for c in range(min(layer.shape[0], 6)):
            for t in range(3):
                for i in range(4):
                    for j in range(4):
                        rows = slice(max(0, side * i - shift), side * i - shift + side)
                        cols = slice(max(0, side * j - shift), side * j - shift + side)
                        window = layer[c, steps * t : steps * (t + 1), rows, cols]
                        expected = window.max() if name == "pool5" else window.max().clamp(min=0)
                        assert aligned[0, index, c, t, i, j] == expected


@pytest.mark.parametrize("n_frames", [16, 31, 32, 47, 100])
def test_every_layer_lands_on_floor_n_over_16_steps(n_frames: int) -> None:
    context = Captioner(tiny_config("soft")).prepare(video(n_frames, seed=1))
    assert context.grid == (n_frames // 16, 4, 4)
    assert context.locations.shape == (1, n_frames // 16 * 16, 4, 6)
    assert context.projected.shape == (1, n_frames // 16 * 16, 8)


# ---- feature normalisation -------------------------------------------------------------------


def test_location_norm_standardises_valid_locations_and_ignores_padding() -> None:
    torch.manual_seed(0)
    model = Captioner(tiny_config("soft", init_range=0.5)).train()  # convs not near zero
    model.alignment.norm.eps = 1e-12  # so the variance comes out 1, not v / (v + eps)
    videos = [video(16, seed=20), video(48, seed=21)]
    context = model.prepare(collate(videos, fill=7.0))  # junk in video 0's padding
    valid = context.locations[context.mask]  # (valid locations, L, F)
    torch.testing.assert_close(valid.mean(dim=0), torch.zeros(valid.shape[1:]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        valid.var(dim=0, unbiased=False), torch.ones(valid.shape[1:]), atol=1e-3, rtol=0
    )
    again = model.prepare(collate(videos, fill=-3.0))
    torch.testing.assert_close(again.locations, context.locations)  # padding changes nothing
    norm = model.alignment.norm
    assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    # Evaluation uses the running statistics: one video alone is normalised like in a batch.
    model.eval()
    alone = model.prepare(videos[1])
    batched = model.prepare(collate(videos))
    torch.testing.assert_close(batched.locations[1], alone.locations[0])


def test_without_location_norm_features_keep_their_scale() -> None:
    model = Captioner(tiny_config("pool5", feature_norm="none")).train()
    features = video(32, seed=22)
    context = model.prepare(features)
    raw = rearrange(features.layers["pool5"], "1 f t h w -> (t h w) f")
    torch.testing.assert_close(context.locations[0, :, 0], raw)
    assert model.alignment is not None and model.alignment.norm is None


def test_fc7_is_standardised_with_the_training_statistics() -> None:
    model = Captioner(tiny_config("fc7")).eval()
    generator = torch.Generator().manual_seed(3)
    training = 5.0 + 2.0 * torch.rand(20, FC_DIM, generator=generator)  # (n, D)
    training[:, 0] = 1.5  # a dead dimension: constant over the training set
    model.set_fc7_statistics(training)
    torch.testing.assert_close(model.fc7_mean, training.mean(0))
    features = video(16, seed=23)
    features.fc7 = training[:1]
    expected = torch.tanh(model.init_hidden((training[:1] - training.mean(0)) / model.fc7_std))
    torch.testing.assert_close(model.prepare(features).initial_hidden, expected)
    assert model.fc7_std[0] > 0  # floored, not zero: the dead dimension maps to 0, not NaN
    assert {"fc7_mean", "fc7_std"} <= set(model.state_dict())  # checkpoints carry them
    with pytest.raises(CaptionerInputError, match="fc7 statistics"):
        model.set_fc7_statistics(training[:1])
    plain = Captioner(tiny_config("fc7", fc7_norm="none")).eval()
    plain.set_fc7_statistics(training)  # recorded but not applied
    torch.testing.assert_close(
        plain.prepare(features).initial_hidden, torch.tanh(plain.init_hidden(training[:1]))
    )


# ---- variable lengths ------------------------------------------------------------------------


def test_padded_locations_get_exactly_zero_attention() -> None:
    model = Captioner(tiny_config("soft")).eval()
    batch = collate([video(16, seed=2), video(64, seed=3)], fill=5.0)
    context = model.prepare(batch)  # grid (4, 4, 4): video 0 fills only t = 0
    inside = torch.zeros(2, 4, 16, dtype=torch.bool)
    inside[0, 0], inside[1] = True, True
    assert torch.equal(context.mask, inside.flatten(1))
    assert torch.equal(context.locations[0, 16:], torch.zeros_like(context.locations[0, 16:]))
    _, state, _ = model.step(None, None, context)
    for word in (torch.tensor([3, 4]), torch.tensor([5, 6])):
        _, state, extras = model.step(word, state, context)
        alpha = extras["alpha"]  # (2, 64)
        assert torch.equal(alpha[0, 16:], torch.zeros(48))
        assert (alpha[0, :16] > 0).all() and (alpha[1] > 0).all()
        torch.testing.assert_close(alpha.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("variant", ["soft", "hard", "pool2"])
def test_batched_equals_per_video_for_variable_lengths(variant: str) -> None:
    model = Captioner(tiny_config(variant)).double().eval()
    videos = [video(n, seed=10 + n).to(dtype=torch.float64) for n in (37, 70, 16)]
    tokens = torch.tensor([[3, 4, 5, 1, 0], [6, 2, 1, 0, 0], [7, 8, 9, 10, 1]])
    batched = model.prepare(collate(videos, fill=3.0))  # junk in the padding on purpose
    scores = model.teacher_force(batched, tokens)
    for row, one in enumerate(videos):
        alone = model.prepare(one)
        locations = alone.locations.shape[1]
        torch.testing.assert_close(batched.locations[row, :locations], alone.locations[0])
        torch.testing.assert_close(batched.projected[row, :locations], alone.projected[0])
        single = model.teacher_force(alone, tokens[row : row + 1])
        torch.testing.assert_close(scores.token_log_probs[row], single.token_log_probs[0])
        if variant == "hard":
            assert torch.equal(scores.layers[row], single.layers[0])


# ---- gradients -------------------------------------------------------------------------------

EXPECTED_MODULES = {
    "fc7": set(),
    "pool2": {"alignment", "spatiotemporal"},
    "pool5": {"alignment", "spatiotemporal"},  # identity alignment: only the location norm
    "soft": {"alignment", "spatiotemporal", "abstraction"},
    "hard": {"alignment", "spatiotemporal", "abstraction"},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant: str) -> None:
    torch.manual_seed(0)
    model = Captioner(tiny_config(variant)).train()
    batch = collate([video(16, seed=4), video(40, seed=5)])
    tokens = torch.tensor([[3, 4, 1, 0], [5, 1, 0, 0], [2, 3, 4, 1]])
    loss = model(batch, tokens, torch.tensor([0, 1, 1]))  # forward is loss
    assert torch.isfinite(loss.loss) and loss.per_caption.shape == (3,) and loss.n_tokens == 9
    loss.loss.backward()
    visual = {name.split(".")[0] for name, _ in model.named_parameters()} - {
        "init_hidden",
        "embedding",
        "lstm",
        "output",
    }
    assert visual == EXPECTED_MODULES.get(variant, {"alignment", "spatiotemporal"})
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["soft", "hard"])
def test_bf16_autocast_keeps_caption_log_likelihoods_in_float32(variant: str) -> None:
    model = Captioner(tiny_config(variant, dropout=0.0)).train()
    batch = collate([video(16, seed=4), video(40, seed=5)])
    tokens, video_index = torch.tensor([[3, 4, 5, 6, 1], [5, 1, 0, 0, 0]]), torch.tensor([0, 1])
    torch.manual_seed(0)
    full = model.loss(batch, tokens, video_index).per_caption
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(batch, tokens, video_index).per_caption
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.05, rtol=0)


# ---- video-major batching --------------------------------------------------------------------


def test_captions_of_a_video_share_its_prepare_work() -> None:
    model = Captioner(tiny_config("soft")).eval()
    seen = []
    model.alignment.convs["pool2"].register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].shape[0])
    )
    videos = [video(32, seed=6), video(48, seed=7)]
    tokens = torch.tensor([[3, 1, 0], [4, 5, 1], [6, 1, 0], [2, 2, 1], [7, 8, 1]])
    video_index = torch.tensor([0, 0, 0, 1, 1])
    video_major = model.loss(collate(videos), tokens, video_index)
    assert seen == [2]  # two videos aligned, not five captions
    caption_major = model.loss(collate([videos[i] for i in video_index]), tokens, torch.arange(5))
    torch.testing.assert_close(video_major.per_caption, caption_major.per_caption)


def test_context_rows_can_be_selected_and_repeated() -> None:
    model = Captioner(tiny_config("soft")).eval()
    context = model.prepare(collate([video(16, seed=8), video(32, seed=9)]))
    repeated = context.repeat_interleave(3)
    assert isinstance(repeated, Context) and len(repeated) == 6 and repeated.grid == context.grid
    assert torch.equal(repeated.locations[4], context.locations[1])
    assert torch.equal(repeated.mask[2], context.mask[0])
    picked = context.index_select(torch.tensor([1, 0, 1]))
    assert torch.equal(picked.initial_hidden[0], context.initial_hidden[1])
    _, state, _ = model.step(None, None, picked)
    assert torch.equal(state.index_select(torch.tensor([2])).hidden[0], state.hidden[2])


# ---- decoder (eqs. 1-3) ----------------------------------------------------------------------


def test_first_word_comes_from_fc7_alone() -> None:
    model = Captioner(tiny_config("soft")).eval()
    features = video(32, seed=11)
    log_probs, state, extras = model.step(None, None, model.prepare(features))
    hidden = torch.tanh(features.fc7 @ model.init_hidden.weight.T + model.init_hidden.bias)
    logits = hidden @ model.output.weight.T + model.output.bias  # p(y_1) = softmax(V h_1)
    torch.testing.assert_close(log_probs, logits.log_softmax(dim=-1))
    assert torch.equal(state.cell, torch.zeros_like(state.cell)) and extras == {}
    features.layers = {k: torch.rand_like(v) for k, v in features.layers.items()}
    again, _, _ = model.step(None, None, model.prepare(features))
    torch.testing.assert_close(again, log_probs)


def test_fc7_variant_ignores_the_conv_layers() -> None:
    model = Captioner(tiny_config("fc7")).eval()
    features = video(32, seed=12)
    tokens = torch.tensor([[3, 4, 5, 1]])
    before = model.teacher_force(model.prepare(features), tokens).token_log_probs
    features.layers = {}
    after = model.teacher_force(model.prepare(features), tokens).token_log_probs
    torch.testing.assert_close(before, after)


def test_loss_counts_every_token_through_eos_and_no_padding() -> None:
    model = Captioner(tiny_config("soft")).eval()
    batch = collate([video(32, seed=13), video(16, seed=14)])
    tokens = torch.tensor([[3, 4, 1, 0, 0], [5, 6, 7, 8, 1]])
    loss = model.loss(batch, tokens, torch.tensor([0, 1]))
    assert loss.n_tokens == 8
    context = model.prepare(batch)
    log_probs, state, _ = model.step(None, None, context)
    manual = log_probs[0, 3]  # caption 0 alone, written out: y_1, y_2, eos
    for previous, target in ((3, 4), (4, 1)):
        log_probs, state, _ = model.step(torch.tensor([previous, 5]), state, context)
        manual = manual + log_probs[0, target]
    torch.testing.assert_close(loss.per_caption[0], -manual)
    torch.testing.assert_close(loss.loss, loss.per_caption.mean())


def test_dropout_acts_on_the_output_from_the_second_word_only() -> None:
    """ASTAR-NOTES: p(y_1) = softmax(V h_1) (eq. 1); p(y_t) = softmax(V dropout(h_t)) for t >= 2."""
    model = Captioner(tiny_config("soft", dropout=0.5)).train()
    context = model.prepare(video(32, seed=15)).repeat_interleave(64)
    words = torch.full((64,), 3)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        first, state, _ = model.step(None, None, context)
        second, state_2, _ = model.step(words, state, context)
        runs.append((first, state, second, state_2))
    (first_a, state_a, second_a, state_2a), (first_b, state_b, second_b, state_2b) = runs
    assert torch.equal(first_a, first_b)  # the first word: no dropout, whatever the RNG
    assert torch.equal(first_a, first_a[:1].expand_as(first_a))  # nor from row to row
    assert torch.equal(state_a.hidden, state_b.hidden)  # h_1 is not dropped
    assert torch.equal(state_2a.hidden, state_2b.hidden)  # nor h_2 inside the recurrence
    assert not torch.allclose(second_a, second_b)  # but V sees a dropped-out h_2
    assert not torch.allclose(second_a[0], second_a[1])
    model.eval()  # eval mode: no dropout at any step, V h_t as it is
    first, state, _ = model.step(None, None, context)
    second, state_2, _ = model.step(words, state, context)
    torch.testing.assert_close(first, model.output(state.hidden).log_softmax(dim=-1))
    torch.testing.assert_close(second, model.output(state_2.hidden).log_softmax(dim=-1))
    torch.testing.assert_close(first, first_a)


def test_initialisation_follows_the_notes() -> None:
    model = Captioner(tiny_config("soft", init_range=0.01))
    for name, parameter in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("alignment.norm."):  # a normalisation starts as the identity map
            expected = 1.0 if leaf == "gain" else 0.0
            assert torch.equal(parameter, torch.full_like(parameter, expected)), name
        elif leaf.startswith("bias"):
            assert torch.equal(parameter, torch.zeros_like(parameter)), name
        elif leaf == "weight_hh":
            for gate in parameter.detach().chunk(4):
                torch.testing.assert_close(gate @ gate.T, torch.eye(gate.shape[0]))
        else:
            assert parameter.abs().max() <= 0.01 and parameter.std() > 0.002, name
    vectors = torch.randn(12, 8)
    assert torch.equal(Captioner(tiny_config("soft"), vectors).embedding.weight, vectors)
    with pytest.raises(CaptionerConfigError, match="word vectors"):
        Captioner(tiny_config("soft"), torch.randn(12, 9))


# ---- hard layer choice (eq. 8) ---------------------------------------------------------------


def hard_step(config: CaptionerConfig, train: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Captioner(config).train(train)
    with torch.no_grad():
        model.abstraction.score.weight.normal_(0, 3.0)  # a beta far from uniform and from one-hot
    context = model.prepare(video(32, seed=16)).repeat_interleave(400)
    _, state, _ = model.step(None, None, context)
    return model.step(torch.full((400,), 3), state, context)[2]


def test_hard_inference_takes_argmax_and_training_samples_beta() -> None:
    chosen = hard_step(tiny_config("hard", dropout=0.0), train=False)
    assert torch.equal(chosen["layer"], chosen["beta"].argmax(dim=-1))
    drawn = hard_step(tiny_config("hard", dropout=0.0), train=True)
    frequencies = torch.bincount(drawn["layer"], minlength=4) / 400
    torch.testing.assert_close(frequencies, drawn["beta"][0], atol=0.08, rtol=0)
    torch.testing.assert_close(
        drawn["layer_log_prob"], drawn["beta"].log().gather(1, drawn["layer"][:, None])[:, 0]
    )
    sampled = hard_step(tiny_config("hard", dropout=0.0, hard_inference="sample"), train=False)
    assert len(set(sampled["layer"].tolist())) > 1


# ---- bad input -------------------------------------------------------------------------------


def broken(kind: str) -> tuple[FeatureBatch, torch.Tensor, torch.Tensor]:
    features = collate([video(32, seed=17), video(48, seed=18)])
    tokens, video_index = torch.tensor([[3, 1], [4, 1]]), torch.tensor([0, 1])
    if kind == "missing layer":
        del features.layers["pool3"]
    elif kind == "channels":
        features.layers["pool4"] = features.layers["pool4"][:, :2]
    elif kind == "short video":
        features.n_frames = torch.tensor([15, 48])
    elif kind == "fc7":
        features.fc7 = features.fc7[:, :3]
    elif kind == "cut in time":
        features.layers["pool2"] = features.layers["pool2"][:, :, :20]
    elif kind == "video index":
        video_index = torch.tensor([0, 2])
    elif kind == "empty caption":
        tokens = torch.tensor([[0, 0], [4, 1]])
    return features, tokens, video_index


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing layer", "needs layer pool3"),
        ("channels", "layer pool4 has shape"),
        ("short video", "n_frames 15 < 16"),
        ("fc7", "fc7 has shape"),
        ("cut in time", "pool2 has 20 time steps"),
        ("video index", "video_index must lie"),
        ("empty caption", "empty"),
    ],
)
def test_bad_input_is_refused_with_the_reason(kind: str, message: str) -> None:
    model = Captioner(tiny_config("soft"))
    with pytest.raises(CaptionerInputError, match=message):
        model.loss(*broken(kind))


def test_step_refuses_a_word_without_state() -> None:
    model = Captioner(tiny_config("soft"))
    context = model.prepare(video(16, seed=19))
    with pytest.raises(CaptionerInputError, match="both None"):
        model.step(torch.tensor([3]), None, context)
    _, state, _ = model.step(None, None, context)
    with pytest.raises(CaptionerInputError, match="hard variant"):
        model.step(torch.tensor([3]), state, context, layer=torch.tensor([0]))


# ---- memorisation ----------------------------------------------------------------------------


def memorisation_data() -> tuple[FeatureBatch, torch.Tensor, torch.Tensor, list[list[int]]]:
    """4 videos x 2 captions; a video's two captions start with different words."""
    channels = {"pool3": 4, "pool4": 4, "pool5": 8}
    features = collate([video(n, seed=20 + n, channels=channels) for n in (16, 24, 40, 33)])
    generator = torch.Generator().manual_seed(0)
    captions = []
    for _ in range(4):
        firsts = torch.randperm(14, generator=generator)[:2] + 2
        for first in firsts.tolist():
            length = int(torch.randint(2, 6, (1,), generator=generator))
            rest = (torch.randint(2, 16, (length,), generator=generator)).tolist()
            captions.append([first, *rest, 1])
    tokens = torch.zeros(8, max(map(len, captions)), dtype=torch.long)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.tensor(caption)
    return features, tokens, torch.arange(4).repeat_interleave(2), captions


@pytest.mark.parametrize("variant", ["soft", "hard"])
def test_small_model_memorises_eight_captions_of_four_videos(variant: str) -> None:
    torch.manual_seed(0)
    features, tokens, video_index, captions = memorisation_data()
    config = CaptionerConfig.small(
        vocab_size=16,
        variant=variant,
        layer_channels={"pool3": 4, "pool4": 4, "pool5": 8},
        fc_dim=FC_DIM,
        hidden_dim=64,
        embed_dim=16,
        attention_dim=16,
        dropout=0.0,
        samples=3,
        init_range=0.1,
    )
    model = Captioner(config).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model.loss(features, tokens, video_index)
        optimiser.zero_grad()
        loss.loss.backward()
        optimiser.step()
        if loss.per_caption.max() < 0.8:  # each caption near p = 1/2: the split first word
            break
    model.eval()
    with torch.no_grad():
        free = greedy(model, features, max_length=tokens.shape[1])
        for row, caption in enumerate(free):
            assert caption in captions[2 * row : 2 * row + 2]
        chosen = collate([features_row(features, i) for i in video_index.tolist()])
        forced = greedy(model, chosen, tokens.shape[1], first=tokens[:, 0])
    assert forced == captions


def features_row(features: FeatureBatch, row: int) -> FeatureBatch:
    return FeatureBatch(
        {k: v[row : row + 1] for k, v in features.layers.items()},
        features.n_frames[row : row + 1],
        features.fc7[row : row + 1],
    )
