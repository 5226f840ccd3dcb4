"""The follower as a detector of wrong labels (issue 19 item 4).

    python -m ssapo.bench.detect RUNS_DIR [--out DIR] [--eps 0,0.005,0.01,0.02,0.05,0.1,0.2,0.5] [--methods ssapo]

For every run directory under RUNS_DIR (a `ssapo bench` output: a directory with config.yaml and
round_<t>/annotations.jsonl) of the chosen methods, on each round's self-annotated pairs:

Targets
- `flipped`: the pairs the run's annotation_flip_rate turned around (the rows' `flipped` column; rows
  without it are left out of this target);
- `mislabelled`: the pairs the gold reward calls wrong, gold(chosen) < gold(rejected) (gold ties are
  not wrong), with the seed's task spec (task.json next to the run's preference_data, or
  OUT/seed<S>/task/task.json by the bench's layout).

Detectors
- `follower`: the follower re-solved on the round's margins with the run's own settings
  (config.yaml: k, group_size, beta_follower, follower_space) at each ε of the grid; pair i's moved
  mass m_i = Σ_j mass_ij·[loc_ij ≠ ξ_i]; flagged when m_i > 0. One point per ε (joined as a curve);
  per ε also the curve of ranking by m_i (detection.json).
- `margin`: the implicit-reward margin alone, ascending (the lowest margin most suspect): the full
  precision/recall curve (every distinct threshold; tied margins enter together). Its point at
  SeRA's keep fraction (`margin@keep`: per round all but the max(1, round(sera_keep·n)) largest
  margins, the pairs SeRA's rule would drop if it ranked by the annotation margin) is a row of the
  table.
- `sera`: the pairs SeRA did not keep, from sera runs only (round_<t>/sera.jsonl: its first `kept`
  rows, the count in round_<t>/metrics.json, are the kept pool pairs; the rest are bootstrapped).
  SeRA's selection is not a function of the annotation margins (it ranks by log π_{t−1}/π_init,
  ensembled with π_{t−2}, recomputed with the models), so it is not recomputed for other runs.

Pooled over every round of every chosen run: flagged, precision, recall, F1 per target, and the
base rate. Within the follower's groups (per ε): the fraction of groups where the moved pairs are
exactly the k lowest-margin pairs (k = pairs moved; groups with 0 < k < group size; ties in the
margin count as either side), and the mean over groups of Spearman's and Kendall's correlation
between moved mass and margin (over every pair of the group, and over the moved pairs alone where
three or more moved).

Note: annotation_flip_rate negates a flipped pair's margin (ssapo.annotators.flip_pairs) while a
self-annotated pair's margin is ≥ 0, so on the `flipped` target the margin ranking is perfect up to
the flip fraction by construction, and so is any detector that reads the margin's sign.

Writes DIR/detection.png (precision vs recall, a panel per target), DIR/detection.md and
DIR/detection.json; prints the Markdown. `analyse(runs_dir, eps_grid, methods)` returns the dict
written to detection.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np

DEFAULT_EPS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_METHODS = ("ssapo",)
TARGETS = ("flipped", "mislabelled")


# -- precision and recall ---------------------------------------------------------------------------


def point(flagged: Sequence[bool], target: Sequence[bool]) -> Dict[str, float]:
    """Precision, recall and F1 of the flagged set against the target set (nan where undefined:
    precision with nothing flagged, recall with no target, F1 where either is nan or both are 0)."""
    f = np.asarray(flagged, dtype=bool)
    y = np.asarray(target, dtype=bool)
    if f.shape != y.shape:
        raise ValueError(f"flagged and target: different shapes {f.shape} and {y.shape}")
    tp, nf, ny = int(np.sum(f & y)), int(f.sum()), int(y.sum())
    p = tp / nf if nf else float("nan")
    r = tp / ny if ny else float("nan")
    f1 = 2 * p * r / (p + r) if nf and ny and (p + r) > 0 else float("nan")
    return {"n": int(len(f)), "flagged": nf, "true_positives": tp, "precision": p, "recall": r, "f1": f1}


def ranking_curve(score: Sequence[float], target: Sequence[bool]) -> Dict[str, List[float]]:
    """Precision and recall of flagging every pair whose `score` (suspicion, higher first) is at
    least t, for every distinct t from the highest down (tied scores enter together): lists
    threshold, flagged, precision, recall; the last point flags every pair (recall 1)."""
    s = np.asarray(score, dtype=np.float64)
    y = np.asarray(target, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"score and target: different shapes {s.shape} and {y.shape}")
    if len(s) == 0:
        return {"threshold": [], "flagged": [], "precision": [], "recall": []}
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last index of each tie block
    flagged = last + 1
    ny = int(y.sum())
    return {
        "threshold": s[last].tolist(),
        "flagged": flagged.tolist(),
        "precision": (tp[last] / flagged).tolist(),
        "recall": (tp[last] / ny).tolist() if ny else [float("nan")] * len(last),
    }


def lowest_k_agree(moved: Sequence[bool], margin: Sequence[float]) -> bool:
    """The moved pairs are the k lowest-margin pairs of the group (k = number moved): every moved
    pair's margin is ≤ every unmoved pair's margin (a tie at the boundary counts as either side)."""
    mv = np.asarray(moved, dtype=bool)
    m = np.asarray(margin, dtype=np.float64)
    if not mv.any() or mv.all():
        return True
    return bool(m[mv].max() <= m[~mv].min())


# -- reading runs -----------------------------------------------------------------------------------


def _text(m) -> str:
    return m if isinstance(m, str) else m[-1]["content"]


def find_runs(runs_dir: str) -> List[str]:
    """Every directory under `runs_dir` (itself included) with config.yaml and round_1/annotations.jsonl,
    sorted."""
    out = []
    for d, dirs, files in os.walk(runs_dir):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in ("model", "trainer", "data"))
        if "config.yaml" in files and os.path.exists(os.path.join(d, "round_1", "annotations.jsonl")):
            out.append(d)
    return sorted(out)


def bench_name(run_dir: str, cfg_method: str) -> str:
    """The bench's method name of a run (`<method>[@var]` in OUT/seed<S>/seedflip<a>_annflip<b>/), else
    the config's method."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(run_dir)))
    if parent.startswith("seedflip") and "_annflip" in parent:
        return os.path.basename(os.path.abspath(run_dir)).split("@")[0]
    return cfg_method


def task_json_of(run_dir: str, cfg) -> Optional[str]:
    """The seed's task.json: next to the run's preference_data, or OUT/seed<S>/task/task.json."""
    cands = []
    pref = getattr(cfg, "preference_data", None)
    if isinstance(pref, str) and pref:
        cands.append(os.path.join(os.path.dirname(pref), "task.json"))
    cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(run_dir))), "task", "task.json"))
    return next((c for c in cands if os.path.isfile(c)), None)


def _rounds(run_dir: str) -> List[int]:
    out, t = [], 1
    while os.path.exists(os.path.join(run_dir, f"round_{t}", "annotations.jsonl")):
        out.append(t)
        t += 1
    return out


def sera_kept(round_dir: str, rows: List[dict]) -> Optional[np.ndarray]:
    """Which of the round's pairs SeRA kept (bool per row), from sera.jsonl's first `kept` rows
    (metrics.json "sera"."kept"); None without sera.jsonl. A kept row is matched to an unmatched
    round pair with the same prompt, chosen and rejected (a cumulative pool's kept rows from other
    rounds match none)."""
    from ssapo.io import read_jsonl

    path = os.path.join(round_dir, "sera.jsonl")
    if not os.path.exists(path):
        return None
    sel = read_jsonl(path)
    kept = None
    mt = os.path.join(round_dir, "metrics.json")
    if os.path.exists(mt):
        with open(mt) as f:
            kept = json.load(f).get("sera", {}).get("kept")
    if kept is None:
        return None
    key = lambda r: json.dumps([r["prompt"], r["chosen"], r["rejected"]], sort_keys=True)  # noqa: E731
    want = Counter(key(r) for r in sel[: int(kept)])
    out = np.zeros(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        k = key(r)
        if want[k] > 0:
            want[k] -= 1
            out[i] = True
    return out


def read_round(run_dir: str, t: int, cfg, spec, eps_grid: Sequence[float]) -> dict:
    """One round's pairs: margins, targets, per ε the moved mass and the groups, SeRA's kept pairs."""
    from ssapo.bench.task import gold_reward
    from ssapo.follower import follow, load
    from ssapo.io import read_jsonl

    rd = os.path.join(run_dir, f"round_{t}")
    rows = read_jsonl(os.path.join(rd, "annotations.jsonl"))
    margins = np.array([float(r["margin"]) for r in rows], dtype=np.float64)
    out: dict = {"run": run_dir, "round": t, "n": len(rows), "margin": margins}
    out["flipped"] = np.array([bool(r["flipped"]) for r in rows]) if rows and "flipped" in rows[0] else None
    if spec is not None:
        out["mislabelled"] = np.array(
            [
                gold_reward(spec, _text(r["prompt"]), _text(r["chosen"]))
                < gold_reward(spec, _text(r["prompt"]), _text(r["rejected"]))
                for r in rows
            ],
            dtype=bool,
        )
    else:
        out["mislabelled"] = None
    out["moved"], out["group"] = {}, {}
    for e in eps_grid:
        atoms, _ = follow(margins, cfg, eps=float(e))
        out["moved"][float(e)] = atoms.moved_mass()
        out["group"][float(e)] = np.asarray(atoms.group)
    # the re-solve at the run's own ε against the follower.npz the run saved (the same solver, the same settings)
    fol = os.path.join(rd, "follower.npz")
    if os.path.exists(fol) and len(rows):
        saved = load(fol)
        if len(saved.get("xi", [])) == len(rows):
            atoms, _ = follow(margins, cfg)
            out["matches_saved"] = bool(np.allclose(saved["mass"], atoms.mass) and np.allclose(saved["loc"], atoms.loc))
    out["sera_kept"] = sera_kept(rd, rows)
    keep = float(getattr(cfg, "sera_keep", 0.7))
    out["keep_fraction"] = keep
    return out


# -- the analysis -----------------------------------------------------------------------------------


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def _margin_at_keep(rounds: List[dict]) -> np.ndarray:
    """Per round, the pairs SeRA's rule drops if it ranked by the annotation margin: all but the top
    max(1, round(keep·n)) by margin (ties: the earlier pair first)."""
    out = []
    for r in rounds:
        n, m = r["n"], r["margin"]
        order = sorted(range(n), key=lambda i: (-m[i], i))
        drop = np.ones(n, dtype=bool)
        drop[order[: max(1, round(r["keep_fraction"] * n))] if n else []] = False
        out.append(drop)
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float:
    """Spearman's ρ (Pearson on average ranks); nan when either side is constant. (numpy only: scipy is
    not among the package's dependencies.)"""
    a, b = _ranks(x), _ranks(y)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def kendall(x, y) -> float:
    """Kendall's τ-b over every pair of elements; nan when either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    iu = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    n0 = len(dx)
    den = math.sqrt(float(n0 - np.sum(dx == 0)) * float(n0 - np.sum(dy == 0)))
    return float(np.sum(dx * dy)) / den if den > 0 else float("nan")


def agreement(rounds: List[dict], eps: float) -> dict:
    """Within the follower's groups at `eps`: whether the moved pairs are the k lowest-margin pairs,
    and the rank correlation of moved mass with margin (see the module docstring)."""
    groups = same = 0
    rho_all, tau_all, rho_moved, tau_moved = [], [], [], []
    for r in rounds:
        mv, g, m = r["moved"][eps], r["group"][eps], r["margin"]
        for gi in np.unique(g):
            idx = np.flatnonzero(g == gi)
            mm, mg = mv[idx], m[idx]
            k = int(np.sum(mm > 0))
            if k == 0 or k == len(idx):
                continue
            groups += 1
            same += lowest_k_agree(mm > 0, mg)
            if np.ptp(mg) > 0:
                rho_all.append(spearman(mm, mg))
                tau_all.append(kendall(mm, mg))
            sel = mm > 0
            if k >= 3 and np.ptp(mm[sel]) > 0 and np.ptp(mg[sel]) > 0:
                rho_moved.append(spearman(mm[sel], mg[sel]))
                tau_moved.append(kendall(mm[sel], mg[sel]))
    return {
        "eps": eps,
        "groups_with_movement": groups,
        "lowest_k_fraction": same / groups if groups else float("nan"),
        "spearman_all": _nanmean(rho_all),
        "kendall_all": _nanmean(tau_all),
        "groups_moved_ge3": len(rho_moved),
        "spearman_moved": _nanmean(rho_moved),
        "kendall_moved": _nanmean(tau_moved),
    }


def condition_of(run_dir: str) -> str:
    """The bench condition directory a run sits in (`seedflip<a>_annflip<b>`), or ''."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(run_dir)))
    return parent if parent.startswith("seedflip") and "_annflip" in parent else ""


def analyse(
    runs_dir: str,
    eps_grid: Sequence[float] = DEFAULT_EPS,
    methods: Sequence[str] = DEFAULT_METHODS,
    conditions: Optional[Sequence[str]] = None,
) -> dict:
    """The detection analysis of the runs under `runs_dir` of `methods` (bench names, e.g. ssapo,
    sera, ssapo-eps; a run outside the bench layout by its config's method), of the bench conditions
    named in `conditions` (e.g. seedflip0_annflip0.4; None: every run). ValueError (one line)
    when no run directory with annotations is found, or none of `methods`."""
    from ssapo.bench.task import load_spec
    from ssapo.loop import read_run_config

    eps_grid = [float(e) for e in eps_grid]
    found = find_runs(runs_dir)
    if not found:
        raise ValueError(f"RUNS_DIR: no run directory with config.yaml and round_1/annotations.jsonl under {runs_dir}")
    runs, rounds, skipped = [], [], []
    specs: Dict[str, object] = {}
    for d in found:
        cfg = read_run_config(d)
        name = bench_name(d, cfg.method)
        if name not in methods or (conditions and condition_of(d) not in conditions):
            skipped.append({"run": d, "method": name})
            continue
        tj = task_json_of(d, cfg)
        if tj is not None and tj not in specs:
            specs[tj] = load_spec(tj)
        spec = specs.get(tj) if tj else None
        rs = [read_round(d, t, cfg, spec, eps_grid) for t in _rounds(d)]
        rs = [r for r in rs if r["n"] > 0]
        runs.append(
            {
                "run": os.path.relpath(d, runs_dir),
                "method": name,
                "rounds": len(rs),
                "pairs": sum(r["n"] for r in rs),
                "task": tj,
                "follower": {k: getattr(cfg, k) for k in ("eps", "k", "group_size", "beta_follower", "follower_space")},
                "resolve_matches_saved": [r.get("matches_saved") for r in rs],
            }
        )
        rounds.extend(rs)
    if not runs:
        have = sorted({s["method"] for s in skipped})
        if conditions:
            raise ValueError(
                f"--conditions: no run of {', '.join(methods)} in {', '.join(conditions)} under {runs_dir}"
            )
        raise ValueError(f"--methods: no run of {', '.join(methods)} under {runs_dir} (found: {', '.join(have)})")
    n = sum(r["n"] for r in rounds)
    res: dict = {
        "runs_dir": os.path.abspath(runs_dir),
        "methods": list(methods),
        "eps_grid": eps_grid,
        "runs": runs,
        "rounds": len(rounds),
        "pairs": n,
        "targets": {},
        "agreement": [agreement(rounds, e) for e in eps_grid if e > 0],
    }
    for target in TARGETS:
        have = [r for r in rounds if r[target] is not None]
        if not have:
            res["targets"][target] = {"available": False}
            continue
        y = np.concatenate([r[target] for r in have])
        mg = np.concatenate([r["margin"] for r in have])
        tres: dict = {"available": True, "pairs": int(len(y)), "positives": int(y.sum())}
        tres["base_rate"] = float(y.mean()) if len(y) else float("nan")
        tres["margin_curve"] = ranking_curve(-mg, y)
        tres["margin_at_keep"] = point(_margin_at_keep(have), y)
        fol = []
        for e in eps_grid:
            mm = np.concatenate([r["moved"][e] for r in have])
            fol.append({"eps": e, **point(mm > 0, y), "curve": ranking_curve(mm, y)})
        tres["follower"] = fol
        sera = [r for r in have if r["sera_kept"] is not None]
        if sera:
            y_s = np.concatenate([r[target] for r in sera])
            tres["sera"] = {
                **point(~np.concatenate([r["sera_kept"] for r in sera]), y_s),
                "base_rate": float(y_s.mean()),
            }
        res["targets"][target] = tres
    return res


# -- output -----------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(res: dict) -> str:
    lines = [
        "# The follower as a detector of wrong labels",
        "",
        f"Runs under `{res['runs_dir']}` of {', '.join(res['methods'])}: {len(res['runs'])} runs, "
        f"{res['rounds']} rounds, {res['pairs']} pairs (pooled). Flagged: the follower, m_i > 0 at ε; "
        "margin: the lowest implicit-reward margins (a row per share of pairs flagged, and at SeRA's keep "
        "fraction); SeRA: the pairs it did not keep (sera runs only).",
        "",
    ]
    for target in TARGETS:
        t = res["targets"][target]
        if not t.get("available"):
            lines += [f"## Target: {target}", "", "Not available in these runs.", ""]
            continue
        lines += [
            f"## Target: {target}",
            "",
            f"{t['positives']} of {t['pairs']} pairs; base rate {_f(t['base_rate'])}.",
            "",
            "| detector | ε | flagged | precision | recall | F1 |",
            "|---|---|---|---|---|---|",
        ]
        for p in t["follower"]:
            lines.append(
                f"| follower | {p['eps']:g} | {p['flagged']} | {_f(p['precision'])} | {_f(p['recall'])} | {_f(p['f1'])} |"
            )
        c = t["margin_curve"]
        N = t["pairs"]
        for share in (0.1, 0.2, 0.3, 0.4, 0.5, 1.0):
            # the first threshold that flags at least this share
            i = next((j for j, f in enumerate(c["flagged"]) if f >= share * N - 1e-9), None)
            if i is None:
                continue
            p, r = c["precision"][i], c["recall"][i]
            f1 = 2 * p * r / (p + r) if (p + r) > 0 and not math.isnan(r) else float("nan")
            lines.append(f"| margin (lowest {share:.0%}) | – | {c['flagged'][i]} | {_f(p)} | {_f(r)} | {_f(f1)} |")
        p = t["margin_at_keep"]
        lines.append(
            f"| margin (SeRA's keep fraction) | – | {p['flagged']} | {_f(p['precision'])} | {_f(p['recall'])} | "
            f"{_f(p['f1'])} |"
        )
        if "sera" in t:
            p = t["sera"]
            lines.append(
                f"| SeRA not kept ({p['n']} pairs, base rate {_f(p['base_rate'])}) | – | {p['flagged']} | "
                f"{_f(p['precision'])} | {_f(p['recall'])} | {_f(p['f1'])} |"
            )
        else:
            lines.append("| SeRA not kept | – | – | – | – | – (no sera run in the set) |")
        lines.append("")
    lines += [
        "## Within-group agreement of the follower with the margin",
        "",
        "Groups where the follower moved some but not all pairs: the fraction where the moved pairs are "
        "exactly the k lowest-margin pairs; mean over groups of the rank correlation of moved mass with "
        "margin (all pairs of the group; the moved pairs alone where ≥ 3 moved).",
        "",
        "| ε | groups | lowest-k | Spearman (all) | Kendall (all) | groups ≥3 moved | Spearman (moved) | "
        "Kendall (moved) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in res["agreement"]:
        lines.append(
            f"| {a['eps']:g} | {a['groups_with_movement']} | {_f(a['lowest_k_fraction'])} | {_f(a['spearman_all'])} | "
            f"{_f(a['kendall_all'])} | {a['groups_moved_ge3']} | {_f(a['spearman_moved'])} | {_f(a['kendall_moved'])} |"
        )
    checks = [x for r in res["runs"] for x in r["resolve_matches_saved"] if x is not None]
    lines += [
        "",
        f"The re-solve at each run's own ε reproduces its saved follower.npz in {sum(checks)} of {len(checks)} rounds.",
        "",
    ]
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssapo.io import atomic_write

    targets = [t for t in TARGETS if res["targets"][t].get("available")]
    fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(5.5 * max(1, len(targets)), 4.5), squeeze=False)
    for ax, target in zip(axes[0], targets):
        t = res["targets"][target]
        c = t["margin_curve"]
        ax.plot(c["recall"], c["precision"], "-", color="C0", label="margin (ascending)")
        fol = t["follower"]
        ax.plot([p["recall"] for p in fol], [p["precision"] for p in fol], "o-", color="C1", label="follower (ε grid)")
        for p in fol:
            if p["flagged"]:
                ax.annotate(f"{p['eps']:g}", (p["recall"], p["precision"]), fontsize=7, color="C1")
        p = t["margin_at_keep"]
        ax.plot([p["recall"]], [p["precision"]], "s", color="C0", label="margin at SeRA's keep fraction")
        if "sera" in t:
            ax.plot([t["sera"]["recall"]], [t["sera"]["precision"]], "*", ms=12, color="C2", label="SeRA not kept")
        ax.axhline(t["base_rate"], color="grey", ls=":", label=f"base rate {t['base_rate']:.2f}")
        ax.set(
            xlabel="recall", ylabel="precision", title=f"{target} ({t['pairs']} pairs)", xlim=(0, 1.02), ylim=(0, 1.02)
        )
        ax.legend(fontsize=7, loc="best")
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if math.isnan(float(o)) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def write(res: dict, out: str) -> str:
    from ssapo.io import atomic_write, write_json

    os.makedirs(out, exist_ok=True)
    md = markdown(res)
    atomic_write(os.path.join(out, "detection.md"), lambda p: open(p, "w").write(md))
    write_json(os.path.join(out, "detection.json"), _jsonable(res))
    plot(res, os.path.join(out, "detection.png"))
    return md


def _eps_list(s: str) -> List[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers >= 0, got {s!r}") from None
    if not vals or any(not math.isfinite(v) or v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"comma-separated numbers >= 0, got {s!r}")
    return sorted(set(vals))


def _methods(s: str) -> List[str]:
    vals = [x.strip() for x in s.split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"comma-separated method names, got {s!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ssapo.bench.detect",
        description="The follower, the implicit-reward margin and SeRA's selection as detectors of wrong labels.",
    )
    ap.add_argument("runs_dir", metavar="RUNS_DIR", help="a `ssapo bench` output directory")
    ap.add_argument("--out", default=None, help="where detection.{png,md,json} go (default: RUNS_DIR/detect)")
    ap.add_argument(
        "--eps", type=_eps_list, default=list(DEFAULT_EPS), help="the follower's ε grid (default: %(default)s)"
    )
    ap.add_argument(
        "--methods",
        type=_methods,
        default=list(DEFAULT_METHODS),
        help="bench method names whose runs are pooled (default: ssapo)",
    )
    ap.add_argument(
        "--conditions",
        type=_methods,
        default=None,
        help="bench condition directories whose runs are pooled, e.g. seedflip0_annflip0.4 (default: every one)",
    )
    args = ap.parse_args(argv)
    if not os.path.isdir(args.runs_dir):
        ap.error(f"RUNS_DIR: {args.runs_dir} is not a directory")
    try:
        res = analyse(args.runs_dir, args.eps, args.methods, args.conditions)
    except ValueError as e:
        ap.error(str(e))
    out = args.out or os.path.join(args.runs_dir, "detect")
    try:
        md = write(res, out)
    except OSError as e:
        ap.error(f"--out: {out}: {e}")
    print(md)
    print(f"written: {os.path.join(out, 'detection.md')}, detection.json, detection.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
