"""The follower step of a round: self-annotation margins → ξ → dro_core → atoms.

- `prob` space (the paper's): ξ_i = σ(β_f · margin_i) ∈ [0.5, 1), loss −log ξ by
  K tangents (`Loss.neg_log(k)`), support [0, 1]; the shift is in probability
  units and the `shift_prob` leader subtracts it from σ(βh).
- `margin` space: ξ_i = β_f · margin_i, loss softplus(−ξ) by K tangents over
  [−m, m], m = max|ξ|; the shift is in units of β·h, as the `shift_margin`
  leader uses it.
Groups: G consecutive pairs in the annotation order (stable), or one ball.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


def follow(margins, eps: float, k: int = 6, group_size: int = 100, beta_follower: float = 0.1,
           space: str = "prob", threads=None) -> Tuple[Dict[str, np.ndarray], Dict[str, object], object]:
    """Returns (columns, diagnostics, solution): columns `shift`, `mass` (N, 2) and `weight` (N,)."""
    import dro_core

    m = np.asarray(margins, dtype=np.float64)
    if space == "prob":
        xi = 1.0 / (1.0 + np.exp(-beta_follower * m))
        loss = dro_core.Loss.neg_log(k)
    elif space == "margin":
        xi = beta_follower * m
        r = float(np.max(np.abs(xi))) if len(xi) else 0.0
        loss = dro_core.Loss.softplus(k, -r, r) if r > 0 else dro_core.Loss.max_affine([0.0], [float(np.log(2))])
    else:
        raise ValueError(f"follower_space: must be 'prob' or 'margin', got {space!r}")
    res = dro_core.solve(xi, eps, group_size if group_size > 0 else None, loss=loss, threads=threads)
    mass = np.asarray(res.mass)
    moved = (mass[:, 0] < 1.0) | (np.asarray(res.loc)[:, 0] != xi)
    diag = {
        "n": int(len(xi)),
        "value": res.value,
        "empirical_value": res.empirical_value,
        "dual_value": res.dual_value,
        "dual_gap": res.dual_gap,
        "lam": np.asarray(res.lam).tolist(),
        "budget_used": np.asarray(res.budget_used).tolist(),
        "moved_fraction": float(np.mean(moved)) if len(xi) else 0.0,
        "space": space,
        "loss": repr(loss),
    }
    cols = {"shift": np.asarray(res.shift), "mass": mass, "weight": np.asarray(res.weights), "xi": xi}
    return cols, diag, res
