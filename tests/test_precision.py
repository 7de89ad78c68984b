"""bf16 training gives fp32's gradients, for every shape the model can meet.

On a CPU with native bf16 these run oneDNN's bf16 kernels (where a wrong weight-gradient kernel
for inputs shorter than the kernel was found); elsewhere PyTorch emulates bf16, slowly, so the
models are tiny. Tolerances are relative errors in norm against fp32: bf16 keeps 8 significant
bits (2^-8 = 0.4% per rounding), and a gradient sums many rounded products.
"""

from __future__ import annotations

import pytest
import torch
from test_model import SPATIAL, collate, tiny_config, video
from torch import nn

from astar.extract.precision import cpu_has_fast_bf16
from astar.train.model import ALIGNMENT, Captioner, FeatureBatch, conv3d_exact, padded_conv3d

CONV_TOLERANCE = 2e-2  # one conv: measured 2.8e-3 .. 3.0e-3 on AVX-512 BF16
MODEL_TOLERANCE = 3e-2  # all of a model's gradients together
TENSOR_COSINE = 0.9  # each parameter tensor's gradient (see the model test)
LOSS_TOLERANCE = 1e-2
# 32 channels reach oneDNN's jit bf16 kernels (where the wrong one was); without native bf16
# PyTorch's emulation is some 100x slower than fp32, and 4 channels keep the suite quick.
WIDTH = 32 if cpu_has_fast_bf16() else 4
CHANNELS = dict.fromkeys(("pool2", "pool3", "pool4", "pool5"), WIDTH)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _conv_grads(conv: nn.Conv3d, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, ...]:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv3d_exact(conv, x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    return out.detach().float(), conv.weight.grad.clone(), conv.bias.grad.clone()


@pytest.mark.parametrize("layer", ["pool2", "pool3", "pool4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_alignment_conv_gradients_match_fp32_for_every_length(layer: str, batch: int) -> None:
    spec = ALIGNMENT[layer]
    torch.manual_seed(0)
    conv = nn.Conv3d(WIDTH, WIDTH, spec.kernel, padding=spec.padding)
    side = SPATIAL[layer]
    for steps in range(1, spec.kernel + 3):  # shorter than, equal to and past the kernel
        x = torch.rand(batch, WIDTH, steps, side, side)
        out32, weight32, bias32 = _conv_grads(conv, x, bf16=False)
        out16, weight16, bias16 = _conv_grads(conv, x, bf16=True)
        assert out16.shape == out32.shape == (batch, WIDTH, steps, side, side)
        assert _relative(out16, out32) < CONV_TOLERANCE, (layer, steps)
        assert _relative(weight16, weight32) < CONV_TOLERANCE, (layer, steps)
        assert _relative(bias16, bias32) < CONV_TOLERANCE, (layer, steps)


def test_conv3d_exact_changes_nothing_in_fp32() -> None:
    conv = nn.Conv3d(4, 5, 5, padding=2)
    x = torch.rand(2, 4, 3, 14, 14)
    assert torch.equal(conv3d_exact(conv, x), conv(x))


@pytest.mark.parametrize("layer", ["pool2", "pool3", "pool4"])
def test_padding_to_the_kernel_is_exact(layer: str) -> None:
    """The padded-and-cropped conv is the conv: checked in float64, where no kernel rounds, for
    every length shorter than, equal to and past the kernel."""
    spec = ALIGNMENT[layer]
    conv = nn.Conv3d(4, 5, spec.kernel, padding=spec.padding).double()
    side = SPATIAL[layer]
    for steps in range(1, spec.kernel + 2):
        x = torch.rand(2, 4, steps, side, side, dtype=torch.float64)
        torch.testing.assert_close(padded_conv3d(conv, x), conv(x), rtol=0, atol=1e-12)


def _batch(lengths: list[int], seed: int) -> FeatureBatch:
    return collate([video(n, seed + i, CHANNELS) for i, n in enumerate(lengths)])


def _model_grads(
    model: Captioner, features: FeatureBatch, tokens, index, bf16: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with torch.random.fork_rng(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(3)
        loss = model.loss(features, tokens, index).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _fixed_layers(self, log_beta, forced):  # hard: the same layer draws in both precisions
    if forced is not None:
        return forced
    return torch.arange(log_beta.shape[0], device=log_beta.device) % log_beta.shape[1]


# 16..31 frames give pool3 T = 4..7 and pool4 T = 2..3: the short inputs; 64 the long ones.
LENGTHS = [[16], [24], [31], [32], [48], [64], [16, 33, 64]]


# 16..31 frames give pool3 T = 4..7 and pool4 T = 2..3: the short inputs; 64 the long ones.
LENGTHS = [[16], [24], [31], [32], [48], [64], [16, 33, 64]]


@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.parametrize("variant", ["fc7", "pool2", "pool3", "pool4", "pool5", "soft", "hard"])
def test_bf16_gradients_match_fp32_for_every_variant(variant: str, norm: str, monkeypatch) -> None:
    """The whole gradient within MODEL_TOLERANCE of fp32, each tensor's pointing its way.

    Per tensor, relative errors reach 10-60% in these tiny random models where the gradient is
    a small difference of large terms: the bias of W_aα (shared by all locations, so softmax
    nearly cancels it), the alignment convs feeding the location norm (which removes each
    channel's mean and scale). Rounding one activation to bf16 in otherwise fp32 arithmetic
    already moves those by as much, so each tensor is held to its direction (cosine) and the
    gradient as a whole, the update Adam sees, to MODEL_TOLERANCE. A wrong kernel gives errors
    of order 1 and inf/NaN.
    """
    monkeypatch.setattr(Captioner, "_choose_layer", _fixed_layers)
    torch.manual_seed(0)
    config = tiny_config(
        variant, layer_channels=CHANNELS, dropout=0.0, init_range=0.1, feature_norm=norm
    )
    model = Captioner(config).train()
    for case, lengths in enumerate(LENGTHS):
        features = _batch(lengths, seed=10 * case)
        n = len(lengths)
        tokens = torch.randint(2, config.vocab_size, (2 * n, 6))
        tokens[:, -1] = config.eos_id
        index = torch.arange(n).repeat_interleave(2)
        loss32, grads32 = _model_grads(model, features, tokens, index, bf16=False)
        loss16, grads16 = _model_grads(model, features, tokens, index, bf16=True)
        assert abs(loss16 - loss32) <= LOSS_TOLERANCE * abs(loss32), (lengths, loss16, loss32)
        every32 = torch.cat([g.flatten() for g in grads32.values()])
        every16 = torch.cat([grads16[name].flatten() for name in grads32])
        assert torch.isfinite(every16).all(), lengths
        error = _relative(every16, every32)
        assert error < MODEL_TOLERANCE, (variant, lengths, error)
        for name, grad in grads32.items():
            if float(grad.norm()) < 1e-6 * float(every32.norm()):  # nothing to point
                continue
            cosine = float(
                nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), 0)
            )
            assert cosine >= TENSOR_COSINE, (variant, lengths, name, cosine)
