"""Independent formulations of the follower, solved by HiGHS (scipy), for tests
and benchmarks. Nothing here shares code with dro_core.

- `ek_lp`: the Esfahani–Kuhn linear program of a convex max-affine loss
  (DESIGN.md §2), variables α_ik, q⁺_ik, q⁻_ik.
- `transport_lp`: any continuous piecewise-linear loss; each sample sends its
  mass 1/n to points of a grid holding the support's ends, the loss's knots and
  every sample, within a mean transport of ε. Exact because the optimum only
  uses ends, kinks and the samples themselves.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix


def ek_lp(xi, eps, slopes, intercepts, lo, hi):
    """Optimal value of max (1/n) Σ_ik α_ik(a_k ξ_i + b_k) − a_k q_ik
    s.t. (1/n) Σ |q_ik| ≤ ε, Σ_k α_ik = 1, α ≥ 0, lo·α_ik ≤ α_ik ξ_i − q_ik ≤ hi·α_ik,
    with q = q⁺ − q⁻ (q⁺, q⁻ ≥ 0), so |q| ≤ q⁺ + q⁻ and the budget row is linear."""
    xi = np.asarray(xi, float)
    a = np.asarray(slopes, float)
    b = np.asarray(intercepts, float)
    n, k = len(xi), len(a)
    nk = n * k
    # variables [alpha | q+ | q-], each indexed i*k + j
    xr = np.repeat(xi, k)  # ξ_i for index i*k + j
    ar = np.tile(a, n)
    br = np.tile(b, n)
    c = np.concatenate([-(ar * xr + br) / n, ar / n, -ar / n])  # minimise the negative
    idx = np.arange(nk)
    # row 0: budget (1/n) Σ (q+ + q-) ≤ ε
    # rows 1..nk:      α(ξ − hi) − q+ + q- ≤ 0   (ξ − q/α ≤ hi)
    # rows nk+1..2nk:  α(lo − ξ) + q+ − q- ≤ 0   (ξ − q/α ≥ lo)
    up, dn = 1 + idx, 1 + nk + idx
    rows = np.concatenate([np.zeros(2 * nk, int), up, up, up, dn, dn, dn])
    cols = np.concatenate([nk + idx, 2 * nk + idx, idx, nk + idx, 2 * nk + idx, idx, nk + idx, 2 * nk + idx])
    vals = np.concatenate(
        [np.full(2 * nk, 1.0 / n), xr - hi, -np.ones(nk), np.ones(nk), lo - xr, np.ones(nk), -np.ones(nk)]
    )
    A_ub = coo_matrix((vals, (rows, cols)), shape=(1 + 2 * nk, 3 * nk)).tocsr()
    b_ub = np.concatenate([[eps], np.zeros(2 * nk)])
    A_eq = coo_matrix((np.ones(nk), (np.repeat(np.arange(n), k), idx)), shape=(n, 3 * nk)).tocsr()
    res = linprog(c, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return -res.fun


def transport_lp(xi, eps, loss_fn, knots, lo, hi, counts=None):
    """Optimal value of the transport LP on the grid {lo, hi, knots in [lo, hi], xi}:
    max (1/n) Σ_ij π_ij ℓ(g_j)  s.t.  Σ_j π_ij = 1,  (1/n) Σ_ij π_ij |g_j − ξ_i| ≤ ε,  π ≥ 0.

    With `counts`, xi holds distinct values and counts[i] samples sit at xi[i]
    (rows then sum to counts[i]; n = Σ counts): the same LP with equal samples
    merged, which keeps large tied instances small."""
    xi = np.asarray(xi, float)
    w = np.ones(len(xi)) if counts is None else np.asarray(counts, float)
    d = len(xi)
    n = w.sum()
    grid = np.unique(np.concatenate([[lo, hi], np.asarray(knots, float), xi]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    m = len(grid)
    lg = loss_fn(grid)
    c = -np.tile(lg, d) / n
    cost = np.abs(grid[None, :] - xi[:, None]).ravel() / n
    A_ub = cost[None, :]
    rows = np.repeat(np.arange(d), m)
    A_eq = coo_matrix((np.ones(d * m), (rows, np.arange(d * m))), shape=(d, d * m)).tocsr()
    res = linprog(c, A_ub=A_ub, b_ub=[eps], A_eq=A_eq, b_eq=w, bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return -res.fun
