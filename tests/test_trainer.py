"""SSAPOTrainer on a tiny Llama: every leader loss trains, ε = 0 is DPO to the
digit, and each pair's own atoms reach the loss."""

import os

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl import DPOConfig, DPOTrainer  # noqa: E402

from ssapo.tiny import build_tokenizer, tiny_llama  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402

WORDS = "a b c d e f g h i j".split()


def rows(atoms=None):
    base = [
        {"prompt": "a b ", "chosen": "c d", "rejected": "e f"},
        {"prompt": "b c ", "chosen": "d e", "rejected": "g h"},
        {"prompt": "c d ", "chosen": "e f", "rejected": "h i"},
        {"prompt": "d e ", "chosen": "f g", "rejected": "i j"},
    ] * 2
    if atoms is not None:
        base = [{**r, **atoms(i)} for i, r in enumerate(base)]
    return Dataset.from_list(base)


def config(cls, tmp_path, **kw):
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-3,
        report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", beta=0.1,
        seed=0, data_seed=0, precompute_ref_log_probs=True,
    )
    return cls(**{**args, **kw})


def train(cls, tmp_path, ds, **kw):
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, seed=0)
    cfg_cls = SSAPOConfig if cls is SSAPOTrainer else DPOConfig
    tr = cls(model, args=config(cfg_cls, tmp_path, **kw), train_dataset=ds, processing_class=tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr.train()
    changed = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    return tr, changed


@pytest.mark.parametrize(
    "loss, atoms",
    [
        ("dpo", None),
        ("shift_prob", lambda i: {"shift": [0.0, 0.1], "mass": [0.7, 0.3]}),
        ("shift_margin", lambda i: {"shift": [0.0, 0.5], "mass": [0.7, 0.3]}),
        ("weights", lambda i: {"weight": 1.0 + i % 2}),
    ],
)
def test_every_leader_loss_trains(tmp_path, loss, atoms):
    tr, changed = train(SSAPOTrainer, tmp_path, rows(atoms), leader_loss=loss)
    assert changed
    st = tr.leader_stats
    assert st["param_displacement"] > 0 and st["max_grad_norm"] > 0 and len(st["loss_history"]) == 4


def test_eps_zero_equals_trl_dpo_to_the_digit(tmp_path):
    zero = lambda i: {"shift": [0.0, 0.0], "mass": [1.0, 0.0]}  # noqa: E731
    ours, _ = train(SSAPOTrainer, tmp_path / "a", rows(zero), leader_loss="shift_prob")
    theirs, _ = train(DPOTrainer, tmp_path / "b", rows(), )
    a = [r["loss"] for r in ours.state.log_history if "loss" in r]
    b = [r["loss"] for r in theirs.state.log_history if "loss" in r]
    assert a == b and len(a) == 4


def test_each_pair_uses_its_own_atoms(tmp_path):
    # odd rows carry an atom at shift 0.6 > σ(0) = 0.5 with mass 0.75: clamped;
    # even rows stay; with batch 2 each batch holds one of each
    atoms = lambda i: {"shift": [0.0, 0.6], "mass": [0.25, 0.75]} if i % 2 else {"shift": [0.0, 0.0], "mass": [1.0, 0.0]}  # noqa: E731
    tr, _ = train(SSAPOTrainer, tmp_path, rows(atoms), leader_loss="shift_prob")
    st = tr.leader_stats
    # 4 steps × 2 rows: 4 odd rows × 2 atoms + 4 even rows × 1 atom with mass; the odd rows' shifted atoms clamp
    assert st["atoms"] == 12 and st["clamped_atoms"] == 4
    assert st["clamped_fraction"] == pytest.approx(4 / 12)


def test_missing_atom_columns_are_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset: leader_loss='shift_prob' needs the column\(s\) \['shift', 'mass'\]"):
        train(SSAPOTrainer, tmp_path, rows(), leader_loss="shift_prob")
    with pytest.raises(ValueError, match="leader_loss: must be one of"):
        config(SSAPOConfig, tmp_path, leader_loss="nope")


def test_spa_flags_and_smooths(tmp_path):
    # a tiny step keeps each pair's confidence nearly fixed; the window of 4 fills after two
    # batches of 2, and from then on pairs at or below its median are flagged
    tr, changed = train(SSAPOTrainer, tmp_path, rows(), leader_loss="spa", spa_window=4, spa_quantile=0.5,
                        spa_warmup_ratio=0.0, spa_lambda=0.5, learning_rate=1e-6, max_steps=8)
    assert changed and tr.args.precompute_ref_log_probs is False
    assert 0 < tr.leader_stats["spa_flagged_fraction"] < 1


def test_spa_without_smoothing_is_dpo(tmp_path):
    ours, _ = train(SSAPOTrainer, tmp_path / "a", rows(), leader_loss="spa", spa_alpha=0.0)
    theirs, _ = train(SSAPOTrainer, tmp_path / "b", rows(), leader_loss="dpo")
    a = [r["loss"] for r in ours.state.log_history if "loss" in r]
    b = [r["loss"] for r in theirs.state.log_history if "loss" in r]
    assert a == pytest.approx(b, rel=1e-5)
