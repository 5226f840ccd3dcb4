"""`ssapo bench`: SSAPO, the baselines (seed-only DPO, iterative DPO, SPA, SeRA, the
robust-DPO losses) and two oracles on the offline gold-reward task, under label
noise in the seed and in the self-annotations; resumable; writes report.md,
summary.json and PNG plots into the output directory.

    ssapo bench --quick                       # every method family, 2 seeds, small task, clean labels
    ssapo bench --output-dir runs/bench       # the default preset: 5 seeds, 4 conditions
    ssapo bench --preset eps-sweep            # the ε sweep (per leader loss, space, grouping), 5 seeds
    ssapo bench --preset lr-sweep             # the round-lr sweep (iterative DPO, SSAPO, robust DPO), 3 seeds
    ssapo bench --full                        # both sweeps, every method, every condition (~70 min)
    ssapo bench --preset power --seeds 6      # the detection leaders and the baselines, ±3-point intervals
    ssapo bench --preset scale2-quick         # the second scale (256 words, 8-word answers), 2 seeds
    ssapo bench --methods ssapo,iterative-dpo --seeds 0,3,7 --flip-rates 0.25 --annotation-flip-rates 0.2

The presets and methods are in ssapo.bench.suite (PRESETS, all_methods()).
"""

from __future__ import annotations

import argparse
import sys
import time

DOC = __doc__


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the methods on the gold-reward task",
        description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", default="runs/bench", help="the runs (resumable; presets can share one)")
    p.add_argument(
        "--report-dir",
        default=None,
        help="where report.md, summary.json and the plots go (default: the output directory)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small task, 2 seeds, clean labels (a few minutes)")
    g.add_argument(
        "--full",
        action="store_true",
        help="every method; the lr sweep of every self-annotating method and the ε sweep in the clean condition, "
        "the chosen candidates in the noisy ones (about 70 min on 2 cores)",
    )
    g.add_argument(
        "--preset",
        default=None,
        help="a preset by name (ssapo.bench.suite.PRESETS: quick, default, power, eps-sweep, eps-sweep-tuned, lr-sweep, "
        "full, scale2, scale2-quick)",
    )
    p.add_argument("--methods", default=None, help="comma-separated (default: the preset's; see ssapo.bench.suite)")
    p.add_argument(
        "--seeds",
        default=None,
        help="a count (5 = seeds 0..4) or seed values (0,3,7; one value: 3,); default: the preset's",
    )
    p.add_argument(
        "--flip-rates", default=None, help="comma-separated seed-label flip rates (default: the preset's conditions)"
    )
    p.add_argument(
        "--annotation-flip-rates",
        default=None,
        help="comma-separated self-annotation flip rates (annotation_flip_rate; default: the preset's conditions)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing out the seeds (one run per core is fastest on CPU); default: 2 where there are "
        "2 or more cores, else 1",
    )
    p.set_defaults(func=run)


def _rates(text: str, flag: str):
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: give rates in [0, 1] like 0,0.25, got {text!r}") from None
    if not rates or any(not 0 <= r <= 1 for r in rates):
        raise ValueError(f"{flag}: give rates in [0, 1] like 0,0.25, got {text!r}")
    return rates


def options(args):
    """(preset, seeds, methods) from the command line; ValueError naming the flag at fault."""
    import dataclasses

    from ssapo.bench.stats import parse_seeds
    from ssapo.bench.suite import PRESETS, all_methods

    name = getattr(args, "preset", None) or ("quick" if args.quick else "full" if args.full else "default")
    if name not in PRESETS:
        raise ValueError(f"--preset: must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    known = all_methods()
    methods = [m for m in preset.methods if m in known]
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in known]
        if bad or not methods:
            raise ValueError(f"--methods: unknown {bad or args.methods!r}; known: {', '.join(known)}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(preset.seeds))
    if getattr(args, "workers", None) is not None and args.workers < 1:
        raise ValueError(f"--workers: must be >= 1, got {args.workers}")
    if args.flip_rates is not None or args.annotation_flip_rates is not None:
        sf = _rates(args.flip_rates, "--flip-rates") if args.flip_rates is not None else [0.0]
        af = _rates(args.annotation_flip_rates, "--annotation-flip-rates") if args.annotation_flip_rates else []
        conds = [(f, 0.0, None) for f in sf] + [(0.0, a, None) for a in af if a > 0]
        preset = dataclasses.replace(preset, conditions=conds)
    if args.methods:  # the methods given run in every condition
        preset = dataclasses.replace(preset, conditions=[(f, a, None) for f, a, _ in preset.conditions])
    return preset, seeds, methods


def run(args) -> int:
    try:
        preset, seeds, methods = options(args)
    except ValueError as e:
        print(f"ssapo bench: error: {e}", file=sys.stderr)
        return 2
    import os
    import signal

    from ssapo.bench import report, suite

    # the report's directory is made before the runs, so an unusable one is said at once, not after hours
    out = getattr(args, "report_dir", None) or args.output_dir
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        flag = "--report-dir" if getattr(args, "report_dir", None) else "--output-dir"
        print(f"ssapo bench: error: {flag}: cannot create {out}: {e.strerror}", file=sys.stderr)
        return 2
    cmd = "ssapo " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("ssapo") else "ssapo bench"
    t0 = time.time()
    workers = args.workers if args.workers is not None else (2 if (os.cpu_count() or 1) >= 2 else 1)
    # SIGTERM ends the bench as Ctrl-C does: the worker processes are stopped, finished runs stay for a resume
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = suite.execute(preset, args.output_dir, seeds, methods, workers=workers)
    except KeyboardInterrupt:
        print("ssapo bench: interrupted; finished runs are kept, run the same command to resume", file=sys.stderr)
        return 130
    md = report.write(preset, results, seeds, methods, out, cmd, time.time() - t0, workers=workers)
    print(md)
    return 0
