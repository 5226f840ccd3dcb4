"""Per-round Markdown summary and PNG plots in the round directory."""

from __future__ import annotations

import os
from typing import Any, Dict, List

from ssapo.io import atomic_write


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return f"[{len(v)} values]"
    return str(v)


def round_report(rd: str, t: int, metrics: Dict[str, Any], rows: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lines = [f"# Round {t}", ""]
    for section, vals in metrics.items():
        lines += [f"## {section}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in vals.items() if k not in ("loss_history", "grad_norms")]
        lines.append("")
    fol = os.path.join(rd, "follower.npz")
    if os.path.exists(fol):
        z = np.load(fol)
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].hist(z["xi"], bins=40, alpha=0.6, label="ξ (data)")
        ax[0].hist(z["loc"].ravel(), bins=40, weights=z["mass"].ravel(), alpha=0.6, label="worst case")
        ax[0].set_title("follower: ξ before / after")
        ax[0].legend()
        ax[1].plot(z["lam"], label="λ*")
        ax[1].plot(z["budget_used"], label="budget used")
        ax[1].set_title("per group")
        ax[1].legend()
        _save(fig, os.path.join(rd, "follower.png"))
        lines += ["![follower](follower.png)", ""]
    hist = metrics.get("leader", {}).get("loss_history") or []
    if hist:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot(hist)
        ax.set_title("leader loss")
        ax.set_xlabel("logged step")
        _save(fig, os.path.join(rd, "loss.png"))
        lines += ["![loss](loss.png)", ""]
    margins = [r["margin"] for r in rows]
    if margins:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.hist(margins, bins=40)
        ax.set_title("self-annotation margins")
        _save(fig, os.path.join(rd, "margins.png"))
        lines += ["![margins](margins.png)", ""]
    atomic_write(os.path.join(rd, "summary.md"), lambda tmp: open(tmp, "w").write("\n".join(lines)))


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png"))
    plt.close(fig)
