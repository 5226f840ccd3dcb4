"""SSAPOTrainer on a tiny Llama (ssapo.tiny, hidden 64, 2 layers): every leader
loss trains, ε = 0 is trl's DPO to the bit, each pair meets its own atoms, the
reference is computed once, SPA flags / warms up, peft's reference is the
adapter-disabled model, and leader_stats say what happened."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from ssapo.tiny import build_tokenizer, tiny_llama  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402

torch.set_num_threads(1)
WORDS = "a b c d e f g h i j".split()
BASE = [
    {"prompt": "a b ", "chosen": "c d", "rejected": "e f"},
    {"prompt": "b c ", "chosen": "d e", "rejected": "g h i"},
    {"prompt": "c d ", "chosen": "e f g", "rejected": "h i"},
    {"prompt": "d e ", "chosen": "f g", "rejected": "i j"},
]
ZERO = lambda i: {"shift": [0.0, 0.0], "mass": [1.0, 0.0]}  # noqa: E731  the ε = 0 atoms


def rows(atoms=None, base=BASE * 2):
    return Dataset.from_list([{**r, **(atoms(i) if atoms else {})} for i, r in enumerate(base)])


def config(cls, out, **kw):
    args = dict(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-3,
        report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", beta=0.1,
        seed=0, data_seed=0, precompute_ref_log_probs=True, disable_tqdm=True,
    )
    return cls(**{**args, **kw})


def train(cls, out, ds, ref_model=None, peft_config=None, **kw):
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)
    cfg_cls = SSAPOConfig if cls is SSAPOTrainer else DPOConfig
    tr = cls(model, ref_model=ref_model, args=config(cfg_cls, out, **kw), train_dataset=ds, processing_class=tok,
             peft_config=peft_config)
    tr._before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    return tr


def logged(tr, key="loss"):
    return [r[key] for r in tr.state.log_history if key in r]


def displacement(tr):
    return math.sqrt(sum(float(((p.detach() - tr._before[n]) ** 2).sum())
                         for n, p in tr.model.named_parameters() if p.requires_grad))


@pytest.fixture(scope="module")
def trl_dpo(tmp_path_factory):
    """Plain trl DPOTrainer on the same seed and data."""
    return train(DPOTrainer, tmp_path_factory.mktemp("trl"), rows())


@pytest.mark.parametrize(
    "loss, atoms",
    [
        ("dpo", None),
        ("shift_prob", lambda i: {"shift": [0.0, 0.1], "mass": [0.7, 0.3]}),
        ("shift_margin", lambda i: {"shift": [0.0, 0.5], "mass": [0.7, 0.3]}),
        ("weights", lambda i: {"weight": 1.0 + i % 2}),
        ("spa", None),
    ],
)
def test_every_leader_loss_trains(tmp_path, loss, atoms):
    tr = train(SSAPOTrainer, tmp_path, rows(atoms), leader_loss=loss, spa_warmup_ratio=0.0)
    assert any(not torch.equal(tr._before[n], p) for n, p in tr.model.named_parameters())
    st = tr.leader_stats
    assert st["param_displacement"] == pytest.approx(displacement(tr), rel=1e-6) and st["param_displacement"] > 0
    assert len(st["loss_history"]) == 4 and all(math.isfinite(x) for x in st["loss_history"])
    assert st["max_grad_norm"] == pytest.approx(max(logged(tr, "grad_norm")), rel=1e-6)
    assert st["clamped_fraction"] == 0.0


@pytest.mark.parametrize(
    "loss, atoms",
    [("shift_prob", ZERO), ("shift_margin", ZERO), ("weights", lambda i: {"weight": 1.0}), ("dpo", None)],
)
def test_eps_zero_equals_trl_dpo_to_the_bit(tmp_path, trl_dpo, loss, atoms):
    ours = train(SSAPOTrainer, tmp_path, rows(atoms), leader_loss=loss)
    assert logged(ours) == logged(trl_dpo) and len(logged(ours)) == 4
    assert logged(ours, "grad_norm") == logged(trl_dpo, "grad_norm")
    assert all(torch.equal(p, dict(trl_dpo.model.named_parameters())[n]) for n, p in ours.model.named_parameters())
    assert ours.leader_stats["loss_history"] == pytest.approx(logged(trl_dpo), rel=1e-6)
    assert ours.leader_stats["clamped_atoms"] == 0


@pytest.mark.parametrize("shift, clamp_min", [(0.6, 1e-6), (0.49, 0.05)])
def test_each_pair_meets_its_own_atoms(tmp_path, shift, clamp_min):
    # one batch of two pairs: A unshifted, B with all its mass on an atom past σ(0) − clamp_min.
    # B is clamped and counted and gives no gradient, so the step's gradient is half of A's
    # alone (the released code would give both pairs the first row's atoms)
    a, b = BASE[0], BASE[1]
    ds = Dataset.from_list([{**a, "shift": [0.0, 0.0], "mass": [1.0, 0.0]},
                            {**b, "shift": [0.0, shift], "mass": [0.0, 1.0]}])
    ours = train(SSAPOTrainer, tmp_path / "a", ds, leader_loss="shift_prob", clamp_min=clamp_min, max_steps=1)
    st = ours.leader_stats
    assert (st["clamped_atoms"], st["atoms"], st["clamped_fraction"]) == (1, 2, 0.5)
    assert st["loss_history"][0] == pytest.approx((math.log(2) - math.log(clamp_min)) / 2, rel=1e-5)
    alone = train(DPOTrainer, tmp_path / "b", Dataset.from_list([a]), max_steps=1, per_device_train_batch_size=1)
    assert st["max_grad_norm"] == pytest.approx(logged(alone, "grad_norm")[0] / 2, rel=1e-4)


def test_atoms_are_counted_per_pair_over_a_run(tmp_path):
    # odd rows: an atom at shift 0.6 > σ(0) = 0.5 with mass 0.75 (clamped); even rows: unshifted
    atoms = lambda i: {"shift": [0.0, 0.6], "mass": [0.25, 0.75]} if i % 2 else {"shift": [0.0, 0.0], "mass": [1.0, 0.0]}  # noqa: E731
    st = train(SSAPOTrainer, tmp_path, rows(atoms), leader_loss="shift_prob").leader_stats
    # 4 steps × 2 pairs = 4 odd rows × 2 atoms + 4 even rows × 1 atom with mass; the odd rows' shifted atoms clamp
    assert (st["atoms"], st["clamped_atoms"]) == (12, 4) and st["clamped_fraction"] == pytest.approx(4 / 12)


def test_reference_is_computed_once(tmp_path):
    tok = build_tokenizer(WORDS)
    ref = tiny_llama(tok, seed=1)
    calls = []
    ref.register_forward_hook(lambda *a: calls.append(1))
    tr = train(SSAPOTrainer, tmp_path, rows(ZERO), ref_model=ref, leader_loss="shift_prob", max_steps=8)
    assert len(calls) == 4  # 8 rows in batches of 2, before training; none in the 8 steps
    assert tr.state.global_step == 8
    # the reference is the given model, not the policy: the first step's margin is not 0
    assert logged(tr)[0] != pytest.approx(math.log(2), abs=1e-4)


def test_loss_history_is_per_optimizer_step(tmp_path):
    tr = train(SSAPOTrainer, tmp_path, rows(ZERO), leader_loss="shift_prob", max_steps=3,
               gradient_accumulation_steps=2, per_device_train_batch_size=1, logging_steps=3)
    st = tr.leader_stats
    assert len(st["loss_history"]) == 3 and len(st["grad_norms"]) == 3 and len(logged(tr)) == 1
    assert sum(st["loss_history"]) / 3 == pytest.approx(logged(tr)[0], rel=1e-5)
    assert st["max_grad_norm"] == max(st["grad_norms"])


def test_spa_flags_and_smooths(tmp_path):
    # a tiny step keeps each pair's confidence nearly fixed; with a window of 4 and the median
    # as τ, from the second batch on the pairs at or below the median so far are flagged
    tr = train(SSAPOTrainer, tmp_path, rows(), leader_loss="spa", spa_window=4, spa_quantile=0.5,
               spa_warmup_ratio=0.0, spa_lambda=0.5, learning_rate=1e-6, max_steps=8)
    assert tr.args.precompute_ref_log_probs is False
    assert 0 < tr.leader_stats["spa_flagged_fraction"] < 1
    assert logged(tr, "spa/flagged")[0] == 0.0  # empty window: nothing flagged
    assert set(logged(tr, "spa/alpha")) == {0.1} and len(logged(tr, "spa/tau")) == 7
    assert len(tr.confidence) == 4


def test_spa_warmup_has_no_smoothing(tmp_path):
    tr = train(SSAPOTrainer, tmp_path, rows(), leader_loss="spa", spa_warmup_ratio=0.5, max_steps=4)
    assert logged(tr, "spa/alpha") == [0.0, 0.0, 0.1, 0.1]


def test_spa_without_smoothing_is_dpo(tmp_path):
    # the reference's log-probs come from its full logits in 'spa' (not trl's fused head): equal to ~1e-6
    ours = train(SSAPOTrainer, tmp_path / "a", rows(), leader_loss="spa", spa_alpha=0.0)
    theirs = train(SSAPOTrainer, tmp_path / "b", rows(), leader_loss="dpo")
    assert logged(ours) == pytest.approx(logged(theirs), rel=1e-5)


@pytest.mark.parametrize("loss", ["shift_prob", "spa"])
def test_peft_reference_is_the_adapter_disabled_model(tmp_path, loss):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    tr = train(SSAPOTrainer, tmp_path, rows(ZERO), peft_config=lora, leader_loss=loss, spa_warmup_ratio=0.0,
               learning_rate=5e-2)
    # LoRA starts as the identity, so the first margin is 0 against the adapter-disabled reference
    assert logged(tr)[0] == pytest.approx(math.log(2), abs=1e-5)
    moved = [n for n, p in tr.model.named_parameters() if not torch.equal(tr._before[n], p)]
    assert moved and all("lora_" in n for n in moved)
    assert tr.leader_stats["param_displacement"] == pytest.approx(displacement(tr), rel=1e-6)


@pytest.mark.parametrize(
    "field, value",
    [("leader_loss", "nope"), ("clamp_min", 0.0), ("spa_alpha", 0.7), ("spa_lambda", -1.0), ("spa_quantile", 2.0),
     ("spa_window", 0), ("spa_warmup_ratio", 1.5), ("loss_type", "ipo"), ("label_smoothing", 0.1)],
)
def test_config_errors_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        config(SSAPOConfig, tmp_path, **{field: value})


def test_wrong_args_or_missing_columns_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset: leader_loss='shift_prob' needs the column\(s\) \['shift', 'mass'\]"):
        train(SSAPOTrainer, tmp_path, rows(), leader_loss="shift_prob")
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['weight'\]"):
        train(SSAPOTrainer, tmp_path, rows(ZERO), leader_loss="weights")
    tok = build_tokenizer(WORDS)
    with pytest.raises(ValueError, match="args: must be an ssapo.trainer.SSAPOConfig"):
        SSAPOTrainer(tiny_llama(tok), args=config(DPOConfig, tmp_path), train_dataset=rows(), processing_class=tok)
