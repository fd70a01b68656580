"""TopoFR's structure damage estimation (SDE): hard-sample weights from a Gaussian–uniform mixture that EM fits,
on the device and without host synchronisation, to the batch's signed prediction entropies.

Easy samples have low-entropy predictions and fall in the zero-mean Gaussian; hard ones spread over the flat
uniform component. The posterior of the uniform component is the "hard" score h of each sample.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from faceforge.heads.centres import SoftmaxView


class MixtureFit(NamedTuple):
    """π·N(0, var) + (1 − π)·U(−Ω, Ω) fitted to the last dimension of the input; `hard` = uniform posterior."""

    hard: torch.Tensor
    pi: torch.Tensor
    var: torch.Tensor
    half_width: torch.Tensor


def _log_odds(pi: torch.Tensor, var: torch.Tensor, half2: torch.Tensor) -> torch.Tensor:
    """log[π·N(0; 0, var) / ((1 − π)·U)] with U = 1/(2Ω), Ω² = half2: the easy log-odds at x = 0."""
    return torch.logit(pi) + 0.5 * torch.log(half2 / var * (2 / math.pi))


def fit_gauss_uniform(x: torch.Tensor, iters: int = 30, pi_max: float = 1.0) -> MixtureFit:
    """EM for the mixture over the last dimension of x [..., N]; every leading index is an independent fit.

    A fixed number of iterations (a convergence test would need the host) from π = 1/2, var = mean(x²),
    Ω = max|x|. M-step: π = mean easy posterior (at most `pi_max`; the official code caps it at 0.5),
    var = posterior-weighted mean of x², Ω = √(3·(η₂ − η₁²)) from the hard-weighted moments η₁, η₂ (the paper's
    moment match; a uniform on (−Ω, Ω) has variance Ω²/3). The uniform density 1/(2Ω) is applied everywhere,
    not only inside (−Ω, Ω), so outliers beyond Ω stay hard instead of being forced into the Gaussian.
    The E-step is sigmoid(b − x²/(2·var)), b the log-odds at 0: few kernels per iteration on a GPU.
    """
    n = x.shape[-1]
    x2 = x * x
    scale = x2.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    floor = scale * 1e-6
    moments = torch.stack([torch.ones_like(x), x, x2], dim=-1)
    totals = moments.sum(dim=-2)
    pi = torch.full_like(scale, min(0.5, pi_max))
    var, half2 = scale, x2.amax(dim=-1, keepdim=True).clamp_min(floor)
    for _ in range(iters):
        easy = torch.sigmoid(torch.addcmul(_log_odds(pi, var, half2), x2, -0.5 / var))
        s_easy = (easy[..., None, :] @ moments).squeeze(-2)
        sums = torch.stack([s_easy, totals - s_easy], dim=-2)
        mean = sums / sums[..., :1].clamp_min(torch.finfo(x.dtype).eps)
        pi = (s_easy[..., :1] / n).clamp(1e-6, min(pi_max, 1 - 1e-6))
        var = torch.maximum(mean[..., 0, 2:], floor)
        half2 = torch.maximum(3 * (mean[..., 1, 2:] - mean[..., 1, 1:2].square()), floor)
    hard = torch.sigmoid(-torch.addcmul(_log_odds(pi, var, half2), x2, -0.5 / var))
    return MixtureFit(hard, pi[..., 0], var[..., 0], half2[..., 0].sqrt())


def signed_entropy(entropy: torch.Tensor, sign: str = "alternate") -> torch.Tensor:
    """Entropies with half of them negated, so that easy samples form a zero-mean peak: every even index
    ("alternate", the official code) or a fair coin per sample ("random", the paper)."""
    if sign == "alternate":
        flip = torch.arange(len(entropy), device=entropy.device) % 2 == 0
    elif sign == "random":
        flip = torch.rand(len(entropy), device=entropy.device) < 0.5
    else:
        raise ValueError(f"sign must be 'alternate' or 'random', got {sign!r}")
    return torch.where(flip, -entropy, entropy)


@torch.no_grad()
def sde_weights(
    view: SoftmaxView, lam: float = 1.0, sign: str = "alternate", iters: int = 30, pi_max: float = 1.0
) -> tuple[torch.Tensor, MixtureFit]:
    """ω = (1 + h)^λ · (1 − p_gt) [B] and the mixture fit, without gradient.

    Signed entropies are standardised (zero mean, unit variance, as the official code) before the fit;
    p_gt stays a float (the official code truncates it to an integer, which makes (1 − p_gt) a 0/1 mask).
    """
    x = signed_entropy(view.entropy(), sign)
    x = (x - x.mean()) / x.std(correction=0).clamp_min(torch.finfo(x.dtype).eps)
    fit = fit_gauss_uniform(x, iters, pi_max)
    return (1 + fit.hard) ** lam * (1 - view.target_prob()), fit
