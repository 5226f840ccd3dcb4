"""A design probe of the benchmark: a few methods, one or two seeds, one line per run.

    python -m ssapo.bench.probe OUT --design '{"short_answer_rate": 0.3}' --run '{"seed_size": 256}' \\
        --tune '{"iterative-dpo": {"learning_rate": [2e-4, 5e-4]}}' --methods dpo,oracle-iterative,iterative-dpo --seeds 0

Starts from a preset (`--preset`, default `default`; `power` for its 8 samples per test prompt) and
replaces its task design (`--design`: TaskSpec / SIZES
keys), loop settings (`--run`: RunConfig fields) and grids (`--tune`); clean labels only.
Prints, per run, its wall time and the test win rate of π_0 and each round, the final
model's validation win rate, the mean answer length per round and the gold accuracy of
each round's self-annotations; the same lines go to OUT/probe.txt. How the benchmark's
task was chosen (benches/results/bench/designs.md) is a series of these.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time


def main(argv=None) -> int:
    from ssapo.bench import suite
    from ssapo.bench.stats import parse_seeds

    p = argparse.ArgumentParser(prog="python -m ssapo.bench.probe", description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--preset", default="default", help="the preset whose settings the probe starts from")
    p.add_argument("--design", default="{}", help="JSON: TaskSpec / SIZES overrides (size: the SIZES key)")
    p.add_argument("--run", default="{}", help="JSON: RunConfig overrides on top of the preset's")
    p.add_argument("--tune", default="{}", help="JSON: method -> {field: candidates}")
    p.add_argument("--methods", default="dpo,oracle-iterative,iterative-dpo")
    p.add_argument("--seeds", default="0", help="seed values, e.g. 0 or 0,1,2")
    a = p.parse_args(argv)
    try:
        design, run, tune = json.loads(a.design), json.loads(a.run), json.loads(a.tune)
        seeds = parse_seeds(a.seeds if "," in a.seeds else a.seeds + ",")  # here a single number is a seed value
    except (ValueError, json.JSONDecodeError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    if a.preset not in suite.PRESETS:
        print(f"probe: error: --preset: unknown {a.preset!r}; known: {', '.join(suite.PRESETS)}", file=sys.stderr)
        return 2
    base = suite.PRESETS[a.preset]
    run = {**base.run, **run}
    if "round_sizes" in run and "num_rounds" not in json.loads(a.run):
        run["num_rounds"] = len(run["round_sizes"])
    size = design.pop("size", base.size)
    design = {**base.design, **design}
    preset = dataclasses.replace(
        base, name="probe", size=size, design=design, run=run, conditions=[(0.0, 0.0, None)], tune=tune
    )
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "probe.txt"), "a")

    def say(*x):
        print(*x, flush=True)
        print(*x, file=log, flush=True)

    say("probe", json.dumps({"design": design, "size": size, "run": run, "tune": tune, "methods": methods}))
    t0 = time.time()
    for job in suite.jobs_of(preset, seeds, methods):
        t = time.time()
        suite.run_job(preset, job, a.out)
        ev = suite.evaluate_run(preset, job, a.out)
        say(
            f"seed {job.seed} {job.method}{'@' + job.var_name if job.var else ''} ({time.time() - t:.0f} s):",
            "win rate",
            [round(r["win_rate"], 3) for r in ev["rounds"]],
            "val",
            round(ev["val"]["win_rate"], 3),
            "length",
            [round(r["mean_length"], 2) for r in ev["rounds"]],
            "annotation acc.",
            [round(x["annotation"]["accuracy"], 3) for x in ev["per_round"]],
        )
    say(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
