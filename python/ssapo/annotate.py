"""Self-annotation (docs/METHOD.md §4.2; the released pairing defect: §5.6): sample n
responses per prompt from the current policy π_t, score each response once by
the implicit reward

    r(y) = Σ_tok log π_t(y|x) − Σ_tok log π_ref(y|x)      (π_ref = π_init by default)

summed over the response tokens (the stop token included when it was
generated; no β, no length normalisation, as the released code), and keep the
best response as chosen and the worst as rejected.

Length-aware ranking (`ssapo.scoring.length_aware`; RunConfig `annotation_reward`,
`annotation_length_penalty`, shared by every self-annotating method): with
|y| the response's scored tokens, rank by r(y) ('sum', the default: the
above) or r(y)/|y| ('mean': length-normalised), minus α·|y| (SPA's length
penalty, its appendix; α = 0 by default). The defaults are the released
code's ranking, bit for bit. A given `scorer` (another judge) is ranked as it
returns its rewards.

    from ssapo.annotate import annotate
    ds, stats = annotate(policy, init_model, tok, prompts, cfg)   # cfg: a RunConfig
    ds, stats = annotate(policy, init_model, tok, prompts, n=4, temperature=0.7, max_new_tokens=300)

Ties: the responses of a prompt are ranked by reward, then by index: on equal
rewards the lower index is chosen and the higher index is rejected (what the
released code's stable descending sort does). Prompts where the best or the
worst reward is shared are counted (`tied_best`, `tied_worst`). A prompt whose
responses all have the same reward (identical samples included: every distinct
(prompt, response) is scored exactly once, so identical samples tie exactly)
gives no pair and is counted in `dropped_all_tied`.

Prompts (`ssapo.chat`): chat messages go through the tokenizer's chat template
with the generation prompt, after the empty system turn where
`RunConfig.system_turn` asks for it (the released code's rule for
zephyr-style models); the rows returned carry the prompt as it was rendered,
so the trainer sees the same tokens.

Generation (`ssapo.generation`): transformers' batched `generate` by chunks of
`batch_size` prompts, chunk c sampled under its own seed (the samples do not
depend on how the chunks are shared between processes, `rank` and `world`), or
one vLLM engine on one process, shut down before scoring.

Scoring (`ssapo.scoring`): the implicit reward above, without gradients, on
`scoring_device(cfg)` (the GPU when there is one: `annotate_rows` moves the
models there itself, after vLLM's engine is gone), each sequence cut to
`max_length` as trl's DPOTrainer cuts it.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ssapo import chat, generation, scoring
from ssapo.processes import chunks_of


def _place(model, device) -> None:
    """Moves `model` to `device` (in place) unless it is there already or was
    dispatched by a device map (quantised or sharded models stay put)."""
    if model is None or device is None or getattr(model, "hf_device_map", None):
        return
    p = next(model.parameters(), None)
    if p is not None and p.device != torch.device(device):
        model.to(device)


def pick_pairs(rewards: Sequence[Sequence[float]]) -> Tuple[List[Optional[Tuple[int, int]]], Dict[str, int]]:
    """(best, worst) response index per prompt: the best is the lowest index
    among the maximal rewards, the worst the highest index among the minimal
    ones; None where every reward ties. Returns the pairs and the counts
    {"tied_best", "tied_worst", "dropped_all_tied"}."""
    pairs: List[Optional[Tuple[int, int]]] = []
    stats = {"tied_best": 0, "tied_worst": 0, "dropped_all_tied": 0}
    for r in rewards:
        r = list(r)
        hi, lo = max(r), min(r)
        if hi == lo:
            pairs.append(None)
            stats["dropped_all_tied"] += 1
            continue
        best = r.index(hi)
        worst = len(r) - 1 - r[::-1].index(lo)
        stats["tied_best"] += sum(1 for v in r if v == hi) > 1
        stats["tied_worst"] += sum(1 for v in r if v == lo) > 1
        pairs.append((best, worst))
    return pairs, stats


def _text(tok, ids: Sequence[int], stop: Sequence[int] = ()) -> str:
    drop = set(stop) | {tok.eos_token_id}
    return tok.decode([t for t in ids if t not in drop], skip_special_tokens=True).strip()


def _settings(cfg, **kw) -> dict:
    """Annotation settings: keyword arguments win over `cfg`'s fields, which win over RunConfig's
    defaults (declared there only); each keyword argument (and a cfg that is not a RunConfig, whose fields
    were checked when it was made) checked against its field's choices and bounds."""
    from ssapo.config import RunConfig, check_value, default_of

    names = {
        "n": "num_samples",
        "temperature": "temperature",
        "top_p": "top_p",
        "max_new_tokens": "max_new_tokens",
        "batch_size": "generation_batch_size",
        "backend": "generation_backend",
        "seed": "seed",
        "max_length": "max_length",
        "system_turn": "system_turn",
        "reward": "annotation_reward",
        "length_penalty": "annotation_length_penalty",
        "score_stop": "annotation_score_stop",
    }
    out = {}
    for k, field in names.items():
        v = kw.get(k)
        if v is None:
            v = getattr(cfg, field, None) if cfg is not None else None
        out[k] = default_of(field) if v is None else v
        if kw.get(k) is not None or not isinstance(cfg, RunConfig):  # a RunConfig's values were checked once
            check_value(field, out[k])
    return out


def _vllm_responses(policy_path: str, tok, prompts: Sequence, s: dict, stop_ids, progress: bool):
    """`generate_vllm` over the rendered `prompts` with the annotation settings `s`, and what it cost:
    the free GPU memory before the engine and after its release (`torch.cuda.mem_get_info`: the device
    check wants at least 95 % back), its seconds."""
    out: Dict[str, Any] = {}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        out["gpu_free_before_engine_bytes"], out["gpu_total_bytes"] = torch.cuda.mem_get_info()
    t0 = time.time()
    responses = generation.generate_vllm(
        policy_path,
        tok,
        prompts,
        s["n"],
        s["temperature"],
        s["top_p"],
        s["max_new_tokens"],
        s["seed"],
        stop_ids=stop_ids,
        max_length=s["max_length"],
        progress=progress,
    )
    out["generate_seconds"] = time.time() - t0
    if torch.cuda.is_available():
        out["gpu_free_after_release_bytes"] = torch.cuda.mem_get_info()[0]
    return responses, out


def vllm_pregenerate(policy_path: str, tok, prompts: Sequence, cfg=None, *, seed: Optional[int] = None, progress=True):
    """The vLLM half of `annotate_rows` on its own (the driver's first launch of a vLLM annotation step, one
    process with the GPUs to itself): the responses (token ids per prompt, exactly what `annotate_rows`'
    vLLM path would sample: the same rendering, stop ids and per-prompt seeds) and the engine's stats
    (`generate_seconds`, free GPU memory before and after). `annotate_rows(..., responses=...)` then scores
    them, shared out over every process of the next launch."""
    s = _settings(cfg, seed=seed)
    name = (getattr(cfg, "tokenizer", None) or getattr(cfg, "model", None)) if cfg is not None else None
    rendered = [chat.with_system_turn(p, chat.wants_system_turn(tok, s["system_turn"], name)) for p in prompts]
    stop_ids = chat.stop_token_ids(None, tok, generation.generation_config(policy_path))
    responses, st = _vllm_responses(policy_path, tok, rendered, s, stop_ids, progress)
    return responses, {**st, "backend": "vllm"}


def annotate_rows(
    policy,
    init_model,
    tok,
    prompts: Sequence,
    cfg=None,
    *,
    n: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    max_new_tokens: Optional[int] = None,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    backend: Optional[str] = None,
    policy_path: str = "",
    progress: bool = True,
    scorer: Optional[scoring.Scorer] = None,
    responses: Optional[Sequence[Sequence[List[int]]]] = None,
    rank: int = 0,
    world: int = 1,
    max_length: Optional[int] = None,
    system_turn: Optional[str] = None,
    device=None,
    chunk_tokens: Optional[int] = 1024,
    reward: Optional[str] = None,
    length_penalty: Optional[float] = None,
    score_stop: Optional[bool] = None,
) -> Tuple[List[dict], Dict[str, float]]:
    """`annotate` as a list of rows, each with `index` (the prompt's position in
    `prompts`), for process `rank` of `world` (its chunks only; merge the
    processes' rows by `index`). `responses` (token ids per prompt) skips
    generation; `scorer(prompts, responses) -> rewards` replaces the implicit
    reward (tests, other judges).

    The models run on `device` (default `scoring.scoring_device(cfg)`: this process's
    GPU when there is one); they are moved there in place. With vLLM they are
    first moved to the CPU, so that the engine has the GPUs to itself, and
    come to `device` once the engine is shut down: load them anywhere. Each row's `prompt` is the prompt as rendered: with the empty
    system turn when `system_turn` (default `cfg.system_turn`, else 'auto')
    asks for it. Scored sequences are cut to `max_length` (default
    `cfg.max_length`) as in training; `overlong_prompts` counts prompts that
    alone fill it (no response token left to score: every response ties). The implicit reward
    is ranked length-aware by `reward` and `length_penalty` (default `cfg.annotation_reward`,
    `cfg.annotation_length_penalty`; see `scoring.length_aware`); the rows' rewards and margin are those values."""
    s = _settings(
        cfg,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        backend=backend,
        seed=seed,
        max_length=max_length,
        system_turn=system_turn,
        reward=reward,
        length_penalty=length_penalty,
        score_stop=score_stop,
    )
    bs = max(1, int(s["batch_size"]))
    mode = s["system_turn"]
    name = (getattr(cfg, "tokenizer", None) or getattr(cfg, "model", None)) if cfg is not None else None
    prompts = [chat.with_system_turn(p, chat.wants_system_turn(tok, mode, name)) for p in prompts]
    stop_ids = chat.stop_token_ids(policy, tok)
    stop = set(stop_ids)
    scorer = scorer or scoring.implicit_reward(
        policy,
        init_model,
        tok,
        batch_size=max(bs, 8),
        max_length=s["max_length"],
        chunk_tokens=chunk_tokens,
        reward=s["reward"],
        length_penalty=float(s["length_penalty"]),
        unscored=() if s["score_stop"] else stop,
    )
    vllm = responses is None and generation.use_vllm(s["backend"])
    engine_stats: Dict[str, Any] = {}
    t0 = time.time()
    if vllm:  # one engine on this process over every prompt (run it on the main process only)
        if world != 1:
            raise ValueError("generation_backend: vLLM annotates on one process; call with world=1")
        if not policy_path:
            raise ValueError("policy_path: vLLM loads the policy from its checkpoint directory; give policy_path")
        for m in (policy, init_model):  # the engine gets the GPUs to itself; the scorers come back after it
            _place(m, torch.device("cpu"))
        responses, engine_stats = _vllm_responses(policy_path, tok, prompts, s, stop_ids, progress)
    target = torch.device(device) if device is not None else scoring.scoring_device(cfg)
    _place(policy, target)
    _place(init_model, target)
    mine = chunks_of(len(prompts), bs, rank, world)
    gen_s = score_s = 0.0
    rows: List[dict] = []
    stats: Dict[str, float] = {
        "prompts": 0,
        "pairs": 0,
        "tied_best": 0,
        "tied_worst": 0,
        "dropped_all_tied": 0,
        "responses": 0,
        "distinct_responses": 0,
        "truncated_responses": 0,
        "response_tokens": 0,
        "chosen_tokens": 0,
        "rejected_tokens": 0,
        "overlong_prompts": 0,
        "empty_chosen": 0,
    }
    from tqdm.auto import tqdm

    if policy is not None:
        policy.eval()
    for c in tqdm(mine, desc=f"annotate (rank {rank})" if world > 1 else "annotate", disable=not progress):
        lo, hi = c * bs, min((c + 1) * bs, len(prompts))
        ps = list(prompts[lo:hi])
        t1 = time.time()
        if responses is not None:
            resp = [list(map(list, rs)) for rs in responses[lo:hi]]
        else:
            resp = generation.generate_chunk(
                policy,
                tok,
                ps,
                s["n"],
                s["temperature"],
                s["top_p"],
                s["max_new_tokens"],
                generation.chunk_seed(s["seed"], c),
                stop_ids,
            )
        t2 = time.time()
        rewards = scoring.score(ps, resp, scorer)
        score_s += time.time() - t2
        gen_s += t2 - t1
        pairs, st = pick_pairs(rewards)
        for k, v in st.items():
            stats[k] += v
        stats["prompts"] += len(ps)
        if s["max_length"] is not None:
            stats["overlong_prompts"] += sum(1 for p in ps if len(chat.prompt_ids(tok, p)) >= int(s["max_length"]))
        for i, (p, rs, rw, pair) in enumerate(zip(ps, resp, rewards, pairs)):
            stats["responses"] += len(rs)
            stats["distinct_responses"] += len({tuple(r) for r in rs})
            stats["truncated_responses"] += sum(1 for r in rs if not r or r[-1] not in stop)
            stats["response_tokens"] += sum(len(r) for r in rs)
            if pair is None:
                continue
            b, w = pair
            stats["chosen_tokens"] += len(rs[b])
            stats["rejected_tokens"] += len(rs[w])
            # an empty best answer (nothing before the stop token): `empty_chosen`, said by the loop
            stats["empty_chosen"] += not any(tok_id not in stop for tok_id in rs[b])
            wrap = (lambda t: t) if isinstance(p, str) else (lambda t: [{"role": "assistant", "content": t}])
            rows.append(
                {
                    "index": lo + i,
                    "prompt": p,
                    "chosen": wrap(_text(tok, rs[b], stop_ids)),
                    "rejected": wrap(_text(tok, rs[w], stop_ids)),
                    "chosen_reward": rw[b],
                    "rejected_reward": rw[w],
                    "margin": rw[b] - rw[w],
                    "chosen_index": b,
                    "rejected_index": w,
                }
            )
    stats["pairs"] = len(rows)
    stats["generate_seconds"] = gen_s if not vllm else time.time() - t0 - score_s
    stats["score_seconds"] = score_s
    stats.update({k: v for k, v in engine_stats.items() if k != "generate_seconds"})
    stats["backend"] = "vllm" if vllm else ("given" if responses is not None and not vllm else "transformers")
    return rows, stats


def finish_stats(stats: Dict[str, float], rows: Sequence[dict]) -> Dict[str, float]:
    """Derived fractions and the margin summary (after merging processes)."""
    out = dict(stats)
    n_resp = max(out.get("responses", 0), 1)
    out["tie_fraction"] = (out.get("tied_best", 0) + out.get("tied_worst", 0)) / max(out.get("prompts", 0), 1)
    out["dropped_fraction"] = out.get("dropped_all_tied", 0) / max(out.get("prompts", 0), 1)
    out["truncated_fraction"] = out.get("truncated_responses", 0) / n_resp
    out["mean_response_tokens"] = out.get("response_tokens", 0) / n_resp
    # the lengths the pairs teach: a length exploit shows as chosen answers shorter round after round
    out["mean_chosen_tokens"] = out.get("chosen_tokens", 0) / max(len(rows), 1)
    out["mean_rejected_tokens"] = out.get("rejected_tokens", 0) / max(len(rows), 1)
    m = [r["margin"] for r in rows]
    if m:
        import numpy as np

        out.update(
            margin_mean=float(np.mean(m)),
            margin_min=float(np.min(m)),
            margin_max=float(np.max(m)),
            margin_median=float(np.median(m)),
        )
    return out


def to_dataset(rows: Sequence[dict]):
    """The rows as a `datasets.Dataset` (columns prompt, chosen, rejected,
    chosen_reward, rejected_reward, margin, ...)."""
    from datasets import Dataset

    if not rows:
        cols = ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"]
        return Dataset.from_dict({c: [] for c in cols})
    return Dataset.from_list([{k: v for k, v in r.items() if k != "index"} for r in rows])


def annotate(policy, init_model, tok, prompts: Sequence, cfg=None, **kw):
    """Self-annotates `prompts` with `policy` (rewards against `init_model`).
    Settings come from `cfg` (a RunConfig: num_samples, temperature, top_p,
    max_new_tokens, generation_batch_size, generation_backend, seed,
    max_length, system_turn, use_cpu, annotation_reward,
    annotation_length_penalty; a field left out takes RunConfig's default) and/or
    keywords (n, temperature, top_p, max_new_tokens, batch_size, backend, seed,
    max_length, system_turn, reward, length_penalty, device, policy_path for
    vLLM, scorer, responses, progress; see `annotate_rows`).

    Returns (dataset, stats): a `datasets.Dataset` with prompt, chosen,
    rejected (chat messages when the prompt is one, else strings),
    chosen_reward, rejected_reward, margin = chosen_reward − rejected_reward
    (> 0), chosen_index, rejected_index; and the counts (prompts, pairs,
    tied_best, tied_worst, dropped_all_tied, responses, distinct_responses,
    truncated_responses, ...) with timings."""
    rows, stats = annotate_rows(policy, init_model, tok, prompts, cfg, **kw)
    return to_dataset(rows), finish_stats(stats, rows)
