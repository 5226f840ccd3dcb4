"""The robust-DPO baselines' leader losses (ssapo.losses: rdpo, cdpo, drdpo,
kldpo): each one's distinctive step on literal tensors, the identities that make
them DPO at their neutral setting, and their wiring into SSAPOTrainer."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ssapo import losses  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402

torch.set_num_threads(1)


def sp(x: float) -> float:  # softplus, in float64 Python
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


H = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)


# --- cDPO ------------------------------------------------------------------------------------------


def test_cdpo_is_label_smoothing_on_every_pair():
    got = losses.cdpo_loss(H, 0.5, 0.2)
    want = [0.8 * sp(-0.5 * h) + 0.2 * sp(0.5 * h) for h in H.tolist()]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def test_cdpo_has_a_finite_minimum_at_log_odds_of_the_trust():
    # d/dz [(1-ε) softplus(-z) + ε softplus(z)] = 0 at z* = log((1-ε)/ε)
    eps, beta = 0.2, 0.5
    z = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    losses.cdpo_loss(z, beta, eps).sum().backward()
    assert abs(z.grad.item()) < 1e-12
    # DPO keeps pushing: its gradient there is not zero
    z.grad = None
    losses.dpo_loss(z, beta).sum().backward()
    assert z.grad.item() < -0.01


# --- rDPO ------------------------------------------------------------------------------------------


def test_rdpo_literal_value():
    eps, beta = 0.1, 0.5
    got = losses.rdpo_loss(H, beta, eps)
    want = [(0.9 * sp(-beta * h) - 0.1 * sp(beta * h)) / 0.8 for h in H.tolist()]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
def test_rdpo_is_unbiased_for_the_clean_loss_under_flips_at_rate_eps(eps):
    # a label kept with prob 1-ε and flipped (h -> -h) with prob ε: the expectation is clean DPO
    beta = 0.7
    expected = (1 - eps) * losses.rdpo_loss(H, beta, eps) + eps * losses.rdpo_loss(-H, beta, eps)
    assert expected.tolist() == pytest.approx(losses.dpo_loss(H, beta).tolist(), rel=1e-12)
    # cDPO is not: its expectation differs from clean DPO
    c = (1 - eps) * losses.cdpo_loss(H, beta, eps) + eps * losses.cdpo_loss(-H, beta, eps)
    assert not torch.allclose(c, losses.dpo_loss(H, beta))


@pytest.mark.parametrize("fn", [losses.rdpo_loss, losses.cdpo_loss])
def test_zero_smoothing_is_dpo_to_the_bit(fn):
    h = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fn(h, 0.1, 0.0), losses.dpo_loss(h, 0.1))


def test_smoothing_bounds_name_the_argument():
    with pytest.raises(ValueError, match=r"^label_smoothing: rdpo needs it in \[0, 0.5\)"):
        losses.rdpo_loss(H, 0.1, 0.5)
    with pytest.raises(ValueError, match=r"^label_smoothing: cdpo needs it in \[0, 0.5\]"):
        losses.cdpo_loss(H, 0.1, -0.1)
    half = losses.cdpo_loss(H, 0.1, 0.5)  # cDPO at 1/2 erases the label: symmetric in h
    assert half.tolist() == pytest.approx(losses.cdpo_loss(-H, 0.1, 0.5).tolist(), rel=1e-12)


# --- Dr. DPO ---------------------------------------------------------------------------------------


def test_drdpo_literal_value_and_its_weights():
    ell = torch.tensor([0.1, 2.0, 0.7], dtype=torch.float64, requires_grad=True)
    got = losses.drdpo_loss(ell, 0.5)
    want = -0.5 * math.log(sum(math.exp(-x / 0.5) for x in (0.1, 2.0, 0.7)) / 3)
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    # ∂/∂ℓ_i = softmax(−ℓ/β′)_i: the high-loss pair counts least
    soft = torch.softmax(-ell.detach() / 0.5, dim=0)
    assert ell.grad.tolist() == pytest.approx(soft.tolist(), rel=1e-12)
    assert ell.grad[1] < ell.grad[2] < ell.grad[0]


def test_drdpo_limits_are_mean_and_min():
    ell = torch.tensor([0.3, 1.9, 0.8], dtype=torch.float64)
    assert losses.drdpo_loss(ell, 1e6).item() == pytest.approx(ell.mean().item(), rel=1e-6)
    assert losses.drdpo_loss(ell, 1e-3).item() == pytest.approx(0.3 + 1e-3 * math.log(3), rel=1e-6)
    assert losses.drdpo_loss(torch.full((4,), 0.69, dtype=torch.float64), 1.0).item() == pytest.approx(0.69, rel=1e-12)


def test_drdpo_refuses_bad_arguments():
    with pytest.raises(ValueError, match="^drdpo_beta: "):
        losses.drdpo_loss(H, 0.0)
    with pytest.raises(ValueError, match="^per_pair: "):
        losses.drdpo_loss(torch.zeros(0), 1.0)


# --- KLDPO -----------------------------------------------------------------------------------------


def test_kldpo_weights_literal_and_detached():
    ell = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    w = losses.kldpo_weights(ell, 1.0, 10.0)
    assert w.tolist() == pytest.approx([math.exp(-0.5), math.exp(0.5)], rel=1e-12)
    assert not w.requires_grad
    (w * ell).mean().backward()  # the gradient is the weighted DPO gradient, weights held fixed
    assert ell.grad.tolist() == pytest.approx((w / 2).tolist(), rel=1e-12)


def test_kldpo_weights_clamp_and_use_the_gathered_mean():
    ell = torch.tensor([0.0, 1.0], dtype=torch.float64)
    w = losses.kldpo_weights(ell, 0.1, 10.0)  # exp(±5): the large one is clamped at 10
    assert w.tolist() == pytest.approx([math.exp(-5.0), 10.0], rel=1e-12)
    everyone = torch.tensor([0.0, 1.0, 3.0, 4.0], dtype=torch.float64)  # mean 2 over all processes
    w = losses.kldpo_weights(ell, 1.0, 10.0, everyone)
    assert w.tolist() == pytest.approx([math.exp(-2.0), math.exp(-1.0)], rel=1e-12)
    assert losses.kldpo_weights(ell, 1e9, 10.0).tolist() == pytest.approx([1.0, 1.0], rel=1e-8)


def test_kldpo_refuses_bad_arguments():
    with pytest.raises(ValueError, match="^kldpo_tau: "):
        losses.kldpo_weights(H, 0.0, 10.0)
    with pytest.raises(ValueError, match="^kldpo_max_weight: "):
        losses.kldpo_weights(H, 1.0, 0.5)


# --- in the trainer --------------------------------------------------------------------------------

from test_trainer import displacement, logged, rows, train  # noqa: E402


@pytest.mark.parametrize(
    "loss, kw",
    [
        ("rdpo", {"label_smoothing": 0.2}),
        ("cdpo", {"label_smoothing": 0.2}),
        ("drdpo", {"drdpo_beta": 0.5}),
        ("kldpo", {"kldpo_tau": 0.05}),
    ],
)
def test_every_robust_loss_trains_and_differs_from_dpo(tmp_path, loss, kw):
    dpo = train(SSAPOTrainer, tmp_path / "dpo", rows(), leader_loss="dpo")
    tr = train(SSAPOTrainer, tmp_path / loss, rows(), leader_loss=loss, **kw)
    st = tr.leader_stats
    assert st["param_displacement"] == pytest.approx(displacement(tr), rel=1e-6) and st["param_displacement"] > 0
    assert len(st["loss_history"]) == 4 and all(math.isfinite(x) for x in st["loss_history"])
    # the first step starts at policy = reference (h = 0): rdpo and cdpo already differ there, the
    # batch-combining losses only once the pairs' losses differ; by the last step all four do
    assert logged(tr)[-1] != logged(dpo)[-1]


@pytest.mark.parametrize("loss", ["rdpo", "cdpo"])
def test_robust_smoothing_zero_is_dpo_in_the_trainer(tmp_path, loss):
    dpo = train(SSAPOTrainer, tmp_path / "dpo", rows(), leader_loss="dpo")
    tr = train(SSAPOTrainer, tmp_path / loss, rows(), leader_loss=loss, label_smoothing=0.0)
    assert logged(tr) == logged(dpo)
    assert all(torch.equal(p, dict(dpo.model.named_parameters())[n]) for n, p in tr.model.named_parameters())


def test_trainer_calls_the_batch_losses_with_their_fields(tmp_path, monkeypatch):
    seen = {}
    real_dr, real_kl = losses.drdpo_loss, losses.kldpo_weights

    def dr(per_pair, beta_prime):
        seen.setdefault("drdpo", []).append((per_pair.shape, beta_prime))
        return real_dr(per_pair, beta_prime)

    def kl(per_pair, tau, max_weight, all_losses=None):
        seen.setdefault("kldpo", []).append((per_pair.shape, tau, max_weight))
        return real_kl(per_pair, tau, max_weight, all_losses)

    monkeypatch.setattr(losses, "drdpo_loss", dr)
    monkeypatch.setattr(losses, "kldpo_weights", kl)
    train(SSAPOTrainer, tmp_path / "dr", rows(), leader_loss="drdpo", drdpo_beta=0.3)
    train(SSAPOTrainer, tmp_path / "kl", rows(), leader_loss="kldpo", kldpo_tau=0.2, kldpo_max_weight=4.0)
    assert seen["drdpo"] and all(s == (torch.Size([2]), 0.3) for s in seen["drdpo"])
    assert seen["kldpo"] and all(s == (torch.Size([2]), 0.2, 4.0) for s in seen["kldpo"])


@pytest.mark.parametrize(
    "field, value, loss",
    [
        ("label_smoothing", 0.5, "rdpo"),
        ("label_smoothing", 0.6, "cdpo"),
        ("label_smoothing", 0.1, "dpo"),
        ("drdpo_beta", 0.0, "drdpo"),
        ("kldpo_tau", -1.0, "kldpo"),
        ("kldpo_max_weight", 0.5, "kldpo"),
    ],
)
def test_robust_config_errors_name_the_field(tmp_path, field, value, loss):
    from test_trainer import config

    with pytest.raises(ValueError, match=f"^{field}: "):
        config(SSAPOConfig, tmp_path, leader_loss=loss, **{field: value})
