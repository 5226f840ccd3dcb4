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
    s.t. (1/n) Σ |q_ik| ≤ ε, Σ_k α_ik = 1, α ≥ 0, lo·α_ik ≤ α_ik ξ_i − q_ik ≤ hi·α_ik."""
    xi = np.asarray(xi, float)
    a = np.asarray(slopes, float)
    b = np.asarray(intercepts, float)
    n, k = len(xi), len(a)
    nv = 3 * n * k  # [alpha | qp | qm], q = qp - qm
    A = lambda i, j: i * k + j
    c = np.zeros(nv)
    for i in range(n):
        for j in range(k):
            c[A(i, j)] = -(a[j] * xi[i] + b[j]) / n
            c[n * k + A(i, j)] = a[j] / n
            c[2 * n * k + A(i, j)] = -a[j] / n
    rows, cols, vals, rhs = [], [], [], []
    r = 0
    # budget
    for idx in range(n * k):
        rows += [r, r]
        cols += [n * k + idx, 2 * n * k + idx]
        vals += [1.0 / n, 1.0 / n]
    rhs.append(eps)
    r += 1
    # support: alpha*(xi - hi) - q <= 0 ; alpha*(lo - xi) + q <= 0
    for i in range(n):
        for j in range(k):
            idx = A(i, j)
            rows += [r, r, r]
            cols += [idx, n * k + idx, 2 * n * k + idx]
            vals += [xi[i] - hi, -1.0, 1.0]
            rhs.append(0.0)
            r += 1
            rows += [r, r, r]
            cols += [idx, n * k + idx, 2 * n * k + idx]
            vals += [lo - xi[i], 1.0, -1.0]
            rhs.append(0.0)
            r += 1
    A_ub = coo_matrix((vals, (rows, cols)), shape=(r, nv)).tocsr()
    eq_rows = np.repeat(np.arange(n), k)
    A_eq = coo_matrix((np.ones(n * k), (eq_rows, np.arange(n * k))), shape=(n, nv)).tocsr()
    res = linprog(c, A_ub=A_ub, b_ub=rhs, A_eq=A_eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return -res.fun


def transport_lp(xi, eps, loss_fn, knots, lo, hi):
    """Optimal value of the transport LP on the grid {lo, hi, knots in [lo, hi], xi}."""
    xi = np.asarray(xi, float)
    n = len(xi)
    grid = np.unique(np.concatenate([[lo, hi], np.asarray(knots, float), xi]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    m = len(grid)
    lg = loss_fn(grid)
    c = -np.tile(lg, n) / n
    cost = np.abs(grid[None, :] - xi[:, None]).ravel() / n
    A_ub = cost[None, :]
    rows = np.repeat(np.arange(n), m)
    A_eq = coo_matrix((np.ones(n * m), (rows, np.arange(n * m))), shape=(n, n * m)).tocsr()
    res = linprog(c, A_ub=A_ub, b_ub=[eps], A_eq=A_eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return -res.fun
