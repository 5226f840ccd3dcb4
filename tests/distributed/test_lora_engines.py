"""LoRA and QLoRA on the paths a GPU run takes, proven where they run on CPU.

- QLoRA: trl casts the LoRA weights of a 4-bit model to bf16; SSAPOTrainer puts
  them back in fp32 (plain AdamW would drop every update below bf16
  resolution), so a 4-bit model passes the trainer's master-weight check and
  trains: a model flagged as 4-bit (the attributes trl reads), and a real
  bitsandbytes 4-bit model where bitsandbytes is installed.
- `load_policy_kwargs` for a 4-bit policy under each engine: a per-process
  `device_map` on one process / DDP / ZeRO-1/2; under ZeRO-3 or FSDP no
  `device_map` and the 4-bit weights stored in bf16.
- LoRA under DeepSpeed ZeRO-3 with gradient checkpointing, on 2 CPU processes
  (recipes/accelerate/zero3_cpu.yaml, every parameter partitioned:
  `stage3_param_persistence_threshold` 0), in fp32 and in bf16: every step runs
  the reentrant checkpointing trl asks for (transformers 5 would otherwise
  enable its non-reentrant default from `activation_checkpointing_kwargs`),
  training moves the adapter, and `save_trained` merges it into the base
  (the merged model loads and differs from the base where LoRA was applied).

This file is also the launched worker: `accelerate launch ... tests/distributed/test_lora_engines.py WORK_DIR MODE`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cpu_engines, run as a worker too
import cpu_engines  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "a b c d e f g h i j".split()
PAIRS = [
    {"prompt": "a b ", "chosen": "c d", "rejected": "e f"},
    {"prompt": "b c ", "chosen": "d e", "rejected": "g h i"},
    {"prompt": "c d ", "chosen": "e f g", "rejected": "h i"},
    {"prompt": "d e ", "chosen": "f g", "rejected": "i j"},
]
STEPS = 2
LORA_TARGETS = ["q_proj", "v_proj"]


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def _reentrant(model) -> list:
    """The `use_reentrant` of every layer's checkpointing function (transformers 5 keeps a partial per layer)."""
    found = []
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(m, "gradient_checkpointing", False):
            found.append(getattr(fn, "keywords", {}).get("use_reentrant"))
    return found


def worker(work: str, mode: str = "fp32") -> None:
    """One process of the launch: LoRA + gradient checkpointing under ZeRO-3 (every parameter partitioned),
    STEPS steps, `save_trained` with the adapter merged into the base; a report per rank."""
    import torch
    from accelerate import PartialState
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from ssapo.checkpoints import save_trained
    from ssapo.trainer import SSAPOTrainer

    torch.set_num_threads(1)
    bf16 = mode == "bf16"
    args = cpu_engines.engine_args(work, max_steps=STEPS, learning_rate=5e-2, gradient_checkpointing=True)
    args.bf16 = bf16  # as in tests/distributed/test_zero3_cpu.py: DeepSpeed's bf16 comes from the launch
    # every parameter partitioned, norms included (ZeRO-3 keeps parameters below the threshold whole by default:
    # with a tiny model nothing would be gathered and released, and the recompute would have nothing to miss)
    plugin = args.deepspeed_plugin
    plugin.deepspeed_config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
    plugin.set_deepspeed_weakref()
    state = PartialState()
    tok = AutoTokenizer.from_pretrained(os.path.join(work, "init"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "init"), dtype=torch.float32)
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    seen: dict = {"steps": []}

    class Record(TrainerCallback):
        def on_step_end(self, a, s, c, model=None, **kw):
            seen["steps"].append(_reentrant(trainer.accelerator.unwrap_model(trainer.model)))

    torch.manual_seed(0)
    trainer = SSAPOTrainer(
        model,
        args=args,
        train_dataset=load_from_disk(os.path.join(work, "data")),
        processing_class=tok,
        peft_config=_lora(),
        callbacks=[Record()],
    )
    trainer.train()
    save_trained(trainer, os.path.join(work, "merged"), base_model=os.path.join(work, "init"))
    engine = trainer.model_wrapped
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    threshold = engine._config.zero_config.param_persistence_threshold if hasattr(engine, "_config") else None
    report = {
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
        "zero_stage": zero,
        "persistence_threshold": threshold,
        "persistent_params": sum(1 for p in engine.module.parameters() if getattr(p, "ds_persist", False)),
        "loaded_partitioned": partitioned,
        "gradient_checkpointing": bool(trainer.accelerator.unwrap_model(trainer.model).is_gradient_checkpointing),
        "reentrant_steps": seen["steps"],
        "loss_history": trainer.leader_stats.get("loss_history"),
        "global_step": trainer.state.global_step,
        "bf16_enabled": bool(engine.bfloat16_enabled()),
    }
    with open(os.path.join(work, f"rank{state.process_index}_of_{state.num_processes}.json"), "w") as f:
        json.dump(report, f, indent=1)


def build(work: str) -> dict:
    """The start model (float32 safetensors + tokenizer) and the pairs, saved; returns the model's state dict."""
    from datasets import Dataset

    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)
    save_pretrained(model, tok, os.path.join(work, "init"))
    rows = [{**r, "shift": [0.0, 0.05 * (i % 3)], "mass": [0.8, 0.2]} for i, r in enumerate(PAIRS * 4)]
    Dataset.from_list(rows).save_to_disk(os.path.join(work, "data"))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def launch(work: str, mode: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return cpu_engines.launch(
        __file__, [work, mode], mixed_precision="bf16" if mode == "bf16" else "no", timeout=timeout
    )


if __name__ == "__main__":
    worker(sys.argv[1], *sys.argv[2:3])
    cpu_engines.finish()
    sys.exit(0)

# ---------------------------------------------------------------- the tests
import importlib.util  # noqa: E402

import pytest  # noqa: E402

_MISSING = cpu_engines.MISSING
needs_deepspeed = pytest.mark.skipif(
    bool(_MISSING), reason=f"needs {' and '.join(_MISSING)} (pip install deepspeed ninja)"
)


@pytest.mark.multiprocess
@needs_deepspeed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_lora_zero3_gradient_checkpointing_trains_saves_and_merges(tmp_path, mode):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    work = str(tmp_path)
    init = build(work)
    proc = launch(work, mode)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    reps = [json.load(open(os.path.join(work, f"rank{i}_of_2.json"))) for i in range(2)]
    for i, r in enumerate(reps):
        assert (r["num_processes"], r["process_index"], r["zero_stage"]) == (2, i, 3) and r["is_deepspeed_enabled"]
        # really partitioned: loaded under zero.Init, and no parameter kept whole on every rank
        assert r["loaded_partitioned"] and r["persistence_threshold"] == 0 and r["persistent_params"] == 0, r
        assert r["gradient_checkpointing"] and r["bf16_enabled"] == (mode == "bf16")
        # every step ran the reentrant checkpointing trl asks for (transformers enables checkpointing in train(),
        # from `activation_checkpointing_kwargs`: without SSAPOTrainer's alignment, non-reentrant)
        assert len(r["reentrant_steps"]) == STEPS and all(set(s) == {True} for s in r["reentrant_steps"]), r
        assert r["global_step"] == STEPS and len(r["loss_history"]) == STEPS
        assert all(x == x and abs(x) < 1e3 for x in r["loss_history"]), r["loss_history"]
    assert reps[0]["loss_history"] == reps[1]["loss_history"]
    # the merged model: full weights, no adapter keys, loads, differs from the base exactly where LoRA was applied
    merged_dir = os.path.join(work, "merged")
    saved = {}
    for f in os.listdir(merged_dir):
        if f.endswith(".safetensors"):
            saved.update(load_file(os.path.join(merged_dir, f)))
    expected = {k for k in init if k != "lm_head.weight"}  # tied to the embeddings
    assert expected <= set(saved) and not any("lora" in k for k in saved), sorted(set(saved) ^ expected)
    for k in expected:
        assert saved[k].dtype == torch.float32 and saved[k].shape == init[k].shape, k
        lora = any(t in k for t in LORA_TARGETS) and k.endswith(".weight")
        assert torch.equal(saved[k], init[k]) != lora, (k, lora)  # moved iff an adapter was merged into it
    assert os.path.isfile(os.path.join(merged_dir, "adapter", "adapter_model.safetensors"))
    back = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any(torch.equal(p, init[n]) for n, p in back.named_parameters() if "q_proj" in n)


# -- QLoRA: the adapter stays fp32 ---------------------------------------------------------------


def _qlora_trainer(tmp_path, model, tok, **kw):
    from datasets import Dataset

    from ssapo.trainer import SSAPOConfig, SSAPOTrainer

    args = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        beta=0.1,
        seed=0,
        disable_tqdm=True,
        leader_loss="dpo",
        max_length=32,
    )
    args.update(kw)
    return SSAPOTrainer(
        model,
        args=SSAPOConfig(**args),
        train_dataset=Dataset.from_list(PAIRS * 2),
        processing_class=tok,
        peft_config=_lora(),
    )


def _check_trains_an_fp32_adapter(tr):
    import torch

    trainable = {n: p for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}  # back from trl's bf16
    before = {n: p.detach().clone() for n, p in trainable.items()}
    tr.train()
    assert tr.state.global_step == 3 and all(x == x for x in tr.leader_stats["loss_history"])
    after = dict(tr.model.named_parameters())
    assert all(after[n].dtype == torch.float32 for n in before)
    moved = [n for n in before if not torch.equal(after[n].detach(), before[n])]
    assert any("lora_B" in n for n in moved), moved  # B starts at zero: only training moves it


def test_a_4bit_flagged_model_keeps_an_fp32_adapter_and_trains(tmp_path):
    """The attributes trl (`is_loaded_in_4bit`) and transformers (`quantization_method`) read: trl takes its
    quantized branch and casts the adapter to bf16; without SSAPOTrainer's restore the master-weight check
    refuses the model (the defect: QLoRA refused on every run)."""
    import torch
    from transformers.utils.quantization_config import QuantizationMethod

    from ssapo.tiny import build_tokenizer, tiny_llama

    torch.set_num_threads(1)
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)
    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    tr = _qlora_trainer(tmp_path, model, tok)
    _check_trains_an_fp32_adapter(tr)


def _bitsandbytes_4bit_on_cpu() -> str:
    """'' when bitsandbytes quantizes and runs a 4-bit layer here, else why not."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(8, 8, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer = layer.to("cpu")
        layer.weight = bnb.nn.Params4bit(torch.randn(8, 8), requires_grad=False, quant_type="nf4").to("cpu")
        layer(torch.randn(2, 8))
    except Exception as e:  # noqa: BLE001  any failure of the backend: the reason in the skip
        return f"bitsandbytes has no working 4-bit CPU backend here: {type(e).__name__}: {e}"
    return ""


@pytest.mark.parametrize("bf16", [False, True])
def test_a_real_4bit_model_trains_an_fp32_adapter(tmp_path, bf16):
    """bitsandbytes NF4 on CPU through load_policy (train=True, load_in_4bit) and peft's kbit preparation, as
    leader.train_stage does on one process: the adapter is fp32, trains a few steps under bf16 autocast and
    without it (peft's 4-bit LoRA layer casts the input to the adapter's dtype)."""
    why = _bitsandbytes_4bit_on_cpu()
    if why:
        pytest.skip(why)
    import torch
    from peft import prepare_model_for_kbit_training

    from ssapo.loading import load_policy
    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    torch.set_num_threads(1)
    tok = build_tokenizer(WORDS)
    save_pretrained(tiny_llama(tok, hidden_size=64, num_layers=2, seed=0), tok, tmp_path / "init")
    model = load_policy(str(tmp_path / "init"), train=True, load_in_4bit=True, bf16=bf16)
    assert model.is_loaded_in_4bit and type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tr = _qlora_trainer(tmp_path, model, tok, bf16=bf16)
    assert type(tr.model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # peft's
    _check_trains_an_fp32_adapter(tr)


# -- load_policy_kwargs per engine ----------------------------------------------------------------

_ENGINE_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE")


@pytest.mark.parametrize(
    "env, sharded",
    [
        ({}, False),  # one process, DDP
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds3.json"}, True),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds2.json"}, False),
        ({"ACCELERATE_USE_FSDP": "true"}, True),
    ],
    ids=["one-process-or-ddp", "zero2", "zero3", "zero3-json", "zero2-json", "fsdp"],
)
def test_4bit_load_kwargs_follow_the_engine(tmp_path, monkeypatch, env, sharded):
    """QLoRA under ZeRO-3 / FSDP (peft's recipe): no per-process device_map, the 4-bit weights stored in bf16
    (the dtype of the rest of the model); elsewhere this process's device and bitsandbytes' default storage."""
    from types import SimpleNamespace

    import torch

    from ssapo.loading import load_policy_kwargs

    for k in (*_ENGINE_ENV, "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)
    for stage in (2, 3):
        (tmp_path / f"ds{stage}.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    for k, v in env.items():
        monkeypatch.setenv(k, str(tmp_path / v) if k.endswith("CONFIG_FILE") else v)
    cfg = SimpleNamespace(bf16=True, load_in_4bit=True, trust_remote_code=False)
    kw = load_policy_kwargs(cfg, train=True)
    q = kw["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert kw["dtype"] == torch.bfloat16
    if sharded:
        assert "device_map" not in kw and q.bnb_4bit_quant_storage == torch.bfloat16, kw
    else:
        assert kw["device_map"] == {"": "cpu"} and q.bnb_4bit_quant_storage == torch.uint8, kw  # no GPU here
    # not a training policy: unchanged by the engine
    assert load_policy_kwargs(cfg, train=False) == {
        "use_safetensors": True,
        "trust_remote_code": False,
        "dtype": torch.bfloat16,
    }


def test_4bit_load_kwargs_see_the_zero3_config_of_the_training_arguments(monkeypatch):
    """TrainingArguments(deepspeed=...) registers its config (transformers' weak ref): ZeRO-3 without any
    accelerate variable is seen too."""
    import torch
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from ssapo.engines import sharding_engine
    from ssapo.loading import load_policy_kwargs

    for k in (*_ENGINE_ENV, "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)
    assert sharding_engine() is None
    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})  # noqa: F841
    try:
        assert sharding_engine() == "zero3"
        kw = load_policy_kwargs(train=True, load_in_4bit=True)
        assert "device_map" not in kw and kw["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
    finally:
        unset_hf_deepspeed_config()
    assert sharding_engine() is None
