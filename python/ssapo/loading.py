"""Loading a model directory (or hub id): safetensors only, remote code only when asked.

    model, tok = load_checkpoint(path, dtype="bfloat16", device="cuda:3")   # scores or generates
    model = load_policy(path, cfg, train=True)                              # the policy a leader trains
    with unsharded_loading(): ...                                          # whole, under ZeRO-3 / FSDP

- `load_checkpoint(path, ...)`: a causal LM and its tokenizer, in the file's
  dtype or the one asked, onto one device (`device_map`, never whole in host
  memory first); what `ssapo.models.load` and `ssapo export` use.
- `load_policy_kwargs(cfg, train=...)` / `load_policy(path, cfg, train=...)`:
  the trainable policy loads in float32 (`bf16=True` then autocasts the compute
  while AdamW updates fp32 master weights; DeepSpeed and FSDP build their own
  masters from them), reference and scoring models in bfloat16 when `bf16`;
  QLoRA (`load_in_4bit`) keeps its 4-bit base. `SSAPOTrainer` refuses a
  trainable parameter in 16 bits without DeepSpeed/FSDP: at the paper's
  learning rates an Adam step is below bf16 resolution for most weights.
- `unsharded_loading()`: inside, `from_pretrained` builds whole models even in
  a process that a DeepSpeed ZeRO-3 or FSDP launch started.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

from ssapo.engines import sharding_engine
from ssapo.errors import InputError


def load_checkpoint(path: str, trust_remote_code: bool = False, dtype: Optional[str] = None, device=None):
    """Loads a causal LM and its tokenizer from a local path or hub id
    (safetensors only; no remote code unless asked). `device` (e.g. "cuda:3"):
    the weights are loaded straight onto it (`device_map={"": device}`), never
    whole in host memory first; None: on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype:
        kw["dtype"] = getattr(torch, dtype)
    if device is not None and str(device) != "cpu":
        kw["device_map"] = {"": str(device)}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:  # no such directory / hub id, no tokenizer, config or safetensors weights
        raise InputError(f"model: cannot load {path}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _flag(cfg, name, value, default):
    if value is not None:
        return value
    return getattr(cfg, name, default) if cfg is not None else default


def load_policy_kwargs(
    cfg=None,
    *,
    train: bool = True,
    bf16: Optional[bool] = None,
    load_in_4bit: Optional[bool] = None,
    trust_remote_code: Optional[bool] = None,
) -> dict:
    """`from_pretrained` keyword arguments for a model of a leader stage.

    `cfg`: anything with attributes `bf16`, `load_in_4bit`, `trust_remote_code`
    (a `RunConfig`), or None; the keyword flags override it.
    - `train=True` (the policy being trained): `dtype=torch.float32`. With
      `bf16=True` in the trainer's arguments the forward and backward run under
      bf16 autocast while AdamW updates these fp32 master weights (under
      DeepSpeed / FSDP the engine keeps its own fp32 master copy built from
      them). Never bf16 weights under plain AdamW: at lr 5e-7 a step is below
      bf16 resolution for most weights (`SSAPOTrainer` refuses them).
    - `train=True, load_in_4bit=True` (QLoRA): the 4-bit NF4 base with bf16
      compute. On one process or under DDP it loads onto this process's device
      (`device_map={"": local_process_index}`, `"cpu"` without an accelerator).
      Under a sharding engine (DeepSpeed ZeRO-3 or FSDP, read from accelerate's
      launch environment or the DeepSpeed config that `TrainingArguments`
      registered) there is no `device_map` (the engine places the model) and
      the 4-bit weights are stored in bfloat16 (`bnb_4bit_quant_storage`, the
      dtype of the rest of the model), as peft's QLoRA-with-FSDP/ZeRO-3 recipe
      does: those engines shard and gather only floating-point tensors of one
      dtype. The LoRA weights are float32 (peft's default;
      `SSAPOTrainer` puts them back after trl's bf16 cast, see
      `SSAPOTrainer._restore_fp32_adapter`).
    - `train=False` (reference, scoring, annotation: no optimizer):
      `dtype=torch.bfloat16` when `bf16`, else float32.
    Always `use_safetensors=True`; `trust_remote_code` only when asked."""
    bf16 = bool(_flag(cfg, "bf16", bf16, False))
    four_bit = bool(_flag(cfg, "load_in_4bit", load_in_4bit, False))
    kw: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": bool(_flag(cfg, "trust_remote_code", trust_remote_code, False)),
    }
    if train and four_bit:
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        sharded = sharding_engine() is not None
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            **({"bnb_4bit_quant_storage": torch.bfloat16} if sharded else {}),
        )
        kw["dtype"] = torch.bfloat16
        if not sharded:
            device = PartialState().device
            kw["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    elif train:
        kw["dtype"] = torch.float32
    else:
        kw["dtype"] = torch.bfloat16 if bf16 else torch.float32
    return kw


def load_policy(path: str, cfg=None, *, train: bool = True, **flags):
    """`AutoModelForCausalLM.from_pretrained(path, **load_policy_kwargs(cfg,
    train=train, **flags))`: the causal LM only (load the tokenizer yourself)."""
    from transformers import AutoModelForCausalLM

    kwargs = load_policy_kwargs(cfg, train=train, **flags)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # no such directory / hub id, no config or no safetensors weights in it
        raise InputError(f"model: cannot load a model from {path}: {e}") from None


@contextlib.contextmanager
def unsharded_loading():
    """Inside, `from_pretrained` builds whole models on this process: neither
    ZeRO-3's partitioned `zero.Init` (which a DeepSpeed `TrainingArguments`
    switches on for the whole process) nor FSDP's meta-device loading on the
    ranks other than 0. For a model that one process uses alone (merging an
    adapter on the main rank)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    env = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING") if k in os.environ}
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
        os.environ.update(env)
