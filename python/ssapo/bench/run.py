"""`ssapo bench`: methods × seeds × label-noise levels on the gold-reward task,
resumable, with a Markdown report and plots.

Every (flip rate, seed) builds one task (its SFT model and data, shared by all
methods); every method runs the same loop (`ssapo.loop.run`) into its own
directory, so a finished run is skipped when the benchmark is resumed.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import numpy as np

# name -> RunConfig overrides. The controls: ssapo-eps0 must equal iterative-dpo;
# iterative-dpo-lr/10 is the damping baseline (a smaller round learning rate).
METHODS: Dict[str, dict] = {
    "dpo": {"method": "dpo"},
    "iterative-dpo": {"method": "iterative-dpo"},
    "iterative-dpo-lr/10": {"method": "iterative-dpo", "learning_rate_scale": 0.1},
    "spa": {"method": "spa"},
    "sera": {"method": "sera"},
    "ssapo": {"method": "ssapo"},
    "ssapo-eps0": {"method": "ssapo", "eps": 0.0},
    "ssapo-eps0.1": {"method": "ssapo", "eps": 0.1},
    "ssapo-margin": {"method": "ssapo", "leader_loss": "shift_margin", "follower_space": "margin"},
    "ssapo-weights": {"method": "ssapo", "leader_loss": "weights"},
    "ssapo-global": {"method": "ssapo", "group_size": 0},
    "ssapo-k5": {"method": "ssapo", "k": 5},
    "ssapo-k7": {"method": "ssapo", "k": 7},
    "ssapo-ref-init": {"method": "ssapo", "round_reference": "init"},
}
QUICK_METHODS = ["dpo", "iterative-dpo", "iterative-dpo-lr/10", "ssapo", "ssapo-eps0"]

QUICK = {
    "task_size": "test",
    "seed_size": 32,
    "round_sizes": [32, 64],
    "num_rounds": 2,
    "batch_size": 8,
    "per_device_train_batch_size": 8,
    "max_new_tokens": 6,
}
FULL = {"task_size": "tiny", "max_new_tokens": 6}


def _config(name: str, base: dict, out: str, task_dir: str, seed: int, flip_rate: float = 0.0):
    from ssapo.bench.task import prepare_task
    from ssapo.config import load_config

    ov = dict(METHODS[name])
    scale = ov.pop("learning_rate_scale", None)
    base = dict(base)
    task = prepare_task(task_dir, seed=seed, size=base.pop("task_size"), flip_rate=flip_rate)
    paths = {"model": task["sft_model"], "preference_data": task["preferences"], "prompt_data": task["prompts"]}
    cfg = load_config("tiny", overrides={**base, **ov, **paths, "output_dir": out, "seed": seed})
    if scale is not None:
        cfg.learning_rate *= scale
    return cfg


def _round_models(out: str, method: str) -> List[str]:
    models = [os.path.join(out, "seed", "model")]
    t = 1
    while method != "dpo" and os.path.exists(os.path.join(out, f"round_{t}", "model")):
        models.append(os.path.join(out, f"round_{t}", "model"))
        t += 1
    return models


def evaluate_run(out: str, method: str, task: dict, n: int, seed: int) -> dict:
    """Win rates of the seed and every round's model against the SFT policy (cached in eval.json)."""
    from ssapo.bench import metrics
    from ssapo.bench.task import load_spec
    from ssapo.io import read_jsonl, write_json
    from ssapo.tiny import load

    path = os.path.join(out, "eval.json")
    if os.path.exists(path):
        return json.load(open(path))
    spec = load_spec(task["task"])
    prompts = [r["prompt"][0]["content"] for r in read_jsonl(task["test_prompts"])]
    sft_cache = os.path.join(os.path.dirname(task["task"]), f"sft_answers_{n}.json")
    sft, tok = load(task["sft_model"])
    if os.path.exists(sft_cache):
        sft_answers = json.load(open(sft_cache))
    else:
        from ssapo.bench.task import messages

        sft_answers = metrics.sample_answers(sft, tok, [messages(p) for p in prompts], n, 8, seed=seed + 7)
        write_json(sft_cache, sft_answers)
    res = {"rounds": []}
    for m in _round_models(out, method):
        model, _ = load(m)
        res["rounds"].append(metrics.evaluate(model, sft_answers, tok, spec, prompts, n, 8, seed=seed + 11))
    # per-round annotation and leader diagnostics, and the follower's view of mislabelled pairs
    diag = []
    t = 1
    while os.path.exists(os.path.join(out, f"round_{t}", "metrics.json")):
        mt = json.load(open(os.path.join(out, f"round_{t}", "metrics.json")))
        d = {
            "annotation_accuracy": mt.get("annotation", {}).get("gold_accuracy"),
            "gold_tie_fraction": mt.get("annotation", {}).get("gold_tie_fraction"),
            "max_grad_norm": mt.get("leader", {}).get("max_grad_norm"),
            "clamped_fraction": mt.get("leader", {}).get("clamped_fraction"),
            "param_displacement": mt.get("leader", {}).get("param_displacement"),
        }
        fol = os.path.join(out, f"round_{t}", "follower.npz")
        if os.path.exists(fol):
            z = np.load(fol)
            d.update(lam_mean=float(np.mean(z["lam"])), budget_used_mean=float(np.mean(z["budget_used"])))
            rows = read_jsonl(os.path.join(out, f"round_{t}", "annotations.jsonl"))
            d.update(metrics.mislabelled_movement(spec, rows, z["mass"], z["loc"], z["xi"]))
        diag.append(d)
        t += 1
    res["diagnostics"] = diag
    write_json(path, res)
    return res


def _ms(v: List[float]) -> str:
    v = [x for x in v if x is not None and not (isinstance(x, float) and np.isnan(x))]
    if not v:
        return "–"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def report(
    results: dict, methods: List[str], flips: List[float], seeds: List[int], out: str, cmd: str, seconds: float
) -> str:
    """Writes report.md and the plots; returns the Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssapo.io import atomic_write

    lines = [
        "# ssapo bench: the gold-reward task",
        "",
        f"Command: `{cmd}` — {len(seeds)} seeds × {len(flips)} flip rates × {len(methods)} methods, "
        f"{seconds / 60:.1f} min on this machine.",
        "",
        "Win rate: gold-reward win rate of the final policy's samples against the SFT policy's on held-out prompts "
        "(ties half); LC: the same at equal length (logistic fit on the length difference). "
        "Mean ± standard deviation over seeds.",
        "",
    ]
    for f in flips:
        lines += [
            f"## Label flips {f:.0%}",
            "",
            "| method | win rate | LC win rate | gold reward | annotation acc. (round 1 / last) | max grad norm | clamped | moved: mislabelled / correct |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in methods:
            runs = [results[f][s][m] for s in seeds if m in results[f].get(s, {})]
            if not runs:
                continue
            last = [r["rounds"][-1] for r in runs]
            dg = [r["diagnostics"] for r in runs if r["diagnostics"]]
            lines.append(
                f"| {m} | {_ms([x['win_rate'] for x in last])} | {_ms([x['lc_win_rate'] for x in last])} "
                f"| {_ms([x['gold_reward'] for x in last])} "
                f"| {_ms([d[0]['annotation_accuracy'] for d in dg])} / {_ms([d[-1]['annotation_accuracy'] for d in dg])} "
                f"| {_ms([max(x['max_grad_norm'] or 0 for x in d) for d in dg])} "
                f"| {_ms([np.mean([x['clamped_fraction'] or 0 for x in d]) for d in dg])} "
                f"| {_ms([np.nanmean([x.get('moved_mislabelled', np.nan) for x in d]) for d in dg if 'moved_mislabelled' in d[0]])}"
                f" / {_ms([np.nanmean([x.get('moved_correct', np.nan) for x in d]) for d in dg if 'moved_correct' in d[0]])} |"
            )
        lines.append("")
        # validity of the task, by its own criteria (never by SSAPO's result)
        acc = [
            results[f][s]["iterative-dpo"]["diagnostics"][0]["annotation_accuracy"]
            for s in seeds
            if "iterative-dpo" in results[f].get(s, {})
        ]
        base = [results[f][s]["dpo"]["rounds"][-1]["win_rate"] for s in seeds if "dpo" in results[f].get(s, {})]
        tuned = []
        for s in seeds:
            c = [
                results[f][s][m]["rounds"][-1]["win_rate"]
                for m in ("iterative-dpo", "iterative-dpo-lr/10")
                if m in results[f].get(s, {})
            ]
            if c:
                tuned.append(max(c))
        if acc and base and tuned:
            ok1 = np.mean(acc) >= 0.75
            ok2 = np.mean(tuned) > np.mean(base)
            lines += [
                f"Task validity: seed-model self-annotation accuracy {np.mean(acc):.3f} (needs ≥ 0.75: "
                f"{'holds' if ok1 else 'does NOT hold'}); tuned iterative DPO {np.mean(tuned):.3f} vs seed-only DPO "
                f"{np.mean(base):.3f} (must beat it: {'holds' if ok2 else 'does NOT hold'}).",
                "",
            ]
        eq = [
            results[f][s]["ssapo-eps0"]["rounds"][-1]["win_rate"]
            == results[f][s]["iterative-dpo"]["rounds"][-1]["win_rate"]
            for s in seeds
            if {"ssapo-eps0", "iterative-dpo"} <= set(results[f].get(s, {}))
        ]
        if eq:
            lines += [f"Control: SSAPO at ε = 0 equals iterative DPO in {sum(eq)} of {len(eq)} seeds.", ""]
    # plots: win rate per round per method; clean vs noisy
    fig, axes = plt.subplots(1, len(flips), figsize=(5 * len(flips), 3.5), squeeze=False)
    for ax, f in zip(axes[0], flips):
        for m in methods:
            curves = [[x["win_rate"] for x in results[f][s][m]["rounds"]] for s in seeds if m in results[f].get(s, {})]
            if curves:
                L = min(map(len, curves))
                ax.plot(range(L), np.mean([c[:L] for c in curves], 0), marker="o", label=m)
        ax.set_title(f"flips {f:.0%}")
        ax.set_xlabel("round (0 = seed)")
        ax.set_ylabel("gold win rate vs SFT")
    axes[0][-1].legend(fontsize=7)
    atomic_write(
        os.path.join(out, "win_rate_per_round.png"), lambda t: fig.savefig(t, dpi=90, bbox_inches="tight", format="png")
    )
    plt.close(fig)
    if len(flips) > 1:
        fig, ax = plt.subplots(figsize=(max(5, len(methods)), 3.5))
        wdt = 0.8 / len(flips)
        for i, f in enumerate(flips):
            vals = [
                np.mean(
                    [results[f][s][m]["rounds"][-1]["win_rate"] for s in seeds if m in results[f].get(s, {})]
                    or [np.nan]
                )
                for m in methods
            ]
            ax.bar(np.arange(len(methods)) + i * wdt, vals, wdt, label=f"flips {f:.0%}")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - wdt / 2, methods, rotation=30, ha="right", fontsize=7)
        ax.legend()
        atomic_write(
            os.path.join(out, "clean_vs_noisy.png"), lambda t: fig.savefig(t, dpi=90, bbox_inches="tight", format="png")
        )
        plt.close(fig)
    lines += ["![win rate per round](win_rate_per_round.png)", ""]
    if len(flips) > 1:
        lines += ["![clean vs noisy](clean_vs_noisy.png)", ""]
    md = "\n".join(lines)
    atomic_write(os.path.join(out, "report.md"), lambda t: open(t, "w").write(md))
    return md


def bench(
    out: str,
    methods: List[str],
    seeds: List[int],
    flips: List[float],
    quick: bool,
    n_eval: int = 4,
    cmd: str = "ssapo bench",
) -> str:
    from tqdm.auto import tqdm

    from ssapo.bench.task import prepare_task
    from ssapo.loop import run

    base = QUICK if quick else FULL
    t0 = time.time()
    results: dict = {}
    jobs = [(f, s, m) for f in flips for s in seeds for m in methods]
    for f, s, m in tqdm(jobs, desc="bench"):
        task_dir = os.path.join(out, f"flip{f:g}", f"seed{s}", "task")
        task = prepare_task(task_dir, seed=s, size=base["task_size"], flip_rate=f)
        run_dir = os.path.join(out, f"flip{f:g}", f"seed{s}", m.replace("/", "_"))
        run(_config(m, base, run_dir, task_dir, s, f), resume=True)
        results.setdefault(f, {}).setdefault(s, {})[m] = evaluate_run(run_dir, METHODS[m]["method"], task, n_eval, s)
    return report(results, methods, flips, seeds, out, cmd, time.time() - t0)
