"""The leader: `SSAPOTrainer`, trl's `DPOTrainer` with the losses of
`ssapo.losses`, each pair trained against its own follower atoms, and its
arguments `SSAPOConfig`.

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
Each loss is one declaration of `ssapo.leader_losses` (its function, columns,
parameters and batch combination), which `_compute_loss` follows.
Only the columns `leader_loss` needs are read, and they are checked in every
train and eval dataset before anything runs (`ssapo.leader_columns`).
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

Beside it: loading the policy in float32 (`ssapo.loading`), the engines'
precision and fp32 master weights (`ssapo.engines`), mid-round checkpoints and
saving the trained model (`ssapo.checkpoints`), atoms re-solved during training
(`ssapo.resolving.ResolvingTrainer`). A leader stage, run the same way by every
process of an `accelerate launch`:

    from ssapo.checkpoints import last_checkpoint, save_trained
    from ssapo.loading import load_policy

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

import copy
import logging
import math
import os
import textwrap
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer

from ssapo import leader_losses, losses
from ssapo.atoms import COLUMNS as ATOM_COLUMNS
from ssapo.atoms import MASS
from ssapo.checkpoints import CHECKPOINT_MARKER, CheckpointMixin, is_complete, last_checkpoint
from ssapo.config import check_bounds
from ssapo.engines import (
    check_one_device_per_process,
    cpu_deepspeed_backend,
    deepspeed_on_cpu,
    init_cpu_process_group,
    local_weights_dir,
    reentrant_checkpointing_reaches_transformers,
    restore_fp32_start,
)
from ssapo.errors import ConfigError
from ssapo.leader_columns import PAIR_INDEX, AtomCollator, check_atom_columns

logger = logging.getLogger(__name__)

LEADER_LOSSES = tuple(leader_losses.TABLE)  # every declared leader loss (ssapo.leader_losses)
# the loss parameters SSAPOConfig declares (trl's own, label_smoothing, it inherits), in the table's order
_OWN_PARAMS = tuple(p for p in leader_losses.PARAMS.values() if not p.trl)
_NOT_FORWARD = {*ATOM_COLUMNS, PAIR_INDEX}  # batch keys of ours that model.forward never sees
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *_NOT_FORWARD}
_HALF = (torch.bfloat16, torch.float16)

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


def _with_loss_params(cls):
    """Before @dataclass: SSAPOConfig's fields gain every loss parameter of the table (but trl's own), after
    `leader_loss`, with its declared default and help."""
    notes = {}
    for name, hint in cls.__dict__["__annotations__"].items():
        notes[name] = hint
        if name == "leader_loss":
            for p in _OWN_PARAMS:
                notes[p.name] = p.type.__name__
                setattr(cls, p.name, field(default=p.default, metadata={"help": p.help}))
    cls.__annotations__ = notes
    return cls


@dataclass
@_with_loss_params
class SSAPOConfig(DPOConfig):
    """trl's `DPOConfig` plus the leader's loss (`leader_loss`, one of
    `ssapo.leader_losses.TABLE`) and one field per loss parameter the table
    declares (`clamp_min`, SPA's `spa_*`, `drdpo_beta`, `kldpo_*`: their
    defaults, bounds and help are the declarations'). trl's own loss options
    (`loss_type`, `ld_alpha`, `f_divergence_type`, `use_weighting`, and
    `label_smoothing` unless the loss uses it: rdpo, cdpo) must stay at their
    defaults: the loss is chosen by `leader_loss`.

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
        metadata={"help": "Leader loss: " + leader_losses.help_of(LEADER_LOSSES), "choices": list(LEADER_LOSSES)},
    )
    # then one field per loss parameter (ssapo.leader_losses.PARAMS), added by _with_loss_params
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probabilities once, before training (default True here). "
            "Ignored (False) for leader_loss='spa', which needs the reference's logits every step."
        },
    )

    def __post_init__(self):
        loss = leader_losses.get(self.leader_loss)  # ConfigError naming leader_loss for an unknown one
        # every parameter's bounds are declared once, in ssapo.leader_losses (RunConfig's fields take them too)
        for p in _OWN_PARAMS:
            value = getattr(self, p.name)
            if p.type is int and int(value) != value:
                raise ConfigError(f"{p.name}: must be an integer, got {value}")
            check_bounds(p.name, value)
        trl_params = [p for p in leader_losses.PARAMS.values() if p.trl]  # trl's label_smoothing: rdpo/cdpo's ε
        for p in trl_params:
            if p.name in loss.param_names:
                check_bounds(p.name, getattr(self, p.name))
        if loss.spa_flags:
            self.precompute_ref_log_probs = False  # the de-coupled model needs reference logits every step
        self.ddp_backend = cpu_deepspeed_backend(self)  # DeepSpeed on CPU: gloo, else accelerate sees 1 process
        # bf16 without a GPU: DeepSpeed's bf16 on CPU processes under an accelerate launch (bf16 module weights,
        # fp32 master weights). transformers refuses bf16 without a GPU unless use_cpu, which would switch DeepSpeed
        # off: its check runs with bf16 off and accelerate's mixed precision "bf16" (which DeepSpeed's config takes,
        # as bf16=True gives it on a GPU), and bf16 is set again after it
        cpu_bf16 = bool(self.bf16) and deepspeed_on_cpu(self) and not self.deepspeed
        if self.bf16 and not cpu_bf16 and not self.use_cpu:
            from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

            if not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
                raise ConfigError(
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
            raise ConfigError(
                f"loss_type: SSAPOTrainer takes its loss from leader_loss; leave loss_type at "
                f"['sigmoid'], got {self.loss_type!r}"
            )
        if self.loss_weights not in (None, [1.0]):
            raise ConfigError(f"loss_weights: not used by SSAPOTrainer; leave it unset, got {self.loss_weights!r}")
        for name, default in (
            *(
                (p.name, DPOConfig.__dataclass_fields__[p.name].default)
                for p in trl_params
                if p.name not in loss.param_names
            ),
            ("ld_alpha", None),
            ("f_divergence_type", "reverse_kl"),
            ("use_weighting", False),
        ):
            if getattr(self, name) != default:
                raise ConfigError(
                    f"{name}: not supported by SSAPOTrainer (the loss is chosen by leader_loss); "
                    f"leave it at {default!r}, got {getattr(self, name)!r}"
                )

    @cached_property
    def _setup_devices(self) -> "torch.device":
        # `ddp_timeout` (TrainingArguments', not overridden here) reaches the process group on every path:
        # transformers passes it to accelerate except with use_cpu, where it is set here first
        init_cpu_process_group(self)
        return TrainingArguments._setup_devices.func(self)


# SSAPOConfig's loss parameters that RunConfig declares under the same name (from ssapo.leader_losses)
SHARED_LEADER_FIELDS = tuple(p.name for p in _OWN_PARAMS if p.run)


def leader_fields(cfg, leader_loss: str) -> dict:
    """The SSAPOConfig keyword arguments a leader stage of RunConfig `cfg` takes
    from it: `leader_loss`, the shared fields, and trl's fields that the loss
    uses (`label_smoothing`, the ε of rdpo/cdpo; left at trl's 0 for every other
    loss, which refuses it)."""
    kw = {"leader_loss": leader_loss, **{name: getattr(cfg, name) for name in SHARED_LEADER_FIELDS}}
    for p in leader_losses.PARAMS.values():
        if p.trl and p.name in leader_losses.get(leader_loss).param_names:
            kw[p.name] = getattr(cfg, p.name)
    return kw


class SSAPOTrainer(CheckpointMixin, DPOTrainer):
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
            leader_losses.get(args.leader_loss).spa_flags
            and ref_model is None
            and peft_config is None
            and not isinstance(model, str)
            and not is_peft_model(model)
        ):
            # SPA needs the reference's logits at every step: keep a frozen copy of the start
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        check_one_device_per_process(args, model)
        reentrant_checkpointing_reaches_transformers(args, model, peft_config)
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
        self.data_collator = AtomCollator(self.data_collator, leader_losses.needed_columns(self.args.leader_loss))
        gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
        self.confidence = losses.ConfidenceWindow(self.args.spa_window, self.args.spa_quantile, gather=gather)
        self._reset_stats()
        self.leader_stats: dict[str, Any] = {}
        self._checkpoint_states: dict[str, Any] = {}
        self.start_weights = start_weights
        self.fp32_start_restored: Optional[int] = None  # parameters whose fp32 master was set from start_weights
        self._resuming = False
        self.add_callback(_RestoreFP32Start(self))

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
                "weights. Load the policy in float32 (ssapo.loading.load_policy_kwargs(train=True)) and keep "
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
        directory = local_weights_dir(source)
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
            c for c in leader_losses.needed_columns(self.args.leader_loss) if c not in self._signature_columns
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
        kind = leader_losses.get(self.args.leader_loss)  # its declaration: what the loss reads and how it combines
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
        if kind.spa_flags:
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
        if kind.spa_flags:
            per_pair = self._spa_loss(h, confidence, mode)
        else:  # function(h, β, *its columns, *its parameters), as the table declares it
            extra = (*(inputs[c] for c in kind.columns), *(getattr(self.args, p) for p in kind.function_args))
            per_pair = kind.per_pair()(h, beta, *extra)
            if kind.counts_clamped:
                per_pair, clamped = per_pair
                if mode == "train":
                    mass = inputs[MASS]
                    self._clamped += int(clamped)
                    self._atoms += int((mass > 0).sum())
                    m["leader/clamped_fraction"].append(self._clamped / max(self._atoms, 1))
                    m["leader/atoms"] = [self._atoms]  # this process's atoms (mass > 0) so far, as trl's num_tokens
        batch_args = [getattr(self.args, p) for p in kind.batch_args]
        if kind.batch == "objective":  # the batch's loss from its per-pair losses (Dr. DPO's log-mean-exp)
            loss = kind.combine()(per_pair, *batch_args)
        elif kind.batch == "weights":
            # the mean ℓ over every process's micro-batch (detached), as KLDPO's authors' code gathers it
            everyone = self.accelerator.gather(per_pair.detach()) if self.accelerator.num_processes > 1 else None
            w = kind.combine()(per_pair, *batch_args, everyone)
            if mode == "train":
                m[f"leader/{kind.name}_max_weight"].append(w.max().item())  # this process's micro-batch
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
        return leader_losses.get(a.leader_loss).per_pair()(h, self.beta, flagged, alpha)  # losses.spa_loss

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
            if not is_complete(resume_from_checkpoint):
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
