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

With --num-processes N > 1 the command re-launches itself under
`accelerate launch --config_file recipes/accelerate/<name>.yaml` (name from
--accelerate-config or the recipe's accelerate_config, else ddp); the
processes read the merged config written to <output_dir>/launch_config.yaml.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List, Optional

DOC = __doc__
LAUNCHED_ENV = "SSAPO_ACCELERATE_LAUNCHED"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="run the SSAPO loop (or a baseline)", description=DOC, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="a preset (tiny, mistral-7b, llama3-8b) or the SFT model's local path or hub id")
    p.add_argument("--config", default=None, metavar="YAML", help="a YAML file of RunConfig fields")
    p.add_argument("--output-dir", default=None, help="run directory (default: the recipe's output_dir)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed step")
    p.add_argument("--method", default=None, choices=["ssapo", "dpo", "iterative-dpo", "spa", "sera"],
                   help="ssapo (default) or a baseline")
    p.add_argument("--use-peft", action="store_true", default=None, help="train a LoRA adapter")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow the model repository's own code")
    p.add_argument("--accelerate-config", default=None, choices=["ddp", "zero3", "fsdp"],
                   help="recipes/accelerate/<name>.yaml for a multi-process run")
    p.add_argument("--num-processes", type=int, default=None,
                   help="processes (GPUs); > 1 re-launches under `accelerate launch`")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any RunConfig field (repeatable); `--key value` works too")
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


def launch_command(cfg, config_file: str, num_processes: int, resume: bool) -> List[str]:
    """`accelerate launch` of this command on the merged config in `config_file`."""
    from ssapo.config import accelerate_config_path

    conf = accelerate_config_path(cfg.accelerate_config or "ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", conf,
           "--num_processes", str(num_processes), "-m", "ssapo.cli", "train",
           "--model", cfg.model, "--config", config_file]
    return cmd + (["--resume"] if resume else [])


def _field_error(e: ValueError) -> bool:
    """Whether `e` is a configuration error ("<field>: ..."), not a bug."""
    from ssapo.config import FIELDS

    head = str(e).split(":", 1)[0].strip().lstrip("-").replace("-", "_")
    return head in FIELDS or head in ("config", "overrides") or str(e).split(":", 1)[0].startswith("--")


def run(args, extra: Optional[List[str]] = None) -> int:
    extra = list(extra if extra is not None else getattr(args, "extra", None) or [])
    try:
        cfg = build_config(args, extra)
        if args.num_processes is not None and args.num_processes < 1:
            raise ValueError(f"--num-processes: must be >= 1, got {args.num_processes}")
    except ValueError as e:
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 2
    nproc = args.num_processes or 1
    if nproc > 1 and os.environ.get(LAUNCHED_ENV) != "1" and "LOCAL_RANK" not in os.environ:
        out = os.path.abspath(cfg.output_dir)
        config_file = os.path.join(out, "launch_config.yaml")
        cfg.to_yaml(config_file)
        cmd = launch_command(cfg, config_file, nproc, args.resume)
        print("ssapo train: launching " + " ".join(cmd), file=sys.stderr)
        return subprocess.call(cmd, env={**os.environ, LAUNCHED_ENV: "1"})

    from ssapo.loop import run as run_loop

    try:
        out = run_loop(cfg, resume=args.resume)
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
