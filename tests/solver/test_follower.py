"""The follower step: columns, diagnostics, ε = 0, spaces, groups, saving, the re-solve hook."""

import os
from types import SimpleNamespace

import numpy as np
import pytest

from ssapo.atoms import COLUMNS, Atoms
from ssapo.follower import Resolver, follow, load, save, xi_of

M = np.array([0.0, 1.0, 5.0, 30.0, 2.0, 0.5, 12.0])


def test_eps_zero_is_the_data():
    cols, diag = follow(M, eps=0.0, group_size=2)
    assert np.all(cols.shift == 0) and np.all(cols.mass == [1.0, 0.0]) and np.all(cols.weight == 1.0)
    assert diag["moved_fraction"] == 0 and diag["value"] == diag["empirical_value"] and diag["groups"] == 4
    np.testing.assert_array_equal(cols.loc[:, 0], cols.xi)


def test_columns_and_diagnostics():
    cols, diag = follow(M, eps=0.05, group_size=3, beta_follower=0.2)
    n = len(M)
    np.testing.assert_allclose(cols.xi, 1 / (1 + np.exp(-0.2 * M)), rtol=1e-15)
    for key, shape in (("loc", (n, 2)), ("mass", (n, 2)), ("shift", (n, 2)), ("weight", (n,)), ("group", (n,))):
        assert getattr(cols, key).shape == shape, key
    np.testing.assert_allclose(cols.mass.sum(1), 1.0)
    np.testing.assert_allclose(cols.shift, cols.xi[:, None] - cols.loc)
    assert cols.group.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert diag["groups"] == len(diag["lam"]) == len(diag["budget_used"]) == 3 and diag["group_sizes"] == [3, 3, 1]
    assert abs(diag["dual_gap"]) < 1e-12 and abs(diag["value"] - diag["dual_value"]) < 1e-12
    assert diag["value"] > diag["empirical_value"] and 0 < diag["moved_fraction"] <= 1
    assert all(b <= 0.05 + 1e-12 for b in diag["budget_used"])
    assert np.all(cols.loc >= 0) and np.all(cols.loc <= 1)  # probability units
    # the worst case moves the least confident pairs toward ξ = 0 first
    assert cols.shift[0].max() > 0


def test_groups_are_consecutive_and_global_is_one_ball():
    cols, diag = follow(M, eps=0.05, group_size=0)
    assert diag["groups"] == 1 and diag["group_size"] == "global" and np.all(cols.group == 0)
    # a group's result depends on its own samples only
    a, _ = follow(M[:3], eps=0.05, group_size=3)
    b, _ = follow(M, eps=0.05, group_size=3)
    np.testing.assert_array_equal(a.shift, b.shift[:3])


def test_margin_space_shifts_in_margin_units():
    cols, diag = follow(M, eps=0.1, space="margin", beta_follower=0.1)
    np.testing.assert_array_equal(cols.xi, 0.1 * M)
    r = np.abs(0.1 * M).max()
    assert diag["space"] == "margin" and diag["dead_at_start_fraction"] == 0.0
    assert np.all(cols.loc >= -r - 1e-12) and np.all(cols.loc <= r + 1e-12)
    assert cols.shift.max() > 0


def test_settings_from_a_config_and_keywords_win():
    cfg = SimpleNamespace(eps=0.0, k=4, group_size=100, beta_follower=0.1, follower_space="prob")
    cols, diag = follow(M, cfg)
    assert diag["k"] == 4 and diag["eps"] == 0.0 and np.all(cols.shift == 0)
    _, diag = follow(M, cfg, eps=0.05)
    assert diag["eps"] == 0.05 and diag["moved_fraction"] > 0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="^margins: not finite at index 1"):
        follow([1.0, np.nan])
    with pytest.raises(ValueError, match="^follower_space: "):
        follow(M, space="logit")
    with pytest.raises(ValueError, match="^group_size: "):
        follow(M, group_size=-1)
    cols, diag = follow([])
    assert cols.shift.shape == (0, 2) and diag["n"] == 0


def test_save_load_and_attach(tmp_path):
    cols, diag = follow(M, eps=0.05, group_size=3)
    path = save(tmp_path / "follower.npz", cols, diag, margins=M)
    assert os.listdir(tmp_path) == ["follower.npz"]  # no temp file left
    z = load(path)
    for key in ("xi", "loc", "mass", "shift", "weight", "group"):  # the atoms' names, once
        np.testing.assert_array_equal(z[key], getattr(cols, key))
    np.testing.assert_array_equal(z["lam"], diag["lam"])
    assert float(z["value"]) == diag["value"] and float(z["eps"]) == 0.05
    rows = Atoms.of(z).attach([{"margin": float(m)} for m in M])
    assert [r["shift"] for r in rows] == cols.shift.tolist() and rows[0]["margin"] == 0.0
    assert len({tuple(r["shift"]) for r in rows}) > 1  # each pair its own atoms
    with pytest.raises(ValueError, match="^rows: "):
        Atoms.of(z).attach(rows[:2])


def test_resolver_replaces_the_atoms_in_place_and_keeps_its_state():
    atoms = Atoms.identity(7)
    cfg = SimpleNamespace(eps=0.05, k=6, group_size=0, beta_follower=0.1, follower_space="prob")
    seen = []
    r = Resolver(cfg, 2, lambda model: seen.append(model) or M, atoms)
    d = r.resolve(step=2, model="the policy")
    want, _ = follow(M, cfg)
    np.testing.assert_array_equal(atoms.shift, want.shift)  # the very object the collator holds
    assert d["step"] == 2 and len(r.history) == 1 and seen == ["the policy"]
    assert xi_of([0.0])[0] == 0.5
    # a checkpoint's copy: a fresh resolver takes the atoms and the history back
    again = Resolver(cfg, 2, lambda model: M, Atoms.identity(7))
    again.load_state_dict(r.state_dict())
    np.testing.assert_array_equal(again.atoms.mass, want.mass)
    assert again.history == r.history


def test_atoms_are_one_type():
    a = Atoms.identity(3)
    assert COLUMNS == ("shift", "mass", "weight") and len(a) == 3
    rows = a.attach([{"prompt": "p"}] * 3)
    assert rows[0] == {"prompt": "p", "shift": [0.0, 0.0], "mass": [1.0, 0.0], "weight": 1.0}
    np.testing.assert_array_equal(Atoms.of_rows(rows).mass, a.mass)
    with pytest.raises(ValueError, match="^atoms: "):
        Atoms(np.zeros((3, 2)), np.zeros((3, 3)), np.ones(3))
    with pytest.raises(ValueError, match="^atoms: "):
        a.update(Atoms.identity(2))


@pytest.mark.parametrize("space", ["prob", "margin"])
def test_moved_mass_is_one_definition(space):
    """ssapo.atoms.moved_mass, read by the follower's diagnostics, the bench's movement columns and
    ssapo.bench.detect, is the leader losses' torch sum (before their clamp) and flags a pair as moved
    exactly when its first atom lost mass or left ξ."""
    import torch

    from ssapo import losses
    from ssapo.atoms import moved_mass

    rng = np.random.default_rng(3)
    margins = rng.normal(0.5, 2.0, 300)
    cols, diag = follow(margins, eps=0.1, group_size=50, space=space)
    m = cols.moved_mass()
    np.testing.assert_array_equal(m, moved_mass(cols.shift, cols.mass))
    np.testing.assert_array_equal(m, np.where(cols.loc != cols.xi[:, None], cols.mass, 0.0).sum(1))
    torch_m = losses._moved(torch.from_numpy(cols.shift), torch.from_numpy(cols.mass)).numpy()
    np.testing.assert_allclose(m, torch_m, rtol=0, atol=1e-15)
    flag = (cols.mass[:, 0] < 1) | (cols.loc[:, 0] != cols.xi)
    assert 0 < flag.sum() < len(flag)  # some moved, some not: the comparison can fail
    np.testing.assert_array_equal(m > 0, flag)
    assert diag["moved_fraction"] == pytest.approx(float(np.mean(m > 0)))
    assert diag["moved_mass"] == pytest.approx(float(np.mean(m)))
