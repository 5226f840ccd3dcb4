"""sera: SeRA (Ko et al., ICLR 2025; docs/METHOD.md §5.4, our choices marked
there): after self-annotation, the `sera` step selects the pairs with the
largest implicit-reward margins and bootstraps new ones; the leader trains
plain DPO on DIR/round_<t>/sera.jsonl."""

from __future__ import annotations

import os
from typing import List, Optional

from ssapo.methods import Method, Step


def sera_round(
    cfg,
    rows: List[dict],
    policy_path: str,
    before_path: Optional[str],
    init_path: str,
    seed: int,
    device=None,
    procs=None,
    work_dir: Optional[str] = None,
):
    """SeRA's round (SeRA's Algorithm 1 is unpublished, so each unknown is a named option):
    1. pool: this round's self-annotated pairs (`sera_pool` = 'round'), or the
       seed pairs and every round's annotated pairs so far ('cumulative');
    2. implicit-reward margin (IRM) of every pooled pair, log π_{t−1}/π_init of
       chosen minus that of rejected, recomputed for the whole pool;
       `sera_gamma_role` = 'ensemble' (default): m̃ = (1−γ)·m_{π_{t−1}} +
       γ·m_{π_{t−2}} (the model before it; before round 2 that is π_init,
       whose margin is 0) [choice];
    3. keep the top `sera_keep` fraction, largest m̃ first (ties: earlier pair first);
    4. preference bootstrapping: `sera_num_samples` responses per kept prompt
       from π_{t−1} (the policy the round starts from) at `temperature` and top-p
       `sera_top_p`, best vs worst by implicit reward against π_init, not
       IRM-filtered again [choice]; γ role 'mix': the bootstrapped pairs are a γ
       share of the training set; 'threshold': a bootstrapped pair is kept only
       if β·margin > γ;
    5. the caller trains DPO (reference π_{t−1}) on kept ∪ bootstrapped.
    The margin passes and the bootstrap are shared out by chunks over `procs`
    (exchanging through `work_dir`; vLLM bootstraps on the main process alone).
    Returns (training rows, stats), the same on every process."""
    import random

    from ssapo import annotate, generation, models
    from ssapo.processes import exchange, merge_counts

    d = work_dir or os.path.dirname(os.path.abspath(policy_path))
    if device is None and procs is not None:
        device = models.device_of(cfg, procs)
    policy, tok = models.load(policy_path, cfg, device)
    init_model, _ = models.load(init_path, cfg, device)
    bs = max(8, cfg.generation_batch_size)

    shared = (tok, rows, bs, procs, d)
    m = models.shared_margins(policy, init_model, *shared, "sera_margins", cfg.max_length) if rows else []
    if cfg.sera_gamma_role == "ensemble" and before_path is not None and cfg.sera_gamma > 0:
        before, _ = models.load(before_path, cfg, device)
        mb = models.shared_margins(before, init_model, *shared, "sera_before", cfg.max_length)
        del before
        m = [(1 - cfg.sera_gamma) * a + cfg.sera_gamma * b for a, b in zip(m, mb)]
    elif cfg.sera_gamma_role == "ensemble" and cfg.sera_gamma > 0:
        m = [(1 - cfg.sera_gamma) * a for a in m]
    order = sorted(range(len(rows)), key=lambda i: (-m[i], i))
    kept = [{**rows[i], "irm": m[i]} for i in order[: max(1, round(cfg.sera_keep * len(rows)))]]
    world, rank = (procs.num_processes, procs.process_index) if procs is not None else (1, 0)
    if generation.use_vllm(cfg.generation_backend):
        world = 1
    boot, bstats = [], {}
    if rank < world:
        boot, bstats = annotate.annotate_rows(
            policy,
            init_model,
            tok,
            [r["prompt"] for r in kept],
            cfg,
            n=cfg.sera_num_samples,
            top_p=cfg.sera_top_p,
            seed=seed,
            policy_path=policy_path,
            progress=False,
            rank=rank,
            world=world,
        )
    if procs is not None and procs.num_processes > 1:
        parts = exchange(procs, d, "sera_boot", {"rows": boot, "stats": bstats})
        boot = [r for part in parts for r in part["rows"]]
        bstats = merge_counts([part["stats"] for part in parts])
    boot.sort(key=lambda r: r["index"])
    bstats = annotate.finish_stats(bstats, boot)
    if cfg.sera_gamma_role == "threshold":
        boot = [b for b in boot if cfg.beta * b["margin"] > cfg.sera_gamma]
    if cfg.sera_gamma_role == "mix" and cfg.sera_gamma > 0:
        n_boot = min(len(boot), round(cfg.sera_gamma / (1 - cfg.sera_gamma) * len(kept)))
        boot = random.Random(seed).sample(boot, n_boot)
    del policy, init_model
    models.free()
    keys = ("prompt", "chosen", "rejected", "margin")
    sel = [{k: r[k] for k in keys if k in r} for r in kept] + [{k: b[k] for k in keys} for b in boot]
    return sel, {
        "pairs_in": len(rows),
        "kept": len(kept),
        "bootstrapped": len(boot),
        "kept_irm_min": float(min(r["irm"] for r in kept)) if kept else 0.0,
        **{f"bootstrap_{k}": v for k, v in bstats.items() if not isinstance(v, str)},
    }


def sera_step(run, state, t: int):
    """Round t's selection and bootstrap → DIR/round_<t>/sera.jsonl."""
    from ssapo.io import write_jsonl

    cfg, rd = run.cfg, run.dir(t)
    rows = run.annotations(t)
    if cfg.sera_pool == "cumulative":
        rows = [dict(r) for r in run.seed_rows] + [r for s in range(1, t) for r in run.annotations(s)] + rows
    before = run.model(t - 2) if t > 1 else None
    sel, stats = sera_round(
        cfg, rows, run.model(t - 1), before, run.init, seed=cfg.seed + 100 + t, procs=state.procs, work_dir=rd
    )
    if not state.main:
        return None
    write_jsonl(os.path.join(rd, "sera.jsonl"), sel)
    return {"sera": stats}


def sera_rows(run, t: int) -> List[dict]:
    from ssapo.io import read_jsonl

    return read_jsonl(os.path.join(run.dir(t), "sera.jsonl"))


METHOD = Method(
    name="sera",
    help="SeRA: the largest implicit-reward margins kept, pairs bootstrapped, plain DPO",
    extra_steps=(Step("sera", sera_step, kind="data", generates=True),),
    train_rows=sera_rows,
)
