"""Self-annotation: sample n responses per prompt from the current policy,
score each once by the implicit reward r(y) = Σ log π_t(y|x) − Σ log π_init(y|x)
(summed over response tokens, end-of-sequence included), keep the best as
chosen and the worst as rejected.

Ties: responses are ranked by reward, then by index (the lower index wins),
and counted; a prompt whose responses all tie (including identical samples)
gives no pair and is counted as dropped.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def _ids(tok, prompt) -> List[int]:
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


def generate_vllm(model_path: str, tok, prompts: Sequence, n: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int = 0) -> List[List[List[int]]]:
    """The same as `generate`, through vLLM (GPU machines; not exercised by the CPU test suite)."""
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


def generate(model, tok, prompts: Sequence, n: int, temperature: float, top_p: float, max_new_tokens: int,
             batch_size: int = 16, seed: int = 0, progress: bool = True) -> List[List[List[int]]]:
    """n sampled responses (token ids, end-of-sequence included when produced) per prompt,
    with transformers' batched generate."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.eval()
    pad = tok.pad_token_id
    out: List[List[List[int]]] = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        batch = [_ids(tok, p) for p in prompts[s : s + batch_size]]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        attn = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids, attention_mask=attn, do_sample=True, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
        gen = gen[:, width:].tolist()
        for i in range(len(batch)):
            resp = []
            for seq in gen[i * n : (i + 1) * n]:
                if tok.eos_token_id in seq:
                    seq = seq[: seq.index(tok.eos_token_id) + 1]
                resp.append([t for t in seq if t != pad])
            out.append(resp)
    return out


def sequence_logps(model, tok, prompts: Sequence, responses: Sequence[List[int]], batch_size: int = 32) -> torch.Tensor:
    """Σ log π(y|x) over response tokens for each (prompt, response ids)."""
    model.eval()
    pad = tok.pad_token_id
    res = []
    for s in range(0, len(prompts), batch_size):
        seqs, masks = [], []
        for p, r in zip(prompts[s : s + batch_size], responses[s : s + batch_size]):
            pi = _ids(tok, p)
            seqs.append(pi + list(r))
            masks.append([0] * len(pi) + [1] * len(r))
        width = max(map(len, seqs))
        ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs])
        attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
        mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        res.append((lp * mask[:, 1:]).sum(-1))
    return torch.cat(res) if res else torch.zeros(0)


def pick_pairs(rewards: Sequence[Sequence[float]]) -> Tuple[List[Tuple[int, int]], Dict[str, int]]:
    """(best, worst) response index per prompt; ties broken by index and counted.
    Returns the pairs (None where every reward ties) and the counts."""
    pairs, stats = [], {"tied_best": 0, "tied_worst": 0, "dropped_all_tied": 0}
    for r in rewards:
        hi, lo = max(r), min(r)
        if hi == lo:
            pairs.append(None)
            stats["dropped_all_tied"] += 1
            continue
        best = r.index(hi)  # first index among equals
        worst = len(r) - 1 - r[::-1].index(lo)  # ... so the worst is the last among equals
        stats["tied_best"] += sum(1 for v in r if v == hi) > 1
        stats["tied_worst"] += sum(1 for v in r if v == lo) > 1
        pairs.append((best, worst))
    return pairs, stats


def annotate(policy, init, tok, prompts: Sequence, n: int, temperature: float, top_p: float, max_new_tokens: int,
             batch_size: int = 16, seed: int = 0, progress: bool = True, backend: str = "transformers",
             policy_path: str = ""):
    """Returns (rows, stats): rows with prompt, chosen, rejected (chat messages
    when the prompt is one, else strings), chosen_reward, rejected_reward, margin."""
    if use_vllm(backend):
        resp = generate_vllm(policy_path, tok, prompts, n, temperature, top_p, max_new_tokens, seed)
    else:
        resp = generate(policy, tok, prompts, n, temperature, top_p, max_new_tokens, batch_size, seed, progress)
    flat_p = [p for p, rs in zip(prompts, resp) for _ in rs]
    flat_r = [r for rs in resp for r in rs]
    reward = (sequence_logps(policy, tok, flat_p, flat_r) - sequence_logps(init, tok, flat_p, flat_r)).tolist()
    per_prompt = [reward[i * n : (i + 1) * n] for i in range(len(prompts))]
    pairs, stats = pick_pairs(per_prompt)
    rows = []
    for p, rs, rw, pair in zip(prompts, resp, per_prompt, pairs):
        if pair is None:
            continue
        b, w = pair
        text = lambda ids: tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True).strip()  # noqa: E731
        wrap = (lambda t: [{"role": "assistant", "content": t}]) if not isinstance(p, str) else (lambda t: t)
        rows.append({
            "prompt": p, "chosen": wrap(text(rs[b])), "rejected": wrap(text(rs[w])),
            "chosen_reward": rw[b], "rejected_reward": rw[w], "margin": rw[b] - rw[w],
        })
    stats.update(prompts=len(prompts), pairs=len(rows))
    return rows, stats
