"""The leader: `SSAPOTrainer`, trl's `DPOTrainer` with the losses of
`ssapo.losses`, each pair trained against its own follower atoms.

    from ssapo.trainer import SSAPOConfig, SSAPOTrainer
    args = SSAPOConfig(output_dir="out", leader_loss="shift_prob", beta=0.1)
    trainer = SSAPOTrainer(model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train(); trainer.leader_stats

Dataset columns: `prompt`, `chosen`, `rejected` (strings or chat-message
lists, as for trl) and, by `leader_loss`:
- `shift_prob` / `shift_margin`: `shift` and `mass`, two floats each per row
  (`dro_core.Solution.shift` / `.mass`);
- `weights`: `weight`, one float per row (`dro_core.Solution.weights`);
- `dpo`: nothing more (plain DPO; iterative DPO's rounds and SSAPO's ε = 0 control);
- `spa`: nothing more (SPA's self-refinement, Kim et al. 2025: label smoothing on the
  pairs the de-coupled model is least confident about).
Reference log-probabilities are computed once before training
(`precompute_ref_log_probs=True` by default; `spa` needs the reference's logits
at every step, so it turns the precomputation off).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from ssapo import losses

LEADER_LOSSES = ("dpo", "shift_prob", "shift_margin", "weights", "spa")
ATOM_COLUMNS = ("shift", "mass", "weight")


@dataclass
class SSAPOConfig(DPOConfig):
    """trl's `DPOConfig` plus the leader's loss.

    Leader:
        leader_loss: which loss the leader trains with (see `ssapo.losses`).
        clamp_min: the clamp of the probability-shift loss (released code: 1e-6).
    """

    leader_loss: str = field(
        default="shift_prob",
        metadata={
            "help": "Leader loss: 'shift_prob' (the released SSAPO code: Σ_j mass·−log clamp(σ(βh) − shift)), "
            "'shift_margin' (Σ_j mass·softplus(−(βh − shift))), 'weights' (weight·DPO), or 'dpo'."
        },
    )
    clamp_min: float = field(default=1e-6, metadata={"help": "Clamp of σ(βh) − shift in the 'shift_prob' loss."})
    spa_alpha: float = field(default=0.1, metadata={"help": "SPA: label-smoothing strength α on flagged pairs."})
    spa_lambda: float = field(
        default=0.5, metadata={"help": "SPA: de-coupling λ of this round ((1+λ)·logits_θ − λ·logits_ref); the paper: 1/2, 1/4, 1/8."}
    )
    spa_quantile: float = field(default=0.1, metadata={"help": "SPA: flag pairs at or below this quantile of confidence."})
    spa_window: int = field(default=50, metadata={"help": "SPA: moving window of confidences (gathered over ranks)."})
    spa_warmup_ratio: float = field(
        default=0.2, metadata={"help": "SPA: no smoothing during this fraction of the optimizer steps."}
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Compute the reference log-probabilities once, before training."}
    )

    def __post_init__(self):
        if self.leader_loss not in LEADER_LOSSES:
            raise ValueError(f"leader_loss: must be one of {LEADER_LOSSES}, got {self.leader_loss!r}")
        if not (0.0 < self.clamp_min < 1.0):
            raise ValueError(f"clamp_min: must be in (0, 1), got {self.clamp_min}")
        if not 0.0 <= self.spa_alpha <= 0.5:
            raise ValueError(f"spa_alpha: must be in [0, 0.5], got {self.spa_alpha}")
        if self.spa_lambda < 0:
            raise ValueError(f"spa_lambda: must be >= 0, got {self.spa_lambda}")
        if self.leader_loss == "spa":
            self.precompute_ref_log_probs = False  # the de-coupled model needs reference logits every step
        super().__post_init__()


class _AtomCollator:
    """Wraps trl's preference collator and adds each row's atoms as tensors."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        for key in ATOM_COLUMNS:
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float64)
        return batch


class SSAPOTrainer(DPOTrainer):
    """trl's DPOTrainer whose per-pair loss is one of `ssapo.losses`.

    After `train()`, `leader_stats` holds `max_grad_norm` (the largest
    pre-clipping gradient norm seen), `clamped_fraction` (clamped atoms over
    atoms with positive mass, 'shift_prob' only), `param_displacement` (L2
    distance of the trainable parameters from where training started) and
    `loss_history` (the loss of every optimizer step).
    """

    _tag_names = ["trl", "dpo", "ssapo"]

    def __init__(self, model, ref_model=None, args: SSAPOConfig | None = None, **kwargs):
        if args is not None and args.leader_loss == "spa" and ref_model is None and kwargs.get("peft_config") is None \
                and not hasattr(model, "peft_config") and not isinstance(model, str):
            # SPA needs the reference's logits at every step: keep a frozen copy of the start
            ref_model = copy.deepcopy(model).eval()
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        a = self.args
        needed = {"shift_prob": ("shift", "mass"), "shift_margin": ("shift", "mass"), "weights": ("weight",)}.get(
            a.leader_loss, ()
        )
        if self.train_dataset is not None:
            missing = [c for c in needed if c not in self.train_dataset.column_names]
            if missing:
                raise ValueError(
                    f"train_dataset: leader_loss={a.leader_loss!r} needs the column(s) {missing} "
                    "(the follower's atoms; see ssapo.follower)"
                )
        self.data_collator = _AtomCollator(self.data_collator)
        self.confidence = losses.ConfidenceWindow(a.spa_window, a.spa_quantile)
        self._flagged = 0
        self._seen = 0
        self._start_params = None
        self._grad_norms: list[float] = []
        self._clamped = 0
        self._atoms = 0
        self.leader_stats: dict[str, Any] = {}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in ATOM_COLUMNS if c not in self._signature_columns
        ]

    # -- the loss ------------------------------------------------------------------

    def _policy_logps(self, model, inputs):
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *ATOM_COLUMNS}
        model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        return logps.chunk(2, dim=0), outputs

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        (chosen_logps, rejected_logps), outputs = self._policy_logps(model, inputs)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref, inputs)
        chosen_ratio = chosen_logps - ref_chosen.to(chosen_logps.dtype)
        rejected_ratio = rejected_logps - ref_rejected.to(rejected_logps.dtype)
        h = chosen_ratio - rejected_ratio
        beta = self.beta
        kind = self.args.leader_loss
        if kind == "dpo":
            per_pair = losses.dpo_loss(h, beta)
        elif kind == "shift_prob":
            mass = inputs["mass"].to(h.device)
            per_pair, clamped = losses.shift_prob_loss(
                h, beta, inputs["shift"].to(h.device), mass, self.args.clamp_min
            )
            if mode == "train":
                self._clamped += int(clamped)
                self._atoms += int((mass > 0).sum())
        elif kind == "shift_margin":
            per_pair = losses.shift_margin_loss(h, beta, inputs["shift"].to(h.device), inputs["mass"].to(h.device))
        elif kind == "weights":
            per_pair = losses.weighted_dpo_loss(h, beta, inputs["weight"].to(h.device))
        else:
            per_pair = self._spa_loss(model, inputs, h, ref_chosen, ref_rejected, mode)
        loss = per_pair.mean()

        gather = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        m["rewards/chosen"].append(gather(beta * chosen_ratio.detach()).mean().item())
        m["rewards/rejected"].append(gather(beta * rejected_ratio.detach()).mean().item())
        m["rewards/accuracies"].append(gather((h.detach() > 0).float()).mean().item())
        m["rewards/margins"].append(gather(beta * h.detach()).mean().item())
        m["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        m["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        if kind == "shift_prob" and mode == "train":
            m["leader/clamped_fraction"].append(self._clamped / max(self._atoms, 1))
        return (loss, outputs) if return_outputs else loss

    def _spa_loss(self, model, inputs, h, ref_chosen, ref_rejected, mode):
        """SPA (eq. 9–12): confidence of each pair under the de-coupled model
        softmax((1+λ)·logits_θ − λ·logits_ref), flagged when at or below the
        window's lower quantile, smoothed with α after the warm-up."""
        a = self.args
        model_kwargs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            pol_logits = model(**model_kwargs, use_cache=False).logits
            if self.ref_model is not None:
                ref_logits = self.ref_model(**model_kwargs, use_cache=False).logits
            else:  # peft: the adapter-disabled model
                from trl.trainer.utils import use_adapter

                with use_adapter(self.accelerator.unwrap_model(self.model), adapter_name=None):
                    ref_logits = self.model(**model_kwargs, use_cache=False).logits
        mixed = losses.decoupled_logits(pol_logits, ref_logits, a.spa_lambda)
        labels = inputs["input_ids"][:, 1:]
        mask = inputs["completion_mask"][:, 1:].to(mixed.dtype)
        mixed_logps = losses.sequence_logps(mixed[:, :-1], labels, mask)
        mc, mr = mixed_logps.chunk(2, dim=0)
        confidence = self.beta * ((mc - mr) - (ref_chosen.to(mc.dtype) - ref_rejected.to(mc.dtype)))
        flagged = self.confidence.flag(confidence)
        if mode == "train":
            self.confidence.update(self.accelerator.gather(confidence.detach()))
            self._flagged += int(flagged.sum())
            self._seen += int(flagged.numel())
            self._metrics[mode]["spa/flagged_fraction"].append(self._flagged / max(self._seen, 1))
        warm = self.state.global_step < a.spa_warmup_ratio * max(self.state.max_steps, 1)
        return losses.spa_loss(h, self.beta, flagged, 0.0 if warm else a.spa_alpha)

    # -- diagnostics -----------------------------------------------------------------

    def _trainable(self):
        return [(n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad]

    def _get_grad_norm(self, model, grad_norm=None):
        # the pre-clipping norm of every optimizer step (the clamped loss spikes)
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None:
            self._grad_norms.append(float(grad_norm))
        return grad_norm

    def train(self, *args, **kwargs):
        self._start_params = {n: p.detach().clone().float().cpu() for n, p in self._trainable()}
        self._clamped = self._atoms = 0
        self._grad_norms: list[float] = []
        self._losses: list[float] = []
        out = super().train(*args, **kwargs)
        disp = 0.0
        for n, p in self._trainable():
            disp += float(((p.detach().float().cpu() - self._start_params[n]) ** 2).sum())
        for rec in self.state.log_history:
            if "loss" in rec:
                self._losses.append(float(rec["loss"]))
        self.leader_stats = {
            "max_grad_norm": max(self._grad_norms) if self._grad_norms else float("nan"),
            "clamped_fraction": (self._clamped / self._atoms) if self._atoms else 0.0,
            "clamped_atoms": self._clamped,
            "atoms": self._atoms,
            "param_displacement": math.sqrt(disp),
            "loss_history": self._losses,
            "grad_norms": self._grad_norms,
            "spa_flagged_fraction": self._flagged / self._seen if self._seen else 0.0,
        }
        return out
