"""`ssapo train`: seed DPO, then rounds of self-annotation, follower and leader.

    ssapo train --model tiny --output-dir runs/tiny
    ssapo train --model llama3-8b --preference-data /data/uf.jsonl --output-dir runs/llama
    ssapo train --model mistral-7b --config my.yaml --eps 0.05 --set k=5 --resume
    ssapo train --model llama3-8b --accelerate-config zero3 --num-processes 8 --preference-data /data/uf.jsonl
    ssapo train --model ./my-sft-model --method iterative-dpo --use-peft --preference-data uf.parquet

Every RunConfig field is an option, generated from the dataclass and listed
below in RunConfig's groups with its help, type, bounds and default:
`--field-name value` (or `--field_name value`, `--field-name=value`, `--set
field_name=value`), a bool alone (`--use-peft`) is true (`--no-use-peft`: false), a list takes
`1,2,3` or `1 2 3`. Order of precedence: the preset's recipe
(python/ssapo/recipes/<preset>/config.yaml), then --config, then the command
line (--set, then the --field flags), merged by ssapo.config.load_config. A
bad value or an unknown option is one line naming the field (with the close
matches), exit code 2.

Processes. `ssapo train` uses every visible GPU (torch.cuda.device_count();
one process on a CPU run, use_cpu: true); --num-processes N overrides it.
With N > 1 it is a driver: it prepares the run directory, then starts each
step as its own `accelerate launch ... -m ssapo.launch --run-dir DIR --step S`
(see ssapo.launch): seed and leader steps under the recipe's engine,
recipes/accelerate/<name>.yaml (name: --accelerate-config, else the recipe's
accelerate_config, else ddp); annotation, SeRA's passes and evaluation as
plain data-parallel processes (whole models, no ZeRO-3/FSDP); the follower in
the driver. Each launch logs to DIR/logs/; a failed launch ends the run with
exit 1 and a line naming the step and its log; --resume continues after the
last recorded step. Several machines (a shared run directory; the same
command on every machine, --num-processes counting them all):

    ssapo train --model llama3-8b --preference-data /shared/uf.jsonl --output-dir /shared/runs/llama \\
        --num-processes 16 --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 --main-process-port 29500

Inside an existing launch (`accelerate launch -m ssapo.cli train ...`), it
does not launch again: the ranks run every step together (ddp only).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

from ssapo.errors import ConfigError

DOC = __doc__
LAUNCHED_ENV = "SSAPO_ACCELERATE_LAUNCHED"  # = ssapo.launch.LAUNCHED_ENV


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; option help wrapped at spaces only (never inside
    'iterative-dpo' or a number)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str):
        parser.exit(2, f"ssapo train: error: {message}\n")

    return error


def _show_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _kind(name: str):
    """(metavar, nargs, const, type text) of RunConfig field `name` on the command line."""
    import typing

    from ssapo.config import _HINTS, FIELDS, _show

    hint, optional = _HINTS[name], False
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        hint, optional = next(a for a in args if a is not type(None)), True
    choices = FIELDS[name].metadata.get("choices")
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0].__name__
        return item.upper(), "+", None, f"list of {item}: '1,2,3' or 1 2 3"
    text = hint.__name__ + (" or null" if optional else "")
    if name == "group_size":
        text += " or 'global'"
    if hint is bool:
        return "BOOL", "?", "true", "bool; the flag alone = true"
    if choices is not None:
        return "{" + ",".join(_show(choices).split(", ")) + "}", None, None, text
    return hint.__name__.upper(), None, None, text


def add_field_arguments(p: argparse.ArgumentParser) -> Dict[str, str]:
    """One `--field-name` option per RunConfig field (also spelt `--field_name`, and the ALIASES), in
    the groups of RunConfig's docstring, each with its help, type, default and choices. Values are
    kept as given (strings): ssapo.config converts and checks them, once, with every other source.
    Returns {dest: field}."""
    from ssapo.config import ALIASES, FIELDS, default_of, field_groups

    dests: Dict[str, str] = {}
    for title, names in field_groups():
        g = p.add_argument_group(f"RunConfig: {title}")
        for name in names:
            metavar, nargs, const, kind = _kind(name)
            meta = FIELDS[name].metadata
            extra = f"; {meta['bounds'].text()}" if "bounds" in meta else ""
            default = "tiny" if name == "model" else argparse.SUPPRESS  # --model picks the preset
            shown = "tiny, a preset" if name == "model" else _show_value(default_of(name))
            help = f"{meta['help']} [{kind}{extra}; default: {shown}]".replace("%", "%%")
            kw = dict(dest=name, default=default, nargs=nargs, metavar=metavar)
            if const is not None:
                kw["const"] = const
            g.add_argument(f"--{name.replace('_', '-')}", help=help, **kw)
            spellings = {f"--{name}"} | {f"--{a}" for a, n in ALIASES.items() if n == name}
            spellings |= {s.replace("_", "-") for s in spellings}
            for alias in sorted(spellings - {f"--{name.replace('_', '-')}"}):
                g.add_argument(alias, help=argparse.SUPPRESS, **kw)
            if const == "true":  # HfArgumentParser's --no_field for a bool
                nots = sorted({f"--no-{name.replace('_', '-')}", f"--no_{name}"})
                g.add_argument(
                    *nots,
                    dest=name,
                    action="store_const",
                    const="false",
                    default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS,
                )
            dests[name] = name
    return dests


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="run the SSAPO loop (or a baseline)",
        description=DOC,
        allow_abbrev=False,
        formatter_class=_HelpFormatter,
        usage="ssapo train [--model M] [--config YAML] [--FIELD VALUE ...] [--set FIELD=VALUE] [--resume] "
        "[--num-processes N ...]",
    )
    p.error = _one_line_error(p)
    run_opts = p.add_argument_group("the run")
    run_opts.add_argument(
        "--config", default=None, metavar="YAML", help="a YAML file of RunConfig fields (over the preset's recipe)"
    )
    run_opts.add_argument("--resume", action="store_true", help="continue after the last completed step")
    run_opts.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes over all machines (default: every visible GPU, 1 on CPU); > 1: each step is "
        "its own `accelerate launch`",
    )
    run_opts.add_argument("--num-machines", type=int, default=None, help="machines (accelerate launch --num_machines)")
    run_opts.add_argument("--machine-rank", type=int, default=None, help="this machine's rank (--machine_rank)")
    run_opts.add_argument("--main-process-ip", default=None, help="machine 0's address (--main_process_ip)")
    run_opts.add_argument("--main-process-port", type=int, default=None, help="machine 0's port (--main_process_port)")
    run_opts.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set any RunConfig field (repeatable; the --field flags below win over it)",
    )
    add_field_arguments(p)
    p.set_defaults(func=run, own_options=[a.dest for a in run_opts._group_actions])
    return p


def _unknown(key: str, own: Sequence[str] = ()) -> ConfigError:
    """The error of an option that is neither a RunConfig field nor one of train's `own`, with the close matches."""
    import difflib

    from ssapo.config import ALIASES, FIELDS, key_name

    name = key_name(key, aliases=False)
    close = difflib.get_close_matches(name, [*FIELDS, *ALIASES, *own], n=3)
    hint = f"; did you mean {', '.join('--' + c.replace('_', '-') for c in close)}?" if close else ""
    return ConfigError(f"{name}: unknown option of ssapo train (not a RunConfig field){hint} (see ssapo train --help)")


def build_config(args, extra: Optional[List[str]] = None):
    """The RunConfig of these arguments. The command line's values become one mapping of overrides
    (`field=value` tokens, then --set, then the --field flags: later wins) that ssapo.config.load_config
    merges over the preset's recipe and --config, converts and checks: the one place where values meet."""
    from ssapo.config import FIELDS, key_name, load_config, parse_overrides

    overrides = {}
    sets = []
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected FIELD=VALUE")
        sets.append(item.split("=", 1))
    for key, value in [*parse_overrides(list(extra or [])).items(), *sets]:  # what the parser did not know
        if key_name(key) not in FIELDS:
            raise _unknown(key, getattr(args, "own_options", ()))
        overrides[key_name(key)] = value
    for name in FIELDS:
        if name != "model" and hasattr(args, name):
            value = getattr(args, name)
            overrides[name] = " ".join(value) if isinstance(value, list) else value
    cfg = load_config(args.model, args.config, overrides)
    if args.config:  # the fields the user gave (not the preset's): an accelerate_config named there is launched
        from ssapo.config import read_yaml

        overrides.update({key_name(k): v for k, v in read_yaml(args.config).items()})
    args.given_fields = set(overrides)
    return cfg


def with_tiny_task(cfg, task_dir: Optional[str] = None, size: str = "tiny", procs=None):
    """The tiny preset's run: builds (or finds) the gold-reward task
    (ssapo.bench.task.prepare_task, seeded by cfg.seed) in `task_dir`
    (default <output_dir>/task) and returns `cfg` with model = the task's SFT
    model and preference_data / prompt_data = its files (where cfg leaves them
    null): ordinary paths, so the loop never knows the task. Inside a launch
    (`procs`) the main process builds it, the others wait and find it."""
    import dataclasses

    from ssapo.bench.task import prepare_task

    d = os.path.abspath(task_dir or os.path.join(cfg.output_dir, "task"))
    if procs is None or procs.is_main_process:
        task = prepare_task(d, seed=cfg.seed, size=size)
    if procs is not None:
        procs.wait_for_everyone()
        task = prepare_task(d, seed=cfg.seed, size=size)
    return dataclasses.replace(
        cfg,
        model=task["sft_model"],
        preference_data=cfg.preference_data or task["preferences"],
        prompt_data=cfg.prompt_data or task["prompts"],
    )


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _inside_launch() -> bool:
    return (
        os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    )


def launcher_of(args, cfg):
    """The ssapo.launch.Launcher of these arguments, or None for one process (every step in this process).
    ConfigError naming the flag for a bad combination."""
    from ssapo.accelerate_configs import accelerate_config_path

    machines = args.num_machines or 1
    rank = args.machine_rank or 0
    if machines < 1:
        raise ConfigError(f"--num-machines: must be >= 1, got {machines}")
    if not 0 <= rank < machines:
        raise ConfigError(f"--machine-rank: must be in [0, {machines}), got {rank}")
    if machines > 1 and not args.main_process_ip:
        raise ConfigError("--main-process-ip: needed with --num-machines > 1 (machine 0's address)")
    n = args.num_processes
    gpus = 0 if cfg.use_cpu else _visible_gpus()
    if n is None:
        n = max(1, gpus) * machines
    if n < machines:
        raise ConfigError(f"--num-processes: {n} processes for {machines} machines")
    if n > gpus * machines > 0:
        raise ConfigError(
            f"--num-processes: {n} processes need one GPU each; {gpus} GPU(s) are visible"
            f"{' per machine' if machines > 1 else ''} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})"
        )
    named = cfg.accelerate_config is not None and "accelerate_config" in getattr(args, "given_fields", ())
    # one process runs every step in this process, unless the user named an engine (launched as asked) or more
    # GPUs are visible than the run uses (the launch's processes see only the run's GPUs, CUDA_VISIBLE_DEVICES)
    if n == 1 and not named and gpus <= 1:
        return None
    from ssapo.launch import Launcher

    extra = []
    for flag, value in (
        ("--num_machines", args.num_machines),
        ("--machine_rank", args.machine_rank),
        ("--main_process_ip", args.main_process_ip),
        ("--main_process_port", args.main_process_port),
    ):
        if value is not None:
            extra += [flag, str(value)]
    return Launcher(
        os.path.abspath(cfg.output_dir),
        n,
        accelerate_config_path(cfg.accelerate_config or "ddp"),
        extra,
        machine_rank=rank,
        num_machines=machines,
        timeout_s=float(cfg.ddp_timeout),
        visible_gpus=gpus,
    )


def _hub_lookup(name: str) -> Optional[str]:
    """None when `name` is a hub id that the local hub cache holds (its config.json or adapter_config.json)
    or, online, that the hub knows (a gated repository included); else why not, as the end of a sentence
    ('' when `name` cannot be a hub id: a path).
    Nothing is downloaded; the hub is asked (one metadata request, 10 s at most) only when not offline
    (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) and the cache does not hold it."""
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
        from huggingface_hub.utils import validate_repo_id
    except ImportError:  # pragma: no cover - a dependency of transformers; without it the load says
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return ""  # a path: no such directory
    cache = os.environ.get("HF_HUB_CACHE") or None
    for f in ("config.json", "adapter_config.json"):
        if isinstance(try_to_load_from_cache(name, f, cache_dir=cache), str):
            return None
    on = ("1", "ON", "YES", "TRUE")
    offline = constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").upper() in on for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline:
        return "a hub model in the local cache (offline: HF_HUB_OFFLINE=1, the hub is not asked)"
    try:
        HfApi().model_info(name, timeout=10)
    except GatedRepoError:  # it exists; its access is the load's business
        return None
    except RepositoryNotFoundError:
        return f"a model on the hub ({constants.ENDPOINT} has no repository {name}, or it is private)"
    except Exception as e:  # the hub out of reach (no network, a proxy, a timeout, a 5xx)
        return f"a hub model in the local cache, and the hub is out of reach ({type(e).__name__}: {str(e)[:120]})"
    return None


def check_model(name: str, flag: str = "--model") -> None:
    """ConfigError naming `flag` and the close preset names (difflib) when `name` is neither a preset, nor a
    local directory, nor a hub model (`_hub_lookup`: in the local cache, or on the hub when online): at
    start-up, before anything else is said about the run (`preference_data: needed` and the like)."""
    import difflib

    from ssapo.config import PRESETS

    if name in PRESETS or os.path.isdir(name):
        return
    why = _hub_lookup(name)
    if why is None:
        return
    close = difflib.get_close_matches(name.lower(), list(PRESETS), n=3, cutoff=0.6)
    presets = f"{'did you mean ' + ' or '.join(close) + '? ' if close else ''}presets: {', '.join(PRESETS)}"
    if not why:
        raise ConfigError(f"model: {flag} {name}: no such directory, and not a preset ({presets})")
    raise ConfigError(f"model: {flag} {name} is not a preset ({presets}), nor a local directory, nor {why}")


def run(args, extra: Optional[List[str]] = None) -> int:
    """`ssapo train`. SIGTERM (ssapo.launch.stop_on_signals) and SIGINT stop it, and the processes of a running
    launch with it (ssapo.launch.stop_tree), within seconds: one line on how to continue, exit 143 / 130."""
    from ssapo.launch import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            return _run(args, extra)
    except Stopped as e:
        print(f"ssapo train: stopped by {e.name}; {_how_to_continue(args)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the loop (building the config or the tiny task)
        print(f"ssapo train: interrupted; {_how_to_continue(args)}", file=sys.stderr)
        return 130


def _how_to_continue(args) -> str:
    """What a stopped run says: nothing written is lost (files are renamed into place whole; state.json
    records finished steps only), so --resume continues a run that has started; else start it again."""
    out = getattr(args, "run_dir", None)
    if out is None:
        return "run the same command again"
    if any(os.path.exists(os.path.join(out, f)) for f in ("config.yaml", "state.json")):
        return f"the steps finished so far are kept in {out}; continue with --resume"
    return f"the run had not started in {out}; run the same command again (without --resume)"


def _model_given(args, cfg) -> Optional[str]:
    """The flag that named cfg.model when it is not a preset's own model (None: the preset's)."""
    from ssapo.config import PRESETS, read_yaml

    if args.model in PRESETS and cfg.model == read_yaml(PRESETS[args.model]).get("model"):
        return None
    return "--model" if cfg.model == args.model else "model"


def _run(args, extra: Optional[List[str]] = None) -> int:
    extra = list(extra if extra is not None else getattr(args, "extra", None) or [])
    inside = _inside_launch()
    try:
        cfg = build_config(args, extra)
        args.run_dir = os.path.abspath(cfg.output_dir)  # for the line of a stopped run (`run`)
        flag = _model_given(args, cfg)
        if flag:  # first: a model that cannot load (a typo of a preset, a missing directory, offline)
            check_model(cfg.model, flag)
        if args.num_processes is not None and args.num_processes < 1:
            raise ConfigError(f"--num-processes: must be >= 1, got {args.num_processes}")
        launcher, procs = None, None
        if inside:  # never launch again: the ranks of this launch run every step together
            if (
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
                or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            ):
                raise ConfigError(
                    "--accelerate-config: inside a DeepSpeed/FSDP launch every step would run under the "
                    "engine; run `ssapo train --num-processes N` outside any launch (it launches each "
                    "step itself)"
                )
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                from datetime import timedelta

                from accelerate import PartialState

                procs = PartialState(cpu=cfg.use_cpu, timeout=timedelta(seconds=cfg.ddp_timeout))
        else:
            launcher = launcher_of(args, cfg)
        # the batch's arithmetic, before any launch or model load: one line when it cannot be split
        cfg.batch_split(launcher.num_processes if launcher else (procs.num_processes if procs else 1))
        # bf16 without a GPU only under DeepSpeed: refused before the tiny task is built or anything launched
        from ssapo.accelerate_configs import check_bf16

        check_bf16(cfg, launcher.engine_type if launcher else "NO", _visible_gpus())
        from ssapo.loop import check_output_dir

        # the run directory: not a file, writable, and with --resume holding a run; before the tiny task is built
        check_output_dir(cfg.output_dir, args.resume)
        if cfg.model == "tiny":  # the preset's task, built here; the loop gets its paths
            cfg = with_tiny_task(cfg, procs=procs)
    except ConfigError as e:
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a fault of the machine while building the tiny task: one line
        return _fault(e, getattr(args, "output_dir", None) or ".")

    from ssapo.errors import InputError, StepFailed
    from ssapo.loop import run as run_loop

    try:
        out = run_loop(cfg, resume=args.resume, launcher=launcher, procs=procs)
    except StepFailed as e:
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ssapo train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except (ConfigError, InputError) as e:  # a bad value or input file found by a step: one line, no traceback
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a fault of the machine (disk full, read-only, permissions): one line; else raised
        return _fault(e, cfg.output_dir)
    print(f"ssapo train: done; outputs in {out}")
    return 0


def _fault(e: BaseException, out: str) -> int:
    """Exit 1 with the one line of a fault of the machine behind `e` (ssapo.io.machine_fault); anything else
    is raised again (a bug: its traceback is the report)."""
    from ssapo.io import machine_fault

    msg = machine_fault(e, os.path.abspath(out))
    if msg is None:
        raise e
    print(f"ssapo train: error: {msg}", file=sys.stderr)
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m ssapo.commands.train ...`, the same as `ssapo train ...`."""
    from ssapo.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
