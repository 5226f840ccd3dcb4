"""The leader losses that act on the follower's detection (ssapo.losses: drop_moved, flip_moved, trimmed;
our ablations, docs/METHOD.md §3.4): each one's values on literal tensors, the threshold and trimming
rules, ε = 0 atoms giving DPO to the bit, finite gradients, their parameters' bounds, and a short run of
SSAPOTrainer with each."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ssapo import losses  # noqa: E402
from ssapo.config import load_config  # noqa: E402
from ssapo.errors import ConfigError  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402

torch.set_num_threads(1)

NEW = ("drop_moved", "flip_moved", "trimmed")


def sp(x: float) -> float:  # softplus, in float64 Python
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


BETA = 0.5
H = torch.tensor([1.0, -2.0, 0.25, 0.5], dtype=torch.float64)
# moved mass m = (0, 0.6, 0.3, 1): pair 0 unmoved, pair 3 moved entirely (both atoms shifted)
SHIFT = torch.tensor([[0.0, 0.0], [0.0, 0.1], [0.0, 0.2], [0.05, 0.1]], dtype=torch.float64)
MASS = torch.tensor([[1.0, 0.0], [0.4, 0.6], [0.7, 0.3], [0.5, 0.5]], dtype=torch.float64)
M = [0.0, 0.6, 0.3, 1.0]


def zero_atoms(b, dtype=torch.float32):
    return torch.zeros(b, 2, dtype=dtype), torch.tensor([[1.0, 0.0]] * b, dtype=dtype)


def call(name, h, beta, shift, mass, **kw):
    if name == "drop_moved":
        return losses.drop_moved_loss(h, beta, shift, mass, kw.get("drop_threshold", 0.5))
    if name == "flip_moved":
        return losses.flip_moved_loss(h, beta, shift, mass)
    return losses.trimmed_loss(h, beta, shift, mass, kw.get("trim_fraction", 0.2))


# --- the moved mass --------------------------------------------------------------------------------


def test_moved_mass_counts_the_shifted_atoms_and_is_clamped():
    assert losses.moved_mass(SHIFT, MASS).tolist() == pytest.approx(M, abs=1e-15)
    # both atoms shifted with masses summing past 1 (not a solver's output): clamped to 1
    m = losses.moved_mass(torch.tensor([[0.1, 0.2]]), torch.tensor([[0.7, 0.6]]))
    assert m.tolist() == [1.0]


# --- literal values ----------------------------------------------------------------------------------


def test_drop_moved_literal():
    got = losses.drop_moved_loss(H, BETA, SHIFT, MASS, 0.5)
    # m = 0.6 and 1 are dropped; m = 0.3 (moved partly, below the threshold) trains as DPO
    assert got.tolist() == pytest.approx([sp(-0.5), 0.0, sp(-0.125), 0.0], rel=1e-12)
    # the threshold is inclusive (m >= θ): at θ = 0.6 pair 1 is dropped, just above it is kept
    assert losses.drop_moved_loss(H, BETA, SHIFT, MASS, 0.6)[1].item() == 0.0
    assert losses.drop_moved_loss(H, BETA, SHIFT, MASS, 0.61)[1].item() == pytest.approx(sp(1.0), rel=1e-12)
    # θ = 1: only pairs moved entirely
    got = losses.drop_moved_loss(H, BETA, SHIFT, MASS, 1.0)
    assert got.tolist() == pytest.approx([sp(-0.5), sp(1.0), sp(-0.125), 0.0], rel=1e-12)


def test_flip_moved_literal_is_per_pair_label_smoothing():
    got = losses.flip_moved_loss(H, BETA, SHIFT, MASS)
    want = [(1 - m) * sp(-BETA * h) + m * sp(BETA * h) for h, m in zip(H.tolist(), M)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # m = 1: DPO of the other label; each pair equals cdpo with its own ε = m
    assert got[3].item() == pytest.approx(sp(0.25), rel=1e-12)
    for i in (0, 2):  # m = 0 and 0.3, within cdpo's ε range
        assert got[i].item() == pytest.approx(losses.cdpo_loss(H[i : i + 1], BETA, M[i])[0].item(), rel=1e-12)


def test_trimmed_literal_drops_the_most_moved_and_averages_the_rest():
    # B = 4, trim_fraction 0.5: k = 2, pairs 3 (m = 1) and 1 (m = 0.6) are dropped; the rest scaled by 4/2
    got = losses.trimmed_loss(H, BETA, SHIFT, MASS, 0.5)
    assert got.tolist() == pytest.approx([2 * sp(-0.5), 0.0, 2 * sp(-0.125), 0.0], rel=1e-12)
    assert got.mean().item() == pytest.approx((sp(-0.5) + sp(-0.125)) / 2, rel=1e-12)
    # trim_fraction 0.25: k = 1, pair 3 only, the other three scaled by 4/3
    got = losses.trimmed_loss(H, BETA, SHIFT, MASS, 0.25)
    assert got.tolist() == pytest.approx([4 / 3 * sp(-BETA * h) for h in H.tolist()[:3]] + [0.0], rel=1e-12)


def test_trimmed_never_drops_an_unmoved_pair():
    # trim_fraction 0.75 asks for 3 of 4, but only 3 pairs are moved; 0.999 asks for 3 as well
    for f in (0.75, 0.999):
        got = losses.trimmed_loss(H, BETA, SHIFT, MASS, f)
        assert got.tolist() == pytest.approx([4 * sp(-0.5), 0.0, 0.0, 0.0], rel=1e-12)
    # one moved pair of four: at most that one goes, whatever the fraction
    shift, mass = zero_atoms(4, torch.float64)
    shift[2, 1], mass[2] = 0.1, torch.tensor([0.9, 0.1], dtype=torch.float64)
    got = losses.trimmed_loss(H, BETA, shift, mass, 0.75)
    assert got.tolist() == pytest.approx([4 / 3 * sp(-0.5), 4 / 3 * sp(1.0), 0.0, 4 / 3 * sp(-0.25)], rel=1e-12)


def test_trimmed_breaks_ties_by_the_larger_dpo_loss():
    # pairs 1, 2, 3 all moved by 0.5; k = 1 drops the one with the largest DPO loss: pair 1 (h = −2)
    shift = torch.tensor([[0.0, 0.0]] + [[0.0, 0.1]] * 3, dtype=torch.float64)
    mass = torch.tensor([[1.0, 0.0]] + [[0.5, 0.5]] * 3, dtype=torch.float64)
    got = losses.trimmed_loss(H, BETA, shift, mass, 0.25)
    assert got[1].item() == 0.0 and all(x > 0 for i, x in enumerate(got.tolist()) if i != 1)
    # k = 2: then pair 2 (h = 0.25, the next largest loss among the tied)
    got = losses.trimmed_loss(H, BETA, shift, mass, 0.5)
    assert [i for i, x in enumerate(got.tolist()) if x == 0.0] == [1, 2]


@pytest.mark.parametrize(
    "b, f, k", [(4, 0.2, 0), (5, 0.2, 1), (5, 0.39, 1), (10, 0.3, 3), (100, 0.29, 29), (2, 0.5, 1)]
)
def test_trimmed_drops_floor_of_the_fraction(b, f, k):
    h = torch.linspace(-1, 1, b, dtype=torch.float64)
    shift = torch.full((b, 2), 0.1, dtype=torch.float64)  # every pair moved entirely
    mass = torch.tensor([[0.5, 0.5]] * b, dtype=torch.float64)
    got = losses.trimmed_loss(h, BETA, shift, mass, f)
    assert int((got == 0).sum()) == k


def test_trimmed_fraction_zero_is_dpo():
    assert torch.equal(losses.trimmed_loss(H, BETA, SHIFT, MASS, 0.0), losses.dpo_loss(H, BETA))


# --- ε = 0 atoms: DPO to the bit; gradients ----------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_eps_zero_atoms_are_dpo_to_the_bit(name, dtype):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(64, generator=g, dtype=torch.float64) * 30).to(dtype)
    shift, mass = zero_atoms(64)
    assert torch.equal(call(name, h, 0.1, shift, mass), losses.dpo_loss(h, 0.1))
    assert torch.equal(call(name, h, 0.1, shift, mass, drop_threshold=1e-9, trim_fraction=0.9), losses.dpo_loss(h, 0.1))


@pytest.mark.parametrize("name", NEW)
def test_gradients_are_finite_and_as_the_formula_says(name):
    h = torch.tensor([1.0, -2.0, 0.25, 0.5, 80.0, -80.0], dtype=torch.float32, requires_grad=True)
    shift = torch.cat([SHIFT.float(), torch.tensor([[0.0, 0.3], [0.0, 0.3]])])
    mass = torch.cat([MASS.float(), torch.tensor([[0.2, 0.8], [0.2, 0.8]])])
    call(name, h, BETA, shift, mass, trim_fraction=0.5).mean().backward()
    assert torch.isfinite(h.grad).all()
    # dℓ/dh of DPO: −β·σ(−βh); of the other label's DPO: β·σ(βh)
    s = torch.sigmoid(BETA * h.detach().double())
    m = torch.tensor(M + [0.8, 0.8], dtype=torch.float64)
    if name == "drop_moved":
        want = torch.where(m >= 0.5, 0.0, -BETA * (1 - s))
    elif name == "flip_moved":
        want = (1 - m) * -BETA * (1 - s) + m * BETA * s
    else:  # k = 3 of 6: pairs 3 (m 1), then the two at m 0.8, the larger loss first (h = −80), then h = 80
        kept = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        want = kept * 2 * -BETA * (1 - s)
    assert h.grad.double().tolist() == pytest.approx((want / 6).tolist(), rel=1e-5, abs=1e-12)


def test_trimmed_ties_at_equal_mass_and_loss_go_by_position():
    shift = torch.tensor([[0.0, 0.1]] * 3)
    mass = torch.tensor([[0.5, 0.5]] * 3)
    got = losses.trimmed_loss(torch.zeros(3), 1.0, shift, mass, 0.34)  # k = 1, all equal: the first
    assert got.tolist() == pytest.approx([0.0, 1.5 * math.log(2), 1.5 * math.log(2)], rel=1e-6)


# --- parameters and their bounds -------------------------------------------------------------------


def test_the_table_declares_them_for_ssapos_leader():
    from ssapo import leader_losses
    from ssapo.config import LEADER_LOSSES

    for name in NEW:
        loss = leader_losses.get(name)
        assert loss.ssapo_leader and name in LEADER_LOSSES and loss.columns == ("shift", "mass")
        assert loss.batch == "mean" and loss.per_pair() is getattr(losses, f"{name}_loss")
    assert leader_losses.get("drop_moved").function_args == ("drop_threshold",)
    assert leader_losses.get("trimmed").function_args == ("trim_fraction",)
    cfg = load_config("tiny", overrides={"method": "ssapo", "leader_loss": "trimmed"})
    assert (cfg.drop_threshold, cfg.trim_fraction) == (0.5, 0.2)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("drop_threshold", "0", "drop_threshold: must be in (0, 1], got 0.0"),
        ("drop_threshold", "1.5", "drop_threshold: must be in (0, 1], got 1.5"),
        ("trim_fraction", "1", "trim_fraction: must be in [0, 1), got 1.0"),
        ("trim_fraction", "-0.1", "trim_fraction: must be in [0, 1), got -0.1"),
    ],
)
def test_bounds_are_refused_naming_the_field(tmp_path, field, value, message):
    loss = "drop_moved" if field == "drop_threshold" else "trimmed"
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides={"method": "ssapo", "leader_loss": loss, field: value})
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:
        SSAPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, leader_loss=loss, **{field: float(value)})
    assert str(e.value) == message
    with pytest.raises(ValueError, match=f"^{field}: "):
        call(loss, H, BETA, SHIFT, MASS, **{field: float(value)})


def test_bounds_edges_are_accepted():
    load_config("tiny", overrides={"method": "ssapo", "leader_loss": "drop_moved", "drop_threshold": "1"})
    load_config("tiny", overrides={"method": "ssapo", "leader_loss": "trimmed", "trim_fraction": "0"})


# --- in the trainer ----------------------------------------------------------------------------------

from test_trainer import ZERO, displacement, logged, rows, train  # noqa: E402

# pairs alternately moved by 0.3 (below drop_threshold 0.5) and by 0.6 (above), so each loss acts
MOVED = lambda i: {"shift": [0.0, 0.1], "mass": [0.4, 0.6] if i % 2 else [0.7, 0.3]}  # noqa: E731
PARAMS = {"drop_threshold": 0.5, "trim_fraction": 0.5}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    return train(SSAPOTrainer, tmp_path_factory.mktemp("dpo"), rows(ZERO), leader_loss="dpo", max_steps=2)


@pytest.mark.parametrize("name", NEW)
def test_each_trains_with_its_parameters_and_eps_zero_is_dpo(tmp_path, monkeypatch, dpo_run, name):
    seen = []
    real = getattr(losses, f"{name}_loss")

    def spy(h, beta, shift, mass, *args):
        seen.append((tuple(shift.shape), tuple(mass.shape), args))
        return real(h, beta, shift, mass, *args)

    monkeypatch.setattr(losses, f"{name}_loss", spy)
    tr = train(SSAPOTrainer, tmp_path / "moved", rows(MOVED), leader_loss=name, max_steps=2, **PARAMS)
    want_args = {"drop_moved": (0.5,), "flip_moved": (), "trimmed": (0.5,)}[name]
    assert seen and all(s == ((2, 2), (2, 2), want_args) for s in seen)
    st = tr.leader_stats
    assert st["param_displacement"] == pytest.approx(displacement(tr), rel=1e-6) and st["param_displacement"] > 0
    assert len(st["loss_history"]) == 2 and all(math.isfinite(x) for x in st["loss_history"])
    assert all(math.isfinite(x) for x in logged(tr, "grad_norm"))
    assert logged(tr, "grad_norm") != logged(dpo_run, "grad_norm")  # the moved pairs change the steps
    # ε = 0 atoms: DPO's run to the bit (losses, gradient norms, weights)
    zero = train(SSAPOTrainer, tmp_path / "zero", rows(ZERO), leader_loss=name, max_steps=2, **PARAMS)
    assert logged(zero) == logged(dpo_run) and len(logged(zero)) == 2
    assert logged(zero, "grad_norm") == logged(dpo_run, "grad_norm")
    assert all(torch.equal(p, dict(dpo_run.model.named_parameters())[n]) for n, p in zero.model.named_parameters())
