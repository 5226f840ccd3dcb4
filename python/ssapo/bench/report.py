"""`ssapo bench`'s report: report.md, summary.json and the plots, from the evaluated runs.

Per condition (seed-label flips, self-annotation flips), per method row (a tuned
method: its candidate with the best mean validation win rate), over seeds: the
final test win rate against the SFT policy, its paired difference from tuned
iterative DPO with a 95 % t interval ("no significant difference" where it covers
0), the share of the headroom (oracle − seed-only DPO) it captures, the LC win
rate (flagged where answers collapsed), the mean answer length per round, the
gold accuracy of each round's self-annotations, gold ties, the follower's
movement of flipped / mislabelled pairs against the rest, parameter displacement.

Outcomes: a collapsed run (its rounds stopped early: every prompt's responses tied) keeps its result
policy's score — that is the method's outcome on that seed — and is flagged in its row and listed; a
failed run (an exception) has no score: its seed is left out of that row's means and of every paired
comparison that needs it (each interval says over how many seeds), and it is listed with its cause.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np

from ssapo.bench import stats
from ssapo.bench.suite import (
    BASELINE,
    Job,
    Preset,
    candidates,
    canonical,
    finished,
    is_failed,
    self_annotating,
    tuning_seeds,
)
from ssapo.bench.task import SIZE_SPECS

VALID_ACCURACY = (0.65, 0.85)
MIN_HEADROOM = 0.10


def _fmt(m: float, s: Optional[float] = None, digits: int = 3) -> str:
    if m is None or not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f}" if s is None or not math.isfinite(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _ms(values) -> str:
    return _fmt(*stats.mean_std(values))


def _final(ev: dict, key: str = "win_rate") -> float:
    return ev["rounds"][-1][key]


class Table:
    """The evaluated runs of one condition, rows picked by validation."""

    def __init__(self, preset: Preset, results: Dict[Job, dict], seeds: List[int], methods: List[str], sf, af):
        self.preset, self.results, self.seeds, self.sf, self.af = preset, results, seeds, sf, af
        self.rows: Dict[str, Dict[int, dict]] = {}
        self.chosen: Dict[str, str] = {}
        self.sweeps: Dict[str, Dict[str, Dict[int, dict]]] = {}
        self.failed: Dict[str, Dict[int, dict]] = {}  # method -> seed -> failure record (of the row's candidate)
        # each row's candidate is chosen on the tuning seeds' validation prompts (suite.tuning_seeds), judged on all
        tuners = set(tuning_seeds(preset, seeds))
        for m in methods:
            per_cand, fails = {}, {}
            for var in candidates(preset, m):
                got, bad = {}, {}
                for s in seeds:
                    j = canonical(Job(s, sf, af, m, var), preset)
                    if finished(results.get(j)):
                        got[s] = results[j]
                    elif is_failed(results.get(j)):
                        bad[s] = results[j]
                name = Job(0, 0, 0, m, var).var_name
                if got:
                    per_cand[name] = got
                if bad:
                    fails[name] = bad
            best = stats.pick_by_validation(
                {k: [ev["val"]["win_rate"] for s, ev in v.items() if s in tuners] for k, v in per_cand.items()}
            )
            if best is None:  # nothing finished: the seeds where every candidate failed
                if fails:
                    self.failed[m] = {s: r for per in fails.values() for s, r in per.items()}
                continue
            self.sweeps[m] = per_cand
            self.chosen[m] = best
            self.rows[m] = per_cand[best]
            if fails.get(best):
                self.failed[m] = fails[best]

    def collapsed(self, m: str) -> Dict[int, dict]:
        """seed -> where the row's run stopped early (its eval's "stopped"), for the seeds that collapsed."""
        return {s: ev["stopped"] for s, ev in self.rows.get(m, {}).items() if ev.get("stopped")}

    def final(self, m: str, key: str = "win_rate") -> Dict[int, float]:
        return {s: _final(ev, key) for s, ev in self.rows.get(m, {}).items()}

    def mean(self, m: str) -> float:
        return stats.mean_std(list(self.final(m).values()))[0]

    def headroom(self, oracle: str = "oracle-iterative") -> float:
        return self.mean(oracle) - self.mean("dpo")

    def paired(self, m: str, against: str = BASELINE) -> dict:
        """Paired by seed over the seeds where both rows have a score (a failed run's seed drops out)."""
        return stats.paired_by_seed(self.final(m), self.final(against), self.seeds)

    def seed_accuracy(self) -> List[float]:
        """Round-1 gold accuracy of the self-annotations of π_0 (iterative DPO's first round)."""
        out = []
        for ev in self.rows.get(BASELINE, {}).values():
            if ev["per_round"]:
                out.append(ev["per_round"][0]["annotation"]["accuracy"])
        return out


def _collapsed_seeds(evs: List[dict]) -> int:
    """How many of these runs ended with answers below half the SFT policy's mean length."""
    return sum(stats.length_collapsed([e["rounds"][-1]["mean_length"]], e["sft_mean_length"]) for e in evs)


def ragged_mean(rows: List[List[float]]) -> List[float]:
    """Per index, the mean over the lists that reach it (runs that stopped early have fewer rounds)."""
    n = max(map(len, rows), default=0)
    return [float(np.mean([r[i] for r in rows if len(r) > i])) for i in range(n)]


def _delta(p: dict, short: bool = False) -> str:
    """A paired difference with its interval and the seeds it used; '–' with fewer than 2 pairs."""
    if p["n"] < 2:
        return "–" if not short else ""
    ns = "n.s." if short else "no significant difference"
    text = f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]" + ("" if p["significant"] else f" {ns}")
    return text + f" ({p['n']} seeds)"


def outcome_cell(t: Table, m: str) -> str:
    """The row's collapsed and failed seeds: 'collapsed: seed 1 (round 3); failed: seed 2', or '–'."""
    parts = []
    col = t.collapsed(m)
    if col:
        parts.append("collapsed: " + ", ".join(f"seed {s} (round {c.get('round')})" for s, c in sorted(col.items())))
    bad = t.failed.get(m, {})
    if bad:
        parts.append("failed: " + ", ".join(f"seed {s}" for s in sorted(bad)))
    return "; ".join(parts) or "–"


def _label(m: str, t: Table) -> str:
    c = t.chosen.get(m)
    return f"{m} ({c})" if c else m


def condition_name(sf: float, af: float) -> str:
    """A condition's name in every report heading and table: 'clean labels', or which labels are flipped."""
    if sf == 0 and af == 0:
        return "clean labels"
    parts = []
    if sf:
        parts.append(f"{sf:.0%} of the seed labels flipped")
    if af:
        parts.append(f"{af:.0%} of each round's self-annotations flipped")
    return ", ".join(parts)


def table_lines(t: Table, methods: List[str]) -> List[str]:
    h_it, h_dpo = t.headroom("oracle-iterative"), t.headroom("oracle-dpo")
    lines = [
        f"Seed-only DPO {_ms(list(t.final('dpo').values()))}; oracles: iterative DPO with the gold annotator "
        f"{_ms(list(t.final('oracle-iterative').values()))}, DPO on gold labels for every pair "
        f"{_ms(list(t.final('oracle-dpo').values()))}. **Headroom** (iterative oracle − seed-only DPO) "
        f"{_fmt(h_it)}; to the all-gold DPO {_fmt(h_dpo)}.",
        "",
        "| method | test win rate | Δ vs iterative DPO (tuned), 95 % CI | share of headroom | LC win rate "
        "| mean length per round | annotation acc. per round | gold ties | moved: flipped / unflipped "
        "| moved: mislabelled / correct | displacement from π_init | collapsed / failed runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base, oracle = t.mean("dpo"), t.mean("oracle-iterative")
    for m in methods:
        if m not in t.rows:
            continue
        evs = [t.rows[m][s] for s in t.seeds if s in t.rows[m]]
        wr = [_final(e) for e in evs]
        lens = [[r["mean_length"] for r in e["rounds"]] for e in evs]
        mean_len = ragged_mean(lens)  # a collapsed run counts in the rounds it trained
        collapsed = _collapsed_seeds(evs)
        lc = _ms([_final(e, "lc_win_rate") for e in evs]) + (
            f" ⚠ lengths collapsed on {collapsed} of {len(evs)} seeds" if collapsed else ""
        )
        delta = "(the reference)" if m == BASELINE else _delta(t.paired(m))
        share = stats.headroom_share(float(np.mean(wr)), base, oracle)
        pr = [e["per_round"] for e in evs if e["per_round"]]
        acc = ties = mov_f = mov_m = "–"
        if pr and self_annotating(m) or m == "oracle-iterative":
            if pr:
                acc = " / ".join(_fmt(x) for x in ragged_mean([[r["annotation"]["accuracy"] for r in p] for p in pr]))
                ties = _fmt(float(np.mean([r["annotation"]["tie_fraction"] for p in pr for r in p])))
                fol = [r["follower"] for p in pr for r in p if "follower" in r]
                if fol:
                    mov_m = f"{_fmt(np.nanmean([f['moved_mislabelled'] for f in fol]))} / {_fmt(np.nanmean([f['moved_correct'] for f in fol]))}"
                    if "moved_flipped" in fol[0] and t.af:
                        mov_f = f"{_fmt(np.nanmean([f['moved_flipped'] for f in fol]))} / {_fmt(np.nanmean([f['moved_unflipped'] for f in fol]))}"
        lines.append(
            f"| {_label(m, t)} | {_ms(wr)} | {delta} | {_fmt(share, digits=2)} | {lc} "
            f"| {' → '.join(f'{x:.2f}' for x in mean_len)} | {acc} | {ties} | {mov_f} | {mov_m} "
            f"| {_ms([e['displacement_from_sft'] for e in evs])} | {outcome_cell(t, m)} |"
        )
    lines.append("")
    return lines


def validity_lines(t: Table) -> List[str]:
    """The design criteria (never SSAPO's result): headroom, seed-model annotation accuracy, a tuned
    iterative DPO that captures a clearly non-zero share."""
    h = t.headroom()
    acc = stats.mean_std(t.seed_accuracy())[0]
    p = t.paired(BASELINE, "dpo")
    share = stats.headroom_share(t.mean(BASELINE), t.mean("dpo"), t.mean("oracle-iterative"))
    ok_h = math.isfinite(h) and h >= MIN_HEADROOM
    ok_a = math.isfinite(acc) and VALID_ACCURACY[0] <= acc <= VALID_ACCURACY[1]
    ok_i = p["n"] >= 2 and p["significant"] and p["mean"] > 0
    return [
        "Design criteria: headroom "
        + _fmt(h)
        + f" (needs ≥ {MIN_HEADROOM:.2f}: {'holds' if ok_h else 'does NOT hold'}); seed-model self-annotation "
        f"accuracy {_fmt(acc)} (needs {VALID_ACCURACY[0]}–{VALID_ACCURACY[1]}: {'holds' if ok_a else 'does NOT hold'}); "
        f"tuned iterative DPO − seed-only DPO {_fmt(p['mean'])} [{_fmt(p['lo'])}, {_fmt(p['hi'])}], share "
        f"{_fmt(share, digits=2)} (must be clearly above 0: {'holds' if ok_i else 'does NOT hold'}).",
        "",
    ]


POWER_HALF = 0.03  # the interval the comparisons should reach: ±3 points of win rate


def power_lines(tables: List[Table], methods: List[str]) -> List[str]:
    """Per condition and self-annotating method: the half-width of its 95 % paired interval against tuned
    iterative DPO, the standard deviation of the paired differences, and the seeds that would bring the
    half-width to ±3 points at that spread (stats.seeds_for)."""
    lines = [
        "| condition | method | seeds | Δ vs iterative DPO | half-width | sd of Δ | seeds for ±3 points |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tables:
        for m in methods:
            if m == BASELINE or m not in t.rows or not self_annotating(m):
                continue
            p = t.paired(m)
            if p["n"] < 2:
                continue
            half = (p["hi"] - p["lo"]) / 2
            a, b = t.final(m), t.final(BASELINE)
            sd = stats.mean_std([a[s] - b[s] for s in p["seeds"]])[1]
            need = stats.seeds_for(sd, POWER_HALF)
            lines.append(
                f"| {condition_name(t.sf, t.af)} | {m} | {p['n']} | {p['mean']:+.3f} | ±{half:.3f} | {sd:.3f} "
                f"| {need if need is not None else '–'} |"
            )
    return lines + [""] if len(lines) > 2 else []


def summary_table(tables: List[Table], methods: List[str]) -> List[str]:
    """One row per method, one column pair per condition: win rate (mean ± std) and the paired
    difference from tuned iterative DPO with its 95 % interval (n.s.: it covers 0)."""
    head = "| method |" + "".join(f" {condition_name(t.sf, t.af)} |" for t in tables)
    lines = [head, "|---|" + "---|" * len(tables)]
    for m in methods:
        if not any(m in t.rows for t in tables):
            continue
        cells = []
        for t in tables:
            if m not in t.rows:
                cells.append("–")
                continue
            wr = _ms(list(t.final(m).values()))
            if m == BASELINE:
                cells.append(f"{wr} (reference)")
                continue
            d = _delta(t.paired(m), short=True)
            cells.append(wr + (f"; Δ {d}" if d else ""))
        lines.append(f"| {_label(m, tables[0])} |" + "".join(f" {c} |" for c in cells))
    lines.append("")
    lines.append(
        "Headroom (iterative oracle − seed-only DPO): "
        + "; ".join(f"{condition_name(t.sf, t.af)} {_fmt(t.headroom())}" for t in tables)
        + "."
    )
    return lines


def sweep_lines(t: Table) -> List[str]:
    """Every swept candidate of every row with a grid: mean validation win rate (what tuning reads),
    test win rate, final answer length and the seeds whose answers collapsed; for learning-rate grids
    the lr at which the row breaks (the smallest whose mean test win rate falls below seed-only DPO's);
    for the ε sweep of the SSAPO variants, the validation winner against the recipes' setting."""
    base = t.mean("dpo")
    lines = []
    for m, per in t.sweeps.items():
        if len(per) < 2:
            continue
        key = next(iter(per)).split("=")[0]
        order = sorted(per, key=lambda k: float(k.split("=")[1]))
        lines += [
            f"**{m}** over {key} (chosen: {t.chosen.get(m)})",
            "",
            f"| {key} | validation win rate | test win rate | final answer length | seeds collapsed |",
            "|---|---|---|---|---|",
        ]
        broke = None
        for k in order:
            evs = list(per[k].values())
            test = [_final(e) for e in evs]
            if broke is None and key == "learning_rate" and float(np.mean(test)) < base:
                broke = k
            lens = [e["rounds"][-1]["mean_length"] for e in evs]
            lines.append(
                f"| {k.split('=')[1]} | {_ms([e['val']['win_rate'] for e in evs])} | {_ms(test)} "
                f"| {_fmt(float(np.mean(lens)), digits=2)} | {_collapsed_seeds(evs)} of {len(evs)} |"
            )
        lines.append("")
        if key == "learning_rate":
            lines += [
                f"Breaks at: {broke.split('=')[1] if broke else 'none of these'} (first lr whose mean test win rate "
                f"falls below seed-only DPO's {_fmt(base)}).",
                "",
            ]
    lines += leader_choice_lines(t)
    return lines


def leader_choice_lines(t: Table) -> List[str]:
    """The ε sweep's verdict: the (variant, ε) with the best mean validation win rate against the
    recipes' setting (RECIPE_SSAPO), paired by seed on validation and on test, 95 % t intervals."""
    from ssapo.bench.suite import RECIPE_SSAPO

    rm, rk = RECIPE_SSAPO
    if rk not in t.sweeps.get(rm, {}):
        return []
    cands = {
        (m, k): per
        for m, per in t.sweeps.items()
        if all(x.startswith("eps=") for x in per) and len(per) > 1
        for k, per in per.items()
    }
    val = {c: float(np.mean([e["val"]["win_rate"] for e in per.values()])) for c, per in cands.items()}
    best = max(val, key=lambda c: val[c])
    ref = t.sweeps[rm][rk]
    seeds = [s for s in cands[best] if s in ref]
    pv = stats.paired_ci([cands[best][s]["val"]["win_rate"] for s in seeds], [ref[s]["val"]["win_rate"] for s in seeds])
    pt = stats.paired_ci([_final(cands[best][s]) for s in seeds], [_final(ref[s]) for s in seeds])
    if best == (rm, rk):
        verdict = "the recipes' setting itself has the best validation win rate"
    elif pv["significant"] and pv["mean"] > 0:
        verdict = "it wins on validation (the interval is above 0)"
    else:
        verdict = "no variant wins: the interval covers 0"
    return [
        f"ε sweep: best mean validation win rate {best[0]} at {best[1]} ({_fmt(val[best])}) against the recipes' "
        f"{rm} at {rk} ({_fmt(val[(rm, rk)])}): validation Δ {_fmt(pv['mean'])} [{_fmt(pv['lo'])}, "
        f"{_fmt(pv['hi'])}], test Δ {_fmt(pt['mean'])} [{_fmt(pt['lo'])}, {_fmt(pt['hi'])}] over {len(seeds)} "
        f"seeds; {verdict}.",
        "",
    ]


def control(t: Table) -> Optional[tuple]:
    """(seeds where ssapo-eps0's every-round test win rates equal iterative DPO's at the same
    learning rate, seeds compared), or None when either is missing."""
    if "ssapo-eps0" not in t.rows or BASELINE not in t.sweeps:
        return None
    lr = dict(Job(0, 0, 0, "ssapo-eps0").var).get("learning_rate", t.preset.run.get("learning_rate"))
    key = next((k for k in t.sweeps[BASELINE] if k in ("", f"learning_rate={lr:g}")), None)
    if key is None:
        return None
    ref = t.sweeps[BASELINE][key]
    same = [s for s in t.rows["ssapo-eps0"] if s in ref]
    eq = sum(
        [r["win_rate"] for r in t.rows["ssapo-eps0"][s]["rounds"]] == [r["win_rate"] for r in ref[s]["rounds"]]
        for s in same
    )
    return eq, len(same)


OUTCOME_TEXT = (
    "Collapsed and failed runs: a run is *collapsed* when its rounds stopped early (a round where every prompt's "
    "responses tied left no pairs: the policy stopped exploring); it is evaluated on its result, the last policy it "
    "trained, and keeps that score (that is the method's outcome on that seed), flagged in its row. A run is "
    "*failed* when it raised (a bug, a bad candidate, a fault of the machine; its traceback is in failed.txt in its "
    "directory): it has no score, its seed is left out of its row's mean and of every paired comparison that needs "
    "it (each interval names how many seeds it used), tuning chooses among the candidates on the seeds where they "
    "finished, and a rerun into the same directory tries it again (finished runs are kept)."
)


def outcomes(results: Dict[Job, dict]) -> List[dict]:
    """Every collapsed or failed run: seed, condition, method, candidate, outcome and its where/why or cause."""
    out = []
    for j, ev in sorted(results.items(), key=lambda kv: (kv[0].seed, kv[0].seed_flip, kv[0].ann_flip, kv[0].method)):
        base = {
            "seed": j.seed,
            "seed_flip": j.seed_flip,
            "annotation_flip": j.ann_flip,
            "method": j.method,
            "candidate": j.var_name,
        }
        if is_failed(ev):
            out.append({**base, "outcome": "failed", **ev["failed"]})
        elif ev.get("stopped"):
            out.append({**base, "outcome": "collapsed", **ev["stopped"]})
    return out


def outcome_lines(outs: List[dict]) -> List[str]:
    lines = ["## Runs that stopped early or failed", ""]
    if not outs:
        return lines + ["None: every run trained all its rounds.", ""]
    lines += [
        "| seed | condition | method | outcome | where / cause |",
        "|---|---|---|---|---|",
    ]
    for o in outs:
        name = o["method"] + (f" ({o['candidate']})" if o["candidate"] else "")
        if o["outcome"] == "failed":
            tb = f" (traceback: {o['traceback']})" if o.get("traceback") else ""
            what = f"failed at {o['step']}: {o['cause']}{tb}"
        else:
            what = f"collapsed at {o['at']}: result {o['result']}; {o['why']}"
        cell = what.replace("|", "\\|")
        lines.append(
            f"| {o['seed']} | {condition_name(o['seed_flip'], o['annotation_flip'])} | {name} | {o['outcome']} | {cell} |"
        )
    return lines + [""]


def _save(fig, path: str) -> None:
    from ssapo.io import atomic_write

    atomic_write(path, lambda t: fig.savefig(t, dpi=90, bbox_inches="tight", format="png"))


def plots(tables: List[Table], methods: List[str], out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. win rate against headroom: each method's share, per condition
    fig, axes = plt.subplots(1, len(tables), figsize=(max(5, 0.5 * len(methods)) * len(tables), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tables):
        ms = [m for m in methods if m in t.rows]
        base, oracle = t.mean("dpo"), t.mean("oracle-iterative")
        vals = [[stats.headroom_share(x, base, oracle) for x in t.final(m).values()] for m in ms]
        ax.bar(range(len(ms)), [np.nanmean(v) if v else np.nan for v in vals], yerr=[np.nanstd(v) for v in vals])
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(1, color="g", ls="--", lw=0.8)
        ax.set_xticks(range(len(ms)), ms, rotation=40, ha="right", fontsize=7)
        ax.set_title(
            f"{condition_name(t.sf, t.af)}\nheadroom {_fmt(t.headroom())} (0 = seed-only DPO, 1 = oracle)", fontsize=8
        )
        ax.set_ylabel("share of headroom (win rate)")
    _save(fig, os.path.join(out, "headroom.png"))
    plt.close(fig)
    made.append("headroom.png")
    # 2. per-round annotation accuracy
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.5), squeeze=False)
    for ax, t in zip(axes[0], tables):
        for m in methods:
            pr = [e["per_round"] for e in t.rows.get(m, {}).values() if e["per_round"]]
            if pr:
                acc = ragged_mean([[r["annotation"]["accuracy"] for r in p] for p in pr])
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=m)
        ax.set_title(condition_name(t.sf, t.af), fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel("gold accuracy of the round's pairs")
    axes[0][-1].legend(fontsize=6)
    _save(fig, os.path.join(out, "annotation_accuracy.png"))
    plt.close(fig)
    made.append("annotation_accuracy.png")
    # 3. win rate per round
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.5), squeeze=False)
    for ax, t in zip(axes[0], tables):
        for m in methods:
            curves = [[r["win_rate"] for r in e["rounds"]] for e in t.rows.get(m, {}).values()]
            if curves:
                ax.plot(range(max(map(len, curves))), ragged_mean(curves), marker="o", label=m)
        ax.set_title(condition_name(t.sf, t.af), fontsize=8)
        ax.set_xlabel("round (0 = π_0)")
        ax.set_ylabel("test win rate vs SFT")
    axes[0][-1].legend(fontsize=6)
    _save(fig, os.path.join(out, "win_rate_per_round.png"))
    plt.close(fig)
    made.append("win_rate_per_round.png")
    # 4. sweeps: win rate against each tuned field (learning rate, ε, seed epochs)
    for key, fname in (
        ("learning_rate", "lr_sweep.png"),
        ("eps", "eps_sweep.png"),
        ("seed_epochs", "seed_epochs_sweep.png"),
    ):
        swept = {
            m
            for t in tables
            for m, per in t.sweeps.items()
            if len(per) > 1 and all(k.startswith(key + "=") for k in per)
        }
        if not swept:
            continue
        fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.5), squeeze=False)
        for ax, t in zip(axes[0], tables):
            for m in sorted(swept):
                per = t.sweeps.get(m, {})
                if not per:
                    continue
                xs = sorted(per, key=lambda k: float(k.split("=")[1]))
                ax.plot(
                    [float(k.split("=")[1]) for k in xs],
                    [np.mean([_final(e) for e in per[k].values()]) for k in xs],
                    marker="o",
                    label=m,
                )
            ax.set_xscale("log")
            ax.set_title(condition_name(t.sf, t.af), fontsize=8)
            ax.set_xlabel(key)
            ax.set_ylabel("test win rate vs SFT")
        axes[0][-1].legend(fontsize=6)
        _save(fig, os.path.join(out, fname))
        plt.close(fig)
        made.append(fname)
    return made


def _seed_span(seeds: List[int]) -> str:
    """'0–9' for consecutive seeds, else the list."""
    s = sorted(seeds)
    if len(s) > 2 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}–{s[-1]}"
    return ", ".join(map(str, s))


def write(
    preset: Preset,
    results: Dict[Job, dict],
    seeds: List[int],
    methods: List[str],
    out: str,
    cmd: str,
    seconds: float,
    notes: str = "",
    workers: int = 0,
) -> str:
    """Writes report.md, summary.json and the plots into `out`; returns the Markdown."""
    from ssapo.io import atomic_write, write_json

    conds = [(sf, af) for sf, af, _ in preset.conditions]
    done = [ev for ev in results.values() if finished(ev)]
    run_seconds = sum(ev.get("seconds", 0.0) for ev in done)
    missing = sum("seconds" not in ev for ev in done)
    tables = [Table(preset, results, seeds, methods, sf, af) for sf, af in conds]
    outs = outcomes(results)
    n_col, n_fail = sum(o["outcome"] == "collapsed" for o in outs), sum(o["outcome"] == "failed" for o in outs)
    lines = [
        f"# ssapo bench ({preset.name})",
        "",
        f"Command: `{cmd}` — seeds {seeds}, {len(conds)} conditions, {len(results)} runs ({n_col} collapsed, "
        f"{n_fail} failed: see Runs that stopped early or failed). Time on this machine: "
        f"{run_seconds / 60:.1f} min of run time in all (each run's training and evaluation, summed over runs, "
        f"measured when it ran{'; ' + str(missing) + ' runs without a record' if missing else ''}); this invocation "
        f"{seconds / 60:.1f} min wall" + (f" with {workers} worker processes." if workers else "."),
        "",
        f"Task: size `{preset.size}`"
        + (f" ({SIZE_SPECS[preset.size]})" if preset.size in SIZE_SPECS else "")
        + f", design {preset.design or 'the defaults of ssapo.bench.task.TaskSpec'}; loop: "
        f"the tiny recipe with {preset.run}. Tuning grids (chosen by the mean validation win rate over seeds, on "
        f"validation prompts disjoint from the test prompts): {preset.tune or 'none'}"
        + (
            "; every condition tuned on its own."
            if preset.tune_in_noise
            else "; tuned in the first condition, whose choice the other conditions run."
        ),
        "",
        "Win rate: gold-reward win rate of the final policy's samples against the SFT policy's on the test prompts "
        f"({preset.n_eval} samples per prompt, ties half), mean ± standard deviation over seeds. Δ: paired by seed, "
        "95 % t interval. Share of headroom: (win rate − seed-only DPO) / (iterative oracle − seed-only DPO). LC: "
        "the win rate at equal length (logistic fit on the length difference), flagged where the final mean "
        "answer length fell below half the SFT policy's on some seed (how many are named). Moved: fraction of pairs whose follower atom moved "
        "(flipped: turned around by annotation_flip_rate; mislabelled: gold prefers the rejected answer). "
        "Displacement: ‖θ − θ_init‖ / ‖θ_init‖ of the final model.",
        "",
        OUTCOME_TEXT,
        "",
    ]
    summary = {
        "preset": preset.name,
        "seeds": seeds,
        "command": cmd,
        "seconds": seconds,
        "run_seconds": run_seconds,
        "conditions": [],
        "outcomes": outs,
    }
    for t in tables:
        lines += [f"## {condition_name(t.sf, t.af)}", ""]
        lines += table_lines(t, methods)
        if t.sf == 0 and t.af == 0:
            lines += validity_lines(t)
        if t.sf == 0 and t.af == 0 and any(len(per) > 1 for per in t.sweeps.values()):
            lines += ["### Sweeps", ""] + sweep_lines(t)
        eq = control(t)
        if eq is not None:
            lines += [f"Control: SSAPO at ε = 0 equals iterative DPO in {eq[0]} of {eq[1]} seeds.", ""]
        summary["conditions"].append(
            {
                "seed_flip": t.sf,
                "annotation_flip": t.af,
                "headroom": t.headroom(),
                "chosen": t.chosen,
                "rows": {
                    m: {
                        "win_rate": stats.mean_std(list(t.final(m).values())),
                        "per_seed": t.final(m),
                        "vs_baseline": t.paired(m) if m != BASELINE else None,
                        "share": stats.headroom_share(t.mean(m), t.mean("dpo"), t.mean("oracle-iterative")),
                        "collapsed_seeds": sorted(t.collapsed(m)),
                        "failed_seeds": sorted(t.failed.get(m, {})),
                    }
                    for m in t.rows
                },
                "failed_rows": {m: sorted(f) for m, f in t.failed.items() if m not in t.rows},
            }
        )
    atomic_write(
        os.path.join(out, "summary_table.md"), lambda p: open(p, "w").write("\n".join(summary_table(tables, methods)))
    )
    power = power_lines(tables, methods)
    if power:
        lines += [
            "## Power",
            "",
            "How wide each comparison's 95 % interval is, and how many seeds would make it ±3 points at the spread "
            f"measured here (seeds {_seed_span(seeds)}: a count or a list fixed before the run, never picked by "
            "their results).",
            "",
        ] + power
    lines += outcome_lines(outs)
    made = plots(tables, methods, out)
    lines += [f"![{m}]({m})" for m in made] + [""]
    if notes:
        lines += [notes, ""]
    md = "\n".join(lines)
    atomic_write(os.path.join(out, "report.md"), lambda p: open(p, "w").write(md))
    write_json(os.path.join(out, "summary.json"), summary)
    return md
