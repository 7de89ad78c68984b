"""Hard abstraction attention: the K-sample bound (eq. 10) and its VIMCO gradient (eqs. 12-14).

For one caption Y draw K independent layer-choice sequences m^1..m^K from p(m | A) and let
``log p_k = log p(Y | m^k, A)`` and ``log q_k = log p(m^k | A)``. Then (ASTAR-NOTES, stage two)

    L      = log (1/K) sum_k p_k                                   (eq. 10, inside E)
    w_k    = p_k / sum_j p_j
    log f_k = mean_{j != k} log p_j                                (eq. 14)
    L^_k   = L - log( (sum_{j != k} p_j + f_k) / K )               (eq. 13)
    grad L^K ~= sum_k L^_k grad log q_k + sum_k w_k grad log p_k   (eq. 12, corrected)

The paper prints ``w_k grad p_k``; the gradient of L is ``w_k grad log p_k`` (Mnih & Rezende,
2016), which ASTAR-NOTES fixes. Everything is computed from log-probabilities: caption
likelihoods are far below float range (log p of -50 is common), so p_k itself never appears.

Notation: n captions, K samples per caption.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check(log_likelihoods: Tensor) -> int:
    if log_likelihoods.ndim != 2:
        raise ValueError(f"expected (n, K) log-likelihoods, got {tuple(log_likelihoods.shape)}")
    samples = log_likelihoods.shape[1]
    if samples < 2:
        raise ValueError(f"VIMCO needs K >= 2 samples per caption, got K = {samples}")
    return samples


def multi_sample_bound(log_likelihoods: Tensor) -> Tensor:
    """L(m^{1:K}) = log (1/K) sum_k p_k (eq. 10): (n, K) -> (n,)."""
    samples = log_likelihoods.shape[1]
    return log_likelihoods.logsumexp(dim=1) - math.log(samples)  # (n,)


def leave_one_out_baselines(log_likelihoods: Tensor) -> Tensor:
    """log( (sum_{j != k} p_j + f_k) / K ) for every k (eqs. 13-14): (n, K) -> (n, K).

    Sample k's own likelihood is replaced by the geometric mean of the others, f_k; the
    baseline then depends on m^{-k} only, which keeps the estimator unbiased.
    """
    samples = _check(log_likelihoods)
    total = log_likelihoods.sum(dim=1, keepdim=True)  # (n, 1)
    log_f = (total - log_likelihoods) / (samples - 1)  # (n, K): log f_k (eq. 14)
    own = torch.eye(samples, dtype=torch.bool, device=log_likelihoods.device)  # (K, K)
    # Row k holds log p_1..log p_K with entry k swapped for log f_k.
    swapped = torch.where(own, log_f[:, :, None], log_likelihoods[:, None, :])  # (n, K, K)
    return swapped.logsumexp(dim=2) - math.log(samples)  # (n, K)


def vimco_surrogate(log_likelihoods: Tensor, log_choice_probs: Tensor) -> Tensor:
    """A per-caption objective whose value is L and whose gradient is the VIMCO estimate.

    Maximise it (or minimise its negative). Its value is the K-sample bound L (eq. 10) for
    logging; differentiating it gives eq. 12 with the ``w_k grad log p_k`` correction.

    Args:
        log_likelihoods: (n, K), log p(Y | m^k, A), differentiable
        log_choice_probs: (n, K), log p(m^k | A) = sum_t log beta_{t, m^k_t}, differentiable
    Returns:
        (n,)
    """
    _check(log_likelihoods)
    if log_choice_probs.shape != log_likelihoods.shape:
        raise ValueError(
            f"log_choice_probs {tuple(log_choice_probs.shape)} and log_likelihoods "
            f"{tuple(log_likelihoods.shape)} must both be (n, K)"
        )
    bound = multi_sample_bound(log_likelihoods)  # (n,): L
    with torch.no_grad():
        weights = log_likelihoods.softmax(dim=1)  # (n, K): w_k
        learning_signal = bound[:, None] - leave_one_out_baselines(log_likelihoods)  # (n, K): L^_k
    # Each term below is zero in value and carries one half of eq. 12 in its gradient.
    score_term = (learning_signal * (log_choice_probs - log_choice_probs.detach())).sum(dim=1)
    likelihood_term = (weights * (log_likelihoods - log_likelihoods.detach())).sum(dim=1)
    return bound.detach() + likelihood_term + score_term  # (n,)
