"""The leader's losses: small pure functions on per-sample tensors.

Notation: h_i is the policy-vs-reference log-ratio margin of pair i,
    h = log πθ(y_w|x)/π_ref(y_w|x) − log πθ(y_l|x)/π_ref(y_l|x),      shape (B,),
β the DPO temperature, and the follower's atoms of pair i are (shift_ij, mass_ij),
j = 0..K−1 (K = 2 from `dro_core`: `Solution.shift` / `.mass`), shape (B, K).
Every loss function returns one loss per pair (shape (B,)); the trainer averages them,
except `drdpo_loss`, which combines a batch's losses into one (a log-mean-exp),
and `kldpo_weights`, which returns the detached weights of a weighted mean.
`trimmed_loss` is per pair but not pair by pair: which pairs it drops depends on
the whole micro-batch's atoms.

With shift = 0, mass = (1, 0), weight = 1 and nothing flagged every variant
equals `dpo_loss` bit for bit: SSAPO at ε = 0 is DPO.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


def _check_atoms(h: torch.Tensor, shift: torch.Tensor, mass: torch.Tensor) -> None:
    if h.dim() != 1 or shift.dim() != 2 or shift.shape != mass.shape or shift.shape[0] != h.shape[0]:
        raise ValueError(
            f"shift and mass: must both have shape (B, K) with B = len(h) = {tuple(h.shape)}, "
            f"got shift {tuple(shift.shape)} and mass {tuple(mass.shape)}"
        )


def dpo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(βh) = softplus(−βh), per pair.

    Computed as −logsigmoid(βh), trl's expression, which is also the accurate
    one (torch's softplus returns x itself above x = 20, off by ~e^−20)."""
    return -F.logsigmoid(beta * h)


def shift_prob_loss(
    h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor, clamp_min: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The released SSAPO leader (docs/METHOD.md §3.2; the thesis' eq. 2-6 with α
    outside the log, as the code has it):

        loss_i = Σ_j mass_ij · −log clamp(σ(βh_i) − shift_ij, min=clamp_min).

    The follower worked on ξ = σ(β_f·margin) and moved ξ_i to ζ_ij = ξ_i − shift_ij;
    the leader evaluates −log at σ(βh_i) shifted the same way. Each pair uses
    its own atoms (row i of `shift`/`mass`; the released code applied row 0's
    atoms to the whole micro-batch).

    An atom with mass > 0 and σ(βh_i) − shift_ij < clamp_min sits on the clamp:
    its loss is the constant −log clamp_min (13.8 at 1e-6) and its gradient is
    zero. Such atoms are counted. An atom with shift exactly 0 is DPO's
    softplus(−βh) (the same function, computed without the clamp and without
    the rounding of −log σ), so it is never clamped: ε = 0 is DPO exactly.

    Returns (loss per pair (B,), number of clamped atoms with mass > 0 (a 0-dim
    integer tensor)).
    """
    _check_atoms(h, shift, mass)
    shift = shift.to(device=h.device, dtype=h.dtype)
    mass = mass.to(device=h.device, dtype=h.dtype)
    p = torch.sigmoid(beta * h).unsqueeze(-1) - shift
    unmoved = shift == 0
    clamped = ((p < clamp_min) & (mass > 0) & ~unmoved).sum()
    per_atom = torch.where(unmoved, dpo_loss(h, beta).unsqueeze(-1).expand_as(p), -torch.log(p.clamp(min=clamp_min)))
    return (mass * per_atom).sum(-1), clamped


def shift_margin_loss(h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Margin-space shift (ablation, docs/METHOD.md §3.3): Σ_j mass_ij · softplus(−(βh_i − shift_ij)).

    The shift is in units of βh (the follower's margin space, not probability);
    |∂loss_i/∂h_i| ≤ β·Σ_j mass_ij, so no spikes and no dead atoms.
    """
    _check_atoms(h, shift, mass)
    shift = shift.to(device=h.device, dtype=h.dtype)
    mass = mass.to(device=h.device, dtype=h.dtype)
    # one (B,) column at a time, like dpo_loss (a (B, K) call may take another vectorised
    # path and differ in the last bit); βh − 0.0 = βh exactly, so unshifted atoms are DPO bit for bit
    out = mass[:, 0] * -F.logsigmoid(beta * h - shift[:, 0])
    for j in range(1, shift.shape[1]):
        out = out + mass[:, j] * -F.logsigmoid(beta * h - shift[:, j])
    return out


def weighted_dpo_loss(h: torch.Tensor, beta: float, weights: torch.Tensor) -> torch.Tensor:
    """Scalar weights (ablation): w_i · softplus(−βh_i) (`dro_core.Solution.weights`,
    the gradient-matching weights of the follower's atoms)."""
    if weights.shape != h.shape:
        raise ValueError(f"weights: must have shape {tuple(h.shape)} like h, got {tuple(weights.shape)}")
    return weights.to(device=h.device, dtype=h.dtype) * dpo_loss(h, beta)


def kept_mass_loss(h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Our ablation, not the paper's (docs/METHOD.md §3.4): DPO weighted by the mass the follower
    left at the self-label's own confidence,

        (1 − Σ_j mass_j·[shift_j ≠ 0]) · softplus(−βh),

    so a pair whose worst case the follower moved is trained less instead of harder (the follower
    moves the least confident pairs first, where mislabelled ones gather). ε = 0 atoms (shift 0)
    give `dpo_loss` exactly."""
    _check_atoms(h, shift, mass)
    kept = (1.0 - _moved(shift, mass)).clamp(min=0.0).to(device=h.device, dtype=h.dtype)
    return kept * dpo_loss(h, beta)


def _moved(shift: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Σ_j mass_ij·[shift_ij ≠ 0] per pair, unclamped, in mass's dtype."""
    return (mass * (shift != 0).to(mass.dtype)).sum(dim=1)


def moved_mass(shift: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """The mass the follower moved off each pair's self-label confidence, m_i = Σ_j mass_ij·[shift_ij ≠ 0]
    (`ssapo.atoms.moved_mass` on the trainer's tensors), clamped to [0, 1]; shape (B,), in mass's dtype (0 for
    ε = 0 atoms: shift 0, mass (1, 0))."""
    return _moved(shift, mass).clamp(min=0.0, max=1.0)


def drop_moved_loss(
    h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor, drop_threshold: float
) -> torch.Tensor:
    """Our ablation, not the paper's (docs/METHOD.md §3.4): a pair whose moved mass m_i (`moved_mass`)
    is at least `drop_threshold` is dropped, the others train as DPO,

        [m_i < drop_threshold] · softplus(−βh_i),

    so a pair the follower doubted enough contributes neither loss nor gradient (the trainer still
    averages over the whole micro-batch), and a pair moved only partly, below the threshold, is plain
    DPO, unlike `kept_mass_loss`'s graded weight. drop_threshold in (0, 1]: an unmoved pair (m = 0) is
    never dropped, so ε = 0 atoms give `dpo_loss` exactly."""
    _check_atoms(h, shift, mass)
    if not 0 < drop_threshold <= 1:
        raise ValueError(f"drop_threshold: must be in (0, 1], got {drop_threshold}")
    plain = dpo_loss(h, beta)
    dropped = (moved_mass(shift, mass) >= drop_threshold).to(h.device)
    return torch.where(dropped, torch.zeros_like(plain), plain)


def flip_moved_loss(h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Our ablation, not the paper's (docs/METHOD.md §3.4): the moved mass m_i (`moved_mass`) read as
    the probability that pair i's self-label is wrong, a per-pair label smoothing (cDPO's loss with
    ε_i = m_i instead of one ε for every pair),

        (1 − m_i)·softplus(−βh_i) + m_i·softplus(βh_i),

    each softplus computed as −logsigmoid, as `dpo_loss`. A pair the follower moved entirely (m = 1)
    is trained towards the other label; a half-moved one (m = 0.5) gets a loss with its minimum at
    h = 0 (the label erased). Unmoved pairs (m = 0; ε = 0 atoms) give `dpo_loss` exactly (1·ℓ + 0)."""
    _check_atoms(h, shift, mass)
    m = moved_mass(shift, mass).to(device=h.device, dtype=h.dtype)
    return (1 - m) * dpo_loss(h, beta) + m * -F.logsigmoid(-beta * h)


def trimmed_loss(
    h: torch.Tensor, beta: float, shift: torch.Tensor, mass: torch.Tensor, trim_fraction: float
) -> torch.Tensor:
    """Our ablation, not the paper's (docs/METHOD.md §3.4): a trimmed mean of the micro-batch's DPO
    losses, the trimmed pairs chosen by the follower. Of the B pairs, the k = min(⌊trim_fraction·B⌋,
    #{i: m_i > 0}) with the largest moved mass m_i (`moved_mass`; ties broken by the larger DPO loss,
    then by position) are dropped and the loss is the mean over the other B − k:

        loss_i = [i kept] · B/(B − k) · softplus(−βh_i),

    scaled by B/(B − k) so that the trainer's mean over the B pairs is the mean over the kept ones.
    Pairs with m = 0 are never dropped, so ε = 0 atoms give `dpo_loss` exactly (k = 0). The ranking
    is over this micro-batch on this process (not gathered) and is detached: dropped pairs get no
    gradient, kept ones DPO's. It is a per-pair function rather than a `weights` batch function
    because the batch functions see only the per-pair losses, not the atoms. ⌊·⌋ is taken with a
    1e-9 slack (0.29·100 is 28.999…96 in floating point and counts as 29)."""
    _check_atoms(h, shift, mass)
    if not 0 <= trim_fraction < 1:
        raise ValueError(f"trim_fraction: must be in [0, 1), got {trim_fraction}")
    plain = dpo_loss(h, beta)
    b = h.shape[0]
    m = moved_mass(shift, mass).to(h.device)
    k = min(math.floor(trim_fraction * b + 1e-9), int((m > 0).sum()))
    if k == 0:
        return plain
    # the order: m descending, ties by the larger DPO loss, then by position (stable sorts, last key first)
    by_loss = torch.sort(plain.detach(), descending=True, stable=True).indices
    order = by_loss[torch.sort(m[by_loss], descending=True, stable=True).indices]
    kept = torch.ones(b, dtype=torch.bool, device=h.device)
    kept[order[:k]] = False
    return torch.where(kept, plain * (b / (b - k)), torch.zeros_like(plain))


def spa_loss(h: torch.Tensor, beta: float, flagged: torch.Tensor, alpha: float) -> torch.Tensor:
    """SPA's refined loss (Kim et al. 2025, eq. 10): label smoothing α on the
    flagged (least confident, eq. 9/11) pairs only:

        (1 − αz)·softplus(−βh) + αz·softplus(βh),   z = flagged ∈ {0, 1}.

    Unflagged pairs (or α = 0) give `dpo_loss` exactly."""
    if flagged.shape != h.shape:
        raise ValueError(f"flagged: must have shape {tuple(h.shape)} like h, got {tuple(flagged.shape)}")
    plain = dpo_loss(h, beta)
    if alpha == 0:
        return plain
    smoothed = (1 - alpha) * plain + alpha * -F.logsigmoid(-beta * h)
    return torch.where(flagged.to(h.device).bool(), smoothed, plain)


def cdpo_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):
    label smoothing ε on every pair, the label trusted with probability 1 − ε,

        (1 − ε)·softplus(−βh) + ε·softplus(βh).

    Its minimum in h is finite (βh* = log((1 − ε)/ε)), so no pair is pushed
    without bound. trl ≥ 0.29 no longer applies `label_smoothing` to its sigmoid
    loss; this is the loss itself. ε = 0 gives `dpo_loss` exactly."""
    _check_smoothing(label_smoothing, "cdpo", 0.5, inclusive=True)
    plain = dpo_loss(h, beta)
    if label_smoothing == 0:
        return plain
    return (1 - label_smoothing) * plain + label_smoothing * -F.logsigmoid(-beta * h)


def rdpo_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback"; trl's
    `loss_type="robust"`): with labels flipped independently at the known rate
    ε < 1/2, the unbiased estimate of the clean DPO loss,

        [(1 − ε)·softplus(−βh) − ε·softplus(βh)] / (1 − 2ε).

    Unlike cDPO it is unbounded below (a pair believed flipped is pushed the
    other way at rate ε/(1 − 2ε)). ε = 0 gives `dpo_loss` exactly."""
    _check_smoothing(label_smoothing, "rdpo", 0.5, inclusive=False)
    plain = dpo_loss(h, beta)
    if label_smoothing == 0:
        return plain
    return ((1 - label_smoothing) * plain - label_smoothing * -F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)


def drdpo_loss(per_pair: torch.Tensor, beta_prime: float) -> torch.Tensor:
    """Dr. DPO (Wu et al. 2024, "Towards Robust Alignment of Language Models:
    Distributionally Robustifying Direct Preference Optimization"): the
    batch's DPO losses ℓ_i combined as

        −β′ · log (1/B) Σ_i exp(−ℓ_i/β′)            (a scalar, not one per pair),

    computed with logsumexp. Its gradient weights pair i by
    softmax(−ℓ/β′)_i: pairs with a large loss (likely mislabelled) count less.
    β′ → ∞ gives the mean of ℓ (DPO); β′ → 0 the smallest ℓ. The batch is the
    micro-batch on one process, as in the paper's code (the gradient of a log-
    mean-exp does not split over processes)."""
    if not beta_prime > 0:
        raise ValueError(f"drdpo_beta: must be > 0, got {beta_prime}")
    if per_pair.dim() != 1 or per_pair.numel() == 0:
        raise ValueError(f"per_pair: must be a non-empty 1-d tensor of losses, got shape {tuple(per_pair.shape)}")
    n = per_pair.new_tensor(float(per_pair.numel())).log()
    return -beta_prime * (torch.logsumexp(-per_pair / beta_prime, dim=0) - n)


def kldpo_weights(
    per_pair: torch.Tensor, tau: float, max_weight: float, all_losses: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """KLDPO's per-pair weights (Xu et al. 2025, "Distributionally Robust Direct
    Preference Optimization", the KL-ball worst case; as the authors' code has
    it): detached

        w_i = min(exp((ℓ_i − mean ℓ)/τ), max_weight),

    the mean taken over `all_losses` (the losses of every process's micro-batch,
    gathered; default: `per_pair` itself). The leader's loss is mean_i w_i·ℓ_i:
    pairs with a large loss count MORE (the adversary up-weights them), the
    opposite of Dr. DPO. τ → ∞ gives w = 1 (DPO)."""
    if not tau > 0:
        raise ValueError(f"kldpo_tau: must be > 0, got {tau}")
    if not max_weight >= 1:
        raise ValueError(f"kldpo_max_weight: must be >= 1, got {max_weight}")
    ref = per_pair if all_losses is None else all_losses
    centre = ref.detach().mean()
    return torch.exp((per_pair.detach() - centre) / tau).clamp(max=max_weight)


def _check_smoothing(eps: float, loss: str, hi: float, inclusive: bool) -> None:
    ok = 0 <= eps <= hi if inclusive else 0 <= eps < hi
    if not ok:
        rng = f"[0, {hi}]" if inclusive else f"[0, {hi})"
        raise ValueError(f"label_smoothing: {loss} needs it in {rng}, got {eps}")


def decoupled_logits(policy_logits: torch.Tensor, ref_logits: torch.Tensor, lam: float) -> torch.Tensor:
    """SPA's de-coupled model (eq. 12), in logit space (token logits, before
    any softmax): (1 + λ)·logits_θ − λ·logits_ref, detached (it only scores
    confidence). Mixing log-probabilities instead would drop the per-token
    normaliser of the mixed distribution."""
    return (1 + lam) * policy_logits.detach() - lam * ref_logits.detach()


def masked_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask_t · log softmax(logits_t)[labels_t], in float32 or wider.

    logits (N, T, V) are already aligned with labels (N, T): position t
    predicts labels[:, t] (for a causal LM pass logits[:, :-1] and
    input_ids[:, 1:]). Labels under mask 0 may be anything in range."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    lp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (lp * mask.to(lp.dtype)).sum(-1)


def decoupled_margin(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    input_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    lam: float,
    beta: float,
    ref_logps: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """SPA's confidence of each pair under the de-coupled model (eq. 11–12):

        m̃_i = β·[(log π̃(y_w) − log π̃(y_l)) − (log π_ref(y_w) − log π_ref(y_l))],
        π̃ = softmax((1 + λ)·logits_θ − λ·logits_ref) at every token.

    Inputs are trl's concatenated batch: rows 0..B−1 are prompt+chosen, rows
    B..2B−1 prompt+rejected; logits (2B, T, V) of a causal LM on input_ids
    (2B, T); completion_mask (2B, T) marks the response tokens. The reference's
    sequence log-probs come from `ref_logits` unless given as (chosen, rejected).
    Returns m̃, shape (B,), detached.
    """
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    mixed = masked_sequence_logps(decoupled_logits(policy_logits, ref_logits, lam)[:, :-1], labels, mask)
    if ref_logps is None:
        ref = masked_sequence_logps(ref_logits.detach()[:, :-1], labels, mask)
        ref_c, ref_r = ref.chunk(2, dim=0)
    else:
        ref_c, ref_r = (r.to(mixed) for r in ref_logps)
    mix_c, mix_r = mixed.chunk(2, dim=0)
    return (beta * ((mix_c - mix_r) - (ref_c - ref_r))).detach()


class ConfidenceWindow:
    """SPA's threshold τ (eq. 11, App. B.4): the lower `quantile` boundary of the
    de-coupled confidences m̃ of the last `size` pairs.

    - `update(values)` appends a batch of confidences; when `gather` is given
      (the trainer passes accelerate's `Accelerator.gather` in multi-process
      runs) the batch is first gathered over ranks, so every rank holds the
      same window and the same τ (the released SPA code kept one τ per rank,
      from per-micro-batch means).
    - `tau` is the `quantile` order statistic of the window with linear
      interpolation (`torch.quantile`, numpy's default), e.g. 54.9 for the
      values 50..99 at 0.1.
    - `flag(values)` is `values ≤ τ` (inclusive: a pair exactly at the
      boundary is smoothed). With the window full of distinct values about
      `quantile`·`size` of them fall at or below τ.
    - Choice: while the window is empty τ = −∞ and nothing is flagged (the
      released code used τ = 0 until 50 entries, which flags every pair with a
      negative margin at the start of a round). Once it holds any values τ is
      their quantile, so it is in use after the first batch; SPA's warm-up
      (no smoothing in the first 20 % of steps) covers the noisy start.
    The trainer flags a batch against the window of earlier batches and then
    adds the batch (the released code's order).
    """

    def __init__(
        self, size: int = 50, quantile: float = 0.1, gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    ):
        if size < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile: must be in [0, 1], got {quantile}")
        self.size = size
        self.quantile = quantile
        self.gather = gather
        self._values: list[float] = []

    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> list[float]:
        return list(self._values)

    @property
    def tau(self) -> float:
        if not self._values:
            return float("-inf")
        return float(torch.quantile(torch.tensor(self._values, dtype=torch.float64), self.quantile))

    def update(self, values: torch.Tensor) -> None:
        values = values.detach()
        if self.gather is not None:
            values = self.gather(values)
        self._values.extend(values.double().flatten().tolist())
        del self._values[: -self.size]

    def flag(self, values: torch.Tensor) -> torch.Tensor:
        if not self._values:
            return torch.zeros_like(values, dtype=torch.bool)
        return values <= self.tau

    def reset(self) -> None:
        self._values.clear()
