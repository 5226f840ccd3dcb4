"""DeepSpeed ZeRO-3 on CPU, two processes (accelerate launch, gloo): SSAPOTrainer
trains a few steps of a tiny Llama loaded under zero.Init, every process sees the
real world (2 processes, ranks 0 and 1, DEEPSPEED), and `trainer.save_model`
writes the full gathered weights (not ZeRO-3's empty partitions), moved from
the start.

Runs only where `deepspeed` and `ninja` are installed (skipped with the reason
otherwise). Needs DS_ACCELERATOR=cpu (set here) and, without a GPU, the backend
given to accelerate: `SSAPOConfig(ddp_backend="gloo")` (see
recipes/accelerate/zero3_cpu.yaml). This file is also the launched worker:
`accelerate launch ... tests/test_zero3_cpu.py WORK_DIR`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORDS = "a b c d e f g h i j".split()
PAIRS = [
    {"prompt": "a b ", "chosen": "c d", "rejected": "e f"},
    {"prompt": "b c ", "chosen": "d e", "rejected": "g h i"},
    {"prompt": "c d ", "chosen": "e f g", "rejected": "h i"},
    {"prompt": "d e ", "chosen": "f g", "rejected": "i j"},
]
STEPS = 2


def _recipe() -> str:
    from ssapo.config import RECIPES_DIR

    return os.path.join(RECIPES_DIR, "accelerate", "zero3_cpu.yaml")


def worker(work: str) -> None:
    """One process of the launch: load, train STEPS steps under ZeRO-3, save, report."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssapo.trainer import SSAPOConfig, SSAPOTrainer

    torch.set_num_threads(1)
    args = SSAPOConfig(
        output_dir=os.path.join(work, "train"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, report_to="none",
        use_cpu=False, bf16=False, logging_steps=1, save_strategy="no", beta=0.1, seed=0, data_seed=0,
        disable_tqdm=True, leader_loss="shift_prob", max_length=32,
        ddp_backend="gloo",  # without a GPU accelerate finds no backend for a DeepSpeed launch
        ddp_timeout=300,
    )
    state = PartialState()
    tok = AutoTokenizer.from_pretrained(os.path.join(work, "init"))
    # after the DeepSpeed TrainingArguments: from_pretrained builds the model partitioned (zero.Init)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "init"), dtype=torch.float32)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    local_numel = sum(p.numel() for p in model.parameters())
    rows = [{**r, "shift": [0.0, 0.05 * (i % 3)], "mass": [0.8, 0.2]} for i, r in enumerate(PAIRS * 4)]
    trainer = SSAPOTrainer(model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    trainer.save_model(os.path.join(work, "saved"))  # every rank: gathers the 16-bit weights to rank 0
    try:  # the loop's own save path (model card, atomic rename), where this version of ssapo has it
        from ssapo.trainer import save_trained
    except ImportError:
        save_trained = None
    if save_trained is not None:
        save_trained(trainer, os.path.join(work, "saved_trained"))
    report = {
        "num_processes": state.num_processes, "process_index": state.process_index,
        "distributed_type": str(state.distributed_type), "accelerator_num_processes": trainer.accelerator.num_processes,
        "accelerator_process_index": trainer.accelerator.process_index,
        "is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else None,
        "dist_rank": dist.get_rank() if dist.is_initialized() else None,
        "dist_backend": dist.get_backend() if dist.is_initialized() else None,
        "loaded_partitioned": partitioned, "local_numel_after_load": local_numel,
        "loss_history": trainer.leader_stats.get("loss_history"), "global_step": trainer.state.global_step,
    }
    with open(os.path.join(work, f"rank{state.process_index}_of_{state.num_processes}.json"), "w") as f:
        json.dump(report, f, indent=1)


def build_init(path: str):
    """The start model, saved (safetensors + tokenizer); returns its state dict."""
    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)
    save_pretrained(model, tok, path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def launch(work: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1",
           # torch's JIT build runs `ninja` from PATH: the one installed beside this interpreter (a venv's bin)
           "PATH": os.pathsep.join(filter(None, [os.path.dirname(sys.executable), os.environ.get("PATH")]))}
    env.pop("SSAPO_ACCELERATE_LAUNCHED", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", _recipe(), "--num_processes", "2",
           "--main_process_port", str(_free_port()), os.path.abspath(__file__), work]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    worker(sys.argv[1])
    sys.exit(0)

# ---------------------------------------------------------------- the test
import importlib.util  # noqa: E402

import pytest  # noqa: E402

_MISSING = [m for m in ("deepspeed", "ninja") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(bool(_MISSING), reason=f"needs {' and '.join(_MISSING)} (pip install deepspeed ninja)"),
]


def test_zero3_cpu_recipe_is_deepspeed_stage3_without_use_cpu():
    import yaml

    conf = yaml.safe_load(open(_recipe()))
    assert conf["distributed_type"] == "DEEPSPEED" and conf["deepspeed_config"]["zero_stage"] == 3
    assert conf["deepspeed_config"]["zero3_save_16bit_model"] is True  # save_model gathers the weights
    assert conf["use_cpu"] is False  # with use_cpu accelerate skips DeepSpeed


@pytest.mark.timeout(1200)
def test_zero3_two_cpu_processes_train_and_save_full_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    work = str(tmp_path)
    init = build_init(os.path.join(work, "init"))
    proc = launch(work)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    reports = sorted(f for f in os.listdir(work) if f.startswith("rank"))
    # every process saw the real world: 2 processes, ranks 0 and 1, DeepSpeed
    assert reports == ["rank0_of_2.json", "rank1_of_2.json"], (reports, proc.stderr[-4000:])
    reps = [json.load(open(os.path.join(work, f))) for f in reports]
    for i, r in enumerate(reps):
        assert (r["num_processes"], r["process_index"]) == (2, i)
        assert (r["accelerator_num_processes"], r["accelerator_process_index"]) == (2, i)
        assert (r["dist_world_size"], r["dist_rank"], r["dist_backend"]) == (2, i, "gloo")
        assert r["distributed_type"].endswith("DEEPSPEED") and r["is_deepspeed_enabled"]
        # from_pretrained after the DeepSpeed config built the model partitioned (zero.Init)
        assert r["loaded_partitioned"] and r["local_numel_after_load"] == 0, r
        assert r["global_step"] == STEPS and len(r["loss_history"]) == STEPS
    assert reps[0]["loss_history"] == reps[1]["loss_history"]  # the mean over ranks, the same on both
    # the saved model holds the full weights, gathered from both partitions, and they moved
    from transformers import AutoModelForCausalLM

    outs = ["saved"] + (["saved_trained"] if os.path.isdir(os.path.join(work, "saved_trained")) else [])
    for out in outs:
        d = os.path.join(work, out)
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        assert files, (out, os.listdir(d))
        saved = {}
        for f in files:
            saved.update(load_file(os.path.join(d, f)))
        expected = {k for k in init if k != "lm_head.weight"}  # tied to the embeddings
        assert expected <= set(saved), (out, sorted(expected - set(saved)))
        for k in expected:
            assert saved[k].shape == init[k].shape and saved[k].numel() > 0, (out, k, saved[k].shape, init[k].shape)
            assert torch.isfinite(saved[k]).all(), (out, k)
        moved = [k for k in expected if not torch.equal(saved[k].float(), init[k].float())]
        assert len(moved) >= len(expected) // 2, f"{out}: only {len(moved)} of {len(expected)} tensors moved"
        # and it loads as an ordinary model again
        back = AutoModelForCausalLM.from_pretrained(d)
        assert sum(p.numel() for p in back.parameters()) == sum(v.numel() for k, v in init.items()
                                                                if k != "lm_head.weight")
    if "saved_trained" in outs:  # trl's model card naming SSAPO
        card = open(os.path.join(work, "saved_trained", "README.md")).read()
        assert "SSAPO" in card and "2502.18099" in card
    shutil.rmtree(os.path.join(work, "train"), ignore_errors=True)
