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
  on the pairs the de-coupled model is least confident about).
Extra columns are carried through trl's tokenization and collator; each pair
meets its own atoms in the loss.

Reference: `ref_model` when given, else (with peft) the adapter-disabled model,
else the policy as it is before training. Its log-probabilities are computed
once, before training (`precompute_ref_log_probs=True`, the default here), and
stored as dataset columns. `spa` needs the reference's token logits at every
step for its de-coupled model, so it runs the reference each step (it then
takes the reference log-probabilities from that same forward) and keeps a
frozen copy of the start model when there is neither `ref_model` nor peft.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from accelerate.utils import is_peft_model
from trl import DPOConfig, DPOTrainer

from ssapo import losses

LEADER_LOSSES = ("dpo", "shift_prob", "shift_margin", "weights", "spa")
ATOM_COLUMNS = ("shift", "mass", "weight")
NEEDED_COLUMNS = {"shift_prob": ("shift", "mass"), "shift_margin": ("shift", "mass"), "weights": ("weight",)}
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *ATOM_COLUMNS}


@dataclass
class SSAPOConfig(DPOConfig):
    """trl's `DPOConfig` plus the leader's loss (`leader_loss`, `clamp_min`) and
    SPA's switches (`spa_*`). trl's own loss options (`loss_type`,
    `label_smoothing`, `ld_alpha`, `f_divergence_type`, `use_weighting`) must
    stay at their defaults: the loss is chosen by `leader_loss`."""

    leader_loss: str = field(
        default="shift_prob",
        metadata={
            "help": "Leader loss, one of 'shift_prob' (default; the released SSAPO code: Σ_j mass·−log "
            "clamp(σ(βh) − shift, clamp_min), needs columns shift and mass), 'shift_margin' (Σ_j mass·"
            "softplus(−(βh − shift)), shift in units of βh; needs shift and mass), 'weights' (weight·DPO; "
            "needs column weight), 'dpo' (plain DPO) or 'spa' (SPA's smoothing of the least confident pairs).",
            "choices": list(LEADER_LOSSES),
        },
    )
    clamp_min: float = field(
        default=1e-6,
        metadata={"help": "'shift_prob': lower clamp of σ(βh) − shift (released code: 1e-6); atoms below it "
                          "give a constant loss and no gradient and are counted in leader_stats."},
    )
    spa_alpha: float = field(
        default=0.1, metadata={"help": "'spa': label-smoothing strength α on flagged pairs (SPA eq. 10), in [0, 0.5]."}
    )
    spa_lambda: float = field(
        default=0.5,
        metadata={"help": "'spa': de-coupling λ of this round, logits (1+λ)·logits_θ − λ·logits_ref (SPA eq. 12); "
                          "the paper uses 1/2, 1/4, 1/8 in rounds 1, 2, 3. >= 0."},
    )
    spa_quantile: float = field(
        default=0.1,
        metadata={"help": "'spa': flag pairs whose de-coupled confidence is at or below this quantile of the "
                          "window (SPA: the lowest 10 %), in [0, 1]."},
    )
    spa_window: int = field(
        default=50, metadata={"help": "'spa': number of most recent confidences (gathered over ranks) τ is taken from."}
    )
    spa_warmup_ratio: float = field(
        default=0.2,
        metadata={"help": "'spa': no smoothing (α = 0) during this fraction of the optimizer steps, in [0, 1]."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Compute the reference log-probabilities once, before training (default True here). "
                          "Ignored (False) for leader_loss='spa', which needs the reference's logits every step."},
    )

    def __post_init__(self):
        if self.leader_loss not in LEADER_LOSSES:
            raise ValueError(f"leader_loss: must be one of {LEADER_LOSSES}, got {self.leader_loss!r}")
        if not 0.0 < self.clamp_min < 1.0:
            raise ValueError(f"clamp_min: must be in (0, 1), got {self.clamp_min}")
        if not 0.0 <= self.spa_alpha <= 0.5:
            raise ValueError(f"spa_alpha: must be in [0, 0.5] (0.5 erases the label), got {self.spa_alpha}")
        if not self.spa_lambda >= 0:
            raise ValueError(f"spa_lambda: must be >= 0 (0 = the policy itself), got {self.spa_lambda}")
        if not 0.0 <= self.spa_quantile <= 1.0:
            raise ValueError(f"spa_quantile: must be in [0, 1], got {self.spa_quantile}")
        if int(self.spa_window) != self.spa_window or self.spa_window < 1:
            raise ValueError(f"spa_window: must be an integer >= 1, got {self.spa_window}")
        if not 0.0 <= self.spa_warmup_ratio <= 1.0:
            raise ValueError(f"spa_warmup_ratio: must be in [0, 1], got {self.spa_warmup_ratio}")
        if self.leader_loss == "spa":
            self.precompute_ref_log_probs = False  # the de-coupled model needs reference logits every step
        super().__post_init__()
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_type != ["sigmoid"]:
            raise ValueError(f"loss_type: SSAPOTrainer takes its loss from leader_loss; leave loss_type at "
                             f"['sigmoid'], got {self.loss_type!r}")
        if self.loss_weights not in (None, [1.0]):
            raise ValueError(f"loss_weights: not used by SSAPOTrainer; leave it unset, got {self.loss_weights!r}")
        for name, default in (("label_smoothing", 0.0), ("ld_alpha", None), ("f_divergence_type", "reverse_kl"),
                              ("use_weighting", False)):
            if getattr(self, name) != default:
                raise ValueError(f"{name}: not supported by SSAPOTrainer (the loss is chosen by leader_loss); "
                                 f"leave it at {default!r}, got {getattr(self, name)!r}")


class _AtomCollator:
    """Wraps trl's preference collator and adds each row's atoms as float32
    tensors, in the order of the rows: shift/mass (B, K), weight (B,)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        for key in ATOM_COLUMNS:
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch


def _columns(ds) -> Optional[list]:
    names = getattr(ds, "column_names", None)
    if names is None:
        return None
    if isinstance(names, dict):  # DatasetDict
        return sorted(set.intersection(*(set(v) for v in names.values()))) if names else []
    return list(names)


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
    """

    _tag_names = ["trl", "dpo", "ssapo"]

    def __init__(self, model, ref_model=None, args: Optional[SSAPOConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SSAPOConfig(f"{str(name).rstrip('/').split('/')[-1] or 'model'}-SSAPO")
        if not isinstance(args, SSAPOConfig):
            raise ValueError(f"args: must be an ssapo.trainer.SSAPOConfig, got {type(args).__name__}")
        needed = NEEDED_COLUMNS.get(args.leader_loss, ())
        for what, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            parts = ds.items() if isinstance(ds, dict) and not hasattr(ds, "column_names") else [(None, ds)]
            for part, d in parts:
                cols = _columns(d) if d is not None else None
                missing = [c for c in needed if cols is not None and c not in cols]
                if missing:
                    where = what if part is None else f"{what}[{part!r}]"
                    raise ValueError(
                        f"{where}: leader_loss={args.leader_loss!r} needs the column(s) {missing} "
                        "(the follower's atoms, see ssapo.follower), or choose leader_loss='dpo'"
                    )
        if args.leader_loss == "spa" and ref_model is None and peft_config is None and not isinstance(model, str) \
                and not is_peft_model(model):
            # SPA needs the reference's logits at every step: keep a frozen copy of the start
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         **kwargs)
        self.data_collator = _AtomCollator(self.data_collator)
        gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
        self.confidence = losses.ConfidenceWindow(self.args.spa_window, self.args.spa_quantile, gather=gather)
        self._reset_stats()
        self.leader_stats: dict[str, Any] = {}

    def _reset_stats(self):
        self._clamped = self._atoms = self._flagged = self._seen = 0
        self._grad_norms: list[float] = []
        self._step_losses: list[torch.Tensor] = []
        self._step_loss = None
        self.confidence.reset()

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in ATOM_COLUMNS if c not in self._signature_columns
        ]

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
            ref_inputs = {k: v for k, v in inputs.items() if k not in ATOM_COLUMNS}
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, ref_inputs)
        chosen_ratio = chosen_logps - ref_chosen.to(chosen_logps.dtype)
        rejected_ratio = rejected_logps - ref_rejected.to(rejected_logps.dtype)
        h = chosen_ratio - rejected_ratio  # log-ratio margin, one per pair

        m = self._metrics[mode]
        if kind == "dpo":
            per_pair = losses.dpo_loss(h, beta)
        elif kind == "shift_prob":
            mass = inputs["mass"]
            per_pair, clamped = losses.shift_prob_loss(h, beta, inputs["shift"], mass, self.args.clamp_min)
            if mode == "train":
                self._clamped += int(clamped)
                self._atoms += int((mass > 0).sum())
                m["leader/clamped_fraction"].append(self._clamped / max(self._atoms, 1))
        elif kind == "shift_margin":
            per_pair = losses.shift_margin_loss(h, beta, inputs["shift"], inputs["mass"])
        elif kind == "weights":
            per_pair = losses.weighted_dpo_loss(h, beta, inputs["weight"])
        else:
            per_pair = self._spa_loss(h, confidence, mode)
        loss = per_pair.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        gather = self.accelerator.gather_for_metrics
        m["rewards/chosen"].append(gather(beta * chosen_ratio.detach()).mean().item())
        m["rewards/rejected"].append(gather(beta * rejected_ratio.detach()).mean().item())
        m["rewards/accuracies"].append(gather((h.detach() > 0).float()).mean().item())
        m["rewards/margins"].append(gather(beta * h.detach()).mean().item())
        m["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        if return_outputs:  # as trl: the fused head builds no logits, so recompute them for compute_metrics
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
            return loss, outputs
        return loss

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
        ref = losses.sequence_logps(ref_logits[:, :-1], input_ids[:, 1:], cmask[:, 1:]).chunk(2, dim=0)
        confidence = losses.decoupled_margin(pol_logits, ref_logits, input_ids, cmask, self.args.spa_lambda,
                                             self.beta, ref_logps=ref)
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

    def train(self, *args, **kwargs):
        self._reset_stats()
        # the start point, on the main process only (ranks hold the same replica), on CPU in the params' dtype
        track = not self._sharded() and self.accelerator.is_main_process
        start = {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()} if track else None
        out = super().train(*args, **kwargs)

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
            disp = float(acc.broadcast(torch.tensor([disp], dtype=torch.float64, device=acc.device))[0])
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
