"""The leader: `SSAPOTrainer`, trl's `DPOTrainer` with the losses of
`ssapo.losses`, each pair trained against its own follower atoms.

    from ssapo.trainer import SSAPOConfig, SSAPOTrainer
    args = SSAPOConfig(output_dir="out", leader_loss="shift_prob", beta=0.1)
    trainer = SSAPOTrainer(model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train(); trainer.leader_stats

Dataset columns: `prompt`, `chosen`, `rejected` (strings or chat-message
lists, as for trl) and, by `leader_loss`:
- `shift_prob` / `shift_margin`: `shift` and `mass`, a list of 2 floats each per
  row (`dro_core.Solution.shift` / `.mass`; any fixed number K of atoms works);
- `weights`: `weight`, one float per row (`dro_core.Solution.weights`);
- `dpo`: nothing more (plain DPO: iterative DPO's rounds, SSAPO's ε = 0 control);
- `spa`: nothing more (SPA's self-refinement, Kim et al. 2025: label smoothing
  on the pairs the de-coupled model is least confident about);
- `rdpo` / `cdpo` / `drdpo` / `kldpo`: nothing more (the robust-DPO baselines of
  `ssapo.losses`: robust DPO and conservative DPO with trl's `label_smoothing`,
  Dr. DPO with `drdpo_beta`, KLDPO's weights with `kldpo_tau`/`kldpo_max_weight`).
Only the columns `leader_loss` needs are read, checked and converted: a
column of another name, or an atom's name the loss does not need (a user's
`weight` of strings under `dpo`), is left to trl as any extra column (dropped
with `remove_unused_columns`, else carried and ignored). The needed ones are
checked before anything runs, in every train and eval dataset (also those
given to `evaluate`): a missing column, or one whose values are not numbers
(shift and mass lists of K finite numbers, K one in both and in every row;
weight one finite number), is a ValueError naming the column and the dataset.
A map-style dataset is checked in every row, an IterableDataset on its first.
Each pair meets its own atoms in the loss; no atom column (nor
`pair_index`) ever reaches `model.forward`.

Reference: `ref_model` when given, else (with peft) the adapter-disabled model,
else the policy as it is before training. Its log-probabilities are computed
once, before training (`precompute_ref_log_probs=True`, the default here), and
stored as dataset columns (under DeepSpeed through trl's precompute engine,
destroyed after the pass, or the training engine once it exists:
`_precompute_ref_logps`). `spa` needs the reference's token logits at every
step for its de-coupled model, so it runs the reference each step (it then
takes the reference log-probabilities from that same forward) and keeps a
frozen copy of the start model when there is neither `ref_model` nor peft.

Precision, checkpoints and saving (the functions a leader stage uses):
- `load_policy_kwargs(cfg, train=...)` / `load_policy(path, cfg, train=...)`:
  the trainable policy loads in float32 (`bf16=True` then autocasts the compute
  while AdamW updates fp32 master weights; DeepSpeed and FSDP build their own
  masters from them), reference and scoring models in bfloat16 when `bf16`;
  QLoRA (`load_in_4bit`) keeps its 4-bit base. `SSAPOTrainer` refuses a
  trainable parameter in 16 bits without DeepSpeed/FSDP: at the paper's
  learning rates an Adam step is below bf16 resolution for most weights.
- DeepSpeed with bf16 builds its fp32 masters from the bf16 module weights
  (ZeRO-3's zero.Init loads the file into bf16 partitions; ZeRO-1/2 casts the
  module): they would start at the bf16 rounding of the file.
  `SSAPOTrainer(start_weights=...)` ("auto": the model's own `name_or_path`)
  sets them to the file's exact fp32 values before the first optimizer step of
  a stage that does not resume (`restore_fp32_start`), so a stage started
  from the previous round's fp32 checkpoint loses nothing. FSDP, DDP and one
  process keep fp32 parameters and need nothing. Without a GPU, `bf16=True`
  is taken only under an accelerate launch with DeepSpeed (its bf16 on CPU
  processes: recipes/accelerate/zero3_cpu.yaml).
- Mid-round checkpoints: with `save_strategy="steps"` every `save_steps`
  optimizer steps a `checkpoint-N` directory is written into `output_dir`
  (transformers' own: weights, optimizer, scheduler, RNG of every rank, trainer
  state) plus the leader's counters; it is marked complete only once every rank
  has written (`ssapo_checkpoint.json`), and only then are older ones rotated
  (`save_total_limit`). `last_checkpoint(output_dir)` is the newest complete
  one; `trainer.train(resume_from_checkpoint=last_checkpoint(d))` on a trainer
  built exactly as the first (same start model, data, arguments) continues to
  the same weights as an uninterrupted run. The precomputed reference
  log-probabilities are cached in `output_dir/ref_logps/` under a key of the
  data and the reference's weights, so every rank reads the file the main rank
  wrote and a resumed run reads the same values.
- `save_trained(trainer, path, save_dtype="float32")`: the trained weights in
  full precision (every rank must call it): under DeepSpeed the engine's fp32
  master weights, gathered parameter by parameter
  (`deepspeed.utils.safe_get_full_fp32_param`; not the 16-bit copy that
  `save_model` gathers, which would round every round's start to bf16), under
  FSDP the FULL_STATE_DICT (fp32 parameters), else the fp32 parameters; a LoRA
  adapter merged into the full-precision base, a model card naming SSAPO and its
  paper, written to a temp directory and renamed into place; `push_to_hub`
  when asked. `save_dtype="bfloat16"` halves the files of a final export.

A leader stage, run the same way by every process of an `accelerate launch`:

    model = load_policy(policy_path, cfg, train=True)                  # float32
    ref = load_policy(ref_path, cfg, train=False) if ref_path else None  # bf16 with cfg.bf16
    args = SSAPOConfig(output_dir=work_dir, bf16=cfg.bf16, save_strategy="steps", save_steps=200,
                       save_total_limit=2, ddp_timeout=4 * 3600, ...)
    trainer = SSAPOTrainer(model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.train(resume_from_checkpoint=last_checkpoint(work_dir))    # None: from the start
    save_trained(trainer, save_to)                                     # every rank; then work_dir may go

Keep `work_dir` until `save_trained` returns (the checkpoints and the reference
log-prob cache live there) and on a filesystem every node sees.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any, Optional

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer

from ssapo import losses
from ssapo.atoms import COLUMNS as ATOM_COLUMNS
from ssapo.atoms import HOLDS, MASS, SHIFT, WEIGHT, row_problem, table_problem
from ssapo.atoms import tensors as atom_tensors
from ssapo.config import FIELDS, check_bounds
from ssapo.io import InputError, atomic_write, write_json

logger = logging.getLogger(__name__)

LEADER_LOSSES = ("dpo", "shift_prob", "shift_margin", "weights", "kept_mass", "spa", "rdpo", "cdpo", "drdpo", "kldpo")
PAIR_INDEX = "pair_index"  # ResolvingTrainer: a row's position in the re-solved atoms
NEEDED_COLUMNS = {
    "shift_prob": (SHIFT, MASS),
    "shift_margin": (SHIFT, MASS),
    "weights": (WEIGHT,),
    "kept_mass": (SHIFT, MASS),
}
_NOT_FORWARD = {*ATOM_COLUMNS, PAIR_INDEX}  # batch keys of ours that model.forward never sees
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *_NOT_FORWARD}
CHECKPOINT_MARKER = "ssapo_checkpoint.json"  # written last, once every rank has written its part
LEADER_STATE = "ssapo_leader_state_{}.json"  # one per rank: the counters behind leader_stats
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_HALF = (torch.bfloat16, torch.float16)
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

SSAPO_PAPER = {
    "title": "Stackelberg Self-Annotated Preference Optimization",
    "id": "2502.18099",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @misc{ssapo2025,
            title        = {{Stackelberg Self-Annotated Preference Optimization}},
            year         = 2025,
            eprint       = {2502.18099},
            archivePrefix = {arXiv},
            note         = {NeurIPS 2025},
            url          = {https://arxiv.org/abs/2502.18099},
        }"""),
}


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


def load_policy(path: str, cfg=None, *, train: bool = True, **flags):
    """`AutoModelForCausalLM.from_pretrained(path, **load_policy_kwargs(cfg,
    train=train, **flags))`: the causal LM only (load the tokenizer yourself)."""
    from transformers import AutoModelForCausalLM

    kwargs = load_policy_kwargs(cfg, train=train, **flags)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # no such directory / hub id, no config or no safetensors weights in it
        raise InputError(f"model: cannot load a model from {path}: {e}") from None


def _is_complete(checkpoint: str) -> bool:
    try:
        with open(os.path.join(checkpoint, CHECKPOINT_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    m = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(checkpoint)))
    return bool(m) and isinstance(marker, dict) and marker.get("global_step") == int(m.group(1))


def last_checkpoint(work_dir) -> Optional[str]:
    """The newest complete `checkpoint-N` directory that an `SSAPOTrainer`
    wrote into `work_dir` (its `output_dir`), or None: no such directory, or
    none complete. A checkpoint is complete once its `ssapo_checkpoint.json`
    marker is there, written after every rank saved its part; a directory that
    a kill cut short is skipped (the resumed run writes it again)."""
    work_dir = os.fspath(work_dir)
    if not os.path.isdir(work_dir):
        return None
    steps = []
    for name in os.listdir(work_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(work_dir, name)):
            steps.append((int(m.group(1)), name))
    for _, name in sorted(steps, reverse=True):
        path = os.path.join(work_dir, name)
        if _is_complete(path):
            return path
    return None


def _init_cpu_process_group(args) -> None:
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


def _true(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _deepspeed_on_cpu(args) -> bool:
    """Whether these arguments train under DeepSpeed on CPU processes: a DeepSpeed
    launch (accelerate's `ACCELERATE_USE_DEEPSPEED`, or `args.deepspeed`), no GPU,
    and not `use_cpu` (with it accelerate skips DeepSpeed altogether)."""
    if args.use_cpu or _true(os.environ.get("ACCELERATE_USE_CPU", "false")):
        return False
    if not (_true(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")) or args.deepspeed):
        return False
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def _cpu_deepspeed_backend(args) -> Optional[str]:
    """ "gloo" for a DeepSpeed launch without a GPU when no `ddp_backend` was
    given, else `args.ddp_backend`. accelerate finds no backend of its own for
    DeepSpeed on CPU and then reports one process, rank 0, in every process;
    with "gloo" it builds the group through `deepspeed.init_distributed` and
    reads the real world size and rank (recipes/accelerate/zero3_cpu.yaml)."""
    if args.ddp_backend is not None:
        return args.ddp_backend
    return "gloo" if _deepspeed_on_cpu(args) else None


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


@dataclass
class SSAPOConfig(DPOConfig):
    """trl's `DPOConfig` plus the leader's loss (`leader_loss`, `clamp_min`) and
    SPA's switches (`spa_*`). trl's own loss options (`loss_type`,
    `label_smoothing`, `ld_alpha`, `f_divergence_type`, `use_weighting`) must
    stay at their defaults: the loss is chosen by `leader_loss`.

    `ddp_timeout` is TrainingArguments' own (seconds, default 1800): the process
    group's timeout for every collective, on GPUs (transformers passes it) and
    with `use_cpu` under a launcher (set here: transformers leaves gloo at
    torch's default). Set it above the longest phase one rank may wait through.
    One process per GPU: `SSAPOTrainer` refuses several GPUs visible to one
    process that no launcher started (trl has no `nn.DataParallel`).
    `ddp_backend`: left unset under a DeepSpeed launch without a GPU
    (`DS_ACCELERATOR=cpu accelerate launch --config_file zero3_cpu.yaml ...`),
    it becomes "gloo", without which accelerate sees one process, rank 0."""

    leader_loss: str = field(
        default="shift_prob",
        metadata={
            "help": "Leader loss, one of 'shift_prob' (default; the released SSAPO code: Σ_j mass·−log "
            "clamp(σ(βh) − shift, clamp_min), needs columns shift and mass), 'shift_margin' (Σ_j mass·"
            "softplus(−(βh − shift)), shift in units of βh; needs shift and mass), 'weights' (weight·DPO; "
            "needs column weight), 'kept_mass' (our ablation: DPO weighted by the mass the follower did not move; "
            "needs shift and mass), 'dpo' (plain DPO) or 'spa' (SPA's smoothing of the least confident pairs).",
            "choices": list(LEADER_LOSSES),
        },
    )
    clamp_min: float = field(
        default=1e-6,
        metadata={
            "help": "'shift_prob': lower clamp of σ(βh) − shift (released code: 1e-6); atoms below it "
            "give a constant loss and no gradient and are counted in leader_stats."
        },
    )
    spa_alpha: float = field(
        default=0.1, metadata={"help": "'spa': label-smoothing strength α on flagged pairs (SPA eq. 10), in [0, 0.5]."}
    )
    spa_lambda: float = field(
        default=0.5,
        metadata={
            "help": "'spa': de-coupling λ of this round, logits (1+λ)·logits_θ − λ·logits_ref (SPA eq. 12); "
            "the paper uses 1/2, 1/4, 1/8 in rounds 1, 2, 3. >= 0."
        },
    )
    spa_quantile: float = field(
        default=0.1,
        metadata={
            "help": "'spa': flag pairs whose de-coupled confidence is at or below this quantile of the "
            "window (SPA: the lowest 10 %), in [0, 1]."
        },
    )
    spa_window: int = field(
        default=50, metadata={"help": "'spa': number of most recent confidences (gathered over ranks) τ is taken from."}
    )
    spa_warmup_ratio: float = field(
        default=0.2,
        metadata={"help": "'spa': no smoothing (α = 0) during this fraction of the optimizer steps, in [0, 1]."},
    )
    drdpo_beta: float = field(
        default=1.0,
        metadata={"help": "'drdpo': β′ of Dr. DPO's −β′·log mean exp(−ℓ/β′) over the micro-batch, > 0 (paper: 1)."},
    )
    kldpo_tau: float = field(
        default=0.1,
        metadata={"help": "'kldpo': temperature τ of the weights exp((ℓ − mean ℓ)/τ), > 0."},
    )
    kldpo_max_weight: float = field(
        default=10.0,
        metadata={"help": "'kldpo': upper clamp of each weight (the authors' code: 10), >= 1."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probabilities once, before training (default True here). "
            "Ignored (False) for leader_loss='spa', which needs the reference's logits every step."
        },
    )

    def __post_init__(self):
        if self.leader_loss not in LEADER_LOSSES:
            raise ValueError(f"leader_loss: must be one of {LEADER_LOSSES}, got {self.leader_loss!r}")
        # every bound is RunConfig's (ssapo.config), declared once on the field of the same name
        check_bounds("clamp_min", self.clamp_min)
        check_bounds("spa_alpha", self.spa_alpha)
        lam = FIELDS["spa_lambdas"].metadata["bounds"]  # this round's λ, one of RunConfig's spa_lambdas
        if self.spa_lambda not in lam:
            raise ValueError(f"spa_lambda: must be {lam.text()} (0 = the policy itself), got {self.spa_lambda}")
        check_bounds("spa_quantile", self.spa_quantile)
        if int(self.spa_window) != self.spa_window:
            raise ValueError(f"spa_window: must be an integer, got {self.spa_window}")
        for name in ("spa_window", "spa_warmup_ratio", "drdpo_beta", "kldpo_tau", "kldpo_max_weight"):
            check_bounds(name, getattr(self, name))
        smoothing = self.leader_loss in ("rdpo", "cdpo")  # trl's own label_smoothing is their ε
        if smoothing:
            check_bounds("label_smoothing", self.label_smoothing)
        if self.leader_loss == "spa":
            self.precompute_ref_log_probs = False  # the de-coupled model needs reference logits every step
        self.ddp_backend = _cpu_deepspeed_backend(self)  # DeepSpeed on CPU: gloo, else accelerate sees 1 process
        # bf16 without a GPU: DeepSpeed's bf16 on CPU processes under an accelerate launch (bf16 module weights,
        # fp32 master weights). transformers refuses bf16 without a GPU unless use_cpu, which would switch DeepSpeed
        # off: its check runs with bf16 off and accelerate's mixed precision "bf16" (which DeepSpeed's config takes,
        # as bf16=True gives it on a GPU), and bf16 is set again after it
        cpu_bf16 = bool(self.bf16) and _deepspeed_on_cpu(self) and not self.deepspeed
        if self.bf16 and not cpu_bf16 and not self.use_cpu:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
                raise ValueError(
                    "bf16: needs a GPU with bf16, or an accelerate launch with DeepSpeed (its bf16 runs on CPU "
                    "processes: recipes/accelerate/zero3_cpu.yaml); neither here: set bf16=False (or use_cpu=True)"
                )
        env = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if cpu_bf16:
            self.bf16 = False
            os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
        try:
            super().__post_init__()
        finally:
            if cpu_bf16:
                self.bf16 = True
                if env is None:
                    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
                else:
                    os.environ["ACCELERATE_MIXED_PRECISION"] = env
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_type != ["sigmoid"]:
            raise ValueError(
                f"loss_type: SSAPOTrainer takes its loss from leader_loss; leave loss_type at "
                f"['sigmoid'], got {self.loss_type!r}"
            )
        if self.loss_weights not in (None, [1.0]):
            raise ValueError(f"loss_weights: not used by SSAPOTrainer; leave it unset, got {self.loss_weights!r}")
        for name, default in (
            *((("label_smoothing", 0.0),) if not smoothing else ()),
            ("ld_alpha", None),
            ("f_divergence_type", "reverse_kl"),
            ("use_weighting", False),
        ):
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}: not supported by SSAPOTrainer (the loss is chosen by leader_loss); "
                    f"leave it at {default!r}, got {getattr(self, name)!r}"
                )

    @cached_property
    def _setup_devices(self) -> "torch.device":
        # `ddp_timeout` (TrainingArguments', not overridden here) reaches the process group on every path:
        # transformers passes it to accelerate except with use_cpu, where it is set here first
        _init_cpu_process_group(self)
        return TrainingArguments._setup_devices.func(self)


# SSAPOConfig's leader fields that RunConfig declares under the same name (their help and bounds live there)
SHARED_LEADER_FIELDS = (
    "clamp_min",
    "spa_alpha",
    "spa_quantile",
    "spa_window",
    "spa_warmup_ratio",
    "drdpo_beta",
    "kldpo_tau",
    "kldpo_max_weight",
)


def leader_fields(cfg, leader_loss: str) -> dict:
    """The SSAPOConfig keyword arguments a leader stage of RunConfig `cfg` takes
    from it: `leader_loss`, the shared fields, and trl's `label_smoothing` (the
    ε of rdpo/cdpo; left at trl's 0 for every other loss, which refuses it)."""
    kw = {"leader_loss": leader_loss, **{name: getattr(cfg, name) for name in SHARED_LEADER_FIELDS}}
    if leader_loss in ("rdpo", "cdpo"):
        kw["label_smoothing"] = cfg.label_smoothing
    return kw


def _check_one_device_per_process(args, model) -> None:
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


def _reentrant_checkpointing_reaches_transformers(args, model, peft_config) -> None:
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


class _AtomCollator:
    """Wraps trl's preference collator and adds each row's atoms that the
    leader loss needs (`columns`, `NEEDED_COLUMNS`; no other column is read) as
    float32 tensors, in the order of the rows: shift/mass (B, K), weight (B,)
    (`ssapo.atoms.tensors`), and each row's `pair_index` (ResolvingTrainer)
    as an int64 tensor."""

    def __init__(self, inner, columns=ATOM_COLUMNS):
        self.inner = inner
        self.columns = tuple(columns)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        index = [ex[PAIR_INDEX] for ex in examples] if PAIR_INDEX in examples[0] else None
        if index is not None:
            examples = [{k: v for k, v in ex.items() if k != PAIR_INDEX} for ex in examples]
        batch = self.inner(examples)
        batch.update(atom_tensors(examples, self.columns))
        if index is not None:
            batch[PAIR_INDEX] = torch.tensor(index, dtype=torch.int64)
        return batch


def _arrow_rows(ds, columns):
    """`columns` of a datasets.Dataset's rows (after select/filter/shuffle) as one pyarrow Table: a take
    through its indices mapping (datasets' own `with_format("arrow")[:]` is ~100x slower there)."""
    try:
        table = ds.data.table.select(list(columns))
        indices = ds._indices
        return table if indices is None else table.take(indices.column(0))
    except AttributeError:  # a datasets version without these
        return ds.select_columns(list(columns)).with_format("arrow")[:]


def check_atom_columns(what: str, ds, leader_loss: str) -> None:
    """ValueError (one line, naming the dataset and the column) unless every
    row of `ds` holds the atom columns `leader_loss` needs as numbers
    (`NEEDED_COLUMNS`, `ssapo.atoms.HOLDS`): a map-style dataset in every row
    (`ssapo.atoms.table_problem`), any other (an IterableDataset, whose columns
    may be unknown) on its first row (`row_problem`). A dict of datasets
    (DatasetDict, `eval_dataset={...}`) part by part; None and a str (the name
    of an eval dataset the trainer holds, checked already) pass."""
    needed = NEEDED_COLUMNS.get(leader_loss, ())
    if not needed or ds is None or isinstance(ds, str):
        return
    parts = ds.items() if isinstance(ds, dict) else [(None, ds)]
    for part, d in parts:
        where = what if part is None else f"{what}[{part!r}]"
        names = getattr(d, "column_names", None)
        missing = [c for c in needed if names is not None and c not in names]
        problem, scope = None, "it"
        if not missing:
            from datasets import Dataset

            if isinstance(d, Dataset):
                problem = table_problem(_arrow_rows(d, needed), needed)
            else:
                row = next(iter(d), None)
                problem, scope = (row_problem(row, needed) if row is not None else None), "its first row"
                if problem is not None and problem[0] not in row:
                    missing, problem = [problem[0]], None
        if missing:
            raise ValueError(
                f"{where}: leader_loss={leader_loss!r} needs the column(s) {missing} "
                "(the follower's atoms, see ssapo.follower), or choose leader_loss='dpo'"
            )
        if problem is not None:
            name, holds = problem
            raise ValueError(
                f"{where}: column {name!r} must hold {HOLDS[name]} in each row for leader_loss={leader_loss!r} "
                f"(the follower's atoms, see ssapo.follower); {scope} holds {holds}"
            )


class SSAPOTrainer(DPOTrainer):
    """trl's DPOTrainer whose per-pair loss is one of `ssapo.losses`, chosen by
    `args.leader_loss` (see the module docstring for the dataset columns).

    After `train()`, `leader_stats` (a dict, the same on every rank) holds:
    - `max_grad_norm`: the largest pre-clipping gradient norm of any optimizer step;
    - `clamped_fraction`: clamped atoms / atoms with mass > 0, over every
      training micro-batch ('shift_prob' only, else 0.0), with the counts
      `clamped_atoms` and `atoms`;
    - `param_displacement`: L2 distance of the trainable parameters from where
      this `train()` started (nan under FSDP / ZeRO-3, where parameters are sharded);
    - `loss_history`: the training loss of every optimizer step (mean over its
      micro-batches and ranks), independent of `logging_steps`;
    - `grad_norms`: the pre-clipping gradient norm of every optimizer step;
    - `spa_flagged_fraction`: flagged pairs / pairs seen ('spa' only, else 0.0).

    Logs (`state.log_history`, `report_to`): every metric trl's DPOTrainer logs
    for the same batch, under its names and computed as it does (`entropy`,
    `num_tokens`, `logits/*`, `mean_token_accuracy`, `rewards/*`, `logps/*`,
    `aux_loss` on a mixture-of-experts model; equal to trl's where the loss is
    DPO), plus the leader's own: `leader/clamped_fraction` and `leader/atoms`
    (this process's running counts, 'shift_prob'), `leader/kldpo_max_weight`,
    `spa/flagged`, `spa/alpha`, `spa/tau`.

    `start_weights`: where the policy's exact start lies (a directory or hub id
    of safetensors weights), for DeepSpeed with 16-bit module weights: on the
    first `train()` that does not resume, the optimizer's fp32 master weights
    are set from it before the first step (`restore_fp32_start`; the count is
    `fp32_start_restored`). "auto" (default): the model's `name_or_path`, used
    only when the loaded weights are its 16-bit rounding (else a warning);
    a path: they must be (else ValueError); None: never.
    """

    _tag_names = ["trl", "dpo", "ssapo"]
    _name = "SSAPO"
    _paper = SSAPO_PAPER

    def __init__(
        self,
        model,
        ref_model=None,
        args: Optional[SSAPOConfig] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        start_weights: Optional[str] = "auto",
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SSAPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-SSAPO")
        if not isinstance(args, SSAPOConfig):
            raise ValueError(f"args: must be an ssapo.trainer.SSAPOConfig, got {type(args).__name__}")
        check_atom_columns("train_dataset", train_dataset, args.leader_loss)
        check_atom_columns("eval_dataset", eval_dataset, args.leader_loss)
        if (
            args.leader_loss == "spa"
            and ref_model is None
            and peft_config is None
            and not isinstance(model, str)
            and not is_peft_model(model)
        ):
            # SPA needs the reference's logits at every step: keep a frozen copy of the start
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        _check_one_device_per_process(args, model)
        _reentrant_checkpointing_reaches_transformers(args, model, peft_config)
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._restore_fp32_adapter()
        self._check_master_weights()
        self.data_collator = _AtomCollator(self.data_collator, NEEDED_COLUMNS.get(self.args.leader_loss, ()))
        gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
        self.confidence = losses.ConfidenceWindow(self.args.spa_window, self.args.spa_quantile, gather=gather)
        self._reset_stats()
        self.leader_stats: dict[str, Any] = {}
        self._checkpoint_states: dict[str, Any] = {}
        self.start_weights = start_weights
        self.fp32_start_restored: Optional[int] = None  # parameters whose fp32 master was set from start_weights
        self._resuming = False
        self.add_callback(_RestoreFP32Start(self))

    def add_checkpoint_state(self, name: str, obj) -> None:
        """Keeps `obj`'s state in every checkpoint: `obj.state_dict()` (tensors,
        lists, dicts, numbers, strings) is written by every rank as
        `ssapo_state_<name>_<rank>.pt`, and `train(resume_from_checkpoint=...)`
        calls `obj.load_state_dict(state)` before training continues. For state
        that changes during a round outside the model and optimizer (e.g. the
        follower's atom table that a mid-round re-solve replaces)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise ValueError(f"name: letters, digits, '_', '.', '-' only, got {name!r}")
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise ValueError(f"obj: needs state_dict() and load_state_dict(state), got {type(obj).__name__}")
        self._checkpoint_states[name] = obj

    def _restore_fp32_adapter(self):
        """QLoRA: trl casts a 4-/8-bit model's trainable parameters (the LoRA
        adapter) to bfloat16 (its `_is_quantized_model` branch), where plain
        AdamW would update them in bf16 and drop every step below bf16
        resolution. Put them back in float32, as peft itself makes them
        (`get_peft_model`'s default `autocast_adapter_dtype=True`): peft's
        bitsandbytes LoRA layers cast the input to the adapter's dtype and the
        output back to the base layer's without autocast, and run the adapter in
        bf16 under `bf16=True`'s autocast. Not under DeepSpeed: its engine sets
        the module's dtype from its own config and keeps fp32 master weights (a
        bf16 adapter beside a bf16 quant storage keeps ZeRO-3's gathers to one
        dtype)."""
        if self.is_deepspeed_enabled:
            return
        model = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(model):
            return
        base = model.get_base_model()
        if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
            return
        for p in model.parameters():
            if p.requires_grad and p.dtype in _HALF:
                p.data = p.data.float()

    def _check_master_weights(self):
        """Plain AdamW (one process or DDP) updates the parameters in their own
        dtype: 16-bit trainable weights would drop most updates at lr 5e-7.
        DeepSpeed keeps fp32 master weights of its own; under FSDP with mixed
        precision accelerate upcasts 16-bit trainable parameters to fp32 when it
        wraps the model. A QLoRA adapter is fp32 here (`_restore_fp32_adapter`)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return
        half = [(n, p.dtype) for n, p in self.model.named_parameters() if p.requires_grad and p.dtype in _HALF]
        if half:
            name, dtype = half[0]
            raise ValueError(
                f"model: {len(half)} trainable parameter(s) are {dtype} (e.g. {name}); AdamW would update them in "
                f"{dtype}, where a step at the paper's learning rates (5e-7, 1e-6) is below the resolution of most "
                "weights. Load the policy in float32 (ssapo.trainer.load_policy_kwargs(train=True)) and keep "
                "bf16=True, which runs the compute in bfloat16 (or train under DeepSpeed / FSDP, which keep fp32 "
                "master weights)"
            )

    def _restore_fp32_start(self) -> None:
        """Under DeepSpeed with 16-bit module weights: the optimizer's fp32
        master weights set to the exact start, read from `start_weights`
        (`restore_fp32_start`; "auto": the model's own `name_or_path` when that
        is a local directory of safetensors, and a model changed since it was
        loaded keeps its masters, with a warning; a path: it must hold the
        model's start, else ValueError). Every process, once."""
        source, strict = self.start_weights, self.start_weights != "auto"
        if not self.is_deepspeed_enabled or source is None:
            return
        if source == "auto":
            source = getattr(self.accelerator.unwrap_model(self.model), "name_or_path", None)
        directory = _weights_dir(source)
        if directory is None:
            if strict:
                raise ValueError(f"start_weights: no safetensors weights found at {source} (a directory or hub id)")
            return
        self.fp32_start_restored = restore_fp32_start(self, directory, strict=strict)
        if self.fp32_start_restored and self.accelerator.is_main_process:
            logger.info("fp32 master weights of %d parameters set from %s", self.fp32_start_restored, source)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # trl caches the reference log-probs in a file named from the data's fingerprint and the reference's
        # weights next to the dataset's cache files; an in-memory dataset has none, and datasets then draws a
        # random name in a per-process temp directory (the other ranks read a file never written). Put the
        # cache in output_dir/ref_logps/ under the fingerprint: shared by the ranks, and the same file (the
        # same values) when a killed run resumes.
        if name == "train":
            self._train_rows_fingerprint = getattr(dataset, "_fingerprint", None)
        if not getattr(dataset, "cache_files", None):
            cache_dir = os.path.join(self.args.output_dir, "ref_logps")
            os.makedirs(cache_dir, exist_ok=True)
            dataset._get_cache_file_path = lambda fingerprint: os.path.join(cache_dir, f"{name}-{fingerprint}.arrow")
        # Under DeepSpeed (no ref_model) trl runs the pass through a second engine over the policy's module
        # (prepare_deepspeed, kept in _precompute_engine). Under ZeRO-3 its hooks and parameter coordinator stay
        # on the module: after exactly one forward its coordinator is still recording, its trace keyed by the
        # modules' ds_ids; the training engine renumbers them (DeepSpeed's counter runs on across engines), and
        # the stale engine's start-of-forward hook, still called at the first training forward, then completes
        # its trace with the new ids (IndexError: pop from an empty deque, in record_parameters). So: once the
        # training engine exists, a pass runs through it (no second engine); otherwise the pass's engine is
        # destroyed (its hooks removed) after the pass, and trl builds a new one for a later pass.
        training_engine = self.deepspeed if self.is_deepspeed_enabled and self.ref_model is None else None
        if training_engine is not None:
            self._precompute_engine = training_engine
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            engine, self._precompute_engine = self._precompute_engine, None
            if engine is not None and engine is not training_engine:
                engine.destroy()

    # -- checkpoints -------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint (weights, optimizer, scheduler, RNG, trainer
        state; trl adds the model card), then every rank's leader counters, a
        barrier, the completion marker, and only then the rotation of older
        checkpoints (so a kill mid-save never leaves no complete checkpoint)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        marker = os.path.join(folder, CHECKPOINT_MARKER)
        if self.args.should_save and os.path.exists(marker):
            os.remove(marker)  # a stale marker from an earlier run of this step: rewritten below
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # rotate below, once this checkpoint is complete
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
            self._in_checkpoint = False
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, LEADER_STATE.format(self.args.process_index)), self._leader_state())
        for name, obj in self._checkpoint_states.items():
            state = obj.state_dict()
            atomic_write(
                os.path.join(folder, f"ssapo_state_{name}_{self.args.process_index}.pt"),
                lambda tmp, state=state: torch.save(state, tmp),
            )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_json(marker, {"global_step": self.state.global_step, "num_processes": self.args.world_size})
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """transformers' `save_model`, except inside a checkpoint under DeepSpeed: there the engine's own
        sharded checkpoint, which `_save_checkpoint` writes next (weights, fp32 masters and optimizer state,
        each rank its part; what a resumed stage loads), is the checkpoint's model. transformers would first
        gather the 16-bit weights to rank 0 (`zero3_save_16bit_model: true`) or write that same DeepSpeed
        checkpoint a second time (false). A stage's model is written by `save_trained`, not here."""
        if getattr(self, "_in_checkpoint", False) and self.is_deepspeed_enabled:
            return
        return super().save_model(output_dir, _internal_call=_internal_call)

    def _leader_state(self) -> dict:
        return {
            "clamped": self._clamped,
            "atoms": self._atoms,
            "flagged": self._flagged,
            "seen": self._seen,
            "grad_norms": list(self._grad_norms),
            "step_losses": [float(x) for x in self._step_losses],
            "confidence": self.confidence.values,
            "global_step": self.state.global_step,
            "reference_hash": self._precompute_model_hash,
            "train_fingerprint": self._train_fingerprint(),
        }

    def _train_fingerprint(self) -> Optional[str]:
        # the prepared (tokenized) rows, before trl adds the reference columns; datasets' content fingerprint
        return getattr(self, "_train_rows_fingerprint", None) or getattr(self.train_dataset, "_fingerprint", None)

    def _load_leader_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, LEADER_STATE.format(self.args.process_index))
        if not os.path.exists(path):
            logger.warning(
                "%s: no leader counters for process %d (written with another number of processes?); "
                "leader_stats count from the resumed step on",
                checkpoint,
                self.args.process_index,
            )
            return
        with open(path) as f:
            st = json.load(f)
        # the resumed trainer must be the interrupted one: same start model (hence reference), same data
        for key, now, what in (
            ("reference_hash", self._precompute_model_hash, "reference model's weights"),
            ("train_fingerprint", self._train_fingerprint(), "train_dataset"),
        ):
            if st.get(key) is not None and now is not None and st[key] != now:
                raise ValueError(
                    f"resume_from_checkpoint: {checkpoint} was written by a run with another {what}; build the "
                    "resumed trainer exactly as the interrupted one (the start model, not the checkpoint's weights, "
                    "which train() loads; the same rows and atoms)"
                )
        self._clamped, self._atoms, self._flagged, self._seen = st["clamped"], st["atoms"], st["flagged"], st["seen"]
        self._grad_norms = [float(g) for g in st["grad_norms"]]
        self._step_losses = [
            torch.tensor(x, dtype=torch.float32, device=self.accelerator.device) for x in st["step_losses"]
        ]
        self.confidence._values = [float(v) for v in st["confidence"]]
        for name, obj in self._checkpoint_states.items():
            state_path = os.path.join(checkpoint, f"ssapo_state_{name}_{self.args.process_index}.pt")
            if not os.path.exists(state_path):
                raise ValueError(
                    f"resume_from_checkpoint: {checkpoint} has no state {name!r} for process "
                    f"{self.args.process_index} (add_checkpoint_state({name!r}, ...) was not used there)"
                )
            obj.load_state_dict(torch.load(state_path, weights_only=True))

    def _reset_stats(self):
        self._clamped = self._atoms = self._flagged = self._seen = 0
        self._grad_norms: list[float] = []
        self._step_losses: list[torch.Tensor] = []
        self._step_loss = None
        self.confidence.reset()

    def _set_signature_columns_if_needed(self):
        # the atom columns the loss needs survive remove_unused_columns; any other column is trl's to drop
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in NEEDED_COLUMNS.get(self.args.leader_loss, ()) if c not in self._signature_columns
        ]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """trl's `evaluate`; a dataset given here is checked first as the
        trainer's own were (`check_atom_columns`)."""
        check_atom_columns("eval_dataset", eval_dataset, self.args.leader_loss)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_ref_log_probs(self, model, inputs):
        """trl's reference forward (the precompute pass, and each step without
        it) on the batch without the atom columns and `pair_index`."""
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in _NOT_FORWARD})

    # -- the loss ------------------------------------------------------------------

    @staticmethod
    def _model_kwargs(inputs):
        kw = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kw["use_cache"] = False
        return kw

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        kind = self.args.leader_loss
        beta = self.beta
        kw = self._model_kwargs(inputs)
        if self.aux_loss_enabled:
            kw["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**kw, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)

        confidence = None
        if kind == "spa":
            (ref_chosen, ref_rejected), confidence = self._spa_reference(model, inputs)
        elif self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, inputs)
        chosen_ratio = chosen_logps - ref_chosen.to(chosen_logps.dtype)
        rejected_ratio = rejected_logps - ref_rejected.to(rejected_logps.dtype)
        h = chosen_ratio - rejected_ratio  # log-ratio margin, one per pair

        m = self._metrics[mode]
        if kind == "dpo":
            per_pair = losses.dpo_loss(h, beta)
        elif kind == "shift_prob":
            mass = inputs[MASS]
            per_pair, clamped = losses.shift_prob_loss(h, beta, inputs[SHIFT], mass, self.args.clamp_min)
            if mode == "train":
                self._clamped += int(clamped)
                self._atoms += int((mass > 0).sum())
                m["leader/clamped_fraction"].append(self._clamped / max(self._atoms, 1))
                m["leader/atoms"] = [self._atoms]  # this process's atoms (mass > 0) so far, as trl's num_tokens
        elif kind == "shift_margin":
            per_pair = losses.shift_margin_loss(h, beta, inputs[SHIFT], inputs[MASS])
        elif kind == "weights":
            per_pair = losses.weighted_dpo_loss(h, beta, inputs[WEIGHT])
        elif kind == "kept_mass":
            per_pair = losses.kept_mass_loss(h, beta, inputs[SHIFT], inputs[MASS])
        elif kind == "rdpo":
            per_pair = losses.rdpo_loss(h, beta, self.args.label_smoothing)
        elif kind == "cdpo":
            per_pair = losses.cdpo_loss(h, beta, self.args.label_smoothing)
        elif kind in ("drdpo", "kldpo"):
            per_pair = losses.dpo_loss(h, beta)
        else:
            per_pair = self._spa_loss(h, confidence, mode)
        if kind == "drdpo":
            loss = losses.drdpo_loss(per_pair, self.args.drdpo_beta)
        elif kind == "kldpo":
            # the mean ℓ over every process's micro-batch (detached), as the authors' code gathers it
            everyone = self.accelerator.gather(per_pair.detach()) if self.accelerator.num_processes > 1 else None
            w = losses.kldpo_weights(per_pair, self.args.kldpo_tau, self.args.kldpo_max_weight, everyone)
            if mode == "train":
                m["leader/kldpo_max_weight"].append(w.max().item())  # this process's micro-batch
            loss = (w * per_pair).mean()
        else:
            loss = per_pair.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            m["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_trl_metrics(m, mode, inputs, outputs, (chosen_logps, rejected_logps), (chosen_ratio, rejected_ratio))
        if return_outputs:  # as trl: the fused head builds no logits, so recompute them for compute_metrics
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
            return loss, outputs
        return loss

    def _log_trl_metrics(self, m, mode, inputs, outputs, logps, ratios):
        """What trl 1.16's `DPOTrainer._compute_loss` logs after its loss, under its names, computed and gathered
        over the processes as it does: `entropy`, `num_tokens`, `logits/chosen`, `logits/rejected` and
        `mean_token_accuracy` from the per-token fields of trl's fused LM head (token-weighted over every rank's
        completions), `rewards/*` and `logps/*` from the pairs. (`aux_loss` is logged where the loss adds it.)"""
        acc = self.accelerator
        mask = inputs["completion_mask"][:, 1:]  # the completion tokens, as the shifted labels score them
        seq_len = mask.size(1)
        chosen_mask, rejected_mask = mask.chunk(2)

        def token_mean(values, keep):  # sum over every rank's tokens of `keep` / their count; 0.0 without tokens
            total, count = (acc.gather_for_metrics(t).sum() for t in ((values * keep).sum(), keep.sum()))
            return (total / count).item() if count > 0 else 0.0

        m["entropy"].append(token_mean(outputs.entropy[:, -seq_len:].detach(), mask))
        if mode == "train":
            tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2)
        m["logits/chosen"].append(token_mean(chosen_logits, chosen_mask))
        m["logits/rejected"].append(token_mean(rejected_logits, rejected_mask))
        m["mean_token_accuracy"].append(token_mean(outputs.is_top1[:, -seq_len:].chunk(2)[0], chosen_mask))
        chosen, rejected = (self.beta * r.detach() for r in ratios)
        for key, value in (
            ("rewards/chosen", chosen),
            ("rewards/rejected", rejected),
            ("rewards/accuracies", (chosen > rejected).float()),
            ("rewards/margins", chosen - rejected),
            ("logps/chosen", logps[0].detach()),
            ("logps/rejected", logps[1].detach()),
        ):
            m[key].append(acc.gather(value).mean().item())  # trl's gather (not gather_for_metrics) for these

    def _spa_reference(self, model, inputs):
        """One no-grad forward of the policy and of the reference with full
        token logits: the reference's sequence log-probs and each pair's
        de-coupled confidence m̃ (SPA eq. 11–12)."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        kw = self._model_kwargs(inputs)
        input_ids, cmask = inputs["input_ids"], inputs["completion_mask"]
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            pol_logits = model(**kw).logits
            if self.ref_model is not None:
                ref_logits = self.ref_model(**kw).logits
            else:  # peft: the adapter-disabled model (or a frozen adapter named "ref")
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_logits = self.model(**kw).logits
        ref = losses.masked_sequence_logps(ref_logits[:, :-1], input_ids[:, 1:], cmask[:, 1:]).chunk(2, dim=0)
        confidence = losses.decoupled_margin(
            pol_logits, ref_logits, input_ids, cmask, self.args.spa_lambda, self.beta, ref_logps=ref
        )
        return ref, confidence

    def _spa_loss(self, h, confidence, mode):
        """SPA (eq. 9–11): flag the pairs at or below the window's lower
        quantile τ (the window of earlier batches), then add this batch to the
        window; smooth the flagged pairs with α once the warm-up is over."""
        a = self.args
        tau = self.confidence.tau
        flagged = self.confidence.flag(confidence)
        warm = self.state.global_step < a.spa_warmup_ratio * max(self.state.max_steps, 1)
        alpha = 0.0 if warm else a.spa_alpha
        if mode == "train":
            self.confidence.update(confidence)
            self._flagged += int(flagged.sum())
            self._seen += int(flagged.numel())
        m = self._metrics[mode]
        m["spa/flagged"].append(self.accelerator.gather_for_metrics(flagged.float()).mean().item())
        m["spa/alpha"].append(alpha)
        if math.isfinite(tau):
            m["spa/tau"].append(tau)
        return losses.spa_loss(h, self.beta, flagged, alpha)

    # -- diagnostics -----------------------------------------------------------------

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)  # already divided by the accumulation steps
        self._step_loss = loss.detach().float() if self._step_loss is None else self._step_loss + loss.detach().float()
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # called once per optimizer step, before the optimizer, with the pre-clipping norm
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None:
            self._grad_norms.append(float(grad_norm))
        if self._step_loss is not None:
            self._step_losses.append(self._step_loss)
            self._step_loss = None
        return grad_norm

    def _sharded(self) -> bool:
        if self.is_fsdp_enabled:
            return True
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def _trainable(self):
        return [(n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`. `resume_from_checkpoint`: a checkpoint directory
        (must be complete, see `last_checkpoint`) or True (the newest complete
        one in `output_dir`); build the trainer exactly as the interrupted one
        (same start model, not the checkpoint's weights: they are loaded here).
        leader_stats then cover the whole run, as if it had not stopped."""
        if resume_from_checkpoint is True:
            found = last_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {self.args.output_dir}")
            resume_from_checkpoint = found
        elif resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            if not _is_complete(resume_from_checkpoint):
                raise ValueError(
                    f"resume_from_checkpoint: {resume_from_checkpoint} is not a complete SSAPOTrainer "
                    f"checkpoint (no {CHECKPOINT_MARKER}); use last_checkpoint(output_dir)"
                )
        else:
            resume_from_checkpoint = None
        self._reset_stats()
        self._resuming = resume_from_checkpoint is not None
        if resume_from_checkpoint is not None:
            self._load_leader_state(resume_from_checkpoint)
        # the start point, on the main process only (ranks hold the same replica), on CPU in the params' dtype
        track = not self._sharded() and self.accelerator.is_main_process
        start = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()} if track else None
        out = super().train(resume_from_checkpoint, *args, **kwargs)

        acc = self.accelerator
        disp = float("nan")
        if track:
            sq = 0.0
            for n, p in self._trainable():
                sq += float(((p.detach().float().cpu() - start[n].float()) ** 2).sum())
            disp = math.sqrt(sq)
        del start
        counts = torch.tensor([self._clamped, self._atoms, self._flagged, self._seen], dtype=torch.float64)
        hist = torch.stack(self._step_losses).double() if self._step_losses else torch.zeros(0, dtype=torch.float64)
        if acc.num_processes > 1:
            counts = acc.reduce(counts.to(acc.device), reduction="sum").cpu()
            if len(hist):
                hist = acc.reduce(hist.to(acc.device), reduction="mean")
            from accelerate.utils import broadcast

            disp = float(broadcast(torch.tensor([disp], dtype=torch.float64, device=acc.device), from_process=0)[0])
        clamped, atoms, flagged, seen = (int(c) for c in counts.tolist())
        norms = [g for g in self._grad_norms if not math.isnan(g)]
        self.leader_stats = {
            "max_grad_norm": max(norms) if norms else float("nan"),
            "clamped_fraction": clamped / atoms if atoms else 0.0,
            "clamped_atoms": clamped,
            "atoms": atoms,
            "param_displacement": disp,
            "loss_history": [float(x) for x in hist.cpu().tolist()],
            "grad_norms": list(self._grad_norms),
            "spa_flagged_fraction": flagged / seen if seen else 0.0,
        }
        return out


class _RestoreFP32Start(TrainerCallback):
    """At the start of the first `train()` (the engine and its optimizer exist,
    a resumed run's checkpoint is loaded, no optimizer step yet): unless that
    train() resumes, the DeepSpeed optimizer's fp32 master weights are set to
    the exact start (`restore_fp32_start`). Later train() calls leave them."""

    def __init__(self, trainer: "SSAPOTrainer"):
        self.trainer, self.pending = trainer, True

    def on_train_begin(self, args, state, control, **kw):
        if self.pending:
            self.pending = False
            if not self.trainer._resuming:
                self.trainer._restore_fp32_start()
        return control


class ResolvingTrainer(SSAPOTrainer):
    """SSAPOTrainer whose pairs' atoms are re-solved during training (the loop's
    `resolve_every`): every row of `train_dataset` carries `pair_index`, its
    position in `resolver.atoms` (an `ssapo.atoms.Atoms`); each micro-batch's
    atoms are read from there when its loss is computed (not when it is
    collated: accelerate's data loader collates one batch ahead), and every
    `resolver.every` optimizer steps `resolver.resolve(step, model)` (an
    `ssapo.follower.Resolver`) solves the follower again on the margins of the
    policy being trained and replaces them in place, so the steps after step s
    train on the atoms of step s. The resolver (atoms and history) is kept in
    every checkpoint: a resumed stage continues with the atoms it had."""

    def __init__(self, *args, resolver, **kwargs):
        super().__init__(*args, **kwargs)
        self.resolver = resolver
        self.add_callback(_ResolveCallback(self))
        self.add_checkpoint_state("resolver", resolver)

    def _current_atoms(self, inputs: dict) -> dict:
        """`inputs` without pair_index, with the pairs' atoms as the resolver has them now."""
        inputs = dict(inputs)
        index = inputs.pop(PAIR_INDEX).cpu().numpy()
        for key in ATOM_COLUMNS:
            if key in inputs:
                value = getattr(self.resolver.atoms, key)[index]
                inputs[key] = torch.as_tensor(value, dtype=torch.float32, device=inputs[key].device)
        return inputs

    def _compute_loss(self, model, inputs, return_outputs):
        return super()._compute_loss(model, self._current_atoms(inputs), return_outputs)

    def scoring_model(self):
        """The policy as the re-solve's margin pass calls it: a module whose forward gathers its sharded
        parameters. Under FSDP the FSDP-wrapped model (its root's forward unshards the root's own parameters,
        the embeddings, final norm and head; `unwrap_model` would strip it); otherwise the unwrapped model
        (under DeepSpeed ZeRO-3 the engine's gather/release hooks live on the module itself; under DDP or
        one process it is whole)."""
        if self.is_fsdp_enabled:
            return self.model_wrapped
        return self.accelerator.unwrap_model(self.model)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PAIR_INDEX not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + [PAIR_INDEX]


class _ResolveCallback(TrainerCallback):
    def __init__(self, trainer: ResolvingTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kw):
        every = self.trainer.resolver.every
        if state.global_step % every == 0 and state.global_step < state.max_steps:
            self.trainer.resolver.resolve(state.global_step, self.trainer.scoring_model())
        return control


def save_trained(
    trainer: "SSAPOTrainer",
    path,
    *,
    merge_adapter: bool = True,
    base_model: Optional[str] = None,
    model_name: Optional[str] = None,
    dataset_name: Optional[str] = None,
    push_to_hub: Optional[bool] = None,
    trust_remote_code: bool = False,
    save_dtype: str = "float32",
) -> str:
    """Saves the trained policy of `trainer` to `path` (safetensors, tokenizer,
    model card) atomically, through the trainer's own `_save` / `save_model`.
    Returns `path`.

    EVERY process must call it: the weights are gathered, a collective
    (DeepSpeed: the fp32 master weights, see below; FSDP: `save_model`, i.e.
    `accelerator.get_state_dict` with a FULL_STATE_DICT).
    - Everything is written into `<path>.tmp-save` and renamed onto `path` by the
      writing process (`args.should_save`) once complete; the old `path`, if
      any, is replaced; a barrier follows, so on return every rank sees `path`.
    - With a peft model and `merge_adapter` (default), the writer merges the
      saved adapter into the full base weights loaded whole on that process in
      float32 (`base_model`, default the adapter's `base_model_name_or_path`;
      `unsharded_loading`: no ZeRO-3 partitioning, no meta tensors), so a 4-bit
      (QLoRA) run is merged into full-precision weights too. The adapter is kept
      under `path/adapter/`. `merge_adapter=False` saves the adapter alone.
      `trust_remote_code` is passed to that base's `from_pretrained`.
    - Precision: the fp32 master weights of every engine, written as
      `save_dtype` ("float32", the default: a checkpoint the next round starts
      from; "bfloat16": half the size, for a final export), and `config.json`'s
      `dtype` says the same. Under DeepSpeed (ZeRO-3 or 1/2) each trainable
      parameter is the optimizer's fp32 copy, gathered over the ranks
      (`deepspeed_fp32_state_dict`: `deepspeed.utils.safe_get_full_fp32_param`),
      never the bf16 module weights that `save_model` /
      `stage3_gather_16bit_weights_on_model_save` gather: chaining rounds
      through those would round the policy to bf16 at every round boundary (at
      lr 5e-7 most of a round's update). The full fp32 state dict is held on the
      writer in CPU memory (4 bytes a parameter: 32 GB for an 8B model). FSDP's
      FULL_STATE_DICT is already the fp32 parameters (accelerate keeps them fp32
      under bf16 mixed precision and torch unshards them in full precision for
      the state dict; a SHARDED_STATE_DICT config is switched to FULL for this save,
      `full_state_dict`); one process / DDP saves the fp32 parameters themselves.
    - README.md: trl's model card naming SSAPO, its paper (arXiv 2502.18099) and
      citation, tags `trl`, `dpo`, `ssapo`; `model_name` defaults to the name of `path`.
    - Raises ValueError when the engine wrote no weights, or for a `save_dtype`
      other than "float32" / "bfloat16".
    - `push_to_hub` (default `trainer.args.push_to_hub`): process 0 uploads
      `path` to `args.hub_model_id` (default: the name of `path`) with
      `args.hub_token`, `args.hub_private_repo`, `args.hub_revision`.
    """
    if save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype: must be one of {', '.join(SAVE_DTYPES)}, got {save_dtype!r}")
    dtype = SAVE_DTYPES[save_dtype]
    path = os.path.abspath(os.fspath(path))
    args, acc = trainer.args, trainer.accelerator
    writer = args.should_save
    tmp = path + ".tmp-save"
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    acc.wait_for_everyone()
    unwrapped = acc.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled:
        # collective: every rank gathers, the writer keeps the full fp32 state dict (the others None)
        state = deepspeed_fp32_state_dict(trainer, trainable_only=is_peft_model(unwrapped), keep=writer)
        trainer._save(tmp, state_dict=_cast_state_dict(state, dtype) if writer else None)
        del state
    else:
        with full_state_dict(trainer):  # FSDP: the full weights here even where checkpoints are sharded
            trainer.save_model(tmp, _internal_call=True)  # collective; writes on the writer only; no hub push here
    acc.wait_for_everyone()
    error: Optional[BaseException] = None
    if writer:
        try:
            _check_weights_written(tmp)
            if merge_adapter and is_peft_model(unwrapped):
                _merge_saved_adapter(unwrapped, tmp, base_model, trust_remote_code)
            _cast_saved(tmp, dtype)
            card = os.path.join(args.output_dir, "README.md")
            trainer.create_model_card(model_name=model_name or os.path.basename(path), dataset_name=dataset_name)
            if os.path.exists(card):
                os.replace(card, os.path.join(tmp, "README.md"))
            _replace_dir(tmp, path)
        except BaseException as e:  # noqa: BLE001  re-raised below, after the other ranks are told
            shutil.rmtree(tmp, ignore_errors=True)
            error = e
    if acc.num_processes > 1:  # the other ranks fail with the writer instead of waiting for it at a barrier
        from accelerate.utils import broadcast_object_list

        status = broadcast_object_list([None if error is None else f"{type(error).__name__}: {error}"], 0)[0]
        if error is None and status is not None:
            raise RuntimeError(f"save_trained: the main process failed to save {path}: {status}")
    if error is not None:
        raise error
    acc.wait_for_everyone()
    if push_to_hub if push_to_hub is not None else args.push_to_hub:
        if args.process_index == 0:
            from huggingface_hub import create_repo, upload_folder

            repo_id = args.hub_model_id or os.path.basename(path)
            repo = create_repo(repo_id, token=args.hub_token, private=args.hub_private_repo, exist_ok=True)
            upload_folder(
                repo_id=repo.repo_id,
                folder_path=path,
                token=args.hub_token,
                revision=args.hub_revision,
                commit_message=f"SSAPO: {os.path.basename(path)}",
            )
        acc.wait_for_everyone()
    return path


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


def _weights_dir(source) -> Optional[str]:
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


def _cast_state_dict(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating-point tensors as `dtype`; tied tensors stay one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
            if id(v) not in done:
                done[id(v)] = v.to(dtype)
            v = done[id(v)]
        out[k] = v
    return out


_ST_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _cast_saved(directory: str, dtype: torch.dtype) -> None:
    """The weights saved in `directory` (its top-level `*.safetensors`) as
    `dtype` (floating-point tensors; a file already in `dtype` is not
    rewritten), the index's `total_size` to match, and `config.json`'s `dtype`
    (what `from_pretrained`'s default `dtype="auto"` loads them in)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    name = str(dtype).split(".")[1]
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for fname in sorted(os.listdir(directory)):
        f = os.path.join(directory, fname)
        if not fname.endswith(".safetensors") or not os.path.isfile(f):
            continue
        with safe_open(f, framework="pt") as st:
            metadata = st.metadata() or {"format": "pt"}
            header = {k: (st.get_slice(k).get_dtype(), st.get_slice(k).get_shape()) for k in st.keys()}
        if any(kind in _ST_FLOATS and _ST_FLOATS[kind] != dtype for kind, _ in header.values()):
            tensors = _cast_state_dict(load_file(f), dtype)
            atomic_write(f, lambda t, tensors=tensors, metadata=metadata: save_file(tensors, t, metadata=metadata))
            del tensors
        for kind, shape in header.values():
            total += math.prod(shape) * (size if kind in _ST_FLOATS else _ST_SIZES.get(kind, 1))
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            data = json.load(fh)
        data.setdefault("metadata", {})["total_size"] = total
        write_json(index, data)
    config = os.path.join(directory, "config.json")
    if os.path.exists(config):
        with open(config) as fh:
            data = json.load(fh)
        if data.get("dtype") != name or data.get("torch_dtype", name) != name:
            data["dtype"] = name
            if "torch_dtype" in data:
                data["torch_dtype"] = name
            write_json(config, data)


def _check_weights_written(tmp: str) -> None:
    names = set(os.listdir(tmp))
    if not names & {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"}:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(
            "trainer: save_model wrote no safetensors weights (DeepSpeed's are gathered here, whatever "
            "stage3_gather_16bit_weights_on_model_save says, and FSDP's are switched to FULL_STATE_DICT for "
            "this save)"
        )


def _merge_saved_adapter(peft_model, tmp: str, base_model: Optional[str], trust_remote_code: bool) -> None:
    """In `tmp`: the adapter that `save_model` wrote, replaced by the merged full
    model (the adapter files move to `tmp/adapter/`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = peft_model.peft_config.get("default") or next(iter(peft_model.peft_config.values()))
    base = base_model or cfg.base_model_name_or_path
    if not base:
        raise ValueError("base_model: the adapter does not record its base model; pass base_model=<path>")
    adapter_dir = os.path.join(tmp, "adapter")
    os.makedirs(adapter_dir, exist_ok=True)
    for name in os.listdir(tmp):
        if name.startswith("adapter_") or name == "README.md":
            os.replace(os.path.join(tmp, name), os.path.join(adapter_dir, name))
    with unsharded_loading():
        full = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        merged = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    merged.save_pretrained(tmp, safe_serialization=True)
    del full, merged


def _replace_dir(src: str, dst: str) -> None:
    """Renames the finished directory `src` onto `dst`, replacing an old `dst`."""
    if os.path.exists(dst):
        old = dst + ".old-save"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
