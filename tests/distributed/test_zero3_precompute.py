"""The reference log-prob precompute under really-partitioned DeepSpeed ZeRO-3 (recipes/accelerate/zero3_cpu.yaml,
2 CPU processes), with exactly ONE precompute forward per rank (issue 16).

trl's DPOTrainer runs the precompute pass through a second DeepSpeed engine over the policy's module (an inference
engine, `prepare_deepspeed(self.model, ...)`, kept in `_precompute_engine`). Its ZeRO-3 hooks stay on the module,
and its parameter coordinator records its trace on the first forward and completes it only at the start of the
second. After exactly one forward it is left recording, its trace keyed by the modules' `ds_id`s; the training
engine, built next, renumbers every module's `ds_id` (DeepSpeed's counter runs on across engines), and at the first
training forward the precompute engine's still-registered start-of-forward hook completes its trace with the new
ids: `IndexError: pop from an empty deque` in `record_parameters`. `SSAPOTrainer._precompute_ref_logps` removes the
precompute engine's hooks after each pass (`DeepSpeedEngine.destroy`) and, once the training engine exists, runs a
later pass (`evaluate` with a new dataset) through the training engine rather than a second engine.

The launch: 16 pairs, 8 per process and per precompute forward (one forward per rank), a training step at learning
rate 0 (the weights do not move), then the same pairs again through `_precompute_ref_logps` one pair per forward
(8 forwards per rank, through the training engine); a second launch has one pair per rank (2 pairs). The reference
log-probs must agree across the passes, and with a one-process computation from the start weights.

Runs only where `deepspeed` and `ninja` are installed (skipped otherwise). This file is also the launched worker:
`accelerate launch ... tests/distributed/test_zero3_precompute.py WORK_DIR PAIRS`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_engines, run as a worker too
import time

import cpu_engines  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "a b c d e f g h i j".split()


def rows(n: int) -> list[dict]:
    return [
        {
            "prompt": f"{WORDS[i % 10]} {WORDS[(i + 1) % 10]} ",
            "chosen": f"{WORDS[(i + 2) % 10]} {WORDS[(i + 3) % 10]}",
            "rejected": " ".join(WORDS[(i + k) % 10] for k in (5, 7, 1)[: 2 + i % 2]),
        }
        for i in range(n)
    ]


def config(work: str, per_device: int):
    return cpu_engines.engine_args(
        work,
        per_device_train_batch_size=per_device,  # also the precompute's batch (precompute_ref_batch_size unset)
        max_steps=1,
        learning_rate=0.0,  # the weights stay the start: the passes after the step see the same reference
    )


def worker(work: str, n_pairs: int) -> None:
    """One process: an SSAPOTrainer whose precompute pass is one forward per rank (n_pairs / 2 pairs each), one
    training step, then the same pairs through `_precompute_ref_logps` one pair per forward; rank 0 writes both."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssapo.trainer import SSAPOTrainer

    torch.set_num_threads(1)
    state = PartialState()
    args = config(work, n_pairs // 2)
    tok = AutoTokenizer.from_pretrained(os.path.join(work, "init"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "init"), dtype=torch.float32)
    data = [{**r, "shift": [0.0, 0.05 * (i % 3)], "mass": [0.8, 0.2]} for i, r in enumerate(rows(n_pairs))]
    trainer = SSAPOTrainer(model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    first = {k: list(trainer.train_dataset[k]) for k in ("ref_chosen_logps", "ref_rejected_logps")}
    trainer.train()  # before the fix: IndexError "pop from an empty deque" at the first forward
    again = trainer._precompute_ref_logps(
        trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"]), "again", 1
    )
    report = {
        "first": first,
        "again": {k: list(again[k]) for k in ("ref_chosen_logps", "ref_rejected_logps")},
        "global_step": trainer.state.global_step,
        "precompute_engine": trainer._precompute_engine is not None,
    }
    if state.is_main_process:
        with open(os.path.join(work, "report.json"), "w") as f:
            json.dump(report, f)


def launch(work: str, n_pairs: int, timeout: int = 300) -> subprocess.CompletedProcess:
    return cpu_engines.launch(__file__, [work, n_pairs], timeout=timeout)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
    cpu_engines.finish()
    sys.exit(0)

# ---------------------------------------------------------------- the test
import pytest  # noqa: E402

_MISSING = cpu_engines.MISSING


def _reference(init: str, n_pairs: int) -> dict:
    """The reference log-probs from one process without DeepSpeed: trl's own computation (compute_ref_log_probs)
    on the start weights, one pair per forward."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssapo.trainer import SSAPOTrainer

    args = config(os.path.join(os.path.dirname(init), "one_process"), 1)
    args.use_cpu = True
    args.precompute_ref_log_probs = False
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    data = [{**r, "shift": [0.0, 0.05 * (i % 3)], "mass": [0.8, 0.2]} for i, r in enumerate(rows(n_pairs))]
    trainer = SSAPOTrainer(model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    chosen, rejected = [], []
    for i in range(n_pairs):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen.append(float(c[0]))
        rejected.append(float(r[0]))
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_MISSING), reason=f"needs {' and '.join(_MISSING)} (pip install deepspeed ninja)")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("n_pairs", [16, 2])  # 8 pairs per rank in one forward; 1 pair per rank
def test_zero3_one_precompute_forward_per_rank_trains(tmp_path, n_pairs):
    sys.path.insert(0, HERE)
    from test_zero3_cpu import build_init

    work = str(tmp_path)
    build_init(os.path.join(work, "init"))
    t0 = time.time()
    proc = launch(work, n_pairs)
    seconds = time.time() - t0
    assert proc.returncode == 0, f"launch failed ({proc.returncode}, {seconds:.0f} s):\n{proc.stderr[-6000:]}"
    rep = json.load(open(os.path.join(work, "report.json")))
    assert rep["global_step"] == 1
    assert not rep["precompute_engine"]  # torn down after each pass
    expected = _reference(os.path.join(work, "init"), n_pairs)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        first, again = rep["first"][key], rep["again"][key]
        assert len(first) == len(again) == n_pairs
        # one forward per rank (the trainer's own pass) = one pair per forward after the step (lr 0) = one process
        assert first == pytest.approx(again, rel=1e-5, abs=1e-5), key
        assert first == pytest.approx(expected[key], rel=1e-5, abs=1e-5), key
