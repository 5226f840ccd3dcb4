"""The follower of a round (docs/METHOD.md §2; the loop step: §4.3): self-annotation margins → ξ →
`dro_core.solve` → at most two atoms per pair.

    from ssapo.follower import follow, save
    atoms, diag = follow(margins, cfg)                # cfg: a RunConfig (eps, k, group_size, beta_follower, follower_space)
    atoms, diag = follow(margins, eps=0.01, group_size=100)
    save("round_1/follower.npz", atoms, diag)
    rows = Atoms.of(load("round_1/follower.npz")).attach(rows)

Spaces (`follower_space`):
- `prob` (the paper's and the released code's): ξ_i = σ(β_f·margin_i) ∈ [0.5, 1)
  for self-annotated pairs (margin > 0), loss −log ξ by its K tangents at k/K
  (`dro_core.Loss.neg_log(K)`), support [0, 1]. The shift δ_ij = ξ_i − ζ_ij is
  in *probability units*: the `shift_prob` leader subtracts it from σ(βh_θ)
  (Σ_j α_ij·−log clamp(σ(βh_θ) − δ_ij, clamp_min)). β_f is `beta_follower`
  (the released code hard-codes 0.1 for every model).
- `margin`: ξ_i = β_f·margin_i, the DPO margin at β_f of the self-annotation;
  loss softplus(−ξ) by K tangents spread over [−m, m], m = max_i |ξ_i|
  (`dro_core.Loss.softplus(K, −m, m)`: the adversary may turn a pair into the
  most confidently wrong pair observed). The shift is in units of β·h (the
  margin the DPO loss sees): the `shift_margin` leader uses
  Σ_j α_ij·softplus(−(βh_θ − δ_ij)). With β_f = β the two scales agree.

Groups (`group_size`): G consecutive pairs in the annotation order (the stable
prompt order, never a worker's completion order), the last group shorter; 0 =
one global ball. The result is bit-identical whatever the thread count.

Returned per pair: an `ssapo.atoms.Atoms`: `xi`, `loc` (N, 2), `mass` (N, 2)
(rows sum to 1), `shift` (N, 2) = ξ − loc, `weight` (N,) (gradient-matching
scalar weights for the `weights` leader) and `group` (N,). With ε = 0 every
shift is 0 and every mass (1, 0): every leader loss is then exactly DPO.
Settings not given default to RunConfig's fields (declared there only).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ssapo.atoms import Atoms, moved_mass

# keyword -> the RunConfig field it defaults to
SETTINGS = {
    "eps": "eps",
    "k": "k",
    "group_size": "group_size",
    "beta_follower": "beta_follower",
    "space": "follower_space",
}


def _settings(cfg, **kw) -> Dict[str, Any]:
    from ssapo.config import RunConfig, check_value, default_of
    from ssapo.errors import ConfigError

    out = {}
    for key, field in SETTINGS.items():
        v = kw.get(key)
        if v is None and cfg is not None:
            v = getattr(cfg, field, None)
        out[key] = default_of(field) if v is None else v
    if isinstance(out["group_size"], str):
        if out["group_size"].strip().lower() != "global":
            raise ConfigError(f"group_size: an integer >= 0 or 'global', got {out['group_size']!r}")
        out["group_size"] = 0
    for key, field in SETTINGS.items():  # the choices and bounds of RunConfig's fields, declared there once
        if kw.get(key) is not None or not isinstance(cfg, RunConfig):  # a RunConfig's values were checked once
            check_value(field, out[key])
    return out


def xi_of(margins, beta_follower: float = 0.1, space: str = "prob") -> np.ndarray:
    """The follower's samples: σ(β_f·margin) (prob) or β_f·margin (margin)."""
    m = np.asarray(margins, dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"margins: must be 1-D, got shape {m.shape}")
    bad = np.flatnonzero(~np.isfinite(m))
    if len(bad):
        raise ValueError(f"margins: not finite at index {int(bad[0])} ({m[bad[0]]})")
    z = beta_follower * m
    if space == "prob":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z), accurate at both ends
    if space == "margin":
        return z
    raise ValueError(f"follower_space: must be 'prob' or 'margin', got {space!r}")


def loss_of(xi: np.ndarray, k: int, space: str):
    """The follower's piecewise-linear loss in `space` (see the module docstring)."""
    import dro_core

    if space == "prob":
        return dro_core.Loss.neg_log(int(k))
    r = float(np.max(np.abs(xi))) if len(xi) else 0.0
    if r == 0.0:  # every margin 0: nothing to move towards; softplus(-0) = log 2, flat
        return dro_core.Loss.max_affine([0.0], [float(np.log(2.0))])
    return dro_core.Loss.softplus(int(k), -r, r)


def follow(
    margins,
    cfg=None,
    *,
    eps: Optional[float] = None,
    k: Optional[int] = None,
    group_size: Optional[int] = None,
    beta_follower: Optional[float] = None,
    space: Optional[str] = None,
    threads: Optional[int] = None,
    clamp_level: float = 0.5,
) -> Tuple[Atoms, Dict[str, Any]]:
    """Solves the follower over `margins` (chosen_reward − rejected_reward per
    pair, in the stable annotation order). Settings from `cfg` (a RunConfig)
    and/or keywords (keywords win).

    Returns (atoms, diagnostics): the atoms as in the module docstring;
    diagnostics {n, eps, k, space, beta_follower, group_size, groups, value
    (worst-case expected loss), empirical_value, dual_value, dual_gap, lam
    (λ* per group), budget_used (per group, mean transport, ≤ ε),
    budget_used_fraction, moved_fraction (pairs with mass away from ξ),
    moved_mass (mean mass moved), dead_at_start_fraction (prob space: pairs
    with an atom of mass > 0 shifted by ≥ `clamp_level` = σ(βh) at the start of
    a round whose reference is π_{t−1}; the `shift_prob` leader's clamp gives
    those atoms no gradient), mean_shift, xi_min/xi_mean/xi_max, seconds}."""
    import dro_core

    s = _settings(cfg, eps=eps, k=k, group_size=group_size, beta_follower=beta_follower, space=space)
    t0 = time.time()
    xi = xi_of(margins, s["beta_follower"], s["space"])
    n = len(xi)
    G = int(s["group_size"])
    diag: Dict[str, Any] = {
        "n": n,
        "eps": float(s["eps"]),
        "k": int(s["k"]),
        "space": s["space"],
        "beta_follower": float(s["beta_follower"]),
        "group_size": G if G > 0 else "global",
    }
    if n == 0:
        z2 = np.zeros((0, 2))
        atoms = Atoms(z2, z2.copy(), np.zeros(0), xi=xi, loc=z2.copy(), group=np.zeros(0, dtype=np.int64))
        diag.update(
            groups=0,
            value=0.0,
            empirical_value=0.0,
            dual_value=0.0,
            dual_gap=0.0,
            lam=[],
            budget_used=[],
            group_sizes=[],
            budget_used_fraction=0.0,
            moved_fraction=0.0,
            moved_mass=0.0,
            dead_at_start_fraction=0.0,
            mean_shift=0.0,
            seconds=time.time() - t0,
        )
        return atoms, diag
    loss = loss_of(xi, s["k"], s["space"])
    res = dro_core.solve(xi, float(s["eps"]), G if G > 0 else None, loss=loss, threads=threads)
    loc, mass, shift = np.asarray(res.loc), np.asarray(res.mass), np.asarray(res.shift)
    moved = moved_mass(shift, mass)  # per pair
    group = np.arange(n) // G if G > 0 else np.zeros(n, dtype=np.int64)
    budget = np.asarray(res.budget_used, dtype=np.float64)
    atoms = Atoms(shift, mass, np.asarray(res.weights), xi=xi, loc=loc, group=group)
    diag.update(
        groups=int(len(res.lam)),
        value=float(res.value),
        empirical_value=float(res.empirical_value),
        dual_value=float(res.dual_value),
        dual_gap=float(res.dual_gap),
        lam=np.asarray(res.lam, dtype=np.float64).tolist(),
        budget_used=budget.tolist(),
        group_sizes=np.asarray(res.group_sizes).tolist(),
        budget_used_fraction=float(np.mean(budget) / s["eps"]) if s["eps"] > 0 else 0.0,
        moved_fraction=float(np.mean(moved > 0)),
        moved_mass=float(np.mean(moved)),
        dead_at_start_fraction=float(np.mean(((mass > 0) & (shift >= clamp_level)).any(axis=1)))
        if s["space"] == "prob"
        else 0.0,
        mean_shift=float(np.mean((mass * shift).sum(axis=1))),
        xi_min=float(xi.min()),
        xi_mean=float(xi.mean()),
        xi_max=float(xi.max()),
        seconds=time.time() - t0,
    )
    return atoms, diag


def save(path, atoms: Atoms, diag: Dict[str, Any], margins=None) -> str:
    """follower.npz, atomically: the atoms' arrays under their names (xi, loc,
    mass, shift, weight, group), lam, budget_used, group_sizes, value,
    empirical_value, dual_value, dual_gap, eps (and margins when given)."""
    from ssapo.io import atomic_write

    arrays = {
        **atoms.arrays(),
        "lam": np.asarray(diag.get("lam", []), dtype=np.float64),
        "budget_used": np.asarray(diag.get("budget_used", []), dtype=np.float64),
        "group_sizes": np.asarray(diag.get("group_sizes", []), dtype=np.int64),
        "value": np.float64(diag.get("value", 0.0)),
        "empirical_value": np.float64(diag.get("empirical_value", 0.0)),
        "dual_value": np.float64(diag.get("dual_value", 0.0)),
        "dual_gap": np.float64(diag.get("dual_gap", 0.0)),
        "eps": np.float64(diag.get("eps", 0.0)),
    }
    if margins is not None:
        arrays["margins"] = np.asarray(margins, dtype=np.float64)

    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, w)


def load(path) -> Dict[str, np.ndarray]:
    """The arrays of a follower.npz (`Atoms.of` of them: the atoms)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


class Resolver:
    """The re-solve hook (`resolve_every`): every `every` optimizer steps of a
    round, `margins_fn(model)` gives the margins of the round's pairs (in the
    dataset's order) under the policy being trained, the follower is solved
    again with the same settings, and the new atoms replace the old ones in
    `atoms` in place (what `ssapo.resolving.ResolvingTrainer`'s collator reads).
    `broadcast` (several processes): every rank takes the main process's atoms.
    `history` keeps the diagnostics of each re-solve; `state_dict` /
    `load_state_dict` keep both in a trainer checkpoint."""

    def __init__(
        self,
        cfg,
        every: int,
        margins_fn: Callable[[Any], np.ndarray],
        atoms: Atoms,
        broadcast: Optional[Callable[[Any], Any]] = None,
    ):
        if every < 1:
            raise ValueError(f"resolve_every: must be >= 1 for a Resolver, got {every}")
        self.cfg, self.every, self.margins_fn, self.atoms = cfg, int(every), margins_fn, atoms
        self.broadcast = broadcast
        self.history: list = []

    def resolve(self, step: int, model=None) -> Dict[str, Any]:
        margins = np.asarray(self.margins_fn(model), dtype=np.float64)
        new, diag = follow(margins, self.cfg)
        if self.broadcast is not None:  # every rank trains on the main process's atoms
            new = self.broadcast(new)
        self.atoms.update(new)
        diag = {k: v for k, v in diag.items() if k not in ("lam", "budget_used", "group_sizes")}
        diag["step"] = int(step)
        self.history.append(diag)
        return diag

    def state_dict(self) -> Dict[str, Any]:
        return {"atoms": {k: v.tolist() for k, v in self.atoms.arrays().items()}, "history": list(self.history)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.atoms.update(Atoms.of({k: np.asarray(v) for k, v in state["atoms"].items()}))
        self.history = list(state["history"])
