"""The leader's losses on literal tensors."""

import math

import pytest
import torch

from ssapo.losses import (
    ConfidenceWindow,
    decoupled_logits,
    dpo_loss,
    sequence_logps,
    shift_margin_loss,
    shift_prob_loss,
    spa_loss,
    weighted_dpo_loss,
)

H = torch.tensor([-30.0, -2.0, 0.0, 0.5, 3.0, 40.0], dtype=torch.float64)
B = 0.1


def test_dpo_loss_values():
    expected = [math.log1p(math.exp(-B * h)) for h in H.tolist()]
    assert dpo_loss(H, B).tolist() == pytest.approx(expected, rel=1e-14)


def test_no_shift_is_dpo_exactly():
    zero = torch.zeros(len(H), 2, dtype=torch.float64)
    one = torch.tensor([[1.0, 0.0]] * len(H), dtype=torch.float64)
    ref = dpo_loss(H, B)
    loss, clamped = shift_prob_loss(H, B, zero, one)
    assert torch.equal(loss, ref) and clamped == 0
    assert torch.equal(shift_margin_loss(H, B, zero, one), ref)
    assert torch.equal(weighted_dpo_loss(H, B, torch.ones(len(H), dtype=torch.float64)), ref)
    assert torch.equal(spa_loss(H, B, torch.zeros(len(H), dtype=torch.bool), 0.1), ref)


def test_shift_prob_per_sample_atoms_and_clamp():
    h = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # σ(0) = 0.5 for both
    shift = torch.tensor([[0.0, 0.2], [0.0, 0.6]], dtype=torch.float64)
    mass = torch.tensor([[0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    loss, clamped = shift_prob_loss(h, B, shift, mass)
    # row 0: 0.5·(−log 0.5) + 0.5·(−log 0.3); row 1: 0.25·(−log 0.5) + 0.75·(−log 1e-6)
    assert loss[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * -math.log(0.3), rel=1e-12)
    assert loss[1].item() == pytest.approx(0.25 * math.log(2) + 0.75 * -math.log(1e-6), rel=1e-12)
    assert clamped.item() == 1  # only row 1's second atom; row 0 keeps its own atoms
    loss.sum().backward()
    # d/dh of −log(σ(βh) − s) = −β σ(1−σ)/(σ − s); the clamped atom adds nothing
    g0 = 0.5 * -B * 0.25 / 0.5 + 0.5 * -B * 0.25 / 0.3
    g1 = 0.25 * -B * 0.25 / 0.5
    assert h.grad.tolist() == pytest.approx([g0, g1], rel=1e-12)


def test_shift_prob_first_row_atoms_are_not_broadcast():
    h = torch.tensor([1.0, 1.0], dtype=torch.float64)
    shift = torch.tensor([[0.0, 0.0], [0.3, 0.3]], dtype=torch.float64)
    mass = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    loss, _ = shift_prob_loss(h, B, shift, mass)
    assert loss[0] != loss[1]
    assert loss[1].item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1)) - 0.3), rel=1e-12)


def test_shift_margin_gradient_is_bounded_by_beta():
    h = torch.linspace(-100, 100, 41, dtype=torch.float64, requires_grad=True)
    shift = torch.full((41, 2), 5.0, dtype=torch.float64)
    mass = torch.tensor([[0.3, 0.7]] * 41, dtype=torch.float64)
    shift_margin_loss(h, B, shift, mass).sum().backward()
    assert torch.all(h.grad.abs() <= B + 1e-15)
    # value: softplus(−(βh − s))
    v = shift_margin_loss(torch.tensor([0.0], dtype=torch.float64), B, shift[:1], mass[:1])
    assert v.item() == pytest.approx(math.log1p(math.exp(5.0)), rel=1e-14)


def test_weights_scale_the_dpo_loss():
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert torch.equal(weighted_dpo_loss(H, B, w), w * dpo_loss(H, B))


def test_spa_smooths_only_flagged_pairs():
    flagged = torch.tensor([True, False, True, False, False, False])
    out = spa_loss(H, B, flagged, 0.1)
    a = 0.1
    for i, f in enumerate(flagged.tolist()):
        h = H[i].item()
        exp = (1 - a * f) * math.log1p(math.exp(-B * h)) + a * f * math.log1p(math.exp(B * h))
        assert out[i].item() == pytest.approx(exp, rel=1e-13)


def test_decoupled_logits_are_mixed_in_logit_space():
    pol = torch.tensor([[[2.0, 0.0, -1.0]]])
    ref = torch.tensor([[[1.0, 1.0, 1.0]]])
    mixed = decoupled_logits(pol, ref, 0.5)
    assert mixed.tolist() == [[[2.5, -0.5, -2.0]]]  # (1 + λ)·pol − λ·ref on raw logits
    # the de-coupled model's log-probs are renormalised; mixing log-probs
    # directly, (1 + λ)·log π_θ − λ·log π_ref, misses the per-token normaliser
    lp = 1.5 * torch.log_softmax(pol, -1) - 0.5 * torch.log_softmax(ref, -1)
    assert not torch.allclose(torch.log_softmax(mixed, -1), lp)
    labels = torch.tensor([[0]])
    assert sequence_logps(mixed, labels, torch.ones(1, 1)).item() == pytest.approx(
        2.5 - math.log(math.exp(2.5) + math.exp(-0.5) + math.exp(-2.0)), rel=1e-6
    )


def test_confidence_window_flags_the_least_confident_tenth():
    w = ConfidenceWindow(size=50, quantile=0.1)
    assert w.tau == float("-inf") and not w.flag(torch.tensor([-1e9])).any()
    w.update(torch.arange(100, dtype=torch.float64))  # keeps the last 50: 50..99
    assert w.tau == pytest.approx(54.9)  # numpy-style linear interpolation
    flags = w.flag(torch.arange(50, 100, dtype=torch.float64))
    assert flags.sum().item() == 5 and flags[:5].all()
    assert w.flag(torch.tensor([54.9])).item()  # ≤ τ is flagged
    with pytest.raises(ValueError, match="quantile"):
        ConfidenceWindow(quantile=1.5)
