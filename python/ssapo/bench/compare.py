"""Paired comparisons against any row of a finished bench, from its summary.json.

    python -m ssapo.bench.compare runs/power/summary.json --against rdpo
    python -m ssapo.bench.compare runs/power/summary.json --against rdpo --methods ssapo-kept,ssapo-drop

The report compares every row with tuned iterative DPO; this prints, per condition, each row's
mean test win rate and its paired difference from the row named by `--against` (95 % paired t
interval over the seeds both rows finished, `ssapo.bench.stats.paired_by_seed`, as the report
computes its own), flagged "above" or "below" where the interval leaves 0. It reads the per-seed
win rates summary.json records; nothing is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

from ssapo.bench.report import condition_name
from ssapo.bench.stats import paired_by_seed


def _per_seed(cond: dict, method: str) -> Dict[int, float]:
    row = cond.get("rows", {}).get(method) or {}
    return {int(s): float(v) for s, v in (row.get("per_seed") or {}).items()}


def compare(summary: dict, against: str, methods: Optional[List[str]] = None) -> List[str]:
    """The lines: per condition that has `against`, every other row (or `methods`) against it."""
    lines: List[str] = []
    for cond in summary.get("conditions", []):
        ref = _per_seed(cond, against)
        if not ref:
            continue
        name = condition_name(float(cond.get("seed_flip", 0.0)), float(cond.get("annotation_flip", 0.0)))
        lines.append(f"## {name} (against {against}, mean {sum(ref.values()) / len(ref):.3f})")
        for m in sorted(cond.get("rows", {})):
            if m == against or (methods and m not in methods):
                continue
            ps = _per_seed(cond, m)
            if not ps:
                continue
            r = paired_by_seed(ps, ref, sorted(ps))
            where = "above" if r["significant"] and r["lo"] > 0 else "below" if r["significant"] else "n.s."
            lines.append(
                f"{m}: {sum(ps.values()) / len(ps):.3f}; Δ {r['mean']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] "
                f"{where} ({r['n']} seeds)"
            )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssapo.bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("summary", help="a bench's summary.json")
    p.add_argument("--against", required=True, help="the row every other is paired with (e.g. rdpo)")
    p.add_argument("--methods", default=None, help="comma-separated rows to show (default: every row)")
    a = p.parse_args(argv)
    try:
        with open(a.summary) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        print(f"compare: error: summary: cannot read {a.summary}: {e}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    lines = compare(summary, a.against, methods)
    if not lines:
        print(f"compare: error: --against: no condition of {a.summary} has a row {a.against!r}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
