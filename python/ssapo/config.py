"""`RunConfig`: everything one `ssapo train` run needs, with the paper's
defaults, merged from a preset recipe, a YAML file and command-line overrides.

    from ssapo.config import load_config
    cfg = load_config("llama3-8b", "my.yaml", ["--eps", "0.05", "--round-sizes", "8000,20000"])
    cfg = load_config("tiny", overrides={"seed": 1})
    cfg = RunConfig.from_yaml("runs/x/config.yaml")

Order of precedence (later wins): the preset's recipe (when `model` names a
preset), the YAML file, the overrides. Every value is converted to its field's
type and checked once, from the field's metadata (`_f`: help, choices, bounds); every error is a
`ConfigError` (a ValueError) whose message starts with the field: "eps: must be >= 0, got -1"; an
unknown key lists the close matches.

Recipes live in one place, inside the package: `python/ssapo/recipes/<preset>/config.yaml`
and `python/ssapo/recipes/accelerate/{ddp,zero3,fsdp,zero3_cpu}.yaml` (maturin ships every
file under `python/ssapo/`, so an installed `ssapo` finds them next to this
module). The repository's top-level `recipes` is a git symlink to that
directory, for people browsing the repository; there is no second copy.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ssapo import leader_losses
from ssapo.accelerate_configs import ACCELERATE_CONFIGS, accelerate_config_path
from ssapo.errors import ConfigError
from ssapo.method_names import declared_methods

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
# preset name -> its recipe
PRESETS: Dict[str, str] = {
    name: os.path.join(RECIPES_DIR, name, "config.yaml") for name in ("tiny", "mistral-7b", "llama3-8b")
}


_METHOD_HELP = declared_methods()
# the `method` choices: one module per method in ssapo/methods/ (read, not imported: no torch, no cycle)
METHODS = tuple(_METHOD_HELP)
# the `leader_loss` choices: the losses of ssapo.leader_losses.TABLE that SSAPO's leader may use
LEADER_LOSSES = leader_losses.ssapo_leader_losses()


@dataclass(frozen=True)
class Bounds:
    """An interval a field's value (each item of a list field) must lie in; None = unbounded."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def of(cls, spec) -> "Bounds":
        """From "[0, 0.5]", "(0, 1]", "[0, 1)", "> 0", ">= 1", or a tuple (lo, hi) = the closed [lo, hi]."""
        if isinstance(spec, Bounds):
            return spec
        if not isinstance(spec, str):
            lo, hi = spec
            return cls(lo, hi)
        s = spec.strip()
        for op, lo_open in ((">=", False), (">", True)):
            if s.startswith(op):
                return cls(float(s[len(op) :]), None, lo_open, False)
        if s[0] in "[(" and s[-1] in "])":
            lo, hi = (float(v) for v in s[1:-1].split(","))
            return cls(lo, hi, s[0] == "(", s[-1] == ")")
        raise ValueError(f"bounds: cannot read {spec!r}")

    def __contains__(self, value) -> bool:
        if self.lo is not None and not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def text(self) -> str:
        """'in [0, 0.5]', 'in (0, 1]', '>= 1', '> 0'."""
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def _f(
    default,
    help: str,
    choices: Optional[Sequence[Any]] = None,
    bounds: Union[str, Sequence[float], None] = None,
    note: str = "",
    error: str = "",
):
    """A RunConfig field: its default, help, and what RunConfig.__post_init__ checks from the metadata:
    `choices`, `bounds` (Bounds.of: "[0, 0.5]", "(0, 1]", "> 0", ">= 1", (lo, hi) = closed; a list field's
    items each; None passes an Optional field), the error's `note` after the interval, or `error` instead of
    "must be <interval>"."""
    meta: Dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if bounds is not None:  # checked by check_bounds (RunConfig and SSAPOConfig alike)
        meta["bounds"] = Bounds.of(bounds)
        if note:
            meta["note"] = note
        if error:
            meta["error"] = error
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _param(name: str):
    """A RunConfig field that is a leader-loss parameter: everything but its place from its one declaration
    in ssapo.leader_losses (default, bounds, help)."""
    return _f(**leader_losses.field_spec(name))


def _with_loss_params(cls):
    """Before @dataclass: RunConfig's fields gain every leader-loss parameter (`ssapo.leader_losses`, `run`)
    that the class body does not place (those are appended, after the declared fields); a placed one must
    have its declared type and be declared through `_param`."""
    notes = dict(cls.__dict__.get("__annotations__", {}))
    for p in leader_losses.run_params():
        if p.name not in notes:
            notes[p.name] = p.type.__name__
            setattr(cls, p.name, _param(p.name))
        elif notes[p.name] != p.type.__name__ or cls.__dict__[p.name].metadata["help"] != p.help:
            raise TypeError(f"RunConfig.{p.name}: declare it as `{p.name}: {p.type.__name__} = _param({p.name!r})`")
    cls.__annotations__ = notes
    return cls


@dataclass
@_with_loss_params
class RunConfig:
    """The whole SSAPO run. Defaults are the paper's Mistral-7B setting
    (docs/METHOD.md §4.6); the recipes in `recipes/<preset>/`
    set every value explicitly.

    Model: model, ref_model, tokenizer, trust_remote_code, output_dir, method, seed.
    Data: preference_data, prompt_data, seed_size, round_sizes, num_rounds,
        max_prompt_length, max_length.
    Seed stage (DPO on the labelled seed from π_init): seed_epochs, seed_learning_rate, seed_model.
    Rounds: learning_rate, num_train_epochs_per_round, per_device_train_batch_size,
        gradient_accumulation_steps, batch_size, precompute_ref_batch_size, lr_scheduler_type, warmup_ratio, beta,
        round_reference.
    Annotation: num_samples, temperature, top_p, max_new_tokens, annotation_reference,
        generation_batch_size, generation_backend, system_turn, annotator, annotator_args,
        annotation_flip_rate, annotation_reward, annotation_length_penalty,
        annotation_score_stop.
    Follower: beta_follower, eps, k, group_size, follower_space.
    Leader: leader_loss, clamp_min, resolve_every.
    SPA (Kim et al., ICLR 2025): spa_alpha, spa_lambdas, spa_quantile, spa_window, spa_warmup_ratio.
    SeRA (Ko et al., ICLR 2025): sera_keep, sera_num_samples, sera_top_p, sera_gamma,
        sera_gamma_role, sera_pool.
    Robust DPO (docs/METHOD.md §5.5): label_smoothing, drdpo_beta, kldpo_tau, kldpo_max_weight.
    (The leader losses' parameters are declared in ssapo.leader_losses, placed here by `_param`; one
    not placed is appended, shown in its declared group.)
    PEFT: use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules, load_in_4bit.
    Infra: bf16, use_cpu, gradient_checkpointing, report_to, logging_steps,
        save_total_limit, save_steps, ddp_timeout, accelerate_config, report_plots.
    """

    # -- model --
    model: str = _f("tiny", "Preset (tiny, mistral-7b, llama3-8b) or a local path / hub id of the SFT model π_init.")
    ref_model: Optional[str] = _f(
        None, "π_init: the reference of the seed stage and of the implicit reward (default: model)."
    )
    tokenizer: Optional[str] = _f(None, "Tokenizer path or hub id (default: the model's own).")
    trust_remote_code: bool = _f(False, "Allow model repositories' own code (only when you trust them).")
    output_dir: str = _f("runs/ssapo", "Run directory: seed/, round_<t>/, state.json, config.yaml.")
    method: str = _f(
        "ssapo",
        "; ".join(f"{name}: {text}" for name, text in _METHOD_HELP.items()) + " (ssapo.methods: one module each).",
        METHODS,
    )
    seed: int = _f(42, "Seed of the data shuffle (the paper: 42), sampling and training.")
    # -- data --
    preference_data: Optional[str] = _f(
        None,
        "Labelled pairs (prompt/chosen/rejected, strings or chat messages): .jsonl/.json/.parquet, a save_to_disk "
        "dir or a hub id ('id' or 'id:split'). The paper: argilla/ultrafeedback-binarized-preferences-cleaned.",
    )
    prompt_data: Optional[str] = _f(
        None, "Separate unlabelled prompt pool for the rounds (default: the prompts of preference_data after the seed)."
    )
    seed_size: int = _f(
        2000, "Labelled seed pairs: rows [0, seed_size) after the shuffle (the paper: 2K, 3.3 %).", bounds=">= 1"
    )
    round_sizes: List[int] = _f(
        [8000, 20000, 30000],
        "Prompts per round, consecutive blocks after the seed (the paper: 8K, 20K, 30K).",
        bounds=">= 1",
    )
    num_rounds: int = _f(3, "Self-annotation rounds T (the first num_rounds of round_sizes are used).", bounds=">= 0")
    max_prompt_length: int = _f(
        1024, "Prompts longer than this many tokens are skipped (and counted) by the split.", bounds=">= 1"
    )
    max_length: int = _f(2048, "Maximum prompt + response tokens in training.", bounds=">= 1")
    # -- seed stage --
    seed_epochs: float = _f(3.0, "Epochs of seed DPO (the paper: 3 for Mistral, 1 for Llama).", bounds="> 0")
    seed_learning_rate: float = _f(5e-7, "Learning rate of seed DPO.", bounds="> 0")
    seed_model: Optional[str] = _f(
        None,
        "π_0 given (a checkpoint directory): the seed-DPO stage is skipped and round 1 starts from it "
        "(e.g. one seed model shared by several methods' runs); null: seed DPO trains π_0.",
    )
    # -- rounds --
    learning_rate: float = _f(5e-7, "Learning rate of every round (the released Mistral yaml: 3e-7).", bounds="> 0")
    num_train_epochs_per_round: float = _f(1.0, "Epochs per round, on that round's own pairs only.", bounds="> 0")
    per_device_train_batch_size: Optional[int] = _f(
        1,
        "Micro-batch per device; null: derived, batch_size / (processes × gradient_accumulation_steps (null: 1)).",
        bounds=">= 1",
    )
    gradient_accumulation_steps: Optional[int] = _f(
        None,
        "Accumulation steps; default (null): batch_size / (per_device_train_batch_size × processes).",
        bounds=">= 1",
    )
    batch_size: int = _f(
        32, "Effective batch size: per device × accumulation × processes (the paper: 32).", bounds=">= 1"
    )
    precompute_ref_batch_size: Optional[int] = _f(
        None,
        "Pairs per forward pass when the reference's log-probs are computed once before each training stage, "
        "and in the re-solve's margin pass (resolve_every) (no gradients: larger than the micro-batch, bounded by "
        "the logits' memory, 2 × length × vocabulary per pair); null: per_device_train_batch_size (trl's default; "
        "the re-solve: max(8, generation_batch_size)).",
        bounds=">= 1",
    )
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule (transformers' names).")
    warmup_ratio: float = _f(0.1, "Warm-up fraction of each stage's optimizer steps.", bounds="[0, 1)")
    beta: float = _f(0.1, "DPO β of the seed stage and the leader (the paper: 0.1 Mistral, 0.05 Llama).", bounds="> 0")
    round_reference: str = _f(
        "previous",
        "Reference of round t's leader: 'previous' = π_{t-1} (the released code) or 'init' = π_init.",
        ("previous", "init"),
    )
    # -- annotation --
    num_samples: int = _f(
        2,
        "Responses sampled per prompt; chosen = best, rejected = worst by implicit reward.",
        bounds=">= 2",
        error="needs at least 2 responses per prompt to form a pair",
    )
    temperature: float = _f(0.7, "Sampling temperature.", bounds="> 0")
    top_p: float = _f(1.0, "Nucleus sampling.", bounds="(0, 1]")
    max_new_tokens: int = _f(300, "Maximum new tokens per response.", bounds=">= 1")
    annotation_reference: str = _f(
        "init",
        "Reference of the implicit reward log π_{t-1} − log π_ref: 'init' = π_init (the paper and the released "
        "code) or 'seed' = the seed model π_0.",
        ("init", "seed"),
    )
    generation_batch_size: int = _f(16, "Prompts per generate() call (transformers backend).", bounds=">= 1")
    generation_backend: str = _f(
        "auto", "auto (vLLM if installed and a GPU is there) | transformers | vllm.", ("auto", "transformers", "vllm")
    )
    system_turn: str = _f(
        "auto",
        "Empty system message before chat prompts (generation, scoring and training alike): 'empty' | 'none' | "
        "'auto' = the released code's rule: empty when the chat template has a system role, unless the model's "
        "name contains 'llama'.",
        ("auto", "empty", "none"),
    )
    annotator: str = _f(
        "implicit",
        "Who ranks the sampled responses: 'implicit' = the implicit reward log π_{t-1} − log π_ref (the paper), "
        "or 'module:factory', imported in the process that annotates: factory(annotator_args) returns "
        "score(prompts, responses) -> rewards (a list of floats per prompt); best/worst and ties as for implicit "
        "rewards.",
    )
    annotator_args: Optional[str] = _f(
        None, "The string handed to the annotator's factory (e.g. a path); null: the factory is called with None."
    )
    annotation_flip_rate: float = _f(
        0.0,
        "After each round's annotation, swap chosen and rejected in round(r·n) pairs drawn uniformly (seeded by "
        "seed and the round), recorded in the 'flipped' column; a robustness knob, 0 = none.",
        bounds=(0.0, 1.0),
    )
    annotation_reward: str = _f(
        "sum",
        "How self-annotation ranks a prompt's responses by the implicit reward (every self-annotating method): "
        "'sum' = Σ_tok log π_t/π_ref over the response (the paper, the released code); 'mean' = that sum over "
        "the response's scored tokens (length-normalised: no reward for ending early).",
        ("sum", "mean"),
    )
    annotation_length_penalty: float = _f(
        0.0,
        "α of SPA's length penalty (Kim et al., appendix): rank by reward − α·|y|, |y| = the response's scored "
        "tokens, after annotation_reward; 0 = none. The pairs' rewards and margins are these values.",
        bounds=">= 0",
    )
    annotation_score_stop: bool = _f(
        True,
        "Count the stop token in the implicit reward (the released code: yes). false: score the response's "
        "own tokens only, so that ending early earns no reward by itself (a stop token whose log-ratio grew "
        "most makes the shortest answer 'best', the next round trains on it, and answers shrink).",
    )
    # -- follower --
    beta_follower: float = _f(
        0.1,
        "β_f of ξ = σ(β_f·margin); the released code hard-codes 0.1 for every model (also Llama at β 0.05).",
        bounds="> 0",
    )
    eps: float = _f(
        0.01,
        "Wasserstein radius ε per group (the paper's best of {0, 0.01, 0.1}; the released Mistral script: 0.05).",
        bounds=">= 0",
        note="0 = plain DPO on the self-labels",
    )
    k: int = _f(6, "Tangents K of the follower's piecewise-linear −log.", bounds=">= 1")
    group_size: int = _f(
        100,
        "Follower groups of G consecutive pairs in a stable order (the paper: 100); 0 or 'global' = one ball.",
        bounds=">= 0",
        note="0 or 'global' = one ball",
    )
    follower_space: str = _f(
        "prob", "'prob': ξ = σ(β_f·margin), loss −log ξ (the paper); 'margin': softplus(−margin).", ("prob", "margin")
    )
    # -- leader --
    leader_loss: str = _f("shift_prob", leader_losses.help_of(LEADER_LOSSES), LEADER_LOSSES)
    clamp_min: float = _param("clamp_min")
    resolve_every: int = _f(
        0,
        "Re-solve the follower every n optimizer steps of a round; 0 = once per round.",
        bounds=">= 0",
        note="0 = once per round",
    )
    # -- SPA (Kim et al., ICLR 2025) --
    spa_alpha: float = _param("spa_alpha")
    spa_lambdas: List[float] = _f(
        [0.5, 0.25, 0.125],
        "SPA: de-coupling λ of rounds 1, 2, 3, … (the last repeats).",
        bounds=">= 0",
        error="needs one or more values >= 0",
    )
    spa_quantile: float = _param("spa_quantile")
    spa_window: int = _param("spa_window")
    spa_warmup_ratio: float = _param("spa_warmup_ratio")
    # -- SeRA (Ko et al., ICLR 2025; Algorithm 1 unpublished: docs/METHOD.md §5.4, each unknown an option) --
    sera_keep: float = _f(
        0.7, "SeRA: keep this fraction of the round's pairs, largest implicit-reward margin first.", bounds="(0, 1]"
    )
    sera_num_samples: int = _f(
        4,
        "SeRA: responses sampled per kept prompt for preference bootstrapping.",
        bounds=">= 2",
        error="needs at least 2",
    )
    sera_top_p: float = _f(0.95, "SeRA: top-p of the bootstrap samples (temperature: `temperature`).", bounds="(0, 1]")
    sera_gamma: float = _f(0.3, "SeRA: γ; its role is set by sera_gamma_role.", bounds="[0, 1)")
    sera_gamma_role: str = _f(
        "ensemble",
        "SeRA γ [our choice]: 'ensemble' — margin (1−γ)·m_{t−1} + γ·m_{t−2}; 'mix' — bootstrapped pairs are a γ "
        "share of the training set; 'threshold' — keep pairs whose margin exceeds γ.",
        ("ensemble", "mix", "threshold"),
    )
    sera_pool: str = _f(
        "round",
        "SeRA [our choice]: select from this round's pairs ('round') or from every round's so far ('cumulative').",
        ("round", "cumulative"),
    )
    # -- robust-DPO baselines (docs/METHOD.md §5.5) --
    label_smoothing: float = _param("label_smoothing")
    drdpo_beta: float = _param("drdpo_beta")
    kldpo_tau: float = _param("kldpo_tau")
    kldpo_max_weight: float = _param("kldpo_max_weight")
    # -- peft --
    use_peft: bool = _f(False, "Train a LoRA adapter; the reference is the adapter-disabled model.")
    lora_r: int = _f(16, "LoRA rank.", bounds=">= 1")
    lora_alpha: int = _f(32, "LoRA alpha.", bounds=">= 1")
    lora_dropout: float = _f(0.05, "LoRA dropout.", bounds="[0, 1)")
    lora_target_modules: str = _f("all-linear", "LoRA target modules (peft's syntax; comma-separated names).")
    load_in_4bit: bool = _f(False, "Load the base model in 4 bits (QLoRA; needs use_peft and a GPU).")
    # -- infra --
    bf16: bool = _f(True, "bfloat16 training (false on CPU).")
    use_cpu: bool = _f(False, "Train on CPU.")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing.")
    report_to: str = _f("none", "Passed to transformers: none | wandb | tensorboard | all.")
    logging_steps: int = _f(1, "Log every n optimizer steps.", bounds=">= 1")
    save_total_limit: Optional[int] = _f(
        None, "Keep at most this many trainer checkpoints per stage (null: all).", bounds=">= 1"
    )
    save_steps: int = _f(
        0,
        "Checkpoint the trainer every n optimizer steps of a stage (a resumed run continues from the last one); "
        "0 = no mid-stage checkpoints.",
        bounds=">= 0",
        note="0 = no mid-stage checkpoints",
    )
    ddp_timeout: int = _f(
        10800,
        "Seconds a process waits for the others at a collective (the process group's timeout; NCCL's default "
        "is 600). Long single-process phases run as their own launches, so no rank waits on them.",
        bounds=">= 1",
        note="seconds",
    )
    accelerate_config: Optional[str] = _f(
        None,
        "The training steps' engine: ddp | zero3 | fsdp | zero3_cpu (recipes/accelerate/<name>.yaml), or the path "
        "of your own accelerate config file (a YAML from `accelerate config`; DeepSpeed settings through its "
        "deepspeed_config_file), checked at start-up; null: ddp when several processes run, else none. Named "
        "by you, it is launched even for one process. zero3_cpu: DeepSpeed ZeRO-3 on CPU processes (gloo), the "
        "variant CI runs; needs deepspeed and ninja, slow, not a training setup.",
    )

    report_plots: bool = _f(
        True,
        "Draw each round's PNG plots (margins, the follower's moves, held-out accuracy) beside its summary.md; "
        "false: summary.md only (the offline benchmark, whose runs nobody looks at one by one).",
    )

    def __post_init__(self):
        def bad(name, msg):
            raise ConfigError(f"{name}: {msg}")

        # every field once, from its metadata: its type, its choices, its bounds (nothing listed by hand)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name)))
            check_value(f.name, getattr(self, f.name))
        # what no single field can say: relations between fields
        if not self.model:
            bad("model", "give a preset (tiny, mistral-7b, llama3-8b), a local path or a hub id")
        if len(self.round_sizes) < self.num_rounds:
            bad(
                "round_sizes",
                f"needs one size per round: {len(self.round_sizes)} sizes for num_rounds={self.num_rounds}; "
                "add sizes or lower num_rounds",
            )
        if self.max_prompt_length >= self.max_length:
            bad("max_prompt_length", f"must be below max_length ({self.max_length}), got {self.max_prompt_length}")
        if self.annotator != "implicit" and not _is_import_spec(self.annotator):
            bad(
                "annotator",
                f"must be 'implicit' or 'module:callable' (e.g. my_pkg.judges:make), got {self.annotator!r}",
            )
        if self.leader_loss == "shift_margin" and self.follower_space != "margin":
            bad(
                "leader_loss",
                f"shift_margin needs follower_space: margin (its shifts are in units of βh), got "
                f"follower_space: {self.follower_space}; use leader_loss: shift_prob with follower_space: prob",
            )
        if not self.spa_lambdas:
            bad("spa_lambdas", f"needs one or more values >= 0, got {self.spa_lambdas}")
        micro = (self.per_device_train_batch_size or 1) * (self.gradient_accumulation_steps or 1)
        if self.batch_size % micro:
            bad(
                "batch_size",
                f"must be a multiple of per_device_train_batch_size × gradient_accumulation_steps "
                f"({micro}), got {self.batch_size}",
            )
        if self.load_in_4bit and not self.use_peft:
            bad("load_in_4bit", "needs use_peft: true (4-bit weights are trained through a LoRA adapter)")
        if self.load_in_4bit and self.use_cpu:
            bad("load_in_4bit", "needs a GPU (bitsandbytes); set load_in_4bit: false with use_cpu: true")
        if self.accelerate_config is not None and self.accelerate_config not in ACCELERATE_CONFIGS:
            self.accelerate_config = accelerate_config_path(self.accelerate_config)  # the user's file: checked
        if self.use_cpu and self.bf16:
            bad(
                "bf16",
                "set bf16: false with use_cpu: true (bf16 without a GPU runs only under DeepSpeed: use_cpu: false "
                "with accelerate_config: zero3_cpu)",
            )

    # -- derived values --
    def batch_split(self, num_processes: int = 1) -> Tuple[int, int]:
        """(per-device micro-batch, gradient accumulation steps) whose product with `num_processes` is
        `batch_size`: a null per_device_train_batch_size is derived (batch_size / (processes × accumulation)),
        a null gradient_accumulation_steps too (batch_size / (per-device × processes)). ConfigError, one line
        naming the fields, their values and values that would work, when no such split exists."""
        n, b = int(num_processes), self.batch_size
        p, g = self.per_device_train_batch_size, self.gradient_accumulation_steps
        fixed = (p or 1) * (g or 1) * n  # what one optimizer step holds at least
        if b % fixed == 0 and (p is None or g is None or p * g * n == b):
            if p is None:
                return b // ((g or 1) * n), g or 1
            return p, g if g is not None else b // (p * n)
        raise ConfigError(_batch_error(b, p, g, n))

    def accumulation_steps(self, num_processes: int = 1) -> int:
        """Gradient accumulation that makes up `batch_size` on `num_processes` devices (`batch_split`)."""
        return self.batch_split(num_processes)[1]

    # -- YAML --
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: Optional[str] = None) -> str:
        """The config as YAML text; also written (atomically) to `path` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            d = os.path.dirname(os.path.abspath(path))
            os.makedirs(d, exist_ok=True)
            tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_yaml(cls, path: str) -> "RunConfig":
        """Reads a YAML file of fields (e.g. a run's config.yaml) with typed conversion."""
        return cls(**merge({}, read_yaml(path), path))


FIELDS: Dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunConfig)}
# old or alternative key -> field
ALIASES = {"num_train_epochs": "num_train_epochs_per_round"}
_HINTS = typing.get_type_hints(RunConfig)


def _is_import_spec(spec: str) -> bool:
    """Whether `spec` reads 'module.path:attribute' (both parts dotted Python names)."""
    mod, sep, attr = str(spec).partition(":")
    names = mod.split(".") + attr.split(".")
    return bool(sep) and all(n.isidentifier() for n in names)


def _batch_error(b: int, p: Optional[int], g: Optional[int], n: int) -> str:
    """The one-line error of a batch that `n` processes cannot split (RunConfig.batch_split), with values
    that would work: other batch sizes, other per-device batches, other process counts."""
    per = (p or 1) * (g or 1)  # per process and optimizer step, at least
    have = f"per_device_train_batch_size {'null' if p is None else p} × gradient_accumulation_steps "
    have += f"{'null' if g is None else g} × {n} process{'es' if n > 1 else ''}"
    if p is not None and g is not None:
        have += f" = {p * g * n}"
    fixes = []
    step = per * n
    lo, hi = (b // step) * step, (b // step + 1) * step
    sizes = [step] if p is not None and g is not None else [v for v in (lo, hi) if v > 0]
    fixes.append("--batch-size " + " or ".join(map(str, sizes)))
    if p is not None and b % ((g or 1) * n) == 0:
        room = b // ((g or 1) * n)
        divs = [d for d in range(room, 0, -1) if room % d == 0][:4]
        fixes.append(f"--per-device-train-batch-size {' or '.join(map(str, divs))} (or null: derived)")
    procs = [k for k in range(1, 65) if b % (per * k) == 0 and (p is None or g is None or per * k == b)]
    if procs:
        near = sorted(sorted(procs, key=lambda k: (abs(k - n), k))[:4])
        fixes.append(f"--num-processes {' or '.join(map(str, near))}")
    return (
        f"batch_size: {b} cannot be split as {have} (batch_size = per device × accumulation × processes); "
        f"values that work: {'; '.join(fixes)}"
    )


def check_bounds(name: str, value, note: Optional[str] = None) -> None:
    """ConfigError naming `name` unless `value` (each item of a list) is finite and lies in the Bounds that
    RunConfig's field `name` declares (metadata "bounds"; or a leader-loss parameter of SSAPOConfig's only, its
    declaration in ssapo.leader_losses); None passes an Optional field. `note` (default: the field's own, as
    " (note)") follows the interval."""
    meta = _bounds_meta(name)
    b: Bounds = meta["bounds"]
    if value is None and _optional(name):
        return
    items = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in items):  # inf passes ">= 0", nan no test
        what = "every value must be" if isinstance(value, (list, tuple)) else "must be"
        raise ConfigError(
            f"{name}: {what} a finite number {b.text()}{' or null' if _optional(name) else ''}, got {value}"
        )
    if all(v in b for v in items):
        return
    if meta.get("error"):
        raise ConfigError(f"{name}: {meta['error']}, got {value}")
    if note is None:
        note = f" ({meta['note']})" if meta.get("note") else ""
    what = f"every value must be {b.text()}" if isinstance(value, (list, tuple)) else f"must be {b.text()}"
    raise ConfigError(f"{name}: {what}{' or null' if _optional(name) else ''}{note}, got {value}")


def _bounds_meta(name: str) -> Dict[str, Any]:
    """A RunConfig field's metadata, or for a leader-loss parameter that is no RunConfig field (SSAPOConfig's
    spa_lambda) its declared bounds and note (ssapo.leader_losses)."""
    if name in FIELDS:
        return FIELDS[name].metadata
    p = leader_losses.PARAMS[name]
    return {"bounds": Bounds.of(p.bounds), **({"note": p.note} if p.note else {})}


def check_value(name: str, value) -> None:
    """ConfigError naming `name` unless `value` is one of the field's choices and lies in its bounds
    (what RunConfig checks field by field, for callers that take a field's value on its own)."""
    meta = FIELDS[name].metadata
    allowed = meta.get("choices")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{name}: must be one of {_show(allowed)}, got {value!r}")
    if "bounds" in meta:
        check_bounds(name, value)


def default_of(name: str):
    """RunConfig's default of field `name` (the one place defaults are declared)."""
    f = FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def field_groups() -> List[Tuple[str, List[str]]]:
    """RunConfig's fields grouped as its docstring lists them ("Title: a, b, c." lines, continued by
    indented lines), in that order; a field the docstring misses comes last, under "Other"."""
    import inspect
    import re

    entries: List[List[str]] = []
    for line in inspect.cleandoc(RunConfig.__doc__ or "").splitlines():
        head = re.match(r"^(\S[^:]*?):\s+(\S.*)$", line)
        if head:
            entries.append([head.group(1), head.group(2)])
        elif line.startswith(" ") and entries:
            entries[-1][1] += " " + line.strip()
        else:
            entries.append(["", ""])  # a line of prose ends the entry before it
    groups, seen = [], set()
    for title, text in entries:
        names = [n.strip().rstrip(".") for n in text.split(",")]
        names = [n for n in names if n in FIELDS and n not in seen]
        if title and names:
            groups.append((title, names))
            seen.update(names)
    # a leader-loss parameter the docstring does not list: in its declared group (ssapo.leader_losses)
    for p in leader_losses.run_params():
        if p.name not in seen:
            group = next((names for title, names in groups if title == p.group), None)
            if group is None:
                groups.append((p.group, []))
                group = groups[-1][1]
            group.append(p.name)
            seen.add(p.name)
    rest = [n for n in FIELDS if n not in seen]
    return groups + ([("Other", rest)] if rest else [])


def _optional(name: str) -> bool:
    if name not in _HINTS:  # a leader-loss parameter of SSAPOConfig's only: never null
        return False
    hint = _HINTS[name]
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def _show(allowed) -> str:
    return ", ".join("null" if a is None else str(a) for a in allowed)


def _convert(name: str, value: Any) -> Any:
    """A YAML or command-line value converted to the field's type (ConfigError naming the field otherwise)."""
    hint = _HINTS[name]
    given = value
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Union and type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    if name == "group_size" and isinstance(value, str) and value.strip().lower() == "global":
        return 0
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (list, dict)):
                raise ValueError
            return str(value)
        if typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            if isinstance(value, str):
                text = value.strip()
                if text.startswith("["):
                    import yaml

                    try:
                        value = yaml.safe_load(text)
                    except yaml.YAMLError:
                        raise ValueError from None
                else:
                    value = [v for v in text.replace(",", " ").split() if v]
            if not isinstance(value, (list, tuple)):
                value = [value]
            out = []
            for v in value:
                if item is int and (isinstance(v, bool) or (isinstance(v, float) and not v.is_integer())):
                    raise ValueError
                out.append(item(v))
            return out
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", str(hint))
        if typing.get_origin(hint) is list:
            kind = f"a list of {typing.get_args(hint)[0].__name__} (e.g. '1,2,3')"
        raise ConfigError(f"{name}: cannot read {given!r} as {kind}") from None
    return value


def key_name(key, aliases: bool = True) -> str:
    """The field a command-line or YAML key names, the one place spellings are normalised:
    '--round-sizes', 'round-sizes', 'round_sizes' -> 'round_sizes'; an alias -> its field (`aliases`)."""
    name = str(key).strip().lstrip("-").replace("-", "_")
    return ALIASES.get(name, name) if aliases else name


def _field_name(key: str, source: str) -> str:
    name = key_name(key)
    if name not in FIELDS:
        close = difflib.get_close_matches(name, list(FIELDS) + list(ALIASES), n=3)
        hint = (
            f"; did you mean {', '.join(close)}?" if close else " (see `ssapo train --help` or ssapo.config.RunConfig)"
        )
        raise ConfigError(f"{key}: unknown configuration key in {source}{hint}")
    return name


def merge(base: Mapping[str, Any], updates: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """`base` updated with `updates` (keys checked, values converted)."""
    out = dict(base)
    for key, value in updates.items():
        name = _field_name(key, source)
        out[name] = _convert(name, value)
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config: no such file: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values")
    return data


def recipe_path(preset: str) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"model: {preset!r} is not a preset ({', '.join(PRESETS)})")
    return PRESETS[preset]


def parse_overrides(tokens: Sequence[str]) -> Dict[str, Any]:
    """`--key value`, `--key=value` and `key=value` tokens to a dict (a `--flag` without a value is true).
    Keys are not checked here; `load_config` does that."""
    out: Dict[str, Any] = {}
    tokens = list(tokens)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" in tok:
                k, v = tok.split("=", 1)
            elif i + 1 < len(tokens) and not (tokens[i + 1].startswith("--") and len(tokens[i + 1]) > 2):
                k, v = tok, tokens[i + 1]
                i += 1
            else:
                k, v = tok, "true"
        elif "=" in tok:
            k, v = tok.split("=", 1)
        else:
            raise ConfigError(f"{tok}: expected --key value or key=value")
        if not k:
            raise ConfigError(f"{tokens[i]}: expected --key value or key=value")
        out[key_name(k, aliases=False)] = v
        i += 1
    return out


def load_config(
    model: Optional[str] = "tiny",
    config_path: Optional[str] = None,
    overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
) -> RunConfig:
    """A validated RunConfig: the preset's recipe (when `model` names a preset;
    otherwise `model` is the model's path or hub id) → the YAML file at
    `config_path` → `overrides` (a mapping, or `--key value` / `key=value`
    tokens). `model=None` takes everything from the file and the overrides."""
    values: Dict[str, Any] = {}
    if model in PRESETS:
        values = merge(values, read_yaml(PRESETS[model]), PRESETS[model])
    if config_path:
        values = merge(values, read_yaml(config_path), config_path)
    if model is not None and model not in PRESETS:
        values["model"] = str(model)
    if overrides:
        if not isinstance(overrides, Mapping):
            if isinstance(overrides, str):
                raise ConfigError("overrides: give a mapping or a list of tokens, not one string")
            overrides = parse_overrides(overrides)
        values = merge(values, overrides, "the overrides")
    return RunConfig(**values)
