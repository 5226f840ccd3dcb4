"""Mid-round checkpoints of SSAPOTrainer on a tiny Llama: a run stopped after a
checkpoint (an exception after step 5, or a real SIGKILL of a subprocess in the
middle of writing a checkpoint) and resumed from `last_checkpoint` ends with
the same weights, to the bit, as an uninterrupted run (optimizer, scheduler,
RNG with dropout on, data order across an epoch boundary, leader_stats, the
precomputed reference log-probs); incomplete checkpoints are never resumed
from; two gloo processes (torchrun, CPU) share one reference log-prob cache
(trl's in-memory cache name made rank 1 read a file never written), write
per-rank checkpoint parts, save through `save_trained`, and fail together when
the writer fails; and `ddp_timeout` reaches the process group.

This file is also the launched worker: `python tests/trainer/test_checkpoint.py WORK_DIR`
(killed), `... timeout OUT 1`, `... ddp OUT` (under torch.distributed.run).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "a b c d e f g h i j".split()
BASE = [
    {"prompt": "a b ", "chosen": "c d", "rejected": "e f"},
    {"prompt": "b c ", "chosen": "d e", "rejected": "g h i"},
    {"prompt": "c d ", "chosen": "e f g", "rejected": "h i"},
    {"prompt": "d e ", "chosen": "f g", "rejected": "i j"},
]
STEPS = 7  # 8 pairs in batches of 2: 4 steps an epoch, so the run crosses an epoch boundary


def _rows(base=BASE * 2):
    from datasets import Dataset

    atoms = [{"shift": [0.0, 0.6], "mass": [0.25, 0.75]}, {"shift": [0.0, 0.1], "mass": [0.5, 0.5]}]
    return Dataset.from_list([{**r, **atoms[i % 2]} for i, r in enumerate(base)])


class _StepLog:
    """State outside model and optimizer that changes every step (as a re-solved atom table)."""

    def __init__(self):
        self.steps = []

    def state_dict(self):
        return {"steps": torch.tensor(self.steps, dtype=torch.int64)}

    def load_state_dict(self, state):
        self.steps = state["steps"].tolist()


def _trainer(out, callbacks=(), seed=0, rows=None):
    """The same trainer every time: tiny Llama from seed 0 with attention
    dropout (so the RNG matters), shift_prob atoms (so the leader's counters do)."""
    from ssapo.tiny import build_tokenizer, tiny_args, tiny_llama
    from ssapo.trainer import SSAPOConfig, SSAPOTrainer

    torch.set_num_threads(1)
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=seed)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    args = tiny_args(
        SSAPOConfig,
        out,
        max_steps=STEPS,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=2,
        leader_loss="shift_prob",
        warmup_steps=1,
        lr_scheduler_type="linear",
        precompute_ref_log_probs=True,
    )
    from transformers import TrainerCallback

    log = _StepLog()

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            log.steps.append(state.global_step)

    tr = SSAPOTrainer(
        model,
        args=args,
        train_dataset=rows if rows is not None else _rows(),
        processing_class=tok,
        callbacks=[Record(), *callbacks],
    )
    tr.add_checkpoint_state("steplog", log)
    tr.step_log = log
    return tr


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tr = _trainer(tmp_path_factory.mktemp("whole"))
    tr.train()
    return tr


def _same_run(resumed, whole):
    a, b = _params(resumed), _params(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.state.global_step == whole.state.global_step == STEPS
    for key in ("loss_history", "grad_norms", "clamped_atoms", "atoms", "max_grad_norm"):
        assert resumed.leader_stats[key] == whole.leader_stats[key], key
    assert resumed.step_log.steps == whole.step_log.steps == list(range(1, STEPS + 1))  # add_checkpoint_state
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert list(resumed.train_dataset[col]) == list(whole.train_dataset[col])


class _Stop(Exception):
    pass


def test_resume_after_an_exception_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    from transformers import TrainerCallback

    from ssapo.checkpoints import last_checkpoint

    class StopAfter5(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:  # after checkpoint-4, before checkpoint-6: step 5 is lost
                raise _Stop

    first = _trainer(tmp_path, [StopAfter5()])
    with pytest.raises(_Stop):
        first.train()
    ckpt = last_checkpoint(tmp_path)
    assert ckpt == str(tmp_path / "checkpoint-4")
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert not all(torch.equal(p, q) for p, q in zip(_params(first).values(), _params(uninterrupted).values()))
    # the weights the resumed trainer starts from are the start model's: the checkpoint's are loaded in train()
    resumed = _trainer(tmp_path)
    assert list(resumed.train_dataset["ref_chosen_logps"]) == list(first.train_dataset["ref_chosen_logps"])
    resumed.train(resume_from_checkpoint=ckpt)
    _same_run(resumed, uninterrupted)
    caches = [f for f in os.listdir(tmp_path / "ref_logps") if f.startswith("train-")]
    assert len(caches) == 1  # one file, shared by the ranks, read again on resume
    # save_total_limit: the newest two (transformers also saves the last step), rotated once complete
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-6", "checkpoint-7"]


def test_incomplete_checkpoints_are_not_resumed_from(tmp_path):
    from ssapo.checkpoints import CHECKPOINT_MARKER, last_checkpoint

    assert last_checkpoint(tmp_path / "missing") is None
    assert last_checkpoint(tmp_path) is None
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "checkpoint-8").write_text("not a directory")
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-2" / CHECKPOINT_MARKER).write_text(json.dumps({"global_step": 2}))
    (tmp_path / "checkpoint-4" / CHECKPOINT_MARKER).write_text(json.dumps({"global_step": 4}))
    (tmp_path / "checkpoint-6" / CHECKPOINT_MARKER).write_text(json.dumps({"global_step": 2}))  # copied, not its own
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / CHECKPOINT_MARKER).write_text('{"global_st')  # cut short
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    tr = _trainer(tmp_path / "run")
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: .*checkpoint-4 is not a complete"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: no complete checkpoint in "):
        tr.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match=r"^name: "):
        tr.add_checkpoint_state("a/b", _StepLog())
    with pytest.raises(ValueError, match=r"^obj: needs state_dict\(\) and load_state_dict"):
        tr.add_checkpoint_state("x", object())


def test_resuming_another_run_is_refused(tmp_path):
    from ssapo.checkpoints import last_checkpoint

    first = _trainer(tmp_path)
    first.args.max_steps = 2
    first.train()
    ckpt = last_checkpoint(tmp_path)
    assert ckpt == str(tmp_path / "checkpoint-2")
    # another start model (as when a resumed trainer is built from the checkpoint's weights): another reference
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: .*another reference model's weights"):
        _trainer(tmp_path, seed=1).train(resume_from_checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint: .*another train_dataset"):
        _trainer(tmp_path, rows=_rows(BASE[::-1] * 2)).train(resume_from_checkpoint=ckpt)


def worker(work: str) -> None:
    """Trains with checkpoints and SIGKILLs itself while writing checkpoint-4's
    completion marker: weights, optimizer and trainer state of step 4 are on
    disk, the marker is not, and checkpoint-2 was not rotated away."""
    import ssapo.checkpoints as trainer_mod

    real = trainer_mod.write_json

    def write_json(path, obj):
        if os.path.basename(path) == trainer_mod.CHECKPOINT_MARKER and obj["global_step"] == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, obj)

    trainer_mod.write_json = write_json
    _trainer(work).train()


def test_resume_after_sigkill_mid_checkpoint_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    from ssapo.checkpoints import last_checkpoint

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [os.path.join(os.path.dirname(os.path.dirname(HERE)), "python"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, timeout=600, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert {"trainer_state.json", "optimizer.pt", "model.safetensors"} <= set(os.listdir(tmp_path / "checkpoint-4"))
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")  # checkpoint-4 is incomplete
    resumed = _trainer(tmp_path)
    resumed.train(resume_from_checkpoint=last_checkpoint(tmp_path))
    _same_run(resumed, uninterrupted)
    assert last_checkpoint(tmp_path) == str(tmp_path / f"checkpoint-{STEPS}")  # the last step is saved too


# -- ddp_timeout reaches the process group ---------------------------------------------------


def timeout_worker(out: str, use_cpu: str) -> None:
    import torch.distributed as dist
    from accelerate import PartialState

    from ssapo.trainer import SSAPOConfig

    args = SSAPOConfig(
        output_dir=out, use_cpu=use_cpu == "1", bf16=False, report_to="none", ddp_timeout=1234, leader_loss="dpo"
    )
    args.device  # noqa: B018  sets up the process group
    state = PartialState()
    pg = dist.group.WORLD._get_backend(torch.device("cpu"))
    with open(os.path.join(out, f"rank{state.process_index}.json"), "w") as f:
        json.dump(
            {
                "timeout": pg.options._timeout.total_seconds(),
                "num_processes": state.num_processes,
                "process_index": state.process_index,
                "world_size": args.world_size,
            },
            f,
        )
    dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_timeout_reaches_the_process_group(tmp_path):
    # use_cpu (gloo), the path transformers leaves at torch's default timeout and SSAPOConfig sets; on GPUs
    # transformers hands ddp_timeout to accelerate itself. (Without use_cpu on a machine without GPUs,
    # accelerate builds a group but reports one process: not a configuration ssapo runs.)
    use_cpu = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        os.path.abspath(__file__),
        "timeout",
        str(tmp_path),
        use_cpu,
    ]
    proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [s["process_index"] for s in seen] == [0, 1]
    assert all(s["timeout"] == 1234 and s["num_processes"] == 2 and s["world_size"] == 2 for s in seen)


def ddp_worker(out: str) -> None:
    """One of two gloo processes: train with checkpoints, save_trained, report."""
    import torch.distributed as dist

    from ssapo.checkpoints import save_trained

    tr = _trainer(os.path.join(out, "work"))
    tr.args.max_steps = 4
    tr.train()
    final = save_trained(tr, os.path.join(out, "final"))
    rank = tr.args.process_index
    if rank == 0:  # the writer fails (no weights written): every rank raises, none waits at a barrier
        tr.save_model = lambda output_dir, _internal_call=False: tr.processing_class.save_pretrained(output_dir)
    try:
        save_trained(tr, os.path.join(out, "failed"))
        failure = None
    except (ValueError, RuntimeError) as e:
        failure = f"{type(e).__name__}: {e}"
    report = {
        "failure": failure,
        "num_processes": tr.accelerator.num_processes,
        "final_exists": os.path.isdir(final),
        "ref_chosen": list(tr.train_dataset["ref_chosen_logps"]),
        "params": {n: p.detach().double().sum().item() for n, p in tr.model.named_parameters()},
        "loss_history": tr.leader_stats["loss_history"],
    }
    with open(os.path.join(out, f"ddp{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()


def test_two_processes_share_the_reference_cache_checkpoint_and_save(tmp_path):
    from safetensors.torch import load_file

    from ssapo.checkpoints import LEADER_STATE, last_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        os.path.abspath(__file__),
        "ddp",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, timeout=600, capture_output=True, text=True)
    # before the fix rank 1 raised FileNotFoundError on a cache-*.arrow in its own temp directory
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"ddp{r}.json")) for r in (0, 1))
    assert r0["num_processes"] == r1["num_processes"] == 2 and r0["final_exists"] and r1["final_exists"]
    assert r0["ref_chosen"] == r1["ref_chosen"] and len(r0["ref_chosen"]) == 8
    assert r0["params"] == r1["params"] and r0["loss_history"] == r1["loss_history"] and len(r0["loss_history"]) == 4
    ckpt = last_checkpoint(tmp_path / "work")
    assert ckpt == str(tmp_path / "work" / "checkpoint-4")
    assert all((tmp_path / "work" / "checkpoint-4" / LEADER_STATE.format(r)).exists() for r in (0, 1))
    assert json.load(open(os.path.join(ckpt, "ssapo_checkpoint.json")))["num_processes"] == 2
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert {k: v.double().sum().item() for k, v in saved.items()} == {k: r0["params"][k] for k in saved}
    assert [f for f in os.listdir(tmp_path) if "tmp" in f or "old" in f or f == "failed"] == []
    assert r0["failure"].startswith("ValueError: trainer: save_model wrote no safetensors weights")
    assert r1["failure"].startswith("RuntimeError: save_trained: the main process failed to save ")


if __name__ == "__main__":
    if sys.argv[1] == "timeout":
        timeout_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "ddp":
        ddp_worker(sys.argv[2])
    else:
        worker(sys.argv[1])
