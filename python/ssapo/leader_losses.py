"""The leader losses as data: one `LeaderLoss` declaration per loss in `TABLE`,
from which everything else about a loss is derived.

    from ssapo.leader_losses import TABLE, get
    get("kldpo").params, get("shift_prob").columns, ssapo_leader_losses()

A declaration says: the loss's `name` and `help`; its per-pair `function`
(a name in `ssapo.losses`, resolved only when a trainer calls it, or a
callable), called as `function(h, β, *columns, *function_args)`, where
`columns` are the atom columns of each pair it reads (`ssapo.atoms.COLUMNS`)
and `function_args` the parameters handed to it; its parameters (`Param`:
field name, type, default, bounds, help), declared once, or by name when
another loss declares them; how a batch of per-pair losses combines (`batch`:
their mean, a batch-level objective, or detached weights of a weighted mean);
and whether SSAPO's leader (`method: ssapo`) may use it (`ssapo_leader`).

Derived from the table: `ssapo.config.LEADER_LOSSES` (the names with
`ssapo_leader`) and RunConfig's `leader_loss` choices and help; RunConfig's
parameter fields (their default, bounds and help; a parameter RunConfig does
not declare by position is appended to its `group` in `ssapo train --help`);
`ssapo.trainer.SSAPOConfig`'s `leader_loss` choices (every name) and its
parameter fields, their checks, and `leader_fields`; the columns checked and
collated (`needed_columns`); `SSAPOTrainer._compute_loss`'s dispatch.

This module imports nothing of the project but `ssapo.errors` (ssapo.config
imports it; tests/loop/test_methods.py checks the modules config imports).
Adding a leader loss is one `LeaderLoss(...)` in `TABLE` below and its test
(docs/ARCHITECTURE.md, "How to add a leader loss").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple, Union

from ssapo.errors import ConfigError

BATCH = ("mean", "objective", "weights")


@dataclass(frozen=True)
class Param:
    """A loss parameter: `name` is its field in RunConfig and SSAPOConfig (the same name in both), `type`
    (float or int), `default`, `bounds` (ssapo.config.Bounds.of's text: "[0, 0.5]", "(0, 1)", "> 0",
    ">= 1"), `help` (shown by `ssapo train --help` and by SSAPOConfig's parser), `note` after the interval
    in an error. `run`: also a RunConfig field (False for a per-round value a method hands the leader,
    as SPA's spa_lambda from RunConfig's spa_lambdas). `trl`: a field trl's DPOConfig already declares
    (label_smoothing): SSAPOConfig keeps trl's default, and a loss that does not use it refuses any other
    value. `group`: its group in `ssapo train --help` when RunConfig's docstring does not list it."""

    name: str
    type: type
    default: Any
    bounds: str
    help: str
    note: str = ""
    run: bool = True
    trl: bool = False
    group: str = "Leader"

    def __post_init__(self):
        if self.type not in (float, int):
            raise TypeError(f"{self.name}: a loss parameter is a float or an int, got {self.type!r}")


@dataclass(frozen=True)
class LeaderLoss:
    """One leader loss (see the module docstring).

    - `function`: the per-pair loss, `function(h, beta, *columns, *function_args)` -> (B,) tensor; a name
      in ssapo.losses or a callable. `counts_clamped`: it returns (per pair, clamped atoms), counted in
      leader_stats. `spa_flags`: SPA's leader: the reference runs every step for its logits, the de-coupled
      confidence flags the least confident pairs, and the call is `function(h, beta, flagged, alpha)`.
    - `params`: the parameters it owns (`Param`) or, by name, one another loss declares.
    - `batch`: "mean" (the mean of the per-pair losses), "objective" (`batch_function(per_pair,
      *batch_args)` is the batch's loss, e.g. Dr. DPO's log-mean-exp), "weights" (`batch_function(per_pair,
      *batch_args, everyone)` gives detached weights w, the loss is mean w·ℓ; `everyone` the losses of
      every process's micro-batch; its largest weight is logged as leader/<name>_max_weight).
    - `ssapo_leader`: `method: ssapo` may use it (`leader_loss: <name>`)."""

    name: str
    help: str
    function: Union[str, Callable]
    columns: Tuple[str, ...] = ()
    function_args: Tuple[str, ...] = ()
    params: Tuple[Union[Param, str], ...] = ()
    batch: str = "mean"
    batch_function: Union[str, Callable, None] = None
    batch_args: Tuple[str, ...] = ()
    ssapo_leader: bool = False
    counts_clamped: bool = False
    spa_flags: bool = False

    def __post_init__(self):
        if self.batch not in BATCH:
            raise ValueError(f"{self.name}: batch must be one of {', '.join(BATCH)}, got {self.batch!r}")
        if (self.batch == "mean") != (self.batch_function is None):
            raise ValueError(f"{self.name}: batch_function goes with batch 'objective' or 'weights', and only")

    @property
    def param_names(self) -> Tuple[str, ...]:
        return tuple(p if isinstance(p, str) else p.name for p in self.params)

    def per_pair(self) -> Callable:
        return _resolve(self.function)

    def combine(self) -> Callable:
        return _resolve(self.batch_function)


def _resolve(fn) -> Callable:
    if callable(fn):
        return fn
    from ssapo import losses  # torch: only when a trainer computes a loss

    return getattr(losses, fn)


TABLE: Dict[str, LeaderLoss] = {}
PARAMS: Dict[str, Param] = {}  # every loss parameter, by name, in declaration order


def register(loss: LeaderLoss) -> LeaderLoss:
    """Adds `loss` to TABLE (and its own parameters to PARAMS). Before ssapo.config and ssapo.trainer are
    imported, as the declarations below: RunConfig's and SSAPOConfig's fields are made from the table when
    their modules are imported."""
    if loss.name in TABLE:
        raise ValueError(f"leader loss {loss.name!r} is declared twice")
    own = [p for p in loss.params if isinstance(p, Param)]
    for p in own:
        if p.name in PARAMS:
            raise ValueError(f"{loss.name}: parameter {p.name!r} is declared by another loss; name it as a string")
    for name in (*loss.function_args, *loss.batch_args):
        if name not in loss.param_names:
            raise ValueError(f"{loss.name}: {name!r} is handed to a function but not among its params")
    missing = [p for p in loss.params if isinstance(p, str) and p not in PARAMS]
    if missing:
        raise ValueError(f"{loss.name}: parameters {missing} are declared by no loss before it")
    PARAMS.update({p.name: p for p in own})
    TABLE[loss.name] = loss
    return loss


def get(name: str) -> LeaderLoss:
    if name not in TABLE:
        raise ConfigError(f"leader_loss: must be one of {', '.join(TABLE)}, got {name!r}")
    return TABLE[name]


def ssapo_leader_losses() -> Tuple[str, ...]:
    """The losses SSAPO's leader may use (RunConfig.leader_loss's choices)."""
    return tuple(name for name, loss in TABLE.items() if loss.ssapo_leader)


def needed_columns(name: str) -> Tuple[str, ...]:
    """The atom columns loss `name` reads (none for a name not in the table)."""
    return TABLE[name].columns if name in TABLE else ()


def users(param: str) -> Tuple[str, ...]:
    """The losses that use parameter `param`."""
    return tuple(name for name, loss in TABLE.items() if param in loss.param_names)


def field_spec(name: str) -> Dict[str, Any]:
    """`ssapo.config._f`'s keyword arguments of parameter `name`: default, help, bounds, note."""
    p = PARAMS[name]
    return {"default": p.default, "help": p.help, "bounds": p.bounds, "note": p.note}


def help_of(names) -> str:
    """The `leader_loss` help over `names`: each loss's name and help."""
    return (
        " | ".join(f"{name} ({TABLE[name].help})" for name in names) + " (ssapo.leader_losses: one declaration each)."
    )


def run_params() -> Tuple[Param, ...]:
    return tuple(p for p in PARAMS.values() if p.run)


_SPA = "SPA (Kim et al., ICLR 2025)"
_ROBUST = "Robust DPO (docs/METHOD.md §5.5)"

for _loss in (
    LeaderLoss(
        name="shift_prob",
        help="the released code: Σ_j α_j·−log clamp(σ(βh) − δ_j, clamp_min); needs columns shift and mass",
        function="shift_prob_loss",
        columns=("shift", "mass"),
        function_args=("clamp_min",),
        params=(
            Param(
                "clamp_min",
                float,
                1e-6,
                "(0, 1)",
                "Clamp of σ(βh) − shift in shift_prob (the released code: 1e-6); atoms below it give a constant "
                "loss and no gradient and are counted in leader_stats.",
            ),
        ),
        ssapo_leader=True,
        counts_clamped=True,
    ),
    LeaderLoss(
        name="shift_margin",
        help="Σ_j α_j·softplus(−(βh − δ_j)), shifts in units of βh (follower_space: margin); needs shift and mass",
        function="shift_margin_loss",
        columns=("shift", "mass"),
        ssapo_leader=True,
    ),
    LeaderLoss(
        name="weights",
        help="weight·DPO, the follower's gradient-matching weights; needs column weight",
        function="weighted_dpo_loss",
        columns=("weight",),
        ssapo_leader=True,
    ),
    LeaderLoss(
        name="kept_mass",
        help="ours: DPO weighted by the mass the follower left in place; needs shift and mass",
        function="kept_mass_loss",
        columns=("shift", "mass"),
        ssapo_leader=True,
    ),
    LeaderLoss(
        name="drop_moved",
        help="ours: DPO, pairs whose moved mass is at least drop_threshold dropped; needs shift and mass",
        function="drop_moved_loss",
        columns=("shift", "mass"),
        function_args=("drop_threshold",),
        params=(
            Param(
                "drop_threshold",
                float,
                0.5,
                "(0, 1]",
                "drop_moved: drop a pair (loss 0) whose mass moved by the follower is at least this, in (0, 1].",
            ),
        ),
        ssapo_leader=True,
    ),
    LeaderLoss(
        name="flip_moved",
        help="ours: per-pair label smoothing by the moved mass, (1 − m)·DPO + m·DPO of the other label; "
        "needs shift and mass",
        function="flip_moved_loss",
        columns=("shift", "mass"),
        ssapo_leader=True,
    ),
    LeaderLoss(
        name="trimmed",
        help="ours: DPO's mean over the micro-batch less its trim_fraction most-moved pairs; needs shift and mass",
        function="trimmed_loss",
        columns=("shift", "mass"),
        function_args=("trim_fraction",),
        params=(
            Param(
                "trim_fraction",
                float,
                0.2,
                "[0, 1)",
                "trimmed: drop at most floor(trim_fraction·B) pairs of each micro-batch, the most moved first "
                "(never an unmoved one), in [0, 1).",
            ),
        ),
        ssapo_leader=True,
    ),
    LeaderLoss(name="dpo", help="plain DPO", function="dpo_loss", ssapo_leader=True),
    LeaderLoss(
        name="spa",
        help="SPA's smoothing of the pairs the de-coupled model is least confident about",
        function="spa_loss",
        params=(
            Param(
                "spa_alpha",
                float,
                0.1,
                "[0, 0.5]",
                "SPA: label smoothing α on the flagged pairs, in [0, 0.5] (0.5 erases the label).",
                group=_SPA,
            ),
            Param(
                "spa_lambda",
                float,
                0.5,
                ">= 0",
                "SPA: this round's de-coupling λ, logits (1+λ)·logits_θ − λ·logits_ref (eq. 12); "
                "a run takes it from spa_lambdas.",
                note="0 = the policy itself",
                run=False,
                group=_SPA,
            ),
            Param(
                "spa_quantile",
                float,
                0.1,
                "[0, 1]",
                "SPA: flag the pairs at or below this quantile of de-coupled confidence, in [0, 1].",
                group=_SPA,
            ),
            Param(
                "spa_window", int, 50, ">= 1", "SPA: moving window of confidences (gathered over ranks).", group=_SPA
            ),
            Param(
                "spa_warmup_ratio",
                float,
                0.2,
                "[0, 1]",
                "SPA: no smoothing during this fraction of a round's optimizer steps, in [0, 1].",
                group=_SPA,
            ),
        ),
        ssapo_leader=True,
        spa_flags=True,
    ),
    LeaderLoss(
        name="rdpo",
        help="robust DPO (Chowdhury et al. 2024): unbiased under label flips at rate label_smoothing",
        function="rdpo_loss",
        function_args=("label_smoothing",),
        params=(
            Param(
                "label_smoothing",
                float,
                0.1,
                "[0, 0.5)",
                "rdpo: the assumed flip rate ε of the labels; cdpo: the label smoothing ε of every pair (0.5 would "
                "erase the labels, 0 is DPO).",
                trl=True,
                group=_ROBUST,
            ),
        ),
    ),
    LeaderLoss(
        name="cdpo",
        help="conservative DPO (Mitchell 2023): label smoothing label_smoothing on every pair",
        function="cdpo_loss",
        function_args=("label_smoothing",),
        params=("label_smoothing",),
    ),
    LeaderLoss(
        name="drdpo",
        help="Dr. DPO (Wu et al. 2024): −β′·log mean exp(−ℓ/β′) of the micro-batch's DPO losses",
        function="dpo_loss",
        params=(
            Param(
                "drdpo_beta",
                float,
                1.0,
                "> 0",
                "drdpo: β′ of −β′·log mean exp(−ℓ/β′) over the micro-batch (the paper: 1).",
                group=_ROBUST,
            ),
        ),
        batch="objective",
        batch_function="drdpo_loss",
        batch_args=("drdpo_beta",),
    ),
    LeaderLoss(
        name="kldpo",
        help="KLDPO (Xu et al. 2025): DPO losses weighted by min(exp((ℓ − mean ℓ)/τ), max_weight), detached",
        function="dpo_loss",
        params=(
            Param(
                "kldpo_tau",
                float,
                0.1,
                "> 0",
                "kldpo: temperature τ of the per-pair weights exp((ℓ − mean ℓ)/τ).",
                group=_ROBUST,
            ),
            Param(
                "kldpo_max_weight",
                float,
                10.0,
                ">= 1",
                "kldpo: upper clamp of each weight (the authors' code: 10).",
                group=_ROBUST,
            ),
        ),
        batch="weights",
        batch_function="kldpo_weights",
        batch_args=("kldpo_tau", "kldpo_max_weight"),
    ),
):
    register(_loss)
del _loss
