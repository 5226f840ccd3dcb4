"""`ssapo bench` as a function: run a preset's jobs and write its report.

    from ssapo.bench.run import bench
    md = bench("runs/bench", "quick")                           # the --quick preset
    md = bench("runs/b", "default", seeds=[0, 3], methods=["dpo", "iterative-dpo", "ssapo"])

The presets, methods and runs are in `ssapo.bench.suite`, the statistics in
`ssapo.bench.stats`, the report in `ssapo.bench.report`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional, Tuple


def bench(
    out: str,
    preset: str = "quick",
    seeds: Optional[List[int]] = None,
    methods: Optional[List[str]] = None,
    conditions: Optional[List[Tuple[float, float]]] = None,
    cmd: Optional[str] = None,
    progress: bool = True,
    workers: int = 1,
    **overrides,
) -> str:
    """Runs (or resumes) every job of `preset` (a name in suite.PRESETS) into `out` and writes
    report.md, summary.json and the plots there; returns the Markdown. `conditions`: (seed
    flip rate, self-annotation flip rate) pairs, each running every method; `overrides`:
    Preset fields (e.g. run={...}, design={...}, tune={...}) replaced for this call; `workers`:
    processes sharing out the seeds. A run that collapses (its rounds stop early) or fails (raises) is
    recorded and reported; every other run goes on (`ssapo.bench.suite`, Outcomes)."""
    from ssapo.bench import report, suite

    if preset not in suite.PRESETS:
        raise ValueError(f"preset: must be one of {', '.join(suite.PRESETS)}, got {preset!r}")
    p = suite.PRESETS[preset]
    known = suite.all_methods()
    methods = list(methods) if methods else [m for m in p.methods if m in known]
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"methods: unknown {bad}; known: {', '.join(known)}")
    if conditions is not None:
        overrides["conditions"] = [(float(a), float(b), None) for a, b in conditions]
    if overrides:
        p = dataclasses.replace(p, **overrides)
    seeds = list(seeds) if seeds is not None else list(range(p.seeds))
    t0 = time.time()
    results = suite.execute(p, out, seeds, methods, progress=progress, workers=workers)
    return report.write(p, results, seeds, methods, out, cmd or f"ssapo bench ({preset})", time.time() - t0)
