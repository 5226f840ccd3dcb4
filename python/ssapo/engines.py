"""DeepSpeed and FSDP as a leader stage meets them: which engine shards the
model in this process, the process group of a launch without a GPU, the checks
made before trl builds the trainer, and the engines' full-precision weights.

- `sharding_engine()`: "zero3", "fsdp" or None, from the launch's environment.
- DeepSpeed with bf16 builds its fp32 masters from the bf16 module weights
  (ZeRO-3's zero.Init loads the file into bf16 partitions; ZeRO-1/2 casts the
  module): they would start at the bf16 rounding of the file.
  `SSAPOTrainer(start_weights=...)` ("auto": the model's own `name_or_path`)
  sets them to the file's exact fp32 values before the first optimizer step of
  a stage that does not resume (`restore_fp32_start`), so a stage started
  from the previous round's fp32 checkpoint loses nothing. FSDP, DDP and one
  process keep fp32 parameters and need nothing. Without a GPU, `bf16=True`
  is taken only under an accelerate launch with DeepSpeed (its bf16 on CPU
  processes: recipes/accelerate/zero3_cpu.yaml; `SSAPOConfig` sets the gloo
  backend, `cpu_deepspeed_backend`).
- `deepspeed_fp32_state_dict(trainer)`: the engine's fp32 master weights,
  gathered parameter by parameter; `full_state_dict(trainer)`: FSDP's
  FULL_STATE_DICT for one save. What `ssapo.checkpoints.save_trained` writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from datetime import timedelta
from typing import Optional

import torch
from accelerate.utils import is_peft_model

logger = logging.getLogger(__name__)


def _true(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def sharding_engine() -> Optional[str]:
    """The engine that shards the model in this process: "zero3" (DeepSpeed
    ZeRO-3: the DeepSpeed config a `TrainingArguments` has registered, or an
    `accelerate launch` whose config or DeepSpeed JSON says stage 3), "fsdp"
    (accelerate's `ACCELERATE_USE_FSDP`), else None (one process, DDP,
    ZeRO-1/2)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "zero3"
    if _true(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if stage is None and config_file:  # a DeepSpeed JSON named in the accelerate config
            try:
                with open(config_file) as f:
                    stage = str(json.load(f).get("zero_optimization", {}).get("stage"))
            except (OSError, ValueError, AttributeError):
                stage = None
        if stage == "3":
            return "zero3"
    if _true(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return "fsdp"
    return None


def init_cpu_process_group(args) -> None:
    """transformers hands `ddp_timeout` to the process group except with
    `use_cpu` (gloo): there, initialise the group with the timeout before
    accelerate's state is built (accelerate then keeps the existing group)."""
    import torch.distributed as dist

    cpu = args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    if not cpu or not dist.is_available() or dist.is_initialized():
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not {"MASTER_ADDR", "MASTER_PORT", "RANK"} <= set(os.environ):
        return
    if args.ddp_backend not in (None, "gloo"):
        return
    dist.init_process_group(backend="gloo", timeout=timedelta(seconds=args.ddp_timeout))


def deepspeed_on_cpu(args) -> bool:
    """Whether these arguments train under DeepSpeed on CPU processes: a DeepSpeed
    launch (accelerate's `ACCELERATE_USE_DEEPSPEED`, or `args.deepspeed`), no GPU,
    and not `use_cpu` (with it accelerate skips DeepSpeed altogether)."""
    if args.use_cpu or _true(os.environ.get("ACCELERATE_USE_CPU", "false")):
        return False
    if not (_true(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")) or args.deepspeed):
        return False
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def cpu_deepspeed_backend(args) -> Optional[str]:
    """ "gloo" for a DeepSpeed launch without a GPU when no `ddp_backend` was
    given, else `args.ddp_backend`. accelerate finds no backend of its own for
    DeepSpeed on CPU and then reports one process, rank 0, in every process;
    with "gloo" it builds the group through `deepspeed.init_distributed` and
    reads the real world size and rank (recipes/accelerate/zero3_cpu.yaml)."""
    if args.ddp_backend is not None:
        return args.ddp_backend
    return "gloo" if deepspeed_on_cpu(args) else None


def check_one_device_per_process(args, model) -> None:
    """trl refuses `nn.DataParallel` (several GPUs visible to one process, no
    launcher); say how to launch instead."""
    device_map = getattr(model, "hf_device_map", None) or {}
    split = len({d for d in device_map.values() if d not in ("cpu", "disk")}) > 1  # model parallel: n_gpu 1
    if not split and args.n_gpu > 1:
        raise ValueError(
            f"args: {args.n_gpu} GPUs are visible to one process that was not launched as one process per GPU "
            "(trl does not support nn.DataParallel). Run `ssapo train --num-processes N` (one process per GPU, "
            "launched with accelerate), or `accelerate launch --num_processes N ...`, or make one GPU visible "
            "with CUDA_VISIBLE_DEVICES"
        )


def reentrant_checkpointing_reaches_transformers(args, model, peft_config) -> None:
    """LoRA under DeepSpeed ZeRO-3 with gradient checkpointing: trl forces
    reentrant checkpointing (non-reentrant checkpointing rejects the frozen
    weights that ZeRO-3 partitioned again during the recompute,
    `CheckpointError ... saved [N] vs recomputed [0]`, until DeepSpeed 0.19.3,
    deepspeedai/DeepSpeed#8148). trl writes `use_reentrant=True` into a new
    `gradient_checkpointing_kwargs` dict, while transformers 5 enables
    checkpointing in `train()` from `activation_checkpointing_kwargs` (the old
    name mirrors the new one only once, in `TrainingArguments.__post_init__`):
    the model got transformers' non-reentrant default, and the reentrant
    setting came in only where trl re-enables checkpointing after a reference
    forward during training (the per-step reference of `spa`), never with the
    precomputed reference log-probs. Give both names one dict here, before
    trl: trl's write then reaches transformers, and every step runs
    reentrant."""
    plugin = getattr(args, "deepspeed_plugin", None)
    peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
    if not (peft and args.gradient_checkpointing and plugin is not None and plugin.zero_stage == 3):
        return
    kwargs = dict(args.activation_checkpointing_kwargs or args.gradient_checkpointing_kwargs or {})
    kwargs.setdefault("use_reentrant", True)  # an explicit False is trl's to warn about and override
    args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs


@contextlib.contextmanager
def full_state_dict(trainer):
    """Inside, an FSDP trainer's `save_model` writes the full (gathered, fp32) weights whatever the accelerate
    config's `fsdp_state_dict_type`: mid-round checkpoints stay SHARDED_STATE_DICT (each rank writes its own
    shard of weights and optimizer state, no gather to rank 0 every `save_steps`), the stage's final model is
    FULL_STATE_DICT (accelerate's `FullyShardedDataParallelPlugin.set_state_dict_type`, its documented
    "train with sharded, final save with full"). Nothing changes without FSDP."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    old = getattr(plugin, "state_dict_type", None)
    if plugin is None or "FULL_STATE_DICT" in str(old):
        yield
        return
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.set_state_dict_type(old)


def deepspeed_fp32_state_dict(trainer, *, trainable_only: bool = False, keep: Optional[bool] = None):
    """The full state dict of a DeepSpeed trainer's model with the engine's fp32
    master weights, on CPU, on the processes where `keep` (default: the main
    process); None on the others. EVERY process must call it (collectives, in
    the same order on every rank).

    Keys and tied weights as `state_dict()` of the unwrapped model (a tied
    parameter appears under each of its names, as one tensor). Each trainable
    parameter is the optimizer's fp32 copy, gathered over the ranks
    (`deepspeed.utils.safe_get_full_fp32_param`: ZeRO-3's fp32 partitions, or
    ZeRO-1/2's fp32 partitions of 16-bit weights); a parameter without one
    (frozen, no optimizer yet, fp32 training without a separate copy) is the
    module's own value (ZeRO-3: gathered with `deepspeed.zero.GatheredParameters`);
    persistent buffers as they are. `trainable_only`: leave out frozen
    parameters and buffers (a peft model: its adapter). One parameter at a time:
    no rank holds more than one full parameter beyond the writer's CPU copy."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    engine = trainer.model_wrapped  # the DeepSpeedEngine once train() has prepared it, else the model itself
    module = engine.module if isinstance(engine, deepspeed.DeepSpeedEngine) else engine
    keep = trainer.accelerator.is_main_process if keep is None else bool(keep)
    optimizer = getattr(engine, "optimizer", None) if isinstance(engine, deepspeed.DeepSpeedEngine) else None
    out: Optional[dict] = {} if keep else None
    seen: dict[int, str] = {}

    def has_master(p) -> bool:
        if not p.requires_grad:
            return False
        if hasattr(p, "ds_id"):  # ZeRO-3: linked to the stage-3 optimizer when that is built
            return getattr(p, "_z3_optimizer", None) is not None
        # ZeRO-1/2 and the bf16 optimizer: every trainable parameter has the attribute, None on the ranks that
        # hold none of its fp32 partition; safe_get_full_fp32_param's all-reduce needs every rank, so test for it
        return hasattr(p, "_hp_mapping")

    def visit(mod, prefix: str) -> None:
        for name, p in mod.named_parameters(recurse=False):
            if p is None:
                continue
            key = prefix + name
            if id(p) in seen:  # tied: the same tensor under both names, as in state_dict()
                if keep and seen[id(p)] in out:
                    out[key] = out[seen[id(p)]]
                continue
            seen[id(p)] = key
            if trainable_only and not p.requires_grad:
                continue
            if has_master(p):
                value = safe_get_full_fp32_param(p)  # collective: all-gather of the fp32 partitions
                if keep:
                    out[key] = value.detach().to("cpu", copy=True)
                del value
            elif hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):  # collective
                    if keep:
                        out[key] = p.detach().to("cpu", copy=True)
            elif keep:
                out[key] = p.detach().to("cpu", copy=True)
        if keep and not trainable_only:
            for name, b in mod.named_buffers(recurse=False):
                if b is not None and name not in mod._non_persistent_buffers_set:
                    out[prefix + name] = b.detach().to("cpu", copy=True)
        for name, child in mod.named_children():
            if child is not None:
                visit(child, prefix + name + ".")

    if optimizer is not None and hasattr(optimizer, "checkpoint_event_prologue"):
        optimizer.checkpoint_event_prologue()  # as DeepSpeed's own consolidation: every parameter partitioned
    try:
        visit(module, "")
    finally:
        if optimizer is not None and hasattr(optimizer, "checkpoint_event_epilogue"):
            optimizer.checkpoint_event_epilogue()
    return out


def restore_fp32_start(trainer, weights_dir, *, strict: bool = True) -> int:
    """Sets the fp32 master weights of a DeepSpeed trainer's optimizer to the
    exact float32 start values in `weights_dir` (the safetensors file(s) the
    policy was loaded from); returns how many parameters this process set (its
    partition of each under ZeRO-3, so all of them; under ZeRO-1/2 those it holds
    a fragment of), 0 when there was nothing to do. EVERY process must call it, once the engine and its
    optimizer exist and before the first optimizer step (`SSAPOTrainer` does,
    on the first `train()` that does not resume from a checkpoint: a resumed
    stage's DeepSpeed checkpoint holds its fp32 masters).

    Why: under bf16 (or fp16) DeepSpeed builds its fp32 masters from the 16-bit
    module weights, so they start as the 16-bit rounding of the file. ZeRO-3:
    `zero.Init` makes the parameters bf16 partitions as the model is built
    (`partition_parameters._set_dtype`) and the file's fp32 values are copied
    into them at load; `stage3._create_fp32_partitions` then copies those.
    ZeRO-1/2 and the bf16 optimizer: the engine casts the module to bf16
    (`_cast_module_mixed_precision`) before the optimizer copies its partitions
    to fp32 (`stage_1_and_2`: `parallel_partitioned_bit16_groups[i][p].clone()
    .to(fp32)`). Every stage (seed, each round's leader) would then start from
    the bf16 rounding of the previous stage's fp32 weights (which `save_trained`
    writes exactly): updates below half a bf16 ulp (a round at lr 1e-6) would be
    lost at every round boundary. FSDP (accelerate upcasts trainable parameters
    to fp32 before sharding them, its `MixedPrecision` casts only the compute),
    one process and DDP (fp32 parameters, bf16 autocast) keep the fp32 start.

    How: each rank reads, one tensor at a time and only the part it owns, the
    file's values of the trainable parameters whose master it holds (ZeRO-3:
    its partition of the flattened parameter, `deepspeed.utils.
    safe_set_local_fp32_param`; ZeRO-1/2: its fragment, DeepSpeed's
    `_hp_mapping`, as `safe_set_full_fp32_param` writes it), so no rank holds
    more than that in extra memory. Before anything is set, every master must
    equal the file's value rounded to the module's dtype (the model was loaded
    from this file and not changed since; then the module's 16-bit weights are
    already the rounding of the restored masters, and nothing else needs
    refreshing); the ranks agree on that with one all-reduce. A mismatch raises
    ValueError with `strict`, else leaves every master as it is (a warning).
    Tied weights are one parameter (found under any of their names); a
    parameter not in the file (or of another shape) is left as it is and
    counted in a warning. Nothing to do, 0: no DeepSpeed engine yet, no 16-bit
    module weights (fp32 training), or a peft model (its trainable parameters
    are the adapter, created at the start of training and not in the file;
    lora_B starts at zero, lora_A's random start is rounded to bf16 with the
    module, which loses nothing trained)."""
    import deepspeed
    from safetensors import safe_open

    engine = trainer.model_wrapped
    if not isinstance(engine, deepspeed.DeepSpeedEngine) or getattr(engine, "optimizer", None) is None:
        return 0
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()) or is_peft_model(engine.module):
        return 0
    directory = os.fspath(weights_dir)
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"weights_dir: no .safetensors files in {directory}")
    acc = trainer.accelerator
    with contextlib.ExitStack() as stack:
        handles = {}
        for f in files:
            h = stack.enter_context(safe_open(f, framework="pt"))
            handles.update({key: h for key in h.keys()})
        names: dict[int, list] = {}
        params = {}
        for name, p in engine.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            params[id(p)] = p
        targets, missing, differ = [], 0, []
        for pid, p in params.items():
            part = _local_master(p) if p.requires_grad else None
            if part is None:
                continue
            key = next((n for n in names[pid] if n in handles), None)
            full_shape = tuple(getattr(p, "ds_shape", p.shape))
            if key is None or tuple(handles[key].get_slice(key).get_shape()) != full_shape:
                missing += 1
                continue
            start, numel, master, _ = part
            value = _read_flat(handles[key], key, start, numel)
            dtype = p.ds_tensor.dtype if hasattr(p, "ds_id") else p.dtype
            if not torch.equal(value.to(dtype).float(), master.float().cpu()):
                differ.append(key)
            targets.append((p, key))
        n_differ = torch.tensor([len(differ)], dtype=torch.int64, device=acc.device)
        if acc.num_processes > 1:
            n_differ = acc.reduce(n_differ, reduction="sum")
        n_differ = int(n_differ.item())
        if n_differ:
            msg = (
                f"{directory} does not hold this model's start: {n_differ} parameter part(s) over the ranks are not "
                f"the file's values rounded to the module's dtype (e.g. {differ[0] if differ else 'on another rank'})"
            )
            if strict:
                raise ValueError(f"start_weights: {msg}")  # on every rank: they all know
            if acc.is_main_process:
                logger.warning("%s; the fp32 master weights keep their 16-bit start", msg)
            return 0
        for p, key in targets:
            start, numel, _, set_value = _local_master(p)
            set_value(_read_flat(handles[key], key, start, numel))
    if missing and acc.is_main_process:
        logger.warning(
            "%d trainable parameter(s) are not in %s (or have another shape): their fp32 master weights keep "
            "their 16-bit start",
            missing,
            directory,
        )
    return len(targets)


def local_weights_dir(source) -> Optional[str]:
    """The local directory holding the safetensors weights of `source` (a
    directory, or a hub id already in the local cache, as `from_pretrained`
    left it); None when there is none."""
    if not source:
        return None
    source = os.fspath(source)
    if not os.path.isdir(source):
        try:
            from huggingface_hub import snapshot_download

            source = snapshot_download(source, allow_patterns=["*.safetensors"], local_files_only=True)
        except Exception:  # noqa: BLE001  not a hub id, or not in the cache: nothing to read
            return None
    return source if any(f.endswith(".safetensors") for f in os.listdir(source)) else None


def _local_master(p):
    """(flat start, numel, this rank's fp32 master of p.flatten()[start:start+numel],
    set(value)) for a trainable parameter of a DeepSpeed model; None when this
    rank holds no master of it. ZeRO-3: the rank's partition (the last one padded:
    only its real elements are read or written); ZeRO-1/2, bf16 optimizer: the
    rank's fragment (`_hp_mapping`, possibly empty)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    if hasattr(p, "ds_id"):
        if getattr(p, "_z3_optimizer", None) is None:
            return None
        import torch.distributed as dist

        size = p.ds_tensor.ds_numel
        start = dist.get_rank(group=p.ds_process_group) * size
        numel = max(0, min(size, p.ds_numel - start))
        local = safe_get_local_fp32_param(p)

        def set_value(value):
            full = local.detach().clone()
            full[:numel] = value.to(full.device, full.dtype)
            safe_set_local_fp32_param(p, full)

        return start, numel, local[:numel], set_value
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    address, fragment = mapping.lp_fragment_address, mapping.get_hp_fragment()
    return (
        address.start,
        address.numel,
        fragment.flatten(),
        lambda value: fragment.data.copy_(value.to(fragment.device, fragment.dtype).view_as(fragment)),
    )


def _read_flat(handle, key: str, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start+numel) of tensor `key` of an open safetensors file,
    flattened, as float32, reading only the rows that hold them."""
    view = handle.get_slice(key)
    shape = list(view.get_shape())
    if numel <= 0:
        return torch.zeros(0, dtype=torch.float32)
    if len(shape) == 0:
        return handle.get_tensor(key).reshape(-1)[start : start + numel].float()
    row = math.prod(shape[1:])
    first, last = start // row, -(-(start + numel) // row)
    rows = view[first:last].reshape(-1)
    offset = start - first * row
    return rows[offset : offset + numel].float()
