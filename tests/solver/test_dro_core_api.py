"""Bad input raises ValueError naming the argument (and the first bad index)
before any work; defaults are as documented."""

import numpy as np
import pytest

import dro_core
from dro_core import Loss

X = np.array([0.6, 0.7, 0.9])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(xi=[0.5, np.nan, 0.7]), r"^xi: .*xi\[1\] = NaN"),
        (dict(xi=[0.5, 0.6, np.inf]), r"^xi: .*xi\[2\] = inf"),
        (dict(xi=[0.5, 0.6, 0.7, -np.inf]), r"^xi: .*xi\[3\] = -inf"),
        (dict(xi=np.array([0.5, np.nan], dtype=np.float32)), r"^xi: .*xi\[1\] = NaN"),
        (dict(xi=[]), r"^xi: is empty"),
        (dict(xi=np.array([])), r"^xi: is empty"),
        (dict(xi=0.5), r"^xi: must be 1-D"),
        (dict(xi=np.ones((2, 2)) * 0.5), r"^xi: must be 1-D"),
        (dict(xi=[0.5, 1.5]), r"^xi: xi\[1\] = 1.5 lies outside the support \[0, 1\]"),
        (dict(xi=[0.5, 0.2, -0.1]), r"^xi: xi\[2\] = -0.1 lies outside the support \[0, 1\]"),
        (dict(xi=["a", "b"]), r"^xi: must hold real numbers"),
        (dict(xi=[True, False]), r"^xi: must hold real numbers"),
        (dict(eps=-0.1), r"^eps: must be finite and >= 0"),
        (dict(eps=float("nan")), r"^eps: must be finite and >= 0"),
        (dict(eps=float("inf")), r"^eps: must be finite and >= 0"),
        (dict(eps="0.1"), r"^eps: must be a real number"),
        (dict(eps=None), r"^eps: must be a real number"),
        (dict(eps=True), r"^eps: must be a real number"),
        (dict(eps=np.float64(-1e-300)), r"^eps: must be finite and >= 0"),
        (dict(groups=0), r"^groups: must be >= 1"),
        (dict(groups=-3), r"^groups: must be >= 1"),
        (dict(groups=[0, -1, 0]), r"^groups: labels must be >= 0, but groups\[1\] = -1"),
        (dict(groups=[0, 1]), r"^groups: needs one label per sample: 2 labels for 3 samples"),
        (dict(groups=[0.0, 1.0, 1.0]), r"^groups: labels must be integers"),
        (dict(groups=np.array([0, 1, 1], dtype=np.float32)), r"^groups: labels must be integers"),
        (dict(groups=[0, 1, 2, 3]), r"^groups: needs one label per sample: 4 labels for 3 samples"),
        (dict(groups=np.array([3, 2, -7])), r"^groups: labels must be >= 0, but groups\[2\] = -7"),
        (dict(groups=[[0, 1, 1]]), r"^groups: labels must be 1-D"),
        (dict(support=(0.0, float("inf"))), r"^support: must be finite"),
        (dict(support=(1.0, 0.0)), r"^support: lo must be <= hi"),
        (dict(support=(float("-inf"), 1.0)), r"^support: must be finite"),
        (dict(support=(float("nan"), 1.0)), r"^support: must be finite"),
        (dict(support="ab"), r"^support: must be a pair"),
        (dict(support=(0.0,)), r"^support: must be a pair"),
        (dict(support=(0.65, 1.0)), r"^xi: xi\[0\] = 0.6 lies outside the support"),
        (dict(threads=0), r"^threads: must be >= 1"),
        (dict(threads=-2), r"^threads: must be >= 1"),
        (dict(threads=1.5), r"^threads: must be an int"),
        (dict(loss="neg_log"), r"^loss: must be a dro_core.Loss"),
        # issue 8: a bool or a float is neither a group size nor labels
        (dict(groups=True), r"^groups: must be None \(one ball\), an int G .* got bool True"),
        (dict(groups=np.bool_(False)), r"^groups: must be None \(one ball\), an int G .* got bool"),
        (dict(groups=2.5), r"^groups: must be None \(one ball\), an int G .* got float 2.5"),
        # issue 8: sums that overflow float64 are refused, not returned as inf
        (dict(xi=[1e308, -1e308], loss=Loss.max_affine([1.0, -1.0], [0.0, 0.0])), r"^xi: values this large overflow"),
        (dict(xi=[1e307, 2e307], loss=Loss.max_affine([1.0, -1.0], [0.0, 0.0])), r"^xi: values this large overflow"),
        (
            dict(xi=[0.0, 1.0], loss=Loss.max_affine([1.0], [0.0]), support=(-1e308, 1e308)),
            r"^support: values this large overflow",
        ),
    ],
)
def test_bad_solve_input(kwargs, match):
    args = dict(xi=X, eps=0.01)
    args.update(kwargs)
    xi, eps = args.pop("xi"), args.pop("eps")
    with pytest.raises(ValueError, match=match):
        dro_core.solve(xi, eps, **args)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Loss.neg_log(0), r"^k: must be >= 1"),
        (lambda: Loss.neg_log(-2), r"^k: must be >= 1"),
        (lambda: Loss.softplus(0, -1, 1), r"^k: must be >= 1"),
        (lambda: Loss.softplus(3, 1.0, 1.0), r"^hi: must be greater than lo"),
        (lambda: Loss.softplus(3, float("-inf"), 1.0), r"^lo: must be finite"),
        (lambda: Loss.max_affine([], []), r"^slopes: must hold at least one piece"),
        (lambda: Loss.max_affine([1.0, 2.0], [0.0]), r"^intercepts: must have the length of slopes \(2\), got 1"),
        (lambda: Loss.max_affine([1.0, float("nan")], [0.0, 0.0]), r"^slopes: must be finite, but element 1 is NaN"),
        (
            lambda: Loss.interpolate([0.0, 1.0, 1.0], [0.0, 1.0, 2.0]),
            r"^x: knots must be strictly increasing, but x\[2\]",
        ),
        (
            lambda: Loss.interpolate([0.0, 2.0, 1.0], [0.0, 1.0, 2.0]),
            r"^x: knots must be strictly increasing, but x\[2\]",
        ),
        (lambda: Loss.interpolate([0.0], [0.0]), r"^x: needs at least 2 knots"),
        (lambda: Loss.interpolate([], []), r"^x: needs at least 2 knots, got 0"),
        (lambda: Loss.interpolate([0.0, float("nan")], [0.0, 1.0]), r"^x: must be finite, but element 1"),
        (lambda: Loss.softplus(3, 2.0, 1.0), r"^hi: must be greater than lo"),
        (lambda: Loss.softplus(3, 0.0, float("inf")), r"^hi: must be finite"),
        (lambda: Loss.max_affine([], [1.0]), r"^slopes: must hold at least one piece"),
        (
            lambda: Loss.max_affine([1.0, 2.0, 3.0], [0.0, 0.0]),
            r"^intercepts: must have the length of slopes \(3\), got 2",
        ),
        (lambda: Loss.max_affine([1.0], [float("-inf")]), r"^intercepts: must be finite, but element 0"),
        (lambda: Loss.interpolate([0.0, 1.0], [0.0]), r"^y: must have the length of x"),
        (lambda: Loss.interpolate([0.0, 1.0], [0.0, float("inf")]), r"^y: must be finite, but element 1"),
        # issue 8: wrong types are ValueErrors naming the argument too (were TypeErrors)
        (lambda: Loss.neg_log(2.5), r"^k: must be an int, got float 2.5"),
        (lambda: Loss.neg_log("6"), r"^k: must be an int, got str"),
        (lambda: Loss.neg_log(True), r"^k: must be an int, got bool"),
        (lambda: Loss.softplus(3.0, -1, 1), r"^k: must be an int, got float"),
        (lambda: Loss.softplus(3, "a", 1), r"^lo: must be a real number, got str"),
        (lambda: Loss.softplus(3, -1, None), r"^hi: must be a real number, got NoneType"),
        (lambda: Loss.max_affine(1.0, [0.0]), r"^slopes: must be a sequence of real numbers, got float"),
        (lambda: Loss.max_affine([1.0, "x"], [0.0, 0.0]), r"^slopes\[1\]: must be a real number, got str"),
        (lambda: Loss.interpolate("ab", [0.0, 1.0]), r"^x: must be a sequence of real numbers, got str"),
        (lambda: Loss.interpolate([0.0, 1.0], [0.0, None]), r"^y\[1\]: must be a real number, got NoneType"),
    ],
)
def test_bad_loss_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_default_supports():
    assert Loss.neg_log(6).natural_support == (0.0, 1.0)
    assert Loss.softplus(4, -3.0, 2.0).natural_support == (-3.0, 2.0)
    assert Loss.max_affine([1.0], [0.0]).natural_support is None
    r = dro_core.solve([-0.5, 2.0, 1.0], 0.1, loss=Loss.max_affine([-1.0, 1.0], [0.0, 0.0]))
    assert r.support == (-2.0, 2.0)  # [-max|xi|, max|xi|]
    assert dro_core.solve(X, 0.1).support == (0.0, 1.0)
    r = dro_core.solve([0.0, 0.0], 0.1, loss=Loss.interpolate([-1.0, 1.0], [1.0, 0.0]))
    assert r.support == (0.0, 0.0) and r.value == r.empirical_value  # nowhere to go


def test_group_layouts():
    xi = np.linspace(0.5, 0.99, 250)
    r = dro_core.solve(xi, 0.01, 100)
    np.testing.assert_array_equal(r.group_sizes, [100, 100, 50])
    np.testing.assert_array_equal(r.group_labels, [0, 1, 2])
    np.testing.assert_array_equal(r.group_index[[0, 99, 100, 249]], [0, 0, 1, 2])
    labels = np.where(np.arange(250) % 2 == 0, 9, 4)
    r = dro_core.solve(xi, 0.01, labels)
    np.testing.assert_array_equal(r.group_labels, [4, 9])
    np.testing.assert_array_equal(r.group_sizes, [125, 125])
    np.testing.assert_array_equal(r.group_index, (labels == 9).astype(int))
    # a label group equals the same samples solved alone
    alone = dro_core.solve(xi[labels == 9], 0.01)
    np.testing.assert_array_equal(r.loc[labels == 9], alone.loc)
    assert r.group_values[1] == alone.value
    one = dro_core.solve(xi, 0.01)
    assert len(one.lam) == 1 and one.group_sizes[0] == 250
    big = dro_core.solve(xi, 0.01, np.int64(1000))
    assert big.value == one.value


def test_solution_arrays_and_repr():
    r = dro_core.solve(X, 0.05)
    assert r.loc.shape == (3, 2) and r.mass.shape == (3, 2) and r.shift.shape == (3, 2)
    assert r.weights.shape == (3,) and r.loc.dtype == np.float64
    assert "Solution(value=" in repr(r)
    assert repr(Loss.neg_log(6)) == "Loss.neg_log(k=6)"
    assert r.eps == 0.05


def test_accepted_argument_forms():
    ref = dro_core.solve(X, 0.01)
    for xi in (X.tolist(), tuple(X), np.asfortranarray(X), np.concatenate([X, X])[::2][[0, 1, 2]]):
        assert dro_core.solve(xi, 0.01).value == ref.value
    x2 = np.repeat(X, 2)[::2]  # a strided view is copied, not misread
    assert dro_core.solve(x2, 0.01).value == ref.value
    assert dro_core.solve(X, np.float64(0.01)).value == ref.value
    x32 = X.astype(np.float32)
    assert dro_core.solve(x32, 0.01).value == dro_core.solve(x32.astype(np.float64), 0.01).value
    assert dro_core.solve(X, 0).value == dro_core.solve(X, 0.0).value  # an int radius
    assert dro_core.solve(X, 0.01, support=[0, 1]).value == ref.value  # a list support
    assert dro_core.solve(X, 0.01, np.int8(2)).group_sizes.tolist() == [2, 1]  # a numpy int size
    assert dro_core.solve(X, 0.01, threads=np.int64(1)).value == ref.value
    big = dro_core.solve(X, 0.01, [0, 1, np.iinfo(np.int64).max])
    assert big.group_labels.tolist() == [0, 1, np.iinfo(np.int64).max]
    r = dro_core.solve([0.25, 0.25], 0.1, support=(0.25, 0.25))  # a support of width 0
    assert r.value == r.empirical_value and np.all(r.loc == 0.25)


def test_errors_come_before_any_work():
    # a bad argument late in the list is still reported, whatever comes first
    with pytest.raises(ValueError, match=r"^threads: "):
        dro_core.solve(np.full(1_000_000, 0.5), 0.01, 100, threads=0)
    with pytest.raises(ValueError, match=r"^xi: .*xi\[999999\]"):
        x = np.full(1_000_000, 0.5)
        x[-1] = np.nan
        dro_core.solve(x, 0.01)


def test_accepted_loss_argument_forms():
    assert repr(Loss.neg_log()) == repr(Loss.neg_log(6)) == "Loss.neg_log(k=6)"
    assert repr(Loss.neg_log(np.int64(4))) == "Loss.neg_log(k=4)"
    a = Loss.max_affine(np.array([-1.0, 1.0]), (0, 0))
    b = Loss.max_affine([-1.0, 1.0], [0.0, 0.0])
    z = np.array([-2.0, 0.5, 3.0])
    assert np.array_equal(a(z), b(z))
    assert Loss.softplus(np.int32(3), np.float32(-1.0), 2).natural_support == (-1.0, 2.0)


def test_large_but_safe_inputs_solve_finitely():
    # well below the overflow limit: finite values and a proof
    xi = np.array([1e150, -3e150, 2e150])
    r = dro_core.solve(xi, 1e149, loss=Loss.max_affine([1.0, -1.0], [0.0, 0.0]))
    assert np.isfinite(r.value) and r.certificate().ok
