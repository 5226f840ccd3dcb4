"""Who labels a round's pairs, and the robustness knob applied after (docs/METHOD.md §4.2).

    from ssapo.annotators import load_annotator, text_scorer, flip_pairs
    fn = load_annotator(cfg)            # None for cfg.annotator == "implicit"
    rows = flip_pairs(rows, cfg.annotation_flip_rate, seed=(cfg.seed, t))

`annotator` (a RunConfig field, so it crosses the `python -m ssapo.launch`
process boundary in DIR/config.yaml):
- `implicit` (default): the implicit reward log π_{t−1} − log π_ref
  (`ssapo.scoring.implicit_reward`);
- `module:factory`: imported in the process that annotates; `factory(cfg.annotator_args)`
  (a string, e.g. a path, or None) is called once per step in each annotating
  process and returns `score(prompts, responses) -> rewards`: `prompts` a list
  of prompts as annotations.jsonl writes them (a string, or chat messages),
  `responses[i]` the distinct decoded response texts of prompts[i],
  `rewards[i]` one float per response. The scorer is called once per
  generation batch (`generation_batch_size` prompts). Best and worst are then
  picked, and ties handled, exactly as for implicit rewards
  (`ssapo.annotate.pick_pairs`).
"""

from __future__ import annotations

import importlib
import os
from typing import Callable, List, Optional, Sequence

TextScorer = Callable[[List, List[List[str]]], Sequence[Sequence[float]]]


def load_annotator(cfg) -> Optional[TextScorer]:
    """The scorer that cfg.annotator names (None: the implicit reward). ValueError naming `annotator`."""
    spec = cfg.annotator
    if spec == "implicit":
        return None
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"annotator: cannot import {mod_name!r} ({e}); is it on PYTHONPATH in every process?") from e
    for a in attr.split("."):
        if not hasattr(obj, a):
            raise ValueError(f"annotator: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, a)
    fn = obj(cfg.annotator_args)
    if not callable(fn):
        raise ValueError(f"annotator: {spec}({cfg.annotator_args!r}) returned {type(fn).__name__}, not a scorer")
    return fn


def text_scorer(fn: TextScorer, tok, stop_ids: Sequence[int] = ()):
    """`fn` (texts) as an `ssapo.scoring.score` scorer (token ids, flattened).

    `scoring.score` hands over each prompt's distinct responses consecutively,
    with the same prompt object: those are regrouped per prompt (by identity, so
    two equal prompts of different rows stay two prompts), decoded as the
    annotation rows decode them, and the rewards flattened back."""
    from ssapo.annotate import _text

    def score(flat_prompts, flat_responses):
        prompts: List = []
        groups: List[List[str]] = []
        for p, ids in zip(flat_prompts, flat_responses):
            if not prompts or prompts[-1] is not p:
                prompts.append(p)
                groups.append([])
            groups[-1].append(_text(tok, ids, stop_ids))
        rewards = list(fn(prompts, groups))
        if len(rewards) != len(groups) or any(len(r) != len(g) for r, g in zip(rewards, groups)):
            raise ValueError(
                f"annotator: returned {[len(r) for r in rewards]} rewards for responses {[len(g) for g in groups]} "
                "(one list per prompt, one float per response)"
            )
        return [float(v) for r in rewards for v in r]

    return score


def flip_pairs(rows: List[dict], rate: float, seed: Sequence[int]) -> List[dict]:
    """`rows` with exactly round(rate·n) pairs, drawn uniformly (numpy's
    default_rng(seed)), turned around: chosen ⇄ rejected with their rewards and
    response indices, margin negated. Every row gets `flipped` (bool)."""
    import numpy as np

    from ssapo.config import check_value

    check_value("annotation_flip_rate", rate)  # its bounds are RunConfig's field's
    n = len(rows)
    k = round(rate * n)
    picked = set(np.random.default_rng(list(seed)).choice(n, size=k, replace=False).tolist()) if k else set()
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if i in picked:
            for a, b in (
                ("chosen", "rejected"),
                ("chosen_reward", "rejected_reward"),
                ("chosen_index", "rejected_index"),
            ):
                if a in r or b in r:
                    r[a], r[b] = r.get(b), r.get(a)
            if "margin" in r:
                r["margin"] = -r["margin"]
        r["flipped"] = i in picked
        out.append(r)
    return out


RESPONSES = "responses.json"  # a round's vLLM responses, written by the driver's generation launch


def _responses_key(policy_path: str, prompts: List, seed: int) -> dict:
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True, default=str).encode()).hexdigest()
    return {"policy": os.path.abspath(policy_path), "seed": int(seed), "prompts_sha256": digest}


def pregenerate_round(cfg, rd: str, policy_path: str, prompts: List, seed: int) -> None:
    """The vLLM half of a round's annotation, alone in its process (the driver's first launch of a vLLM
    annotation step on several GPUs; `ssapo.annotate.vllm_pregenerate`): writes DIR/round_<t>/responses.json
    (atomically), which `annotate_round` then scores over every process of the next launch. Skipped when
    that file already holds this policy's, seed's and prompts' responses (a resumed step)."""
    from ssapo import annotate, models
    from ssapo.io import write_json

    key = _responses_key(policy_path, prompts, seed)
    if _read_responses(rd, key) is not None:
        return
    tok = models.tokenizer(cfg, policy_path)
    responses, stats = annotate.vllm_pregenerate(policy_path, tok, prompts, cfg, seed=seed)
    os.makedirs(rd, exist_ok=True)
    write_json(os.path.join(rd, RESPONSES), {**key, "responses": responses, "stats": stats})


def _read_responses(rd: str, key: dict) -> Optional[dict]:
    import json

    try:
        with open(os.path.join(rd, RESPONSES)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if all(data.get(k) == v for k, v in key.items()) else None


def annotate_round(cfg, procs, rd: str, policy_path: str, ref_path: str, prompts: List, seed: int):
    """Round annotation shared out over `procs` by prompt chunks: π at
    `policy_path` samples, the annotator (cfg.annotator; the implicit reward
    against `ref_path` by default) ranks. Under vLLM one process generates and
    scores, unless the driver's generation launch left this round's responses
    (`pregenerate_round`): then every process scores its chunks of them.
    Returns (rows in prompt order, merged stats) on the main process, None
    elsewhere; the shards are exchanged through files in `rd`."""
    import json
    import shutil

    from ssapo import annotate, chat, generation, models
    from ssapo.processes import merge_counts, write_ordered

    given = _read_responses(rd, _responses_key(policy_path, prompts, seed))
    vllm = given is None and generation.use_vllm(cfg.generation_backend)
    world, rank = (1 if vllm else procs.num_processes), procs.process_index
    rows: List[dict] = []
    stats: dict = {}
    if rank < world:
        device = None if vllm else models.device_of(cfg, procs)
        policy, tok = models.load(policy_path, cfg, device)
        ref, _ = models.load(ref_path, cfg, device)
        fn = load_annotator(cfg)
        scorer = text_scorer(fn, tok, chat.stop_token_ids(policy, tok)) if fn is not None else None
        rows, stats = annotate.annotate_rows(
            policy,
            ref,
            tok,
            prompts,
            cfg,
            seed=seed,
            policy_path=policy_path,
            rank=rank,
            world=world,
            scorer=scorer,
            responses=given["responses"] if given else None,
        )
        del policy, ref
        models.free()
    if world == 1:
        return (rows, {**stats, **(given["stats"] if given else {})}) if procs.is_main_process else None
    shard_dir = os.path.join(rd, "annotate_shards")
    write_ordered(os.path.join(shard_dir, f"rank_{rank}.json"), {"rows": rows, "stats": stats})
    procs.wait_for_everyone()
    if not procs.is_main_process:
        return None
    parts = []
    for r in range(world):
        with open(os.path.join(shard_dir, f"rank_{r}.json")) as f:
            parts.append(json.load(f))
    shutil.rmtree(shard_dir, ignore_errors=True)
    rows = sorted((row for p in parts for row in p["rows"]), key=lambda row: row["index"])
    stats = merge_counts([p["stats"] for p in parts])
    return rows, {**stats, **(given["stats"] if given else {})}  # the generation launch's seconds and backend
