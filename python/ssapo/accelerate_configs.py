"""The accelerate configs a run launches its steps with: the shipped recipes/accelerate/<name>.yaml (ddp,
zero3, fsdp, zero3_cpu) or the path of the user's own file, checked at start-up; the engine one names
(its distributed_type) and what that engine allows (bf16 without a GPU only under DeepSpeed).

    path = accelerate_config_path("zero3")          # or "/my/accelerate.yaml"
    engine_of("zero3") == "DEEPSPEED"
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Optional

from ssapo.errors import ConfigError

ACCELERATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "accelerate")
# zero3_cpu: DeepSpeed ZeRO-3 on CPU processes (gloo, fp32), the variant CI runs (tests/distributed/test_zero3_cpu.py)
ACCELERATE_CONFIGS: Dict[str, str] = {
    name: os.path.join(ACCELERATE_DIR, f"{name}.yaml") for name in ("ddp", "zero3", "fsdp", "zero3_cpu")
}


# the distributed types an accelerate config may name for ssapo's training steps
ENGINE_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED", "FSDP")


def accelerate_config_path(name: str) -> str:
    """The file of accelerate_config `name`: a shipped one's recipes/accelerate/<name>.yaml (ddp, zero3,
    fsdp, zero3_cpu), or the absolute path of the user's own accelerate config file, checked
    (`read_accelerate_config`). ConfigError naming accelerate_config otherwise."""
    if name in ACCELERATE_CONFIGS:
        return ACCELERATE_CONFIGS[name]
    if not (name.endswith((".yaml", ".yml", ".json")) or os.sep in name or os.path.exists(name)):
        close = difflib.get_close_matches(name, list(ACCELERATE_CONFIGS), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"accelerate_config: must be one of null, {', '.join(ACCELERATE_CONFIGS)} or the path of an accelerate config "
            f"file, got {name!r}{hint}"
        )
    path = os.path.abspath(os.path.expanduser(name))
    read_accelerate_config(path)
    return path


def read_accelerate_config(path: str) -> Dict[str, Any]:
    """The accelerate config at `path` (YAML or JSON), checked as far as can be before a launch: a mapping
    with a distributed_type ssapo runs (ENGINE_TYPES), a DeepSpeed engine not switched off by use_cpu, its
    deepspeed_config_file (when named) a readable JSON object with zero_optimization, FSDP with an
    fsdp_config mapping. ConfigError naming accelerate_config and the file otherwise."""
    import json

    import yaml

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"accelerate_config: {path}: {msg}")

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)  # JSON is YAML
    except FileNotFoundError:
        raise bad("no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise bad(f"cannot be read ({e})") from None
    except yaml.YAMLError as e:
        raise bad(f"is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise bad("must hold a mapping (an accelerate config, as `accelerate config` writes it)")
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind not in ENGINE_TYPES:
        raise bad(f"distributed_type must be one of {', '.join(ENGINE_TYPES)}, got {data.get('distributed_type')!r}")
    if kind == "DEEPSPEED":
        if str(data.get("use_cpu", False)).lower() in ("true", "1"):
            raise bad("use_cpu: true switches DeepSpeed off in accelerate; set use_cpu: false (see zero3_cpu.yaml)")
        ds = data.get("deepspeed_config") or {}
        if not isinstance(ds, dict):
            raise bad("deepspeed_config must be a mapping")
        ds_file = ds.get("deepspeed_config_file")
        if ds_file:
            ds_path = ds_file if os.path.isabs(ds_file) else os.path.join(os.path.dirname(path), ds_file)
            if not os.path.exists(ds_path) and os.path.exists(ds_file):
                ds_path = ds_file  # accelerate reads it relative to the working directory
            try:
                with open(ds_path, encoding="utf-8") as f:
                    conf = json.load(f)
            except OSError as e:
                raise bad(f"deepspeed_config_file {ds_file}: cannot be read ({e.strerror or e})") from None
            except ValueError as e:
                raise bad(f"deepspeed_config_file {ds_file}: not valid JSON ({e})") from None
            if not isinstance(conf, dict) or not isinstance(conf.get("zero_optimization", {}), dict):
                raise bad(f"deepspeed_config_file {ds_file}: must be a JSON object with a zero_optimization object")
        elif "zero_stage" not in ds:
            raise bad("deepspeed_config needs zero_stage (or a deepspeed_config_file)")
    if kind == "FSDP" and not isinstance(data.get("fsdp_config", {}), dict):
        raise bad("fsdp_config must be a mapping")
    return data


def engine_of(accelerate_config: Optional[str]) -> str:
    """The distributed_type of a run's accelerate_config (a shipped name or a path): DEEPSPEED, FSDP,
    MULTI_GPU, MULTI_CPU, NO; 'NO' for null (one process, no engine)."""
    if accelerate_config is None:
        return "NO"
    return str(read_accelerate_config(accelerate_config_path(accelerate_config)).get("distributed_type", "NO")).upper()


def check_bf16(cfg, engine: str, gpus: int) -> None:
    """Whether the run's bf16 can run where it starts, before any step: bf16 needs a GPU, except under a
    DeepSpeed engine (`engine`: the training steps' accelerate distributed_type, e.g. engine_of(...) or the
    Launcher's; "NO" for one process), whose bf16 runs on CPU processes too (recipes/accelerate/zero3_cpu.yaml with
    use_cpu: false and bf16: true: its training steps run DeepSpeed's bf16, its data steps bf16 models on the
    CPU). ConfigError naming bf16 otherwise (with use_cpu the field check already refused it)."""
    if cfg.bf16 and not cfg.use_cpu and gpus < 1 and str(engine).upper() != "DEEPSPEED":
        raise ConfigError(
            "bf16: needs a GPU (none is visible), or a DeepSpeed engine (--accelerate-config zero3_cpu runs "
            "DeepSpeed's bf16 on CPU processes); set bf16: false (--no-bf16) with use_cpu: true on a CPU"
        )
