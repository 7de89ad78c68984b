"""The hard-attention objective: the K-sample bound (eq. 10) and the VIMCO estimator (eqs. 12-14).

The model-level tests use a tiny hard model (2 layers, a 4-token caption, so 3 layer choices and
2^3 = 8 layer sequences) in float64, where the bound can be computed exactly by enumerating every
K-tuple of sequences with its probability.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from astar.train.hard import leave_one_out_baselines, multi_sample_bound, vimco_surrogate
from astar.train.model import Captioner, CaptionerConfig, FeatureBatch

CAPTION = torch.tensor([[2, 3, 4, 1]])  # y_1..y_3 and eos: choices m_2, m_3, m_4


# ---- the pure functions ----------------------------------------------------------------------


def test_bound_and_baselines_match_probability_space() -> None:
    generator = torch.Generator().manual_seed(0)
    log_p = torch.randn(5, 4, generator=generator, dtype=torch.float64) * 2 - 3  # (n, K)
    p = log_p.exp()
    expected_bound = torch.log(p.mean(dim=1))
    torch.testing.assert_close(multi_sample_bound(log_p), expected_bound)
    for k in range(4):
        others = [j for j in range(4) if j != k]
        f_k = torch.exp(log_p[:, others].mean(dim=1))  # eq. 14
        expected = torch.log((p[:, others].sum(dim=1) + f_k) / 4)  # eq. 13's subtrahend
        torch.testing.assert_close(leave_one_out_baselines(log_p)[:, k], expected)


def test_baselines_stay_finite_far_below_float_range() -> None:
    log_p = torch.tensor([[-900.0, -905.0, -910.0]])  # exp() underflows to 0 in float32/64
    shifted = torch.tensor([[0.0, -5.0, -10.0]])
    torch.testing.assert_close(
        leave_one_out_baselines(log_p), leave_one_out_baselines(shifted) - 900.0
    )
    torch.testing.assert_close(multi_sample_bound(log_p), multi_sample_bound(shifted) - 900.0)


def test_surrogate_value_is_the_bound_and_gradients_are_the_vimco_terms() -> None:
    generator = torch.Generator().manual_seed(1)
    log_p = (torch.randn(3, 5, generator=generator, dtype=torch.float64) - 4).requires_grad_()
    log_q = torch.randn(3, 5, generator=generator, dtype=torch.float64).requires_grad_()
    surrogate = vimco_surrogate(log_p, log_q)
    torch.testing.assert_close(surrogate, multi_sample_bound(log_p).detach())
    grad_p, grad_q = torch.autograd.grad(surrogate.sum(), (log_p, log_q))
    p = log_p.detach().exp()
    torch.testing.assert_close(grad_p, p / p.sum(dim=1, keepdim=True))  # w_k
    bound = torch.log(p.mean(dim=1, keepdim=True))
    torch.testing.assert_close(grad_q, bound - leave_one_out_baselines(log_p.detach()))  # L^_k


def test_one_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="K >= 2"):
        vimco_surrogate(torch.zeros(2, 1), torch.zeros(2, 1))


# ---- the estimator on a model, against exact enumeration -------------------------------------


def tiny_hard_model(samples: int) -> tuple[Captioner, FeatureBatch]:
    torch.manual_seed(0)
    config = CaptionerConfig(
        vocab_size=6,
        variant="hard",
        layer_channels={"pool4": 3, "pool5": 4},
        fc_dim=5,
        hidden_dim=6,
        embed_dim=3,
        attention_dim=5,
        dropout=0.0,  # the expectation below is over layer choices only
        samples=samples,
        init_range=0.5,  # large enough that beta and the likelihoods differ between sequences
        feature_norm="none",  # raw layers differ more: the K = 1 and K = 2 bounds stay apart
    )
    model = Captioner(config).double().train()
    features = FeatureBatch(
        layers={"pool4": torch.randn(1, 3, 2, 7, 7), "pool5": torch.randn(1, 4, 1, 4, 4)},
        n_frames=torch.tensor([16]),
        fc7=torch.randn(1, 5),
    ).to(dtype=torch.float64)
    return model, features


def enumerate_tuples(
    model: Captioner, features: FeatureBatch, samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(Y|m^k), log p(m^k) for every K-tuple of layer sequences: two (n_tuples, K)."""
    n_layers = len(model.config.attended_layers)
    sequences = torch.tensor(list(itertools.product(range(n_layers), repeat=3)))  # (8, 3)
    context = model.prepare(features).index_select(torch.zeros(len(sequences), dtype=torch.long))
    forced = model.teacher_force(context, CAPTION.expand(len(sequences), -1), layers=sequences)
    log_p = forced.token_log_probs.sum(dim=1)  # (8,)
    log_q = forced.layer_log_probs.sum(dim=1)  # (8,)
    torch.testing.assert_close(log_q.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    tuples = torch.tensor(list(itertools.product(range(len(sequences)), repeat=samples)))
    return log_p[tuples], log_q[tuples]  # (8^K, K) each


def exact_bound(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Eq. 10: sum over K-tuples of p(m^{1:K}) log (1/K) sum_k p(Y|m^k)."""
    return (log_q.sum(dim=1).exp() * multi_sample_bound(log_p)).sum()


@pytest.mark.parametrize("samples", [2, 3])
def test_vimco_expectation_equals_the_exact_gradient_of_the_bound(samples: int) -> None:
    """E[estimator], computed exactly by enumeration (no Monte-Carlo noise), = grad of eq. 10."""
    model, features = tiny_hard_model(samples)
    parameters = list(model.parameters())
    log_p, log_q = enumerate_tuples(model, features, samples)
    exact = torch.autograd.grad(exact_bound(log_p, log_q), parameters, retain_graph=True)
    probability = log_q.sum(dim=1).exp().detach()  # (n_tuples,): p(m^{1:K} | A)
    expected = torch.autograd.grad(
        (probability * vimco_surrogate(log_p, log_q)).sum(), parameters, retain_graph=True
    )
    names = [name for name, _ in model.named_parameters()]
    for name, want, got in zip(names, exact, expected, strict=True):
        assert want.abs().max() > 1e-6, f"{name} does not move the bound: the test needs it to"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)
    # The paper's printed form (w_k grad p_k instead of w_k grad log p_k) is visibly biased
    # here, so the comparison above has the power to tell the two apart.
    bound = multi_sample_bound(log_p)
    with torch.no_grad():
        weights = log_p.softmax(dim=1)
        signal = bound[:, None] - leave_one_out_baselines(log_p)
    literal = (signal * log_q).sum(dim=1) + (weights * log_p.exp()).sum(dim=1)
    literal_grads = torch.autograd.grad((probability * literal).sum(), parameters)
    largest = max((a - b).abs().max() for a, b in zip(literal_grads, exact, strict=True))
    assert largest > 1e-3


def test_bound_is_below_the_marginal_and_tightens_with_k() -> None:
    model, features = tiny_hard_model(2)
    with torch.no_grad():
        bounds = [exact_bound(*enumerate_tuples(model, features, k)) for k in (1, 2, 3)]
        log_p, log_q = enumerate_tuples(model, features, 1)
        marginal = torch.logsumexp(log_p[:, 0] + log_q[:, 0], dim=0)  # eq. 9's left side
    assert bounds[0] < bounds[1] < bounds[2] < marginal


def test_sampled_training_loss_gradient_matches_exact_within_monte_carlo_error() -> None:
    """The real path (layers drawn inside ``step``, ``Captioner.loss``) averaged over draws."""
    samples, groups, per_group = 2, 50, 100
    model, features = tiny_hard_model(samples)
    parameters = list(model.parameters())
    log_p, log_q = enumerate_tuples(model, features, samples)
    exact = torch.autograd.grad(-exact_bound(log_p, log_q), parameters)  # loss = -bound
    flat_exact = torch.cat([g.flatten() for g in exact])  # (P,)
    tokens = CAPTION.expand(per_group, -1)
    video_index = torch.zeros(per_group, dtype=torch.long)
    torch.manual_seed(123)
    group_means = []
    for _ in range(groups):
        loss = model.loss(features, tokens, video_index).loss  # mean over per_group draws
        grads = torch.autograd.grad(loss, parameters)
        group_means.append(torch.cat([g.flatten() for g in grads]))
    group_means = torch.stack(group_means)  # (groups, P)
    mean = group_means.mean(dim=0)  # (P,)
    standard_error = group_means.std(dim=0) / math.sqrt(groups)  # (P,)
    z = (mean - flat_exact).abs() / (standard_error + 1e-12)
    assert z.max() < 6.0, f"max |z| = {z.max():.2f}"
    assert (mean - flat_exact).norm() < 0.05 * flat_exact.norm()
    # Power: the gradient of a different objective (the K = 1 bound) is rejected.
    wrong = torch.autograd.grad(-exact_bound(*enumerate_tuples(model, features, 1)), parameters)
    flat_wrong = torch.cat([g.flatten() for g in wrong])
    assert ((mean - flat_wrong).abs() / (standard_error + 1e-12)).max() > 6.0
