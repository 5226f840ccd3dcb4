"""The precision probe through `ssapo train` itself: DeepSpeed ZeRO-3 with bf16 on two CPU processes
(recipes/accelerate/zero3_cpu.yaml, `--bf16 --no-use-cpu`), from the task's fp32 SFT model (whose weights bf16
cannot hold), at learning rates too small to move any fp32 weight (1e-30: an Adam step moves a weight by about
the learning rate, far below the fp32 ulp of any weight here). Every stage's saved weights (seed/model,
round_1/model) must equal the start bit for bit.

Without `ssapo.engines.restore_fp32_start` they do not: zero.Init builds the policy as bf16 partitions and the
ZeRO-3 optimizer builds its fp32 master weights from those, so each stage starts (and, at this learning rate,
ends) at the bf16 rounding of its start. The run's data steps (annotation, evaluation) load bf16 models on the
CPU; its training steps run DeepSpeed's bf16 on CPU processes.

The launch runs only where `deepspeed` and `ninja` are installed (skipped with the reason otherwise), as
tests/distributed/test_zero3_cpu.py. Below it, without processes: bf16 without a GPU is refused at start-up outside DeepSpeed
(one line naming bf16, before any step), by SSAPOConfig too, and the restore's reads of a rank's part of a tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_engines, run as a worker too
import time

import cpu_engines  # noqa: E402
import pytest

_MISSING = cpu_engines.MISSING
needs_deepspeed = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs {' and '.join(_MISSING)} (pip install deepspeed ninja)"
)
TINY_LR = "1e-30"


def _weights(d: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.mark.multiprocess
@needs_deepspeed
@pytest.mark.timeout(900)
def test_zero3_bf16_stages_keep_the_fp32_start_bit_for_bit(tmp_path):
    import torch

    from ssapo.bench.task import prepare_task
    from ssapo.config import recipe_path

    task = prepare_task(str(tmp_path / "task"), seed=42, size="test")
    start = _weights(task["sft_model"])
    # the start is fp32 that bf16 cannot hold: a bf16 rounding of it would show
    values = sum(v.numel() for v in start.values())
    held = sum(int((v.to(torch.bfloat16).float() == v).sum()) for v in start.values())
    assert all(v.dtype == torch.float32 for v in start.values()) and held < 0.01 * values, (held, values)
    assert not any(bool((v == 0).any()) for v in start.values())  # a step of 1e-30 moves only a weight at 0

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ssapo.cli",
        "train",
        "--config",
        recipe_path("tiny"),  # the tiny preset's recipe, on the task built above
        f"--model={task['sft_model']}",
        f"--preference-data={task['preferences']}",
        f"--prompt-data={task['prompts']}",
        f"--output-dir={out}",
        "--num-processes=2",
        "--accelerate-config=zero3_cpu",
        "--bf16",
        "--no-use-cpu",
        "--seed-size=16",
        "--round-sizes=16",
        "--num-rounds=1",
        "--num-samples=2",
        "--max-new-tokens=4",
        # the task's gold reward ranks the samples: the implicit reward log π_0 − log π_init is 0 for every
        # response when the seed stage does not move (every prompt would tie, and no pair would be left)
        "--annotator=ssapo.bench.oracle:gold_annotator",
        f"--annotator-args={task['task']}",
        "--seed-epochs=1",
        "--batch-size=16",  # 8 per process: one optimizer step per stage
        "--warmup-ratio=0",  # the step runs at the learning rate itself
        f"--seed-learning-rate={TINY_LR}",
        f"--learning-rate={TINY_LR}",
        # the seed's 16 pairs and the micro-batch of 8: one reference forward per rank, the case that broke
        # DeepSpeed's ZeRO-3 parameter trace before the precompute engine was destroyed after its pass
        # (tests/distributed/test_zero3_precompute.py)
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, env=cpu_engines.env(), capture_output=True, text=True, timeout=840)
    seconds = time.time() - t0
    assert proc.returncode == 0, f"ssapo train failed ({proc.returncode}, {seconds:.0f} s):\n{proc.stderr[-6000:]}"
    done = json.loads((out / "state.json").read_text())["done"]
    assert "seed" in done and "round_1/lead" in done, done
    for stage in ("seed", "round_1"):
        saved = _weights(str(out / stage / "model"))
        assert set(start) <= set(saved), sorted(set(start) - set(saved))
        for k, v in start.items():
            assert saved[k].dtype == torch.float32, (stage, k, saved[k].dtype)
            moved = int((saved[k] != v).sum())
            rounded = bool(torch.equal(saved[k], v.to(torch.bfloat16).float()))
            assert moved == 0, f"{stage}/model {k}: {moved} of {v.numel()} values differ (bf16 rounding: {rounded})"
    restored = {}
    for stage, metrics in (("seed", out / "seed" / "metrics.json"), ("round_1", out / "round_1" / "metrics.json")):
        leader = json.loads(metrics.read_text())["leader"]
        # the stage ran DeepSpeed's bf16 (the restore counts only there) and set every parameter's fp32 master
        restored[stage] = leader["fp32_start_restored"]
        assert leader["steps"] >= 1 and leader["processes"] == 2, leader
    assert restored == {"seed": len(start), "round_1": len(start)}, restored


# the ZeRO-2 launch: this file is also its worker (`accelerate launch ... tests/distributed/test_precision_zero3.py WORK`)
WORDS = "a b c d e f g h i j".split()
PAIRS = [
    {"prompt": "a b ", "chosen": "c d", "rejected": "e f"},
    {"prompt": "b c ", "chosen": "d e", "rejected": "g h i"},
    {"prompt": "c d ", "chosen": "e f g", "rejected": "h i"},
    {"prompt": "d e ", "chosen": "f g", "rejected": "i j"},
]
ZERO2 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_multinode_launcher: standard
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero_stage: 2
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
use_cpu: false
"""


def zero2_worker(work: str) -> None:
    """One process of the ZeRO-2 launch: SSAPOTrainer(bf16=True) under DeepSpeed ZeRO-2 on CPU, 2 steps at lr
    1e-30 from the fp32 start in WORK/init, then save_trained (the fp32 master weights) to WORK/saved."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssapo.checkpoints import save_trained
    from ssapo.trainer import SSAPOConfig, SSAPOTrainer

    torch.set_num_threads(1)
    args = SSAPOConfig(
        output_dir=os.path.join(work, "train"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        learning_rate=float(TINY_LR),
        lr_scheduler_type="constant",
        warmup_steps=0,
        report_to="none",
        use_cpu=False,
        bf16=True,  # no GPU: allowed under a DeepSpeed launch (DeepSpeed's bf16 on CPU processes)
        save_strategy="no",
        beta=0.1,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        leader_loss="dpo",
        max_length=32,
        ddp_timeout=300,
    )
    state = PartialState()
    init = os.path.join(work, "init")
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    trainer = SSAPOTrainer(
        model, args=args, train_dataset=Dataset.from_list(PAIRS * 2), processing_class=tok, start_weights=init
    )
    trainer.train()
    save_trained(trainer, os.path.join(work, "saved"))  # every rank: the fp32 masters, gathered
    engine = trainer.model_wrapped
    report = {
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": bool(engine.bfloat16_enabled()),
        "module_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "restored": trainer.fp32_start_restored,
        "steps": trainer.state.global_step,
    }
    with open(os.path.join(work, f"rank{state.process_index}.json"), "w") as f:
        json.dump(report, f)


@pytest.mark.multiprocess
@needs_deepspeed
@pytest.mark.timeout(600)
def test_zero2_bf16_stage_keeps_the_fp32_start_and_saves_its_masters(tmp_path):
    """ZeRO-1/2 loses the same way (the engine casts the module to bf16, the optimizer copies its bf16
    partitions to fp32): restored through DeepSpeed's `_hp_mapping` fragments, each rank its own; save_trained
    gathers the masters (every rank joins each all-reduce, also for a parameter it holds no fragment of)."""
    import torch

    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    work = str(tmp_path)
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)
    with torch.no_grad():  # no weight exactly 0 (the padding row): a step of 1e-30 would move it
        for p in model.parameters():
            p.masked_fill_(p == 0, 1e-3)
    save_pretrained(model, tok, os.path.join(work, "init"))
    start = _weights(os.path.join(work, "init"))
    values = sum(v.numel() for v in start.values())
    held = sum(int((v.to(torch.bfloat16).float() == v).sum()) for v in start.values())
    assert held < 0.01 * values, (held, values)  # the start is not bf16-representable
    assert not any(bool((v == 0).any()) for v in start.values())
    config = tmp_path / "zero2.yaml"
    config.write_text(ZERO2)
    proc = cpu_engines.launch(
        __file__, [work], config=["--config_file", str(config)], mixed_precision="bf16", timeout=540
    )
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    reps = [json.load(open(os.path.join(work, f"rank{i}.json"))) for i in range(2)]
    for r in reps:
        assert r["zero_stage"] == 2 and r["bf16"] and r["module_dtypes"] == ["torch.bfloat16"] and r["steps"] == 2, r
    saved = _weights(os.path.join(work, "saved"))
    for k, v in start.items():
        assert saved[k].dtype == torch.float32, (k, saved[k].dtype)
        moved = int((saved[k] != v).sum())
        rounded = bool(torch.equal(saved[k], v.to(torch.bfloat16).float()))
        assert moved == 0, f"{k}: {moved} of {v.numel()} values differ (bf16 rounding: {rounded})"
    # every parameter's fp32 master was set from the file on the rank(s) holding a fragment of it
    assert sum(r["restored"] for r in reps) >= len(start), reps


def test_bf16_without_a_gpu_is_refused_at_start_up_outside_deepspeed(tmp_path, monkeypatch):
    """`ssapo train --bf16 --no-use-cpu` without a GPU and without a DeepSpeed engine: one line naming bf16, exit
    2, before any step (no run directory); check_bf16 lets it through only under DeepSpeed or with a GPU."""
    import torch

    from ssapo.accelerate_configs import check_bf16
    from ssapo.config import RunConfig
    from ssapo.errors import ConfigError

    cfg = RunConfig(model="x", bf16=True, use_cpu=False)
    with pytest.raises(ConfigError, match=r"^bf16: needs a GPU .*zero3_cpu"):
        check_bf16(cfg, "NO", 0)
    with pytest.raises(ConfigError, match=r"^bf16: "):
        check_bf16(cfg, "MULTI_GPU", 0)
    check_bf16(cfg, "DEEPSPEED", 0)  # DeepSpeed's bf16 on CPU processes
    check_bf16(cfg, "NO", 1)  # a GPU
    check_bf16(RunConfig(model="x", bf16=False, use_cpu=True), "NO", 0)
    if torch.cuda.is_available():
        return  # the command below needs a machine without a GPU
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env.pop("SSAPO_ACCELERATE_LAUNCHED", None)
    (tmp_path / "sft").mkdir()  # a model directory (one that is not is refused first, naming --model)
    cmd = [sys.executable, "-m", "ssapo.cli", "train", f"--model={tmp_path / 'sft'}", f"--output-dir={out}"]
    r = subprocess.run([*cmd, "--bf16", "--no-use-cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.startswith("ssapo train: error: bf16: needs a GPU") and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


def test_ssapo_config_refuses_bf16_without_a_gpu_outside_deepspeed(monkeypatch):
    import torch

    from ssapo.trainer import SSAPOConfig

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ValueError, match=r"^bf16: needs a GPU with bf16, or an accelerate launch with DeepSpeed"):
        SSAPOConfig(output_dir="unused", bf16=True, use_cpu=False, report_to="none")


def test_read_flat_reads_a_ranks_part_of_a_tensor(tmp_path):
    """restore_fp32_start's reads: elements [start, start+numel) of the flattened tensor, from the rows that hold
    them, as float32; ranges inside a row, across rows, at the end, empty; 1-D and 3-D tensors."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ssapo.engines import _read_flat

    tensors = {
        "w": torch.randn(7, 5),
        "b": torch.randn(11),
        "c": torch.randn(3, 2, 4, dtype=torch.float64),
    }
    path = str(tmp_path / "m.safetensors")
    save_file(tensors, path)
    with safe_open(path, framework="pt") as h:
        for key, t in tensors.items():
            flat = t.reshape(-1).float()
            n = flat.numel()
            for start, numel in ((0, n), (0, 1), (3, 4), (4, 9), (n - 6, 6), (n - 1, 1), (2, 0), (n // 2, n - n // 2)):
                got = _read_flat(h, key, start, numel)
                assert got.dtype == torch.float32 and torch.equal(got, flat[start : start + numel]), (key, start, numel)


if __name__ == "__main__":
    zero2_worker(sys.argv[1])
    cpu_engines.finish()
