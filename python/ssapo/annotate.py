"""Self-annotation (DESIGN.md §3a, REFERENCE.md §1a and §4.3): sample n
responses per prompt from the current policy π_t, score each response once by
the implicit reward

    r(y) = Σ_tok log π_t(y|x) − Σ_tok log π_ref(y|x)      (π_ref = π_init by default)

summed over the response tokens (end-of-sequence included when it was
generated; no β, no length normalisation, as the released code), and keep the
best response as chosen and the worst as rejected.

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

Generation: vLLM when it is installed and a GPU is present (`backend="auto"`),
else transformers' batched `generate`. With transformers, prompts are taken in
chunks of `batch_size` and chunk c is sampled under its own seed, derived from
(seed, c): the samples do not depend on how the chunks are shared between
processes (`rank`, `world`), so a multi-process run annotates exactly what one
process would. Scoring runs chunk by chunk too, without gradients.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Scorer = Callable[[Sequence, Sequence[List[int]]], Sequence[float]]


def _ids(tok, prompt) -> List[int]:
    """Token ids of a prompt: a plain string as it is, chat messages through the
    chat template with the generation prompt (as trl tokenizes them)."""
    if isinstance(prompt, str):
        return tok(prompt, add_special_tokens=False)["input_ids"]
    out = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def use_vllm(backend: str) -> bool:
    """vLLM for `backend="vllm"`, or for "auto" when it is installed and a GPU is present."""
    if backend == "transformers":
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        if backend == "vllm":
            raise ValueError("generation_backend: 'vllm' needs `pip install ssapo[vllm]` on a GPU machine") from None
        return False
    return backend == "vllm" or torch.cuda.is_available()


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of prompt chunk `chunk` (independent of the process count)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(chunk)]).generate_state(1)[0])


def generate_vllm(model_path: str, tok, prompts: Sequence, n: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int = 0) -> List[List[List[int]]]:
    """The same as `generate`, through vLLM (GPU machines; not exercised by the CPU test suite).
    One engine over every visible GPU (tensor parallel), on the calling process only."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed, dtype="bfloat16", tensor_parallel_size=max(1, torch.cuda.device_count()))
    params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                            stop_token_ids=[tok.eos_token_id])
    outs = llm.generate([{"prompt_token_ids": _ids(tok, p)} for p in prompts], params)
    res = []
    for o in outs:
        seqs = []
        for c in o.outputs:
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and (not ids or ids[-1] != tok.eos_token_id):
                ids.append(tok.eos_token_id)
            seqs.append(ids)
        res.append(seqs)
    del llm
    return res


def _generate_chunk(model, tok, prompts: Sequence, n: int, temperature: float, top_p: float, max_new_tokens: int,
                    seed: int) -> List[List[List[int]]]:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = [_ids(tok, p) for p in prompts]
    width = max(map(len, batch))
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
    attn = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        gen = model.generate(
            input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
    gen = gen[:, width:].tolist()
    out = []
    for i in range(len(batch)):
        resp = []
        for seq in gen[i * n: (i + 1) * n]:
            if tok.eos_token_id in seq:
                seq = seq[: seq.index(tok.eos_token_id) + 1]
            elif pad != tok.eos_token_id:
                seq = [t for t in seq if t != pad]
            resp.append(seq)
        out.append(resp)
    return out


def chunks_of(num_prompts: int, batch_size: int, rank: int = 0, world: int = 1) -> List[int]:
    """The chunk indices (chunks of `batch_size` prompts) that process `rank` of `world` takes."""
    return [c for c in range((num_prompts + batch_size - 1) // batch_size) if c % world == rank]


def generate(model, tok, prompts: Sequence, n: int, temperature: float, top_p: float, max_new_tokens: int,
             batch_size: int = 16, seed: int = 0, progress: bool = True) -> List[List[List[int]]]:
    """n sampled responses per prompt as token ids (end-of-sequence included
    when it was produced), with transformers' batched generate; chunk c of
    `batch_size` prompts is sampled under `chunk_seed(seed, c)`."""
    from tqdm.auto import tqdm

    model.eval()
    out: List[List[List[int]]] = []
    for c in tqdm(chunks_of(len(prompts), batch_size), desc="generate", disable=not progress):
        out += _generate_chunk(model, tok, prompts[c * batch_size: (c + 1) * batch_size], n, temperature, top_p,
                               max_new_tokens, chunk_seed(seed, c))
    return out


def sequence_logps(model, tok, prompts: Sequence, responses: Sequence[List[int]], batch_size: int = 32) -> torch.Tensor:
    """Σ log π(y|x) over the response tokens of each (prompt, response ids), in
    float32, without gradients; returns a CPU float64 tensor."""
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    res = []
    for s in range(0, len(prompts), batch_size):
        seqs, starts = [], []
        for p, r in zip(prompts[s: s + batch_size], responses[s: s + batch_size]):
            pi = _ids(tok, p)
            seqs.append(pi + list(r))
            starts.append(len(pi))
        width = max(map(len, seqs))
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs], device=device)
        attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=device)
        first = max(min(starts) - 1, 0)  # logits before the first response token are not needed
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, first:-1].float()
        target = ids[:, first + 1:]
        lp = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        pos = torch.arange(first + 1, width, device=device)
        mask = (pos[None, :] >= torch.tensor(starts, device=device)[:, None]) & attn[:, first + 1:].bool()
        res.append((lp * mask).sum(-1).double().cpu())
        del logits, lp
    return torch.cat(res) if res else torch.zeros(0, dtype=torch.float64)


def implicit_reward(policy, reference, tok, batch_size: int = 32) -> Scorer:
    """The scorer r(y) = Σ log π_policy(y|x) − Σ log π_reference(y|x)."""

    def score_fn(prompts, responses):
        return (sequence_logps(policy, tok, prompts, responses, batch_size)
                - sequence_logps(reference, tok, prompts, responses, batch_size)).tolist()

    return score_fn


def score(prompts: Sequence, responses: Sequence[Sequence[List[int]]], scorer: Scorer) -> List[List[float]]:
    """Rewards of every prompt's responses, each distinct (prompt, response)
    scored exactly once (identical samples get the same reward bit for bit)."""
    flat_p, flat_r, where = [], [], []
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        seen: Dict[Tuple[int, ...], int] = {}
        idx = []
        for r in rs:
            key = tuple(r)
            if key not in seen:
                seen[key] = len(flat_r)
                flat_p.append(p)
                flat_r.append(list(r))
            idx.append(seen[key])
        where.append(idx)
    vals = list(scorer(flat_p, flat_r)) if flat_r else []
    if len(vals) != len(flat_r):
        raise ValueError(f"scorer: returned {len(vals)} rewards for {len(flat_r)} responses")
    return [[float(vals[j]) for j in idx] for idx in where]


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


def _text(tok, ids: Sequence[int]) -> str:
    return tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True).strip()


def _settings(cfg, **kw) -> dict:
    """Generation settings: keyword arguments win over the RunConfig's fields."""
    names = {"n": "num_samples", "temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_new_tokens",
             "batch_size": "generation_batch_size", "backend": "generation_backend", "seed": "seed"}
    defaults = {"n": 2, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 300, "batch_size": 16,
                "backend": "transformers", "seed": 0}
    out = {}
    for k, field in names.items():
        v = kw.get(k)
        if v is None:
            v = getattr(cfg, field, None) if cfg is not None else None
        out[k] = defaults[k] if v is None else v
    if out["n"] < 2:
        raise ValueError(f"num_samples: needs at least 2 responses per prompt, got {out['n']}")
    return out


def annotate_rows(policy, init_model, tok, prompts: Sequence, cfg=None, *, n: Optional[int] = None,
                  temperature: Optional[float] = None, top_p: Optional[float] = None,
                  max_new_tokens: Optional[int] = None, batch_size: Optional[int] = None, seed: Optional[int] = None,
                  backend: Optional[str] = None, policy_path: str = "", progress: bool = True,
                  scorer: Optional[Scorer] = None, responses: Optional[Sequence[Sequence[List[int]]]] = None,
                  rank: int = 0, world: int = 1) -> Tuple[List[dict], Dict[str, float]]:
    """`annotate` as a list of rows, each with `index` (the prompt's position in
    `prompts`), for process `rank` of `world` (its chunks only; merge the
    processes' rows by `index`). `responses` (token ids per prompt) skips
    generation; `scorer(prompts, responses) -> rewards` replaces the implicit
    reward (tests, other judges)."""
    s = _settings(cfg, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, backend=backend, seed=seed)
    bs = max(1, int(s["batch_size"]))
    scorer = scorer or implicit_reward(policy, init_model, tok, batch_size=max(bs, 8))
    vllm = responses is None and use_vllm(s["backend"])
    t0 = time.time()
    if vllm:  # one engine on this process over every prompt (run it on the main process only)
        if world != 1:
            raise ValueError("generation_backend: vLLM annotates on one process; call with world=1")
        responses = generate_vllm(policy_path, tok, prompts, s["n"], s["temperature"], s["top_p"],
                                  s["max_new_tokens"], s["seed"])
    mine = chunks_of(len(prompts), bs, rank, world)
    gen_s = score_s = 0.0
    rows: List[dict] = []
    stats: Dict[str, float] = {"prompts": 0, "pairs": 0, "tied_best": 0, "tied_worst": 0, "dropped_all_tied": 0,
                               "responses": 0, "distinct_responses": 0, "truncated_responses": 0,
                               "response_tokens": 0}
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
            resp = _generate_chunk(policy, tok, ps, s["n"], s["temperature"], s["top_p"], s["max_new_tokens"],
                                   chunk_seed(s["seed"], c))
        t2 = time.time()
        rewards = score(ps, resp, scorer)
        score_s += time.time() - t2
        gen_s += t2 - t1
        pairs, st = pick_pairs(rewards)
        for k, v in st.items():
            stats[k] += v
        stats["prompts"] += len(ps)
        for i, (p, rs, rw, pair) in enumerate(zip(ps, resp, rewards, pairs)):
            stats["responses"] += len(rs)
            stats["distinct_responses"] += len({tuple(r) for r in rs})
            stats["truncated_responses"] += sum(1 for r in rs if not r or r[-1] != tok.eos_token_id)
            stats["response_tokens"] += sum(len(r) for r in rs)
            if pair is None:
                continue
            b, w = pair
            wrap = (lambda t: t) if isinstance(p, str) else (lambda t: [{"role": "assistant", "content": t}])
            rows.append({
                "index": lo + i, "prompt": p, "chosen": wrap(_text(tok, rs[b])), "rejected": wrap(_text(tok, rs[w])),
                "chosen_reward": rw[b], "rejected_reward": rw[w], "margin": rw[b] - rw[w],
                "chosen_index": b, "rejected_index": w,
            })
    stats["pairs"] = len(rows)
    stats["generate_seconds"] = gen_s if not vllm else time.time() - t0 - score_s
    stats["score_seconds"] = score_s
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
    m = [r["margin"] for r in rows]
    if m:
        import numpy as np

        out.update(margin_mean=float(np.mean(m)), margin_min=float(np.min(m)), margin_max=float(np.max(m)),
                   margin_median=float(np.median(m)))
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
    max_new_tokens, generation_batch_size, generation_backend, seed) and/or
    keywords (n, temperature, top_p, max_new_tokens, batch_size, backend, seed,
    policy_path for vLLM, scorer, responses, progress).

    Returns (dataset, stats): a `datasets.Dataset` with prompt, chosen,
    rejected (chat messages when the prompt is one, else strings),
    chosen_reward, rejected_reward, margin = chosen_reward − rejected_reward
    (> 0), chosen_index, rejected_index; and the counts (prompts, pairs,
    tied_best, tied_worst, dropped_all_tied, responses, distinct_responses,
    truncated_responses, ...) with timings."""
    rows, stats = annotate_rows(policy, init_model, tok, prompts, cfg, **kw)
    return to_dataset(rows), finish_stats(stats, rows)
