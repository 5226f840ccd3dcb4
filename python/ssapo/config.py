"""`RunConfig`: everything one `ssapo train` run needs, with the paper's
defaults, merged from a preset recipe, a YAML file and command-line overrides.

    from ssapo.config import load_config
    cfg = load_config("llama3-8b", "my.yaml", ["--eps", "0.05", "--round-sizes", "8000,20000"])
    cfg = load_config("tiny", overrides={"seed": 1})
    cfg = RunConfig.from_yaml("runs/x/config.yaml")

Order of precedence (later wins): the preset's recipe (when `model` names a
preset), the YAML file, the overrides. Every value is converted to its field's
type; an unknown key is a `ValueError` that lists the close matches.

Recipes live in one place, inside the package: `python/ssapo/recipes/<preset>/config.yaml`
and `python/ssapo/recipes/accelerate/{ddp,zero3,fsdp,zero3_cpu}.yaml` (maturin ships every
file under `python/ssapo/`, so an installed `ssapo` finds them next to this
module). The repository's top-level `recipes` is a git symlink to that
directory, for people browsing the repository; there is no second copy.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
# preset name -> its recipe
PRESETS: Dict[str, str] = {
    name: os.path.join(RECIPES_DIR, name, "config.yaml") for name in ("tiny", "mistral-7b", "llama3-8b")
}
# zero3_cpu: DeepSpeed ZeRO-3 on CPU processes (gloo, fp32), the variant CI runs (tests/test_zero3_cpu.py)
ACCELERATE_CONFIGS: Dict[str, str] = {
    name: os.path.join(RECIPES_DIR, "accelerate", f"{name}.yaml") for name in ("ddp", "zero3", "fsdp", "zero3_cpu")
}
METHODS = ("ssapo", "dpo", "iterative-dpo", "spa", "sera")
LEADER_LOSSES = ("shift_prob", "shift_margin", "weights", "dpo", "spa")


def _f(default, help: str, choices: Optional[Sequence[Any]] = None, bounds: Optional[Sequence[float]] = None):
    meta: Dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if bounds is not None:  # closed interval [lo, hi], checked by check_bounds (RunConfig and SSAPOConfig alike)
        meta["bounds"] = tuple(bounds)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """The whole SSAPO run. Defaults are the paper's Mistral-7B setting
    (docs/METHOD.md §4.6); the recipes in `recipes/<preset>/`
    set every value explicitly.

    Model: model, ref_model, tokenizer, trust_remote_code, output_dir, method, seed.
    Data: preference_data, prompt_data, seed_size, round_sizes, num_rounds,
        max_prompt_length, max_length.
    Seed stage (DPO on the labelled seed from π_init): seed_epochs, seed_learning_rate.
    Rounds: learning_rate, num_train_epochs_per_round, per_device_train_batch_size,
        gradient_accumulation_steps, batch_size, lr_scheduler_type, warmup_ratio, beta,
        round_reference.
    Annotation: num_samples, temperature, top_p, max_new_tokens, annotation_reference,
        generation_batch_size, generation_backend, system_turn.
    Follower: beta_follower, eps, k, group_size, follower_space.
    Leader: leader_loss, clamp_min, resolve_every.
    SPA (Kim et al., ICLR 2025): spa_alpha, spa_lambdas, spa_quantile, spa_window, spa_warmup_ratio.
    SeRA (Ko et al., ICLR 2025): sera_keep, sera_num_samples, sera_top_p, sera_gamma,
        sera_gamma_role, sera_pool.
    PEFT: use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules, load_in_4bit.
    Infra: bf16, use_cpu, gradient_checkpointing, report_to, logging_steps,
        save_total_limit, save_steps, ddp_timeout, accelerate_config.
    Built-in task (the tiny preset): task_size, task_flip_rate, task_dir.
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
        "ssapo | dpo (the seed model π_0 only) | iterative-dpo (self-annotation, plain DPO) | spa | sera (baselines).",
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
    seed_size: int = _f(2000, "Labelled seed pairs: rows [0, seed_size) after the shuffle (the paper: 2K, 3.3 %).")
    round_sizes: List[int] = _f(
        [8000, 20000, 30000], "Prompts per round, consecutive blocks after the seed (the paper: 8K, 20K, 30K)."
    )
    num_rounds: int = _f(3, "Self-annotation rounds T (the first num_rounds of round_sizes are used).")
    max_prompt_length: int = _f(1024, "Prompts longer than this many tokens are skipped (and counted) by the split.")
    max_length: int = _f(2048, "Maximum prompt + response tokens in training.")
    # -- seed stage --
    seed_epochs: float = _f(3.0, "Epochs of seed DPO (the paper: 3 for Mistral, 1 for Llama).")
    seed_learning_rate: float = _f(5e-7, "Learning rate of seed DPO.")
    # -- rounds --
    learning_rate: float = _f(5e-7, "Learning rate of every round (the released Mistral yaml: 3e-7).")
    num_train_epochs_per_round: float = _f(1.0, "Epochs per round, on that round's own pairs only.")
    per_device_train_batch_size: int = _f(1, "Micro-batch per device.")
    gradient_accumulation_steps: Optional[int] = _f(
        None, "Accumulation steps; default (null): batch_size / (per_device_train_batch_size × processes)."
    )
    batch_size: int = _f(32, "Effective batch size: per device × accumulation × processes (the paper: 32).")
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule (transformers' names).")
    warmup_ratio: float = _f(0.1, "Warm-up fraction of each stage's optimizer steps.")
    beta: float = _f(0.1, "DPO β of the seed stage and the leader (the paper: 0.1 Mistral, 0.05 Llama).")
    round_reference: str = _f(
        "previous",
        "Reference of round t's leader: 'previous' = π_{t-1} (the released code) or 'init' = π_init.",
        ("previous", "init"),
    )
    # -- annotation --
    num_samples: int = _f(2, "Responses sampled per prompt; chosen = best, rejected = worst by implicit reward.")
    temperature: float = _f(0.7, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling.")
    max_new_tokens: int = _f(300, "Maximum new tokens per response.")
    annotation_reference: str = _f(
        "init",
        "Reference of the implicit reward log π_{t-1} − log π_ref: 'init' = π_init (the paper and the released "
        "code) or 'seed' = the seed model π_0.",
        ("init", "seed"),
    )
    generation_batch_size: int = _f(16, "Prompts per generate() call (transformers backend).")
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
    # -- follower --
    beta_follower: float = _f(
        0.1, "β_f of ξ = σ(β_f·margin); the released code hard-codes 0.1 for every model (also Llama at β 0.05)."
    )
    eps: float = _f(
        0.01, "Wasserstein radius ε per group (the paper's best of {0, 0.01, 0.1}; the released Mistral script: 0.05)."
    )
    k: int = _f(6, "Tangents K of the follower's piecewise-linear −log.")
    group_size: int = _f(
        100, "Follower groups of G consecutive pairs in a stable order (the paper: 100); 0 or 'global' = one ball."
    )
    follower_space: str = _f(
        "prob", "'prob': ξ = σ(β_f·margin), loss −log ξ (the paper); 'margin': softplus(−margin).", ("prob", "margin")
    )
    # -- leader --
    leader_loss: str = _f(
        "shift_prob",
        "shift_prob (the released code: Σ_j α_j·−log clamp(σ(βh) − δ_j)) | shift_margin | weights | dpo | spa.",
        LEADER_LOSSES,
    )
    clamp_min: float = _f(1e-6, "Clamp of σ(βh) − shift in shift_prob (the released code: 1e-6).")
    resolve_every: int = _f(0, "Re-solve the follower every n optimizer steps of a round; 0 = once per round.")
    # -- SPA (Kim et al., ICLR 2025) --
    spa_alpha: float = _f(
        0.1, "SPA: label smoothing α on the flagged pairs, in [0, 0.5] (0.5 erases the label).", bounds=(0.0, 0.5)
    )
    spa_lambdas: List[float] = _f([0.5, 0.25, 0.125], "SPA: de-coupling λ of rounds 1, 2, 3, … (the last repeats).")
    spa_quantile: float = _f(
        0.1, "SPA: flag the pairs at or below this quantile of de-coupled confidence, in [0, 1].", bounds=(0.0, 1.0)
    )
    spa_window: int = _f(50, "SPA: moving window of confidences (gathered over ranks).")
    spa_warmup_ratio: float = _f(
        0.2, "SPA: no smoothing during this fraction of a round's optimizer steps, in [0, 1].", bounds=(0.0, 1.0)
    )
    # -- SeRA (Ko et al., ICLR 2025; Algorithm 1 unpublished: docs/METHOD.md §5.4, each unknown an option) --
    sera_keep: float = _f(0.7, "SeRA: keep this fraction of the round's pairs, largest implicit-reward margin first.")
    sera_num_samples: int = _f(4, "SeRA: responses sampled per kept prompt for preference bootstrapping.")
    sera_top_p: float = _f(0.95, "SeRA: top-p of the bootstrap samples (temperature: `temperature`).")
    sera_gamma: float = _f(0.3, "SeRA: γ; its role is set by sera_gamma_role.")
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
    # -- peft --
    use_peft: bool = _f(False, "Train a LoRA adapter; the reference is the adapter-disabled model.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: str = _f("all-linear", "LoRA target modules (peft's syntax; comma-separated names).")
    load_in_4bit: bool = _f(False, "Load the base model in 4 bits (QLoRA; needs use_peft and a GPU).")
    # -- infra --
    bf16: bool = _f(True, "bfloat16 training (false on CPU).")
    use_cpu: bool = _f(False, "Train on CPU.")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing.")
    report_to: str = _f("none", "Passed to transformers: none | wandb | tensorboard | all.")
    logging_steps: int = _f(1, "Log every n optimizer steps.")
    save_total_limit: Optional[int] = _f(None, "Keep at most this many trainer checkpoints per stage (null: all).")
    save_steps: int = _f(
        0,
        "Checkpoint the trainer every n optimizer steps of a stage (a resumed run continues from the last one); "
        "0 = no mid-stage checkpoints.",
    )
    ddp_timeout: int = _f(
        10800,
        "Seconds a process waits for the others at a collective (the process group's timeout; NCCL's default "
        "is 600). Long single-process phases run as their own launches, so no rank waits on them.",
    )
    accelerate_config: Optional[str] = _f(
        None,
        "ddp | zero3 | fsdp | zero3_cpu: recipes/accelerate/<name>.yaml for multi-process runs; null: one "
        "process. zero3_cpu: DeepSpeed ZeRO-3 on CPU processes (gloo, picked by SSAPOConfig), the variant CI "
        "runs; needs deepspeed and ninja, slow, not a training setup.",
        (None, *ACCELERATE_CONFIGS),
    )
    # -- the built-in task of the tiny preset (ssapo.bench.task) --
    task_size: str = _f("tiny", "Size of the built-in task of the tiny preset: tiny | test.", ("tiny", "test"))
    task_flip_rate: float = _f(0.0, "Label-flip rate of the tiny preset's built-in task (the benchmark's noise).")
    task_dir: Optional[str] = _f(
        None, "Where the tiny preset's task is built or found (default: <output_dir>/task); shared runs reuse it."
    )

    def __post_init__(self):
        def bad(name, msg):
            raise ValueError(f"{name}: {msg}")

        if isinstance(self.group_size, str):
            self.group_size = _convert("group_size", self.group_size)
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) not in allowed:
                bad(f.name, f"must be one of {_show(allowed)}, got {getattr(self, f.name)!r}")
            if "bounds" in f.metadata:
                check_bounds(f.name, getattr(self, f.name))
        if not self.model:
            bad("model", "give a preset (tiny, mistral-7b, llama3-8b), a local path or a hub id")
        if self.seed_size < 1:
            bad("seed_size", f"must be >= 1, got {self.seed_size}")
        if self.num_rounds < 0:
            bad("num_rounds", f"must be >= 0, got {self.num_rounds}")
        if len(self.round_sizes) < self.num_rounds:
            bad(
                "round_sizes",
                f"needs one size per round: {len(self.round_sizes)} sizes for num_rounds={self.num_rounds}; "
                "add sizes or lower num_rounds",
            )
        if any(s < 1 for s in self.round_sizes):
            bad("round_sizes", f"sizes must be >= 1, got {self.round_sizes}")
        for name in (
            "max_prompt_length",
            "max_length",
            "max_new_tokens",
            "per_device_train_batch_size",
            "batch_size",
            "generation_batch_size",
            "logging_steps",
            "spa_window",
            "k",
            "lora_r",
            "lora_alpha",
        ):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            bad("max_prompt_length", f"must be below max_length ({self.max_length}), got {self.max_prompt_length}")
        for name in (
            "seed_learning_rate",
            "learning_rate",
            "beta",
            "beta_follower",
            "temperature",
            "seed_epochs",
            "num_train_epochs_per_round",
            "clamp_min",
        ):
            if not getattr(self, name) > 0:
                bad(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("top_p", "sera_top_p", "sera_keep"):
            if not 0 < getattr(self, name) <= 1:
                bad(name, f"must be in (0, 1], got {getattr(self, name)}")
        for name in ("warmup_ratio", "sera_gamma", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                bad(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("task_flip_rate",):
            if not 0 <= getattr(self, name) <= 1:
                bad(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.leader_loss == "shift_margin" and self.follower_space != "margin":
            bad(
                "leader_loss",
                f"shift_margin needs follower_space: margin (its shifts are in units of βh), got "
                f"follower_space: {self.follower_space}; use leader_loss: shift_prob with follower_space: prob",
            )
        if self.eps < 0:
            bad("eps", f"must be >= 0 (0 = plain DPO on the self-labels), got {self.eps}")
        if self.group_size < 0:
            bad("group_size", f"must be >= 0 (0 or 'global' = one ball), got {self.group_size}")
        if self.resolve_every < 0:
            bad("resolve_every", f"must be >= 0 (0 = once per round), got {self.resolve_every}")
        if self.num_samples < 2:
            bad("num_samples", f"needs at least 2 responses per prompt to form a pair, got {self.num_samples}")
        if self.sera_num_samples < 2:
            bad("sera_num_samples", f"needs at least 2, got {self.sera_num_samples}")
        if not self.spa_lambdas or any(v < 0 for v in self.spa_lambdas):
            bad("spa_lambdas", f"needs one or more values >= 0, got {self.spa_lambdas}")
        if self.save_steps < 0:
            bad("save_steps", f"must be >= 0 (0 = no mid-stage checkpoints), got {self.save_steps}")
        if self.ddp_timeout < 1:
            bad("ddp_timeout", f"must be >= 1 second, got {self.ddp_timeout}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            bad("save_total_limit", f"must be >= 1 or null, got {self.save_total_limit}")
        micro = self.per_device_train_batch_size
        if self.gradient_accumulation_steps is not None:
            if self.gradient_accumulation_steps < 1:
                bad("gradient_accumulation_steps", f"must be >= 1 or null, got {self.gradient_accumulation_steps}")
            micro *= self.gradient_accumulation_steps
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
        if self.use_cpu and self.bf16:
            bad("bf16", "set bf16: false with use_cpu: true")

    # -- derived values --
    def accumulation_steps(self, num_processes: int = 1) -> int:
        """Gradient accumulation that makes up `batch_size` on `num_processes` devices."""
        if self.gradient_accumulation_steps is not None:
            return self.gradient_accumulation_steps
        per_step = self.per_device_train_batch_size * num_processes
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size: {self.batch_size} is not a multiple of per_device_train_batch_size × "
                f"processes ({self.per_device_train_batch_size} × {num_processes})"
            )
        return max(1, self.batch_size // per_step)

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


def check_bounds(name: str, value: float, note: str = "") -> None:
    """ValueError naming `name` unless `value` lies in the closed interval [lo, hi] that
    RunConfig's field `name` declares (metadata "bounds"); `note` follows the interval."""
    lo, hi = FIELDS[name].metadata["bounds"]
    if not lo <= value <= hi:
        raise ValueError(f"{name}: must be in [{lo:g}, {hi:g}]{note}, got {value}")


def _show(allowed) -> str:
    return ", ".join("null" if a is None else str(a) for a in allowed)


def _convert(name: str, value: Any) -> Any:
    """A YAML or command-line value converted to the field's type (ValueError naming the field otherwise)."""
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

                    value = yaml.safe_load(text)
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
        raise ValueError(f"{name}: cannot read {given!r} as {kind}") from None
    return value


def _field_name(key: str, source: str) -> str:
    name = str(key).strip().lstrip("-").replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        close = difflib.get_close_matches(name, list(FIELDS) + list(ALIASES), n=3)
        hint = (
            f"; did you mean {', '.join(close)}?" if close else " (see `ssapo train --help` or ssapo.config.RunConfig)"
        )
        raise ValueError(f"{key}: unknown configuration key in {source}{hint}")
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
        raise ValueError(f"config: no such file: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config: {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys to values")
    return data


def recipe_path(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"model: {preset!r} is not a preset ({', '.join(PRESETS)})")
    return PRESETS[preset]


def accelerate_config_path(name: str) -> str:
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"accelerate_config: must be one of {', '.join(ACCELERATE_CONFIGS)}, got {name!r}")
    return ACCELERATE_CONFIGS[name]


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
            raise ValueError(f"{tok}: expected --key value or key=value")
        if not k:
            raise ValueError(f"{tokens[i]}: expected --key value or key=value")
        out[k.replace("-", "_")] = v
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
                raise ValueError("overrides: give a mapping or a list of tokens, not one string")
            overrides = parse_overrides(overrides)
        values = merge(values, overrides, "the overrides")
    return RunConfig(**values)
