"""Independent formulations of the follower, solved by HiGHS (scipy), for tests
and benchmarks. Nothing here shares code with dro_core.

- `ek_lp`: the Esfahani–Kuhn linear program of a convex max-affine loss
  (docs/METHOD.md §2.3), variables α_ik, q⁺_ik, q⁻_ik.
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


# --- a randomized comparison: instances of every family, one at a time ---


# numpy evaluations of the losses, written independently of the crate (the tests use them too)


def np_max_affine(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return lambda z: np.max(np.asarray(z, float)[:, None] * a[None, :] + b[None, :], axis=1)


def np_interp(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)

    def f(z):
        z = np.asarray(z, float)
        v = np.interp(z, x, y)
        left, right = z < x[0], z > x[-1]
        v[left] = y[0] + (y[1] - y[0]) / (x[1] - x[0]) * (z[left] - x[0])
        v[right] = y[-1] + (y[-1] - y[-2]) / (x[-1] - x[-2]) * (z[right] - x[-1])
        return v

    return f


def neg_log_pieces(k):
    j = np.arange(1, k + 1)
    return -k / j, 1.0 - np.log(j / k)


def softplus_pieces(k, lo, hi):
    pts = np.array([(lo + hi) / 2]) if k == 1 else np.linspace(lo, hi, k)
    a = -1 / (1 + np.exp(pts))  # d/dz softplus(-z) = -sigmoid(-z)
    b = np.logaddexp(0, -pts) - a * pts
    return a, b


def random_instance(rng):
    """One random follower problem of a family drawn at random, built the way
    users meet them and the way issue 8 was found: samples on a decimal grid of
    the support (its bounds among them, heavy ties, budgets that a set of whole
    moves spends exactly) for the paper's loss and softplus tangents, plus
    continuous samples, random convex losses and non-convex interpolations.
    Returns a dict: xi, eps, kind ('neg_log' | 'softplus' | 'max_affine' |
    'interpolate'), params (the loss constructor's arguments), support (or
    None), f (numpy loss), knots, pieces ((a, b) for convex ones, else None)."""
    fam = rng.integers(6)
    n = int(rng.integers(1, 121))
    if fam <= 2:  # decimal grid (issue 8) with neg_log or softplus
        if fam <= 1:
            k = int(rng.integers(1, 11))
            kind, params, (lo, hi) = "neg_log", (k,), (0.0, 1.0)
            a, b = neg_log_pieces(k)
        else:
            k, m = int(rng.integers(1, 9)), float(rng.integers(1, 8))
            kind, params, (lo, hi) = "softplus", (k, -m, m), (-m, m)
            a, b = softplus_pieces(k, -m, m)
        steps = int(rng.choice([4, 5, 10, 20]))
        grid = rng.integers(0, steps + 1, n)
        if rng.random() < 0.3:
            grid[rng.integers(n, size=max(1, n // 10))] = 0  # on the lower bound
        xi = np.where(grid == steps, hi, lo + (hi - lo) * grid / steps)
        if rng.random() < 0.5:
            # a budget spent exactly by the whole moves toward lo of every sample up to a grid
            # value (the issue-8 shape: the edges above λ* use the budget up to the last bit,
            # so the selection's partial sums land on it, up to one rounding)
            v = int(rng.integers(1, steps + 1))
            eps = (hi - lo) * (int(grid[grid <= v].sum()) / steps) / n
        else:
            eps = (hi - lo) * int(rng.integers(0, 41)) / 100
        return dict(
            xi=xi,
            eps=float(eps),
            kind=kind,
            params=params,
            support=None,
            f=np_max_affine(a, b),
            knots=[],
            pieces=(a, b),
        )
    if fam == 3:  # the paper's loss on continuous probabilities
        k = int(rng.integers(1, 11))
        xi = rng.uniform(0, 1, n) if rng.random() < 0.5 else 1 / (1 + np.exp(-0.1 * np.abs(rng.normal(0, 10, n))))
        a, b = neg_log_pieces(k)
        return dict(
            xi=xi,
            eps=float(rng.choice([0.0, 1e-3, 0.01, 0.05, 0.1, 0.3, 2.0])),
            kind="neg_log",
            params=(k,),
            support=None,
            f=np_max_affine(a, b),
            knots=[],
            pieces=(a, b),
        )
    if fam == 4:  # random convex max-affine
        k = int(rng.integers(1, 9))
        a, b = rng.normal(0, 3, k), rng.normal(0, 1, k)
        lo, hi = sorted(rng.normal(0, 2, 2))
        hi = max(hi, lo + 1e-3)
        xi = rng.uniform(lo, hi, n)
        if rng.random() < 0.3:
            xi[rng.integers(n, size=max(1, n // 4))] = lo
            xi[rng.integers(n, size=max(1, n // 4))] = hi
        eps = float(rng.choice([0.0, 1e-3, 0.05, 0.2, 1.0])) * (hi - lo)
        return dict(
            xi=xi,
            eps=eps,
            kind="max_affine",
            params=(a.tolist(), b.tolist()),
            support=(lo, hi),
            f=np_max_affine(a, b),
            knots=[],
            pieces=(a, b),
        )
    # non-convex interpolation
    nk = int(rng.integers(2, 8))
    x = np.sort(rng.choice(np.linspace(-3, 3, 61), nk, replace=False))
    y = rng.normal(0, 1, nk)
    lo, hi = float(x[0]) - float(rng.uniform(0, 1)), float(x[-1]) + float(rng.uniform(0, 1))
    xi = rng.choice(x, n) if rng.random() < 0.3 else rng.uniform(lo, hi, n)
    eps = float(rng.choice([0.0, 1e-3, 0.05, 0.2, 1.0])) * (hi - lo)
    return dict(
        xi=xi,
        eps=eps,
        kind="interpolate",
        params=(x.tolist(), y.tolist()),
        support=(lo, hi),
        f=np_interp(x, y),
        knots=x,
        pieces=None,
    )


def check_instance(inst, rng, rel=1e-7):
    """Solves `inst` with dro_core in its order and in a random permutation and
    compares both with the independent LP: returns a list of problems (empty
    when all is well). The certificate must hold for both orders."""
    import dro_core

    loss = getattr(dro_core.Loss, inst["kind"])(*inst["params"])
    xi, eps = inst["xi"], inst["eps"]
    problems = []
    res = dro_core.solve(xi, eps, loss=loss, support=inst["support"])
    perm = rng.permutation(len(xi))
    resp = dro_core.solve(xi[perm], eps, loss=loss, support=inst["support"])
    for name, r in (("given order", res), ("permuted", resp)):
        c = r.certificate()
        if not c.ok:
            problems.append(f"{name}: certificate fails {c.failures}: {c!r}")
    lo, hi = res.support
    if inst["pieces"] is not None:
        ref = ek_lp(xi, eps, inst["pieces"][0], inst["pieces"][1], lo, hi)
    else:
        ref = transport_lp(xi, eps, inst["f"], inst["knots"], lo, hi)
    tol = rel * max(abs(ref), 1.0) + 1e-9
    if abs(res.value - ref) > tol:
        problems.append(f"value {res.value!r} vs LP {ref!r}")
    if abs(resp.value - ref) > tol:
        problems.append(f"permuted value {resp.value!r} vs LP {ref!r}")
    return problems
