"""`ssapo bench`: SSAPO, its ablations and the baselines (DPO, iterative DPO,
SPA, SeRA) on the offline gold-reward task; resumable; writes report.md and PNG plots.

    ssapo bench --quick                       # a few minutes: 5 methods, 2 seeds, clean labels, small task
    ssapo bench --output-dir runs/bench       # all methods, 3 seeds, 0 % and 25 % label flips
"""

from __future__ import annotations

import argparse
import sys

DOC = __doc__


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the methods on the gold-reward task",
        description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", default="runs/bench")
    p.add_argument("--quick", action="store_true", help="small task, 5 methods, 2 seeds, clean labels")
    p.add_argument("--methods", default=None, help="comma-separated (default: all; see ssapo.bench.run.METHODS)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 2)")
    p.add_argument("--flip-rates", default=None, help="comma-separated label-flip rates (default 0,0.25; quick 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssapo.bench.run import METHODS, QUICK_METHODS, bench

    methods = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else list(METHODS))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"ssapo bench: error: --methods: unknown {bad}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        flips = [float(x) for x in (args.flip_rates or ("0" if args.quick else "0,0.25")).split(",")]
    except ValueError:
        print("ssapo bench: error: --flip-rates: give numbers like 0,0.25", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    cmd = (
        "ssapo " + " ".join(sys.argv[1:])
        if sys.argv[0].endswith("ssapo")
        else "ssapo bench" + (" --quick" if args.quick else "")
    )
    md = bench(args.output_dir, methods, seeds, flips, args.quick, cmd=cmd)
    print(md)
    return 0
