"""The leader's losses: small pure functions on per-sample tensors.

Notation: h_i is the policy-vs-reference log-ratio margin of pair i,
    h = log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x),
β the DPO temperature, and the follower's atoms of pair i are (shift_ij, mass_ij),
j = 0, 1 (`dro_core.Solution.shift` / `.mass`). Every function returns one loss
per pair; the trainer averages them.

With shift = 0, mass = (1, 0) and weight = 1 every variant equals `dpo_loss`
exactly: SSAPO at ε = 0 is DPO.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def dpo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(βh) = softplus(−βh)."""
    return F.softplus(-beta * h)


def shift_prob_loss(
    h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor, clamp_min: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The released SSAPO leader (REFERENCE §3c): Σ_j mass_ij · −log clamp(σ(βh_i) − shift_ij, clamp_min).

    The follower worked on ξ = σ(β·margin) and moved ξ_i to ζ_ij = ξ_i − shift_ij;
    the leader evaluates −log at σ(βh_i) shifted the same way. Each pair uses
    its own atoms (the released code applied row 0's atoms to the whole
    micro-batch). An atom with σ(βh_i) − shift_ij < clamp_min sits on the clamp:
    its loss is constant and its gradient zero.

    Returns (loss per pair, number of clamped atoms with positive mass).
    """
    p = torch.sigmoid(beta * h).unsqueeze(-1) - shift.to(h.dtype)
    clamped = ((p < clamp_min) & (mass > 0)).sum()
    # an atom that did not move gives DPO's softplus(−βh) exactly (−log σ(βh)
    # differs from it in the last bits and underflows for very negative βh)
    unmoved = dpo_loss(h, beta).unsqueeze(-1).expand_as(p)
    per_atom = torch.where((shift == 0) & (p >= clamp_min), unmoved, -torch.log(p.clamp(min=clamp_min)))
    return (mass.to(h.dtype) * per_atom).sum(-1), clamped


def shift_margin_loss(h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Margin-space shift: Σ_j mass_ij · softplus(−(βh_i − shift_ij)). The shift is
    in units of βh (the follower's margin space); |∂/∂h| ≤ β, so no spikes."""
    z = beta * h.unsqueeze(-1) - shift.to(h.dtype)
    return (mass.to(h.dtype) * F.softplus(-z)).sum(-1)


def weighted_dpo_loss(h: torch.Tensor, beta: float, weights: torch.Tensor) -> torch.Tensor:
    """Scalar weights w_i · softplus(−βh_i) (`dro_core.Solution.weights`: the
    gradient-matching weights of the follower's atoms)."""
    return weights.to(h.dtype) * dpo_loss(h, beta)


def spa_loss(h: torch.Tensor, beta: float, flagged: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPA's refined loss (Kim et al. 2025, eq. 10): label smoothing α on the
    flagged (least confident) pairs only:
    (1 − αz)·softplus(−βh) + αz·softplus(βh)."""
    z = alpha * flagged.to(h.dtype)
    return (1 - z) * F.softplus(-beta * h) + z * F.softplus(beta * h)


def decoupled_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """SPA's de-coupled model (eq. 12), in logit space: (1 + λ)·h_θ − λ·h_ref,
    detached (it only scores confidence)."""
    return ((1 + lam) * policy_logits - lam * ref_logits).detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over masked positions of log softmax(logits)[label]; logits (B, T, V)
    predict labels (B, T)."""
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


class ConfidenceWindow:
    """SPA's threshold τ: the lower `quantile` boundary of the de-coupled
    confidences of the last `size` pairs (App. B.4).

    `update(values)` appends a batch (gather it over ranks first when
    distributed); `flag(values)` marks values ≤ τ. Until the window holds
    `size` values nothing is flagged (τ = −∞): the released code used τ = 0
    there, which flags every negative margin at the start of a round.
    τ is the `quantile` order statistic (linear interpolation, numpy's default)
    of the window.
    """

    def __init__(self, size: int = 50, quantile: float = 0.1):
        if size < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile: must be in [0, 1], got {quantile}")
        self.size = size
        self.quantile = quantile
        self._values: list[float] = []

    @property
    def tau(self) -> float:
        if len(self._values) < self.size:
            return float("-inf")
        return float(torch.quantile(torch.tensor(self._values, dtype=torch.float64), self.quantile))

    def update(self, values: torch.Tensor) -> None:
        self._values.extend(values.detach().double().flatten().tolist())
        self._values = self._values[-self.size :]

    def flag(self, values: torch.Tensor) -> torch.Tensor:
        return values <= self.tau
