"""TopoFR (Dan et al., NeurIPS 2024): PTSA aligns the 0-dim persistent homology of the clean input batch with
that of the perturbed batch's embeddings; SDE reweights hard samples. Spec: the paper; departures are noted below.

Latent distance scale. The official code divides latent distances by a "learnable" scale that it re-creates as 1
on every call, so it compares raw embedding distances (≈ √(2D) ≈ 32 for a BN output) with input distances in
[0, 1], and relies on a trainable BN scale to shrink the embeddings. faceforge's backbones freeze that scale
(as arcface_torch), so the default here, `latent_scale="fit"`, multiplies the latent distances by the scale that
minimises the loss, in closed form per batch (least squares over the compared edge lengths). The loss then
measures structure only: it is invariant to the embedding norm, which the margin heads ignore anyway, and its
gradient has no component along a global rescaling. A number (1.0 = the official code) fixes the scale instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from faceforge.errors import ConfigError
from faceforge.heads.base import Head
from faceforge.regularizers.base import RegOutput, Regularizer
from faceforge.regularizers.rsp import random_structure_perturbation
from faceforge.regularizers.sde import sde_weights
from faceforge.registry import REGULARIZERS
from faceforge.runtime import at_least_fp32, fp32_only
from faceforge.topology import persistence0

LOSSES = ("paper", "official")


def _at(dist: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    return dist[edges[:, 0], edges[:, 1]]


def alignment_loss(
    x_dist: torch.Tensor, z_dist: torch.Tensor, mode: str = "paper", latent_scale: float | str = 1.0
) -> torch.Tensor:
    """Topological discrepancy between two B×B distance matrices (input space X, latent space Z).

    "paper" (Eq. 2): ½·(‖X[γX] − Z[γX]‖² + ‖Z[γZ] − X[γZ]‖²), γ the MST (H0 persistence) edges of each space,
    so each space's edges are evaluated in both. "official": Σ_k (X[γX]_(k) − Z[γZ]_(k))² / B over the sorted
    death times, i.e. the squared 2-Wasserstein distance of the two H0 diagrams, as the released code computes.
    Z is first multiplied by `latent_scale`, or by its least-squares optimum when latent_scale == "fit".
    """
    if mode not in LOSSES:
        raise ValueError(f"mode must be one of {LOSSES}, got {mode!r}")
    z_dist = at_least_fp32(z_dist)
    x_dist = x_dist.to(z_dist.dtype)
    edges, deaths = persistence0(torch.stack([x_dist, z_dist]))
    if mode == "paper":
        x_side = torch.cat([_at(x_dist, edges[0]), _at(x_dist, edges[1])])
        z_side = torch.cat([_at(z_dist, edges[0]), deaths[1]])
    else:
        x_side, z_side = deaths[0], deaths[1]
    if latent_scale == "fit":
        scale = (x_side * z_side).sum() / (z_side * z_side).sum().clamp_min(torch.finfo(z_side.dtype).tiny)
    else:
        scale = float(latent_scale)
    squared = (x_side - scale * z_side).square().sum()
    return 0.5 * squared if mode == "paper" else squared / len(x_dist)


def input_distances(images: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, B] of the flattened images (pixels in [-1, 1]) divided by the largest possible one,
    √(4·C·H·W), so they lie in [0, 1]; no gradient (the input space is a fixed target)."""
    with torch.no_grad():
        flat = at_least_fp32(images.detach().flatten(1))
        return torch.cdist(flat, flat) / math.sqrt(4 * flat.shape[1])


class TopoFR(Regularizer):
    """PTSA (perturbation + persistent-homology alignment, weight α) and SDE sample weights, on top of any head.

    SDE reads the head's softmax (entropy and target probability): it needs a softmax-family head
    (softmax, cosface, arcface, combined, possibly wrapped by UNPG); with sde=False any head works.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        xi: float = 0.2,
        loss: str = "paper",
        sde: bool = True,
        sde_lambda: float = 1.0,
        latent_scale: float | str = "fit",
        sde_sign: str = "alternate",
        sde_pi_max: float = 1.0,
        em_iters: int = 30,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"regularizer topofr: loss must be one of {list(LOSSES)}, got {loss!r}")
        if not 0.0 <= xi <= 1.0:
            raise ConfigError(f"regularizer topofr: xi is a probability in [0, 1], got {xi}")
        if alpha < 0:
            raise ConfigError(f"regularizer topofr: alpha must be >= 0, got {alpha}")
        if latent_scale != "fit" and not (isinstance(latent_scale, (int, float)) and latent_scale > 0):
            raise ConfigError(f"regularizer topofr: latent_scale must be 'fit' or a positive number, got {latent_scale!r}")
        if sde_sign not in ("alternate", "random"):
            raise ConfigError(f"regularizer topofr: sde_sign must be 'alternate' or 'random', got {sde_sign!r}")
        if not 0.0 < sde_pi_max <= 1.0 or em_iters < 1:
            raise ConfigError(f"regularizer topofr: need 0 < sde_pi_max <= 1 and em_iters >= 1, "
                              f"got {sde_pi_max}, {em_iters}")
        self.alpha, self.xi, self.loss_mode = float(alpha), float(xi), loss
        self.sde, self.sde_lambda, self.latent_scale = bool(sde), float(sde_lambda), latent_scale
        self.sde_sign, self.sde_pi_max, self.em_iters = sde_sign, float(sde_pi_max), int(em_iters)
        self._perturbed = 0.0

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, xi={self.xi}, loss={self.loss_mode}, latent_scale={self.latent_scale}, "
                f"sde={self.sde}, sde_lambda={self.sde_lambda}")

    def bind(self, head: Head) -> None:
        """SDE needs the head's softmax view: a head that declares none (gives_softmax) is a ConfigError now,
        not at the first step."""
        if self.sde and not head.gives_softmax:
            raise ConfigError(f"regularizer topofr: sde=true needs a softmax-family head (softmax, cosface, arcface, "
                              f"combined), got {type(head).__name__}; set sde: false to use PTSA alone")

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out, op = random_structure_perturbation(images, self.xi)
        self._perturbed = (op >= 0).float().mean().item()  # `op` is drawn on the CPU: no device sync
        return out

    def forward(self, batch: dict[str, Any], embeddings: torch.Tensor, head_output: Any) -> RegOutput:
        with fp32_only(embeddings.device):
            z = at_least_fp32(embeddings)
            topo = alignment_loss(input_distances(batch["images"]), torch.cdist(z, z), self.loss_mode,
                                  self.latent_scale)
            stats = [topo.detach()]
            weights = None
            if self.sde:
                if head_output.softmax is None:
                    raise ConfigError("regularizer topofr: sde=true but the head returned no softmax view")
                weights, fit = sde_weights(head_output.softmax, self.sde_lambda, self.sde_sign, self.em_iters,
                                           self.sde_pi_max)
                stats += [fit.pi, fit.hard.mean(), weights.mean()]
        # Left on the device: the trainer reads every metric in one transfer on the steps it logs.
        metrics: dict[str, float | torch.Tensor] = dict(zip(("topo", "sde_pi", "sde_hard", "sde_weight"), stats))
        metrics["rsp_frac"] = self._perturbed
        return RegOutput(self.alpha * topo, weights, metrics)


REGULARIZERS.register("topofr")(TopoFR)
