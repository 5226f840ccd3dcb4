"""dro_core against independent LP formulations solved by HiGHS, on random and
adversarial instances, plus feasibility, certificate and determinism checks."""

from __future__ import annotations

import numpy as np
import pytest
from lp_reference import ek_lp, neg_log_pieces, np_interp, np_max_affine, softplus_pieces, transport_lp

import dro_core

REL = 1e-7


def close(a, b, rel=REL, floor=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1.0) + floor


# --- instance generation ---


def instances(seed=20251123):
    """Yields (name, xi, eps, groups, loss, support, f, knots, convex_pieces or None)."""
    rng = np.random.default_rng(seed)
    eps_choices = [0.0, 1e-4, 0.01, 0.05, 0.2, 1.0, 1e6]

    def groups_for(n):
        c = rng.integers(3)
        if c == 0:
            return None
        if c == 1:
            return int(rng.integers(1, n + 2))
        return rng.choice([0, 3, 7, 8], size=n)  # non-contiguous labels

    # 1. random convex max-affine losses (incl. dominated and duplicate pieces)
    for t in range(300):
        k = int(rng.integers(1, 11))
        a = rng.normal(0, 3, k)
        b = rng.normal(0, 1, k)
        if t % 5 == 0 and k > 1:  # a dominated piece and a duplicate
            a[0], b[0] = a[1], b[1] - 5.0
            a[-1], b[-1] = a[-2], b[-2]
        n = int(rng.integers(1, 31))
        lo, hi = sorted(rng.normal(0, 2, 2))
        if t % 7 == 0:
            hi = lo + 1e-3
        xi = rng.uniform(lo, hi, n)
        if t % 4 == 0:  # samples on the bounds and ties
            xi[rng.integers(n, size=max(1, n // 3))] = lo
            xi[rng.integers(n, size=max(1, n // 3))] = hi
        eps = float(rng.choice(eps_choices)) * (hi - lo)
        loss = dro_core.Loss.max_affine(a.tolist(), b.tolist())
        yield f"maxaff{t}", xi, eps, groups_for(n), loss, (lo, hi), np_max_affine(a, b), [], (a, b)

    # 2. the paper's default: neg_log(K) on preference probabilities
    for t in range(250):
        k = int(rng.integers(1, 11))
        n = int(rng.integers(1, 31))
        if t % 3 == 0:
            xi = 1 / (1 + np.exp(-0.1 * np.abs(rng.normal(0, 10, n))))  # self-annotated: [0.5, 1)
        else:
            xi = rng.uniform(0, 1, n)
        if t % 10 == 0:
            xi[:] = xi[0]  # all equal
        if t % 11 == 0:
            xi[0], xi[-1] = 0.0, 1.0
        eps = float(rng.choice(eps_choices))
        a, b = neg_log_pieces(k)
        loss = dro_core.Loss.neg_log(k) if (k != 6 or t % 2) else None
        yield f"neglog{t}", xi, eps, groups_for(n), loss, None, np_max_affine(a, b), [], (a, b)

    # 3. softplus tangents in margin space
    for t in range(200):
        k = int(rng.integers(1, 9))
        n = int(rng.integers(1, 31))
        m = float(rng.uniform(0.5, 10))
        xi = rng.uniform(-m, m, n)
        eps = float(rng.choice(eps_choices))
        a, b = softplus_pieces(k, -m, m)
        loss = dro_core.Loss.softplus(k, -m, m)
        yield f"softplus{t}", xi, eps, groups_for(n), loss, None, np_max_affine(a, b), [], (a, b)

    # 4. non-convex interpolated losses (sigmoid-like, hinge-like, random)
    for t in range(300):
        nk = int(rng.integers(2, 9))
        x = np.sort(rng.choice(np.linspace(-3, 3, 61), nk, replace=False))
        y = rng.normal(0, 1, nk) if t % 3 else -np.tanh(x)  # random, or a sigmoid-type loss
        n = int(rng.integers(1, 31))
        if t % 2:
            lo, hi = float(x[0]) - rng.uniform(0, 1), float(x[-1]) + rng.uniform(0, 1)
            support = (lo, hi)
        else:
            support = None  # default [-max|xi|, max|xi|]
            lo, hi = -3.0, 3.0
        xi = rng.uniform(lo, hi, n) if support else rng.uniform(-2.5, 2.5, n)
        if t % 6 == 0:
            xi = rng.choice(x, n)  # samples on knots
        if support is None:
            mx = np.max(np.abs(xi))
            lo, hi = -mx, mx
        eps = float(rng.choice(eps_choices))
        loss = dro_core.Loss.interpolate(x.tolist(), y.tolist())
        yield f"interp{t}", xi, eps, groups_for(n), loss, support, np_interp(x, y), x, None


def adversarial():
    """Hand-made corner cases: N = 1, all samples equal, every sample on a bound,
    a support of width zero, eps = 0 / tiny / huge, an uneven last group,
    non-contiguous labels, losses with dominated or duplicated pieces, flat
    losses, non-convex losses whose best point is a kink inside the support."""
    hinge = ([-1.0, 0.0], [0.0, 0.0])  # max(-z, 0)
    a6, b6 = neg_log_pieces(6)
    dom = ([-2.0, -2.0, 1.0, 1.0, 0.5], [0.0, -1.0, 0.0, 0.0, -9.0])  # dominated + duplicated
    bump = ([-2.0, -0.5, 0.0, 0.5, 2.0], [0.0, 0.0, 3.0, 0.0, 0.0])  # peak at 0, flat sides
    zig = ([-1.0, -0.5, 0.0, 0.5, 1.0], [1.0, -1.0, 1.0, -1.0, 1.0])
    cases = []
    for eps in [0.0, 1e-12, 0.01, 0.5, 1e6]:
        cases += [
            ("n1_mid", [0.4], None, ("aff", a6, b6), None),
            ("n1_lo", [0.0], None, ("aff", a6, b6), None),
            ("n1_hi", [1.0], None, ("aff", a6, b6), None),
            ("all_equal", [0.7] * 9, 4, ("aff", a6, b6), None),
            ("all_on_bounds", [0.0, 1.0, 1.0, 0.0, 1.0], None, ("aff", a6, b6), None),
            ("uneven_last", list(np.linspace(0.05, 0.95, 23)), 10, ("aff", a6, b6), None),
            (
                "labels_gap",
                list(np.linspace(0.05, 0.95, 12)),
                np.array([5, 0, 5, 2, 9, 0, 2, 5, 9, 9, 0, 5]),
                ("aff", a6, b6),
                None,
            ),
            ("hinge", [-1.0, 0.0, 0.5, 1.0], None, ("aff", *hinge), (-1.0, 1.0)),
            ("dominated", [-0.3, 0.2, 0.2, 0.9], 3, ("aff", *dom), (-1.0, 1.0)),
            ("flat", [0.1, 0.2], None, ("aff", [0.0], [1.5]), (0.0, 1.0)),
            ("zero_width", [0.25, 0.25], None, ("aff", a6, b6), (0.25, 0.25)),
            ("bump_kink_inside", [-1.5, 1.5, 0.0, 1.9], None, ("pl", *bump), (-2.0, 2.0)),
            ("bump_on_kinks", [-0.5, 0.5, 0.0], None, ("pl", *bump), (-2.0, 2.0)),
            ("zigzag", [-1.0, -0.5, 0.5, 1.0, 1.0, -0.25], 4, ("pl", *zig), (-1.0, 1.0)),
            ("zigzag_default_support", [0.75, -0.1], None, ("pl", *zig), None),
            ("knots_beyond_support", [0.1, 0.2], None, ("pl", *bump), (0.1, 0.3)),
        ]
        for name, xi, groups, (kind, u, v), support in cases[-16:]:
            xi = np.asarray(xi, float)
            if kind == "aff":
                loss = dro_core.Loss.max_affine(list(u), list(v))
                f, knots, pieces = np_max_affine(u, v), [], (np.asarray(u), np.asarray(v))
                if support is None:
                    loss = dro_core.Loss.neg_log(6)
            else:
                loss = dro_core.Loss.interpolate(list(u), list(v))
                f, knots, pieces = np_interp(u, v), np.asarray(u), None
            width = (support[1] - support[0]) if support else (1.0 if kind == "aff" else 2 * np.max(np.abs(xi)))
            yield f"adv_{name}_eps{eps}", xi, eps * max(width, 1e-3), groups, loss, support, f, knots, pieces


ALL = list(instances()) + list(adversarial())


def group_members(res, n):
    gi = np.asarray(res.group_index)
    return [np.flatnonzero(gi == g) for g in range(len(res.group_sizes))]


def test_instance_count():
    assert len(ALL) >= 1000


@pytest.mark.parametrize("block", range(10))
def test_matches_highs(block):
    for name, xi, eps, groups, loss, support, f, knots, pieces in ALL[block::10]:
        res = dro_core.solve(xi, eps, groups, loss=loss, support=support)
        lo, hi = res.support
        n = len(xi)
        idx = group_members(res, n)
        total = 0.0
        for g, members in enumerate(idx):
            xg = xi[members]
            ref = transport_lp(xg, eps, f, knots, lo, hi)
            assert close(res.group_values[g], ref), (name, g, res.group_values[g], ref)
            if pieces is not None:
                ref2 = ek_lp(xg, eps, pieces[0], pieces[1], lo, hi)
                assert close(res.group_values[g], ref2), (name, g, res.group_values[g], ref2)
            total += len(xg) * ref
        assert close(res.value, total / n), name


@pytest.mark.parametrize("block", range(4))
def test_certificate_and_feasibility(block):
    for name, xi, eps, groups, loss, support, f, knots, _pieces in ALL[block::4]:
        res = dro_core.solve(xi, eps, groups, loss=loss, support=support)
        lo, hi = res.support
        loc, mass = np.asarray(res.loc), np.asarray(res.mass)
        scale = max(abs(res.value), 1.0)
        assert res.dual_gap <= 1e-9 * scale, (name, res.dual_gap)
        assert np.all(mass >= 0) and np.allclose(mass.sum(axis=1), 1.0, rtol=0, atol=1e-12), name
        assert np.all(loc >= lo) and np.all(loc <= hi), name
        np.testing.assert_array_equal(np.asarray(res.shift), xi[:, None] - loc)
        # value recomputed from the atoms, per group
        per_sample = (mass * f(loc.ravel()).reshape(-1, 2)).sum(axis=1)
        transport = (mass * np.abs(loc - xi[:, None])).sum(axis=1)
        for g, members in enumerate(group_members(res, len(xi))):
            assert close(per_sample[members].mean(), res.group_values[g]), name
            assert transport[members].mean() <= eps * (1 + 1e-9) + 1e-12, name
            assert close(transport[members].mean(), res.budget_used[g], floor=1e-12), name
            split = np.sum((mass[members] > 0).sum(axis=1) == 2)
            assert split <= 1, (name, g, split)
            assert close(res.group_empirical_values[g], f(xi[members]).mean()), name
        # the dual objective at the reported λ*, evaluated here over {lo, hi, knots, samples},
        # equals the value of the feasible atoms: an optimality proof independent of the solver
        pts_all = np.unique(np.concatenate([[lo, hi], np.clip(knots, lo, hi), xi]))
        for g, members in enumerate(group_members(res, len(xi))):
            xg = xi[members]
            lam = float(res.lam[g])
            assert lam >= 0, name
            inner = np.max(f(pts_all)[None, :] - lam * np.abs(pts_all[None, :] - xg[:, None]), axis=1)
            assert close(lam * eps + inner.mean(), res.group_values[g], rel=1e-9), (name, g)
            assert close(res.group_dual_values[g], res.group_values[g], rel=1e-9), (name, g)
            if lam > 0:  # complementary slackness: the budget is spent
                assert close(res.budget_used[g], eps, rel=1e-9, floor=1e-15), (name, g, res.budget_used[g], eps)
        # weak duality at other multipliers: every λ ≥ 0 bounds the value from above
        cands = np.unique(np.concatenate([[lo, hi], np.clip(knots, lo, hi)]))
        for g, members in enumerate(group_members(res, len(xi))):
            xg = xi[members]
            for lam in [0.0, 0.5, 2.0, float(res.lam[g]) * 1.5 + 0.1]:
                pts = np.concatenate([cands[None, :].repeat(len(xg), 0), xg[:, None]], axis=1)
                dual = (
                    lam * eps
                    + np.max(f(pts.ravel()).reshape(pts.shape) - lam * np.abs(pts - xg[:, None]), axis=1).mean()
                )
                assert dual >= res.group_values[g] - 1e-9 * scale, (name, lam)


def test_eps_zero_is_empirical():
    for name, xi, _, groups, loss, support, f, _knots, _ in ALL[::3]:
        res = dro_core.solve(xi, 0.0, groups, loss=loss, support=support)
        assert close(res.value, f(xi).mean(), rel=1e-12), name
        assert res.value == res.empirical_value, name
        np.testing.assert_array_equal(np.asarray(res.loc)[:, 0], xi)
        np.testing.assert_array_equal(np.asarray(res.mass)[:, 0], np.ones(len(xi)))
        assert np.all(np.asarray(res.budget_used) == 0.0)


def test_huge_eps_moves_everything_to_its_best_point():
    for name, xi, _, groups, loss, support, f, knots, _ in ALL[::5]:
        res = dro_core.solve(xi, 1e9, groups, loss=loss, support=support)
        lo, hi = res.support
        cands = np.unique(np.concatenate([[lo, hi], np.clip(knots, lo, hi)]))
        best = np.maximum(f(cands).max(), f(xi))
        assert np.allclose(
            (np.asarray(res.mass) * f(np.asarray(res.loc).ravel()).reshape(-1, 2)).sum(1), best, rtol=1e-12, atol=1e-12
        ), name
        assert np.all(np.asarray(res.lam) == 0.0), name
        assert np.all(np.asarray(res.budget_used) < 1e9), name  # the unused budget shows


def test_paper_default_layout_and_values():
    rng = np.random.default_rng(0)
    xi = 1 / (1 + np.exp(-0.1 * np.abs(rng.normal(0, 10, 250))))
    res = dro_core.solve(xi, 0.01, 100)
    np.testing.assert_array_equal(res.group_sizes, [100, 100, 50])
    a, b = neg_log_pieces(6)
    for g, sl in enumerate([slice(0, 100), slice(100, 200), slice(200, 250)]):
        assert close(res.group_values[g], ek_lp(xi[sl], 0.01, a, b, 0.0, 1.0))
    # the worst case raises the loss and spends the whole budget
    assert res.value > res.empirical_value
    np.testing.assert_allclose(res.budget_used, 0.01, rtol=1e-12)


@pytest.mark.parametrize("groups", [None, 100, "labels"])
def test_thread_count_does_not_change_a_bit(groups):
    rng = np.random.default_rng(1)
    n = 100_003
    xi = 1 / (1 + np.exp(-0.1 * np.abs(rng.normal(0, 10, n))))
    xi[::97] = xi[0]  # ties across chunks
    g = rng.integers(0, 5, n) if groups == "labels" else groups
    r1 = dro_core.solve(xi, 0.01, g, threads=1)
    r2 = dro_core.solve(xi, 0.01, g, threads=2)
    assert_identical(r1, r2)
    if groups == "labels":
        np.testing.assert_array_equal(r1.group_labels, [0, 1, 2, 3, 4])
    assert r1.dual_gap <= 1e-9 * abs(r1.value)


ARRAYS = [
    "group_values",
    "group_empirical_values",
    "group_dual_values",
    "lam",
    "budget_used",
    "group_sizes",
    "group_labels",
    "group_index",
    "loc",
    "mass",
    "shift",
    "weights",
]
FLOATS = ["value", "empirical_value", "dual_value", "dual_gap", "support", "eps"]


def assert_identical(r1, r2, name=""):
    for attr in ARRAYS:
        a, b = getattr(r1, attr), getattr(r2, attr)
        assert a.dtype == b.dtype and np.array_equal(a, b), (name, attr)
    for attr in FLOATS:
        assert getattr(r1, attr) == getattr(r2, attr), (name, attr)


def test_thread_count_does_not_change_a_bit_on_every_instance():
    for name, xi, eps, groups, loss, support, _f, _knots, _pieces in ALL:
        r1 = dro_core.solve(xi, eps, groups, loss=loss, support=support, threads=1)
        r2 = dro_core.solve(xi, eps, groups, loss=loss, support=support, threads=2)
        assert_identical(r1, r2, name)


def test_large_non_convex_loss_identical_across_threads():
    rng = np.random.default_rng(5)
    n = 100_000
    xi = np.round(rng.uniform(-2, 2, n), 2)  # many ties
    loss = dro_core.Loss.interpolate([-2.0, -1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 0.2, 0.8, 0.0])
    for groups in [None, 100, rng.integers(0, 50, n) * 7]:
        r1 = dro_core.solve(xi, 0.05, groups, loss=loss, threads=1)
        r2 = dro_core.solve(xi, 0.05, groups, loss=loss, threads=2)
        assert_identical(r1, r2)
        assert r1.dual_gap <= 1e-9 * max(abs(r1.value), 1.0)


def test_ties_are_shared_in_sample_order():
    # all samples equal: every hull edge ties; the budget goes to the first samples
    xi = np.full(10, 0.8)
    res = dro_core.solve(xi, 0.8 * 0.25, None)  # enough to move 2.5 samples to 0
    mass = np.asarray(res.mass)
    loc = np.asarray(res.loc)
    np.testing.assert_array_equal(loc[:2, 0], 0.0)
    assert mass[2, 1] == pytest.approx(0.5) and loc[2, 1] == 0.0
    np.testing.assert_array_equal(loc[3:, 0], 0.8)


def test_input_conversion_is_exact():
    rng = np.random.default_rng(2)
    x32 = rng.uniform(0, 1, 500).astype(np.float32)
    a = dro_core.solve(x32, 0.02, 50)
    b = dro_core.solve(x32.astype(np.float64), 0.02, 50)
    c = dro_core.solve(x32.astype(np.float64).tolist(), 0.02, 50)
    ints = (x32 * 0).astype(np.int32)  # ints are converted too
    d = dro_core.solve(ints, 0.02, 50)
    e = dro_core.solve(np.zeros(500), 0.02, 50)
    for r in (b, c):
        assert_identical(a, r)
    assert_identical(d, e)


def test_weights_match_the_gradient_of_the_atoms():
    # w_i · ℓ'(ξ_i) = Σ_j m_ij ℓ'(loc_ij) with ℓ' the right derivative
    rng = np.random.default_rng(3)
    xi = rng.uniform(0.3, 1.0, 300)
    loss = dro_core.Loss.neg_log(6)
    res = dro_core.solve(xi, 0.05, 100, loss=loss)
    d = loss.slope(xi)
    loc = np.asarray(res.loc)
    dl = loss.slope(np.ascontiguousarray(loc.ravel())).reshape(-1, 2)
    np.testing.assert_allclose(res.weights * d, (np.asarray(res.mass) * dl).sum(1), rtol=1e-12)
    moved = np.asarray(res.mass)[:, 0] < 1
    assert np.all(res.weights[~moved & (loc[:, 0] == xi)] == 1.0)
    assert np.all(res.weights[loc[:, 1] == 0.0] > 1.0)  # pushed to ξ = 0: steeper loss


def test_loss_call_matches_numpy():
    z = np.linspace(-1, 2, 301)
    a, b = neg_log_pieces(6)
    np.testing.assert_allclose(dro_core.Loss.neg_log(6)(z), np_max_affine(a, b)(z), rtol=1e-15, atol=1e-15)
    x, y = [-1.0, 0.0, 0.5, 1.5], [1.0, -1.0, 2.0, 0.0]
    np.testing.assert_allclose(dro_core.Loss.interpolate(x, y)(z), np_interp(x, y)(z), rtol=1e-13, atol=1e-13)


def test_large_tied_groups_match_highs():
    """Groups far above CHUNK samples with few distinct values: the edges at λ*
    tie across chunks and share the budget chunk by chunk. Checked against the
    transport LP with equal samples merged (exact, and small)."""
    rng = np.random.default_rng(7)
    for trial in range(24):
        n = int(rng.integers(3 * dro_core.CHUNK, 8 * dro_core.CHUNK))
        vals = np.unique(np.round(rng.uniform(0, 1, int(rng.integers(1, 40))), 3))
        xi = rng.choice(vals, n)
        if trial % 2:
            x = np.linspace(0, 1, 6)
            y = rng.normal(size=6)
            loss, f, knots = dro_core.Loss.interpolate(x.tolist(), y.tolist()), np_interp(x, y), x
        else:
            a, b = neg_log_pieces(int(rng.integers(1, 10)))
            loss, f, knots = dro_core.Loss.max_affine(a.tolist(), b.tolist()), np_max_affine(a, b), []
        eps = float(rng.choice([1e-5, 1e-3, 0.01, 0.1, 0.3]))
        labels = (rng.random(n) < 0.5).astype(np.int64) * 4 + 1  # two label groups, each > CHUNK
        for groups in [None, labels]:
            res = dro_core.solve(xi, eps, groups, loss=loss, support=(0.0, 1.0))
            assert res.dual_gap <= 1e-9 * max(abs(res.value), 1.0)
            mass, loc = np.asarray(res.mass), np.asarray(res.loc)
            transport = (mass * np.abs(loc - xi[:, None])).sum(1)
            for g, members in enumerate(group_members(res, n)):
                v, cnt = np.unique(xi[members], return_counts=True)
                ref = transport_lp(v, eps, f, knots, 0.0, 1.0, counts=cnt)
                assert close(res.group_values[g], ref), (trial, g, res.group_values[g], ref)
                assert np.sum((mass[members] > 0).sum(1) == 2) <= 1
                assert transport[members].mean() <= eps * (1 + 1e-9) + 1e-12
                value = (mass[members] * f(loc[members].ravel()).reshape(-1, 2)).sum(1).mean()
                assert close(value, res.group_values[g]), (trial, g)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_more_instances_match_highs(seed):
    """Another 2 × 1050 random instances against both LPs (about 40 s)."""
    for name, xi, eps, groups, loss, support, f, knots, pieces in instances(seed):
        res = dro_core.solve(xi, eps, groups, loss=loss, support=support)
        lo, hi = res.support
        assert res.dual_gap <= 1e-9 * max(abs(res.value), 1.0), name
        for g, members in enumerate(group_members(res, len(xi))):
            ref = transport_lp(xi[members], eps, f, knots, lo, hi)
            assert close(res.group_values[g], ref), (seed, name, g, res.group_values[g], ref)
            if pieces is not None:
                ref2 = ek_lp(xi[members], eps, pieces[0], pieces[1], lo, hi)
                assert close(res.group_values[g], ref2), (seed, name, g, res.group_values[g], ref2)


ISSUE_8 = "74554476382172X7242X09572482915672749779X1649385X79473169844548276X982X87818187571392073345981196932"


def test_issue_8_instance_in_every_order_matches_highs():
    """The reported instance (one decimal, two samples at the support's bound
    0): 200 permutations, each proven by its certificate and equal to the
    Esfahani-Kuhn LP. The old selection failed 16 of 200 (every sample sent to 0)."""
    xi = np.array([1.0 if c == "X" else int(c) / 10 for c in ISSUE_8])
    a, b = neg_log_pieces(6)
    ref = ek_lp(xi, 0.1, a, b, 0.0, 1.0)
    rng = np.random.default_rng(8)
    for t in range(200):
        x = xi if t == 0 else xi[rng.permutation(len(xi))]
        r = dro_core.solve(x, 0.1)
        c = r.certificate()
        assert c.ok, (t, c.failures, c)
        assert r.budget_used[0] <= 0.1 + 1e-12 and r.lam[0] > 0
        assert close(r.value, ref), (t, r.value, ref)
    # only in the group that holds these values, in a 1,000-sample G = 100 layout
    big = np.concatenate([rng.integers(0, 11, 400) / 10, xi, rng.integers(0, 11, 500) / 10])
    r = dro_core.solve(big, 0.1, 100)
    assert r.certificate().ok
    assert close(r.group_values[4], ref)


def test_certificate_on_every_instance():
    for name, xi, eps, groups, loss, support, *_ in ALL:
        c = dro_core.solve(xi, eps, groups, loss=loss, support=support).certificate()
        assert c.ok, (name, c.failures, c)


def test_certificate_reports_each_measure():
    r = dro_core.solve(np.array([0.2, 0.5, 0.9, 0.0]), 0.05)
    c = r.certificate(rel=0.0)  # no tolerance: the raw measures
    assert c.budget_excess <= 1e-15 and c.negative_lam == 0.0 and c.negative_mass == 0.0
    assert c.support_violation == 0.0 and c.gap <= 1e-15 and c.tol_value == 0.0
    assert r.certificate().ok and r.certificate().failures == []
    with pytest.raises(ValueError, match=r"^rel: must be >= 0"):
        r.certificate(rel=-1.0)


@pytest.mark.parametrize("block", range(4))
def test_randomized_against_highs(block):
    """3,000 random instances of every family (decimal grids with bounds and
    ties, exact budgets, continuous, convex, non-convex), each in its order
    and permuted, against the independent LP; benches/compare_highs.py runs
    the same comparison at 10^5 instances before a release."""
    from lp_reference import check_instance, random_instance

    rng = np.random.default_rng(1000 + block)
    bad = []
    for t in range(750):
        inst = random_instance(rng)
        for p in check_instance(inst, rng):
            bad.append((block, t, p))
    assert not bad, bad[:5]


def test_budgets_spent_exactly_on_a_decimal_grid_in_many_orders():
    """The issue-8 shape in bulk: samples on a grid of step 1/10 or 1/20 (zeros on
    the bound among them), ε such that the whole moves toward 0 of every sample up
    to a grid value spend the budget exactly, 4 orders each; every answer must
    carry a valid certificate, and the orders agree on the value. The old
    selection fails about 0.5 % of these solves (measured: 64 and 100 of 12,000)."""
    rng = np.random.default_rng(88)
    a, b = neg_log_pieces(6)
    for t in range(2000):
        steps = 10 if t % 2 else 20
        n = int(rng.integers(10, 121))
        grid = rng.integers(0, steps + 1, n)
        xi = grid / steps
        v = int(rng.integers(1, steps))
        eps = int(grid[grid <= v].sum()) / steps / n
        values = []
        for _ in range(4):
            r = dro_core.solve(xi[rng.permutation(n)], eps)
            c = r.certificate()
            assert c.ok, (t, list(xi), eps, c.failures, c)
            values.append(r.value)
        assert max(values) - min(values) <= 1e-12 * max(1.0, abs(values[0])), (t, values)
        if t % 100 == 0:  # and the value is the LP's
            assert close(values[0], ek_lp(xi, eps, a, b, 0.0, 1.0)), t
