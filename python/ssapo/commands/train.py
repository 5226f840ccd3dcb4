"""`ssapo train`: seed DPO, then rounds of self-annotation, follower and leader.

    ssapo train --model tiny --output-dir runs/tiny
    ssapo train --model llama3-8b --preference-data /data/uf.jsonl --output-dir runs/llama
    ssapo train --model mistral-7b --config my.yaml --eps 0.05 --set k=5 --resume
    ssapo train --model llama3-8b --accelerate-config zero3 --num-processes 8 --preference-data /data/uf.jsonl
    ssapo train --model ./my-sft-model --method iterative-dpo --use-peft --preference-data uf.parquet

Any RunConfig field can be set as `--field value`, `--field=value` or
`--set field=value` (see `ssapo.config.RunConfig` for the fields and their
help). Order of precedence: the preset's recipe
(python/ssapo/recipes/<preset>/config.yaml), then --config, then the command
line. A bad value is reported with the field's name and exit code 2.

Processes. `ssapo train` uses every visible GPU (torch.cuda.device_count();
one process on a CPU run, use_cpu: true); --num-processes N overrides it.
With N > 1 it is a driver: it prepares the run directory, then starts each
step as its own `accelerate launch ... -m ssapo.stage --run-dir DIR --step S`
(see ssapo.stage): seed and leader steps under the recipe's engine,
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
from typing import List, Optional

DOC = __doc__
LAUNCHED_ENV = "SSAPO_ACCELERATE_LAUNCHED"  # = ssapo.stage.LAUNCHED_ENV


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="run the SSAPO loop (or a baseline)",
        description=DOC,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="tiny", help="a preset (tiny, mistral-7b, llama3-8b) or the SFT model's local path or hub id"
    )
    p.add_argument("--config", default=None, metavar="YAML", help="a YAML file of RunConfig fields")
    p.add_argument("--output-dir", default=None, help="run directory (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed step")
    p.add_argument(
        "--method",
        default=None,
        choices=["ssapo", "dpo", "iterative-dpo", "spa", "sera"],
        help="ssapo (default) or a baseline",
    )
    p.add_argument("--use-peft", action="store_true", default=None, help="train a LoRA adapter")
    p.add_argument(
        "--trust-remote-code", action="store_true", default=None, help="allow the model repository's own code"
    )
    from ssapo.config import ACCELERATE_CONFIGS

    p.add_argument(
        "--accelerate-config",
        default=None,
        choices=list(ACCELERATE_CONFIGS),
        help="the training steps' engine, recipes/accelerate/<name>.yaml, for a multi-process run "
        "(default: the recipe's accelerate_config, else ddp)",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes over all machines (default: every visible GPU, 1 on CPU); > 1: each step is "
        "its own `accelerate launch`",
    )
    p.add_argument("--num-machines", type=int, default=None, help="machines (accelerate launch --num_machines)")
    p.add_argument("--machine-rank", type=int, default=None, help="this machine's rank (--machine_rank)")
    p.add_argument("--main-process-ip", default=None, help="machine 0's address (--main_process_ip)")
    p.add_argument("--main-process-port", type=int, default=None, help="machine 0's port (--main_process_port)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any RunConfig field (repeatable); `--key value` works too",
    )
    p.set_defaults(func=run)
    return p


def build_config(args, extra: Optional[List[str]] = None):
    """The RunConfig of these arguments: recipe → --config → --set / --key value → the named flags."""
    from ssapo.config import load_config, parse_overrides

    overrides = parse_overrides(list(extra or []))
    for item in args.set or []:
        if "=" not in item:
            raise ValueError(f"--set {item}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip().lstrip("-").replace("-", "_")] = v
    for name in ("output_dir", "method", "use_peft", "trust_remote_code", "accelerate_config"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return load_config(args.model, args.config, overrides)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _inside_launch() -> bool:
    return (
        os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    )


def launcher_of(args, cfg):
    """The ssapo.stage.Launcher of these arguments, or None for one process (every step in this process).
    ValueError naming the flag for a bad combination."""
    from ssapo.config import accelerate_config_path

    machines = args.num_machines or 1
    rank = args.machine_rank or 0
    if machines < 1:
        raise ValueError(f"--num-machines: must be >= 1, got {machines}")
    if not 0 <= rank < machines:
        raise ValueError(f"--machine-rank: must be in [0, {machines}), got {rank}")
    if machines > 1 and not args.main_process_ip:
        raise ValueError("--main-process-ip: needed with --num-machines > 1 (machine 0's address)")
    n = args.num_processes
    if n is None:
        n = 1 if cfg.use_cpu else max(1, _visible_gpus()) * machines
    if n < machines:
        raise ValueError(f"--num-processes: {n} processes for {machines} machines")
    if n == 1:
        return None
    from ssapo.stage import Launcher

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
    )


def _field_error(e: ValueError) -> bool:
    """Whether `e` is a configuration error ("<field>: ..."), not a bug."""
    from ssapo.config import FIELDS

    head = str(e).split(":", 1)[0].strip().lstrip("-").replace("-", "_")
    return head in FIELDS or head in ("config", "overrides") or str(e).split(":", 1)[0].startswith("--")


def run(args, extra: Optional[List[str]] = None) -> int:
    extra = list(extra if extra is not None else getattr(args, "extra", None) or [])
    inside = _inside_launch()
    try:
        cfg = build_config(args, extra)
        if args.num_processes is not None and args.num_processes < 1:
            raise ValueError(f"--num-processes: must be >= 1, got {args.num_processes}")
        launcher, procs = None, None
        if inside:  # never launch again: the ranks of this launch run every step together
            if (
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
                or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            ):
                raise ValueError(
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
    except ValueError as e:
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 2

    from ssapo.loop import StepFailed
    from ssapo.loop import run as run_loop

    try:
        out = run_loop(cfg, resume=args.resume, launcher=launcher, procs=procs)
    except StepFailed as e:
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ssapo train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except ValueError as e:
        if not _field_error(e):
            raise
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 2
    print(f"ssapo train: done; outputs in {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m ssapo.commands.train ...`, the same as `ssapo train ...`."""
    from ssapo.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
