"""SSAPOTrainer logs what trl 1.16's DPOTrainer logs (issue 18, item 6): every
key of trl's log records for the same data, model and arguments, at every
training and evaluation log, with the same values where the loss is DPO
(leader_loss="dpo", or ε = 0 atoms), aux_loss on a mixture-of-experts model
included, plus the leader's own keys."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_trainer import WORDS, ZERO, config, rows  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from ssapo.tiny import build_tokenizer, tiny_llama  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402

# the metrics trl's DPOTrainer computes beside the loss (train; eval adds the "eval_" prefix)
TRL_METRICS = {
    "entropy",
    "num_tokens",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
}
TIMING = ("runtime", "per_second")  # wall-clock keys: the same name, another value


def tiny_mixtral(tok, seed=0):
    """A randomly initialised mixture-of-experts causal LM: 2 layers, hidden 32, 4 experts (2 per token)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg)


def tiny_dense(tok):
    return tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)  # test_trainer's model


def run(cls, out, ds, build=tiny_dense, **kw):
    """Two optimizer steps with an evaluation after each, on a fresh model of the same seed."""
    tok = build_tokenizer(WORDS)
    model = build(tok)
    args = config(
        SSAPOConfig if cls is SSAPOTrainer else DPOConfig,
        out,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=2,
        **kw,
    )
    tr = cls(model, args=args, train_dataset=ds, eval_dataset=ds.select(range(4)), processing_class=tok)
    tr.train()
    return tr.state.log_history


def assert_logs_like_trl(ours, theirs, extra=()):
    """Record by record: ours has every key of trl's (and `extra`), with trl's value (timings aside)."""
    assert len(ours) == len(theirs) and len(theirs) == 5  # 2 train logs, 2 evaluations, the run's summary
    for i, (o, t) in enumerate(zip(ours, theirs)):
        missing = set(t) - set(o)
        assert not missing, f"log record {i}: trl logs {sorted(missing)}, SSAPOTrainer does not"
        for key, value in t.items():
            if not key.endswith(TIMING):
                assert o[key] == pytest.approx(value, rel=1e-6, abs=1e-12), f"log record {i}: {key}"
        if "loss" in t:
            assert set(extra) <= set(o), f"log record {i}: no {sorted(set(extra) - set(o))}"


@pytest.fixture(scope="module")
def trl_logs(tmp_path_factory):
    logs = run(DPOTrainer, tmp_path_factory.mktemp("trl"), rows())
    # the comparison is not vacuous: trl 1.16 logs these, in training and in evaluation
    assert TRL_METRICS <= set(logs[0]) and {f"eval_{k}" for k in TRL_METRICS} <= set(logs[1])
    return logs


@pytest.mark.parametrize(
    "loss, atoms, extra",
    [("dpo", None, ()), ("shift_prob", ZERO, ("leader/clamped_fraction", "leader/atoms"))],
)
def test_logs_every_trl_metric_with_trls_values(tmp_path, trl_logs, loss, atoms, extra):
    ours = run(SSAPOTrainer, tmp_path, rows(atoms), leader_loss=loss)
    assert_logs_like_trl(ours, trl_logs, extra)
    if loss == "shift_prob":  # ε = 0 atoms: one atom of mass 1 per pair, none clamped, 2 pairs per step
        assert [r["leader/atoms"] for r in ours if "loss" in r] == [2, 4]
        assert [r["leader/clamped_fraction"] for r in ours if "loss" in r] == [0.0, 0.0]


def test_mixture_of_experts_logs_trls_aux_loss(tmp_path):
    theirs = run(DPOTrainer, tmp_path / "trl", rows(), build=tiny_mixtral)
    assert "aux_loss" in theirs[0] and "eval_aux_loss" in theirs[1]  # trl 1.16 logs it on this model
    ours = run(SSAPOTrainer, tmp_path / "ours", rows(), build=tiny_mixtral, leader_loss="dpo")
    assert_logs_like_trl(ours, theirs)  # aux_loss's value and the loss it is added to included
    assert ours[0]["aux_loss"] > 0
