"""Held-out evaluation of a stage's model (the `eval` step): the reward accuracy
on labelled pairs the run never trains on (DIR/data/heldout.jsonl)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from ssapo import models


def heldout_accuracy(
    cfg, model_path: str, init_path: str, rows: List[dict], procs=None, work_dir: Optional[str] = None
) -> Dict[str, float]:
    """Reward accuracy on held-out labelled pairs: the fraction whose implicit
    reward log π/π_init ranks the labelled chosen above the rejected (ties
    count as wrong, and are counted). Shared out over `procs` (exchanging
    through `work_dir`); the same result on every process."""
    if not rows:
        return {}
    import numpy as np

    device = models.device_of(cfg, procs)
    model, tok = models.load(model_path, cfg, device)
    init_model, _ = models.load(init_path, cfg, device)
    bs = max(8, cfg.generation_batch_size)
    d = work_dir or os.path.dirname(model_path)
    m = np.asarray(models.shared_margins(model, init_model, tok, rows, bs, procs, d, "heldout", cfg.max_length))
    del model, init_model
    models.free()
    return {
        "heldout_reward_accuracy": float((m > 0).mean()),
        "heldout_ties": int((m == 0).sum()),
        "heldout_pairs": len(rows),
        "heldout_margin_mean": float(m.mean()),
    }
