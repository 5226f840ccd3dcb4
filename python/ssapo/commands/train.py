"""`ssapo train`: seed DPO, then rounds of self-annotation, follower and leader.

    ssapo train --model tiny --output-dir runs/tiny
    ssapo train --model llama3-8b --output-dir runs/llama --preference-data /data/uf.jsonl
    ssapo train --model mistral-7b --config my.yaml --eps 0.05 --resume
    ssapo train --model llama3-8b --accelerate-config zero3 --num-processes 8 ...

Any RunConfig field can be set as `--field value` (see `ssapo.config`); the
preset's recipe (recipes/<preset>/config.yaml) comes first, then --config,
then the command line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DOC = __doc__


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="run the SSAPO loop", description=DOC,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | mistral-7b | llama3-8b | a local path or hub id")
    p.add_argument("--config", default=None, help="a YAML file of RunConfig fields")
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/<model>)")
    p.add_argument("--resume", action="store_true", help="continue after the last completed step")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    p.add_argument("--use-peft", action="store_true", help="train a LoRA adapter")
    p.add_argument("--accelerate-config", default=None, choices=["ddp", "zero3", "fsdp"],
                   help="relaunch under `accelerate launch` with recipes/accelerate/<name>.yaml")
    p.add_argument("--num-processes", type=int, default=None, help="processes for --accelerate-config")
    p.set_defaults(func=run)


def run(args, extra=None) -> int:
    from ssapo.config import RECIPES_DIR, load_config, parse_overrides

    try:
        overrides = parse_overrides(list(extra or getattr(args, "extra", []) or []))
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        elif "output_dir" not in overrides and args.config is None:
            overrides["output_dir"] = os.path.join("runs", os.path.basename(args.model.rstrip("/")))
        if args.trust_remote_code:
            overrides["trust_remote_code"] = True
        if args.use_peft:
            overrides["use_peft"] = True
        cfg = load_config(args.model, args.config, overrides)
    except ValueError as e:
        print(f"ssapo train: error: {e}", file=sys.stderr)
        return 2
    if args.accelerate_config and os.environ.get("ACCELERATE_LAUNCHED") != "1":
        conf = os.path.join(RECIPES_DIR, "accelerate", f"{args.accelerate_config}.yaml")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", conf]
        if args.num_processes:
            cmd += ["--num_processes", str(args.num_processes)]
        argv = [a for a in sys.argv[1:]]
        cmd += ["-m", "ssapo.cli", *argv]
        return subprocess.call(cmd, env={**os.environ, "ACCELERATE_LAUNCHED": "1"})
    from ssapo.loop import run as run_loop

    out = run_loop(cfg, resume=args.resume)
    print(f"ssapo train: done; outputs in {out}")
    return 0
