"""`RunConfig`: everything one `ssapo train` run needs, with the paper's
defaults, merged from a preset recipe, a YAML file and command-line overrides.

    cfg = load_config("llama3-8b", config_path="my.yaml", overrides={"eps": 0.05})

Fields by group (every field has a default and a help text; `__post_init__`
says what to change when a value is wrong):
- model: model, ref_model, trust_remote_code, output_dir, method, seed
- data: preference_data, prompt_data, seed_size, round_sizes, num_rounds, max_length
- seed stage: seed_epochs, seed_learning_rate
- rounds: learning_rate, epochs_per_round, batch_size, per_device_train_batch_size,
  lr_scheduler_type, warmup_ratio, beta, round_reference
- annotation: num_samples, temperature, top_p, max_new_tokens, generation_batch_size, generation_backend
- follower: beta_follower, eps, k, group_size, follower_space
- leader: leader_loss, clamp_min
- peft: use_peft, lora_r, lora_alpha, lora_dropout, lora_target_modules
- infra: bf16, use_cpu, report_to, logging_steps, gradient_checkpointing, accelerate_config, task_size
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")
PRESETS = ("tiny", "mistral-7b", "llama3-8b")
METHODS = ("ssapo", "dpo", "iterative-dpo", "spa", "sera")
ACCELERATE_CONFIGS = ("ddp", "zero3", "fsdp")


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    # -- model --
    model: str = _f("tiny", "Preset (tiny, mistral-7b, llama3-8b) or a local path / hub id of the SFT model π_init.")
    ref_model: Optional[str] = _f(None, "π_init for the implicit reward and the seed stage's reference (default: model).")
    trust_remote_code: bool = _f(False, "Allow model repositories' own code (only when you trust them).")
    output_dir: str = _f("runs/ssapo", "Run directory: seed/, round_<t>/, state.json, config.yaml.")
    method: str = _f(
        "ssapo", "ssapo | dpo (seed stage only) | iterative-dpo (self-annotation, plain DPO) | spa | sera (baselines)."
    )
    seed: int = _f(42, "Seed of data splits, sampling and training.")
    # -- data --
    preference_data: Optional[str] = _f(
        None, "Labelled pairs (prompt/chosen/rejected): .jsonl/.json/.parquet, a save_to_disk dir or a hub id. "
        "The paper: argilla/ultrafeedback-binarized-preferences-cleaned."
    )
    prompt_data: Optional[str] = _f(None, "Unlabelled prompt pool (default: the prompts of preference_data after the seed).")
    seed_size: int = _f(2000, "Labelled seed pairs (the paper: 2K of UltraFeedback, 3.3 %).")
    round_sizes: List[int] = _f([8000, 20000, 30000], "Prompts per round (the paper: 8K, 20K, 30K).")
    num_rounds: int = _f(3, "Self-annotation rounds T.")
    max_length: int = _f(2048, "Maximum prompt + response tokens in training.")
    # -- seed stage --
    seed_epochs: float = _f(3.0, "Epochs of seed DPO (the paper: 3 for Mistral, 1 for Llama).")
    seed_learning_rate: float = _f(5e-7, "Learning rate of seed DPO.")
    # -- rounds --
    learning_rate: float = _f(5e-7, "Learning rate of every round.")
    epochs_per_round: float = _f(1.0, "Epochs per round on that round's own pairs.")
    batch_size: int = _f(32, "Effective batch size (per device × accumulation × processes).")
    per_device_train_batch_size: int = _f(1, "Micro-batch per device; accumulation makes up batch_size.")
    lr_scheduler_type: str = _f("cosine", "Scheduler (transformers' names).")
    warmup_ratio: float = _f(0.1, "Warm-up fraction of each stage.")
    beta: float = _f(0.1, "DPO β of the seed stage and the leader.")
    round_reference: str = _f(
        "previous", "Reference of round t's leader: 'previous' = π_{t-1} (the released code) or 'init' = π_init."
    )
    # -- annotation --
    num_samples: int = _f(2, "Responses sampled per prompt; chosen = best, rejected = worst by implicit reward.")
    temperature: float = _f(0.7, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling.")
    max_new_tokens: int = _f(300, "Maximum new tokens per response.")
    generation_batch_size: int = _f(16, "Prompts per generate() call (transformers backend).")
    generation_backend: str = _f("auto", "auto (vLLM if installed and a GPU is there) | transformers | vllm.")
    # -- follower --
    beta_follower: float = _f(
        0.1, "β_f of ξ = σ(β_f·margin); the released code hard-codes 0.1 for every model (also Llama at β 0.05)."
    )
    eps: float = _f(0.01, "Wasserstein radius ε per group (the paper's best of {0, 0.01, 0.1}; the released Mistral script: 0.05).")
    k: int = _f(6, "Tangents K of the follower's loss.")
    group_size: int = _f(100, "Follower groups of G consecutive pairs (the paper: 100); 0 = one global ball.")
    follower_space: str = _f("prob", "'prob': ξ = σ(β_f·margin), −log ξ (the paper); 'margin': softplus(−margin).")
    # -- leader --
    leader_loss: str = _f("shift_prob", "shift_prob (released code) | shift_margin | weights | dpo.")
    clamp_min: float = _f(1e-6, "Clamp of σ(βh) − shift in shift_prob.")
    # -- SPA (Kim et al., ICLR 2025) --
    spa_alpha: float = _f(0.1, "SPA: label smoothing α on the flagged pairs.")
    spa_lambdas: List[float] = _f([0.5, 0.25, 0.125], "SPA: de-coupling λ of rounds 1, 2, 3, … (the last repeats).")
    spa_quantile: float = _f(0.1, "SPA: flag the pairs at or below this quantile of de-coupled confidence.")
    spa_window: int = _f(50, "SPA: moving window of confidences.")
    spa_warmup_ratio: float = _f(0.2, "SPA: no smoothing during this fraction of a round's optimizer steps.")
    # -- SeRA (Ko et al., ICLR 2025; Algorithm 1 unpublished: REFERENCE.md §2b, each unknown an option) --
    sera_keep: float = _f(0.7, "SeRA: keep this fraction of the round's pairs, largest implicit-reward margin first.")
    sera_num_samples: int = _f(4, "SeRA: responses sampled per kept prompt for preference bootstrapping.")
    sera_top_p: float = _f(0.95, "SeRA: top-p of the bootstrap samples (temperature: `temperature`).")
    sera_gamma: float = _f(0.3, "SeRA: γ; its role is set by sera_gamma_role.")
    sera_gamma_role: str = _f(
        "ensemble", "SeRA γ [our choice]: 'ensemble' — margin (1−γ)·m_{t−1} + γ·m_{t−2} (π_init before round 2); "
        "'mix' — bootstrapped pairs are a γ share of the training set."
    )
    # -- peft --
    use_peft: bool = _f(False, "Train a LoRA adapter; the reference is the adapter-disabled model.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: str = _f("all-linear", "LoRA target modules (peft's syntax).")
    # -- infra --
    bf16: bool = _f(True, "bfloat16 training (False on CPU).")
    use_cpu: bool = _f(False, "Train on CPU.")
    report_to: str = _f("none", "Passed to transformers: none | wandb | tensorboard | all.")
    logging_steps: int = _f(1, "Log every n optimizer steps.")
    gradient_checkpointing: bool = _f(False, "Gradient checkpointing.")
    accelerate_config: Optional[str] = _f(None, "ddp | zero3 | fsdp: recipes/accelerate/<name>.yaml for multi-GPU runs.")
    task_size: str = _f("tiny", "Size of the built-in task of the tiny preset: tiny | test.")
    task_flip_rate: float = _f(0.0, "Label-flip rate of the tiny preset's built-in task (the benchmark's noise level).")
    task_dir: Optional[str] = _f(None, "Where the tiny preset's task is built or found (default: <output_dir>/task); shared runs reuse it.")

    def __post_init__(self):
        def bad(name, msg):
            raise ValueError(f"{name}: {msg}")

        if self.method not in METHODS:
            bad("method", f"must be one of {METHODS}, got {self.method!r}")
        if self.seed_size < 1:
            bad("seed_size", f"must be >= 1, got {self.seed_size}")
        if self.num_rounds < 0:
            bad("num_rounds", f"must be >= 0, got {self.num_rounds}")
        if len(self.round_sizes) < self.num_rounds:
            bad("round_sizes", f"needs one size per round: {len(self.round_sizes)} sizes for num_rounds={self.num_rounds}")
        if any(s < 1 for s in self.round_sizes):
            bad("round_sizes", f"sizes must be >= 1, got {self.round_sizes}")
        for name in ("seed_learning_rate", "learning_rate", "beta", "beta_follower", "temperature"):
            if not getattr(self, name) > 0:
                bad(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.eps < 0:
            bad("eps", f"must be >= 0, got {self.eps}")
        if self.k < 1:
            bad("k", f"must be >= 1, got {self.k}")
        if self.group_size < 0:
            bad("group_size", f"must be >= 0 (0 = one global ball), got {self.group_size}")
        if self.num_samples < 2:
            bad("num_samples", f"needs at least 2 responses per prompt to form a pair, got {self.num_samples}")
        if self.batch_size % self.per_device_train_batch_size:
            bad("batch_size", f"must be a multiple of per_device_train_batch_size ({self.per_device_train_batch_size}), got {self.batch_size}")
        choices = {
            "round_reference": ("previous", "init"),
            "follower_space": ("prob", "margin"),
            "leader_loss": ("shift_prob", "shift_margin", "weights", "dpo"),
            "generation_backend": ("auto", "transformers", "vllm"),
            "task_size": ("tiny", "test"),
            "sera_gamma_role": ("ensemble", "mix"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.task_flip_rate <= 1:
            bad("task_flip_rate", f"must be in [0, 1], got {self.task_flip_rate}")
        if not 0 < self.sera_keep <= 1:
            bad("sera_keep", f"must be in (0, 1], got {self.sera_keep}")
        if not 0 <= self.sera_gamma < 1:
            bad("sera_gamma", f"must be in [0, 1), got {self.sera_gamma}")
        if self.sera_num_samples < 2:
            bad("sera_num_samples", f"needs at least 2, got {self.sera_num_samples}")
        if not self.spa_lambdas or any(v < 0 for v in self.spa_lambdas):
            bad("spa_lambdas", f"needs one or more values >= 0, got {self.spa_lambdas}")
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.accelerate_config is not None and self.accelerate_config not in ACCELERATE_CONFIGS:
            bad("accelerate_config", f"must be one of {ACCELERATE_CONFIGS} or null, got {self.accelerate_config!r}")
        if self.use_cpu and self.bf16:
            bad("bf16", "set bf16: false with use_cpu: true")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


def _convert(name: str, value: Any) -> Any:
    """Converts a YAML or command-line value to the field's type."""
    hint = _HINTS[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no"):
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
            return str(value)
        if origin in (list, List):
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            (item,) = typing.get_args(hint)
            return [item(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def merge(base: Dict[str, Any], updates: Mapping[str, Any], source: str) -> Dict[str, Any]:
    out = dict(base)
    for key, value in updates.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{key}: unknown configuration key in {source}{hint}")
        out[name] = _convert(name, value)
    return out


def read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    if not os.path.exists(path):
        raise ValueError(f"config: no such file: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of keys to values")
    return data


def recipe_path(preset: str) -> str:
    return os.path.join(RECIPES_DIR, preset, "config.yaml")


def load_config(
    model: str = "tiny", config_path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> RunConfig:
    """Preset recipe (when `model` names one) → YAML file → overrides."""
    values: Dict[str, Any] = {}
    if model in PRESETS:
        values = merge(values, read_yaml(recipe_path(model)), recipe_path(model))
    else:
        values["model"] = model
    if config_path:
        values = merge(values, read_yaml(config_path), config_path)
    if overrides:
        values = merge(values, overrides, "the command line")
    return RunConfig(**values)


def parse_overrides(tokens: List[str]) -> Dict[str, Any]:
    """`--key value`, `--key=value` and `key=value` tokens to a dict (flags without a value are True)."""
    out: Dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" in tok:
                k, v = tok.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                k, v = tok, tokens[i + 1]
                i += 1
            else:
                k, v = tok, "true"
        elif "=" in tok:
            k, v = tok.split("=", 1)
        else:
            raise ValueError(f"{tok}: expected --key value or key=value")
        out[k.replace("-", "_")] = v
        i += 1
    return out
