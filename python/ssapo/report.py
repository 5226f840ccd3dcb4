"""Per-round Markdown summary and PNG plots (matplotlib, Agg backend), written
atomically into the round directory:

- summary.md: every metric of metrics.json (annotation, follower, sera, leader,
  eval, timings) as tables, and the plots below;
- margins.png: the self-annotation margins (chosen_reward − rejected_reward);
- follower.png: the follower's samples ξ before (the data) and after (the
  worst-case distribution, atoms weighted by mass), in the follower's space;
- groups.png: λ* and the budget used per follower group (against ε);
- loss.png: the leader's loss at every optimizer step (and gradient norms);
- heldout.png: held-out reward accuracy of π_0, π_1, …, π_t.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from ssapo.io import atomic_write

SKIP = ("loss_history", "grad_norms", "lam", "budget_used", "group_sizes", "resolves")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]"
    if isinstance(v, dict):
        return "{…}"
    return str(v)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    plt = _plt()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png"))
    plt.close(fig)


def round_report(
    rd: str,
    t: int,
    metrics: Dict[str, Any],
    rows: List[dict],
    heldout: Optional[Sequence[Optional[float]]] = None,
    plots: bool = True,
) -> List[str]:
    """Writes summary.md and the plots of round `t` into `rd`; returns the
    names of the files written. `heldout`: held-out reward accuracy of π_0..π_t.
    `plots` false (RunConfig.report_plots): summary.md only, its tables the same
    (drawing and saving the PNGs is most of a round report's time)."""
    lines = [f"# Round {t}", ""]
    for section, vals in metrics.items():
        if not isinstance(vals, dict):
            lines += [f"- {section}: {_fmt(vals)}", ""]
            continue
        lines += [f"## {section}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in vals.items() if k not in SKIP]
        lines.append("")
    if heldout and any(a is not None for a in heldout):
        lines += ["## held-out reward accuracy", "", "| model | accuracy |", "|---|---|"]
        lines += [f"| {'π_0 (seed)' if i == 0 else f'π_{i}'} | {_fmt(a)} |" for i, a in enumerate(heldout)]
        lines.append("")
    written = _plots(rd, metrics, rows, heldout) if plots else []
    lines += [f"![{name[:-4]}]({name})" for name in written] + [""]
    atomic_write(os.path.join(rd, "summary.md"), lambda tmp: open(tmp, "w").write("\n".join(lines)))
    return ["summary.md"] + written


def _plots(rd: str, metrics: Dict[str, Any], rows: List[dict], heldout) -> List[str]:
    """The round's PNG plots (margins, the follower's moves and groups, the leader's loss, held-out accuracy),
    those it has data for; returns their names."""
    import numpy as np

    plt = _plt()
    written: List[str] = []
    margins = [r["margin"] for r in rows if "margin" in r]
    if margins:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.hist(margins, bins=40)
        ax.set_title("self-annotation margins")
        ax.set_xlabel("chosen_reward − rejected_reward")
        _save(fig, os.path.join(rd, "margins.png"))
        written.append("margins.png")

    fol = os.path.join(rd, "follower.npz")
    if os.path.exists(fol):
        with np.load(fol) as z:
            xi, loc, mass, lam, budget = z["xi"], z["loc"], z["mass"], z["lam"], z["budget_used"]
            eps = float(z["eps"])
        space = metrics.get("follower", {}).get("space", "prob")
        label = "ξ = σ(β_f·margin)" if space == "prob" else "ξ = β_f·margin"
        fig, ax = plt.subplots(figsize=(5, 3.2))
        bins = np.linspace(min(xi.min(), loc.min()), max(xi.max(), loc.max()), 41) if len(xi) else 40
        ax.hist(xi, bins=bins, alpha=0.6, label="data (before)")
        ax.hist(loc.ravel(), bins=bins, weights=mass.ravel(), alpha=0.6, label="worst case (after)")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_title(f"follower, ε = {eps:g}")
        ax.legend()
        _save(fig, os.path.join(rd, "follower.png"))
        written.append("follower.png")

        fig, ax = plt.subplots(1, 2, figsize=(9, 3))
        g = np.arange(len(lam))
        ax[0].bar(g, lam)
        ax[0].set_title("λ* per group")
        ax[0].set_xlabel("group")
        ax[1].bar(g, budget, label="budget used")
        ax[1].axhline(eps, color="k", lw=1, ls="--", label="ε")
        ax[1].set_title("transport per group")
        ax[1].set_xlabel("group")
        ax[1].legend()
        _save(fig, os.path.join(rd, "groups.png"))
        written.append("groups.png")

    leader = metrics.get("leader", {})
    hist = leader.get("loss_history") or []
    if hist:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3))
        ax[0].plot(range(1, len(hist) + 1), hist)
        ax[0].set_title(f"leader loss ({leader.get('loss', '')})")
        ax[0].set_xlabel("optimizer step")
        norms = leader.get("grad_norms") or []
        ax[1].plot(range(1, len(norms) + 1), norms)
        ax[1].set_yscale("log")
        ax[1].set_title("gradient norm (before clipping)")
        ax[1].set_xlabel("optimizer step")
        _save(fig, os.path.join(rd, "loss.png"))
        written.append("loss.png")

    if heldout and any(a is not None for a in heldout):
        fig, ax = plt.subplots(figsize=(4.5, 3))
        xs = [i for i, a in enumerate(heldout) if a is not None]
        ax.plot(xs, [heldout[i] for i in xs], marker="o")
        ax.set_xticks(range(len(heldout)))
        ax.set_xticklabels(["seed"] + [f"r{i}" for i in range(1, len(heldout))])
        ax.set_ylim(0, 1)
        ax.set_title("held-out reward accuracy")
        _save(fig, os.path.join(rd, "heldout.png"))
        written.append("heldout.png")
    return written
