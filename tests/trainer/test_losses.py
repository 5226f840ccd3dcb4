"""The leader's losses (ssapo.losses) on literal tensors with hand-computed values."""

import math

import pytest
import torch

from ssapo.losses import (
    ConfidenceWindow,
    decoupled_logits,
    decoupled_margin,
    dpo_loss,
    kept_mass_loss,
    masked_sequence_logps,
    shift_margin_loss,
    shift_prob_loss,
    spa_loss,
    weighted_dpo_loss,
)

H = torch.tensor([-30.0, -2.0, 0.0, 0.5, 3.0, 40.0], dtype=torch.float64)
B = 0.1
f64 = dict(dtype=torch.float64)


def sp(x):  # softplus by hand
    return math.log1p(math.exp(x))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_values():
    assert dpo_loss(H, B).tolist() == pytest.approx([sp(-B * h) for h in H.tolist()], rel=1e-14)
    assert dpo_loss(torch.tensor([0.0]), 0.5).item() == pytest.approx(math.log(2), rel=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eps_zero_every_variant_is_dpo_exactly(dtype):
    h = torch.cat([H, torch.tensor([-500.0, 500.0, -1e4], **f64)]).to(dtype)  # βh = −50: σ(βh) < 1e-6
    n = len(h)
    zero, one = torch.zeros(n, 2, dtype=dtype), torch.tensor([[1.0, 0.0]] * n, dtype=dtype)
    ref = dpo_loss(h, B)
    loss, clamped = shift_prob_loss(h, B, zero, one)
    assert torch.equal(loss, ref) and clamped.item() == 0  # an unshifted atom is never clamped
    assert torch.equal(shift_margin_loss(h, B, zero, one), ref)
    assert torch.equal(weighted_dpo_loss(h, B, torch.ones(n, dtype=dtype)), ref)
    assert torch.equal(spa_loss(h, B, torch.zeros(n, dtype=torch.bool), 0.1), ref)
    assert torch.equal(spa_loss(h, B, torch.ones(n, dtype=torch.bool), 0.0), ref)
    # and the gradients too
    hs = [h.clone().requires_grad_() for _ in range(2)]
    dpo_loss(hs[0], B).sum().backward()
    shift_prob_loss(hs[1], B, zero, one)[0].sum().backward()
    assert torch.equal(hs[0].grad, hs[1].grad)


def test_shift_prob_per_sample_atoms_values_gradient_and_clamp():
    h = torch.zeros(2, **f64, requires_grad=True)  # σ(0) = 0.5 for both pairs
    shift = torch.tensor([[0.0, 0.2], [0.0, 0.6]], **f64)
    mass = torch.tensor([[0.5, 0.5], [0.25, 0.75]], **f64)
    loss, clamped = shift_prob_loss(h, B, shift, mass)
    # row 0: 0.5·(−log 0.5) + 0.5·(−log 0.3); row 1: 0.25·(−log 0.5) + 0.75·(−log 1e-6)
    assert loss[0].item() == pytest.approx(0.5 * math.log(2) - 0.5 * math.log(0.3), rel=1e-12)
    assert loss[1].item() == pytest.approx(0.25 * math.log(2) - 0.75 * math.log(1e-6), rel=1e-12)
    assert clamped.item() == 1  # only row 1's second atom: row 0 keeps its own atoms
    loss.sum().backward()
    # d/dh −log(σ(βh) − s) = −β σ(1−σ)/(σ − s); the clamped atom adds nothing
    g0 = 0.5 * -B * 0.25 / 0.5 + 0.5 * -B * 0.25 / 0.3
    g1 = 0.25 * -B * 0.25 / 0.5
    assert h.grad.tolist() == pytest.approx([g0, g1], rel=1e-12)


def test_shift_prob_does_not_broadcast_the_first_rows_atoms():
    # the released code used row 0's atoms for the whole micro-batch
    h = torch.tensor([1.0, 1.0, 1.0], **f64)
    shift = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.1, 0.45]], **f64)
    mass = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.4, 0.6]], **f64)
    loss, clamped = shift_prob_loss(h, B, shift, mass)
    s = sig(0.1)  # 0.52498
    assert loss.tolist() == pytest.approx(
        [sp(-0.1), -math.log(s - 0.3), -0.4 * math.log(s - 0.1) - 0.6 * math.log(s - 0.45)], rel=1e-12
    )
    assert clamped.item() == 0
    # a row permutation permutes the losses
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(shift_prob_loss(h[perm], B, shift[perm], mass[perm])[0], loss[perm])


def test_clamp_counts_only_atoms_with_mass_and_honours_clamp_min():
    h = torch.zeros(4, **f64)  # σ = 0.5
    shift = torch.tensor([[0.0, 0.6], [0.0, 0.7], [0.49, 0.0], [0.5, 0.0]], **f64)
    mass = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]], **f64)
    # row 0: the shifted atom has no mass; row 1: clamped; row 2: 0.01 > 1e-6; row 3: 0 < 1e-6
    loss, clamped = shift_prob_loss(h, B, shift, mass)
    assert clamped.item() == 2
    assert loss[0].item() == pytest.approx(math.log(2), rel=1e-14)
    assert loss[2].item() == pytest.approx(-math.log(0.01), rel=1e-9)
    assert loss[3].item() == pytest.approx(-math.log(1e-6), rel=1e-12)
    _, clamped = shift_prob_loss(h, B, shift, mass, clamp_min=0.05)  # now 0.5 − 0.49 = 0.01 clamps too
    assert clamped.item() == 3


def test_atom_shapes_are_checked():
    with pytest.raises(ValueError, match=r"shift and mass: must both have shape \(B, K\)"):
        shift_prob_loss(torch.zeros(3), B, torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shift and mass"):
        shift_margin_loss(torch.zeros(2), B, torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="weights: must have shape"):
        weighted_dpo_loss(torch.zeros(2), B, torch.ones(3))


def test_shift_margin_values_and_gradient_bounded_by_beta():
    h = torch.linspace(-3000, 3000, 61, **f64).requires_grad_()
    shift = torch.tensor([[5.0, -40.0]] * 61, **f64)
    mass = torch.tensor([[0.3, 0.7]] * 61, **f64)
    shift_margin_loss(h, B, shift, mass).sum().backward()
    assert torch.all(h.grad.abs() <= B) and h.grad.abs().max() > 0.99 * B
    v = shift_margin_loss(torch.tensor([0.0, 10.0], **f64), B, shift[:2], mass[:2])
    assert v.tolist() == pytest.approx([0.3 * sp(5.0) + 0.7 * sp(-40.0), 0.3 * sp(4.0) + 0.7 * sp(-41.0)], rel=1e-13)


def test_weights_scale_the_dpo_loss():
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 3.0], **f64)
    assert weighted_dpo_loss(H, B, w).tolist() == pytest.approx(
        [wi * sp(-B * h) for wi, h in zip(w.tolist(), H.tolist())], rel=1e-14
    )


def test_kept_mass_trains_less_on_what_the_follower_moved():
    """Literal atoms: a pair with 0.3 of its mass moved keeps 0.7 of its DPO loss; unmoved atoms
    (shift 0, whatever their mass) keep all of it; ε = 0 atoms give DPO exactly."""
    shift = torch.tensor([[0.0, 0.2], [0.0, 0.0], [0.0, -0.1], [0.1, 0.3], [0.0, 0.5], [0.0, 0.0]], **f64)
    mass = torch.tensor([[0.7, 0.3], [0.4, 0.6], [1.0, 0.0], [0.5, 0.5], [0.9, 0.1], [1.0, 0.0]], **f64)
    kept = [0.7, 1.0, 1.0, 0.0, 0.9, 1.0]
    assert kept_mass_loss(H, B, shift, mass).tolist() == pytest.approx(
        [k * sp(-B * h) for k, h in zip(kept, H.tolist())], rel=1e-14
    )
    zero_shift, zero_mass = torch.zeros(6, 2, **f64), torch.tensor([[1.0, 0.0]] * 6, **f64)
    assert torch.equal(kept_mass_loss(H, B, zero_shift, zero_mass), dpo_loss(H, B))
    with pytest.raises(ValueError, match="shift and mass: must both have shape"):
        kept_mass_loss(H, B, shift[:, :1], mass)


def test_spa_smooths_only_flagged_pairs():
    flagged = torch.tensor([True, False, True, False, False, True])
    out = spa_loss(H, B, flagged, 0.1)
    for i, f in enumerate(flagged.tolist()):
        h = H[i].item()
        exp = (1 - 0.1 * f) * sp(-B * h) + 0.1 * f * sp(B * h)
        assert out[i].item() == pytest.approx(exp, rel=1e-13)
    assert torch.equal(out[~flagged], dpo_loss(H, B)[~flagged])


def test_decoupled_logits_are_mixed_in_logit_space():
    pol = torch.tensor([[[2.0, 0.0, -1.0]]])
    ref = torch.tensor([[[1.0, 1.0, 1.0]]])
    mixed = decoupled_logits(pol, ref, 0.5)
    assert mixed.tolist() == [[[2.5, -0.5, -2.0]]]  # (1 + λ)·pol − λ·ref on the raw logits
    # log π̃ renormalises the mixed logits; mixing log-probs, (1 + λ)·log π_θ − λ·log π_ref,
    # misses the per-token normaliser and is not a distribution
    lp = 1.5 * torch.log_softmax(pol, -1) - 0.5 * torch.log_softmax(ref, -1)
    assert not torch.allclose(torch.log_softmax(mixed, -1), lp)
    assert masked_sequence_logps(mixed, torch.tensor([[0]]), torch.ones(1, 1)).item() == pytest.approx(
        2.5 - math.log(math.exp(2.5) + math.exp(-0.5) + math.exp(-2.0)), rel=1e-6
    )
    assert not decoupled_logits(pol.requires_grad_(), ref, 0.5).requires_grad


def test_decoupled_margin_on_literal_logits():
    # one pair: row 0 prompt+chosen, row 1 prompt+rejected; tokens [p, y]; vocab 2;
    # the logits at position 0 predict token 1 (the response token)
    ids = torch.tensor([[0, 0], [0, 1]])
    cmask = torch.tensor([[0, 1], [0, 1]])
    pol = torch.tensor([[[1.0, 0.0], [9.0, 9.0]], [[0.0, 2.0], [9.0, 9.0]]], **f64)
    ref = torch.tensor([[[0.0, 0.0], [9.0, 9.0]], [[0.0, 0.0], [9.0, 9.0]]], **f64)
    lam, beta = 0.5, 0.1
    m = decoupled_margin(pol, ref, ids, cmask, lam, beta)
    # π̃ logits: chosen row (1.5, 0) → log π̃(token 0); rejected row (0, 3) → log π̃(token 1); ref: log ½ each
    lc = 1.5 - math.log(math.exp(1.5) + 1)
    lr = 3.0 - math.log(1 + math.exp(3.0))
    assert m.tolist() == pytest.approx([beta * ((lc - lr) - 0.0)], rel=1e-12)
    # given reference log-probs are used instead of the reference logits
    m2 = decoupled_margin(pol, ref, ids, cmask, lam, beta, ref_logps=(torch.tensor([-1.0]), torch.tensor([-3.0])))
    assert m2.item() == pytest.approx(beta * ((lc - lr) - 2.0), rel=1e-12)
    # λ = 0 is the policy's own implicit margin
    m0 = decoupled_margin(pol, ref, ids, cmask, 0.0, beta)
    assert m0.item() == pytest.approx(beta * ((1 - math.log(math.e + 1)) - (2 - math.log(1 + math.e**2))), rel=1e-12)


def test_confidence_window_flags_the_least_confident_tenth():
    w = ConfidenceWindow(size=50, quantile=0.1)
    # empty window: τ = −∞ and nothing is flagged, not even −∞ itself
    assert w.tau == float("-inf") and not w.flag(torch.tensor([-1e9, float("-inf")])).any()
    w.update(torch.arange(100, **f64))  # keeps the last 50: 50..99
    assert len(w) == 50 and w.values[0] == 50.0
    assert w.tau == pytest.approx(54.9)  # linear interpolation: 50 + 0.1·49
    conf = torch.arange(50, 100, **f64)[torch.randperm(50, generator=torch.Generator().manual_seed(0))]
    flags = w.flag(conf)
    assert flags.sum().item() == 5 and sorted(conf[flags].tolist()) == [50.0, 51.0, 52.0, 53.0, 54.0]
    # strictness: ≤ τ is flagged, anything above is not
    assert w.flag(torch.tensor([54.9, 54.9 + 1e-9], **f64)).tolist() == [True, False]
    w.update(torch.tensor([1000.0] * 45))  # the oldest 45 leave the window: 95..99 and 45 × 1000
    assert w.tau == pytest.approx(99 + 0.9 * 901)  # between the 5th (99) and 6th (1000) smallest


def test_confidence_window_partial_gather_and_errors():
    seen = []
    w = ConfidenceWindow(size=4, quantile=0.5, gather=lambda v: seen.append(v) or torch.cat([v, v + 10]))
    w.update(torch.tensor([1.0, 2.0]))  # "gathered over two ranks": 1, 2, 11, 12
    assert len(seen) == 1 and w.values == [1.0, 2.0, 11.0, 12.0] and w.tau == pytest.approx(6.5)
    w2 = ConfidenceWindow(size=50, quantile=0.1)
    w2.update(torch.tensor([3.0]))  # a partial window is used as it is
    assert w2.tau == 3.0 and w2.flag(torch.tensor([3.0, 3.5])).tolist() == [True, False]
    w2.reset()
    assert w2.tau == float("-inf")
    with pytest.raises(ValueError, match="quantile"):
        ConfidenceWindow(quantile=1.5)
    with pytest.raises(ValueError, match="size"):
        ConfidenceWindow(size=0)
