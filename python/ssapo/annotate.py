"""Self-annotation (docs/METHOD.md §4.2; the released pairing defect: §5.6): sample n
responses per prompt from the current policy π_t, score each response once by
the implicit reward

    r(y) = Σ_tok log π_t(y|x) − Σ_tok log π_ref(y|x)      (π_ref = π_init by default)

summed over the response tokens (the stop token included when it was
generated; no β, no length normalisation, as the released code), and keep the
best response as chosen and the worst as rejected.

Length-aware ranking (`length_aware`; RunConfig `annotation_reward`,
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

Generation: vLLM when it is installed and a GPU is present (`backend="auto"`),
else transformers' batched `generate`. Both stop on every end-of-sequence id
of the model's generation config (Llama-3 Instruct: <|eot_id|> too), not on
`tok.eos_token_id` alone. With transformers, prompts are taken in chunks of
`batch_size` and chunk c is sampled under its own seed, derived from (seed, c):
the samples do not depend on how the chunks are shared between processes
(`rank`, `world`), so a multi-process run annotates exactly what one process
would. With vLLM, one engine per call over every visible GPU (tensor
parallel), each prompt i sampled under its own seed derived from (seed, i);
the engine is shut down and its GPU memory released before scoring.

Scoring (`sequence_logps`, also the loop's held-out margins): without
gradients, on `scoring_device(cfg)` (the GPU when there is one: `annotate_rows`
moves the models there itself, after vLLM's engine is gone), each sequence
truncated to `max_length` as trl's DPOTrainer truncates it (prompt +
response, keep the start), and the log-softmax taken only at the response
tokens, `chunk_tokens` positions at a time (a selective log-softmax: label
logit minus logsumexp in float32): memory is bounded whatever the vocabulary,
and no (batch, T, vocab) float32 tensor is ever formed.
"""

from __future__ import annotations

import gc
import os
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ssapo import chat
from ssapo.processes import chunks_of

Scorer = Callable[[Sequence, Sequence[List[int]]], Sequence[float]]


def _ids(tok, prompt) -> List[int]:
    """Token ids of a prompt as trl tokenises it (`ssapo.chat.prompt_ids`)."""
    return chat.prompt_ids(tok, prompt)


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


def scoring_device(cfg=None) -> torch.device:
    """Where the scoring models run: this process's GPU (`LOCAL_RANK`) when
    there is one and `cfg.use_cpu` is not set, else the CPU."""
    if (cfg is not None and getattr(cfg, "use_cpu", False)) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))


def _place(model, device) -> None:
    """Moves `model` to `device` (in place) unless it is there already or was
    dispatched by a device map (quantised or sharded models stay put)."""
    if model is None or device is None or getattr(model, "hf_device_map", None):
        return
    p = next(model.parameters(), None)
    if p is not None and p.device != torch.device(device):
        model.to(device)


def _seed(seed: int, *keys: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, keys)]).generate_state(1)[0])


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of prompt chunk `chunk` (independent of the process count)."""
    return _seed(seed, chunk)


def prompt_seed(seed: int, index: int) -> int:
    """vLLM's sampling seed of prompt `index` (each prompt its own, from (seed, index))."""
    return _seed(seed, 0x70726F6D, index)  # a key of its own: not a chunk seed


# -- vLLM --


def _generation_config(path: str):
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def tensor_parallel_for(config, gpus: int) -> int:
    """vLLM's tensor-parallel size for a model of `config` (a transformers config, or a checkpoint directory,
    whose config.json is read) on `gpus` GPUs: the largest number not above `gpus` that divides both the
    attention heads and the key-value heads (vLLM refuses a size that does not divide the heads: Llama-3-8B's
    32 heads and 8 KV heads on 3, 5, 6 or 7 GPUs), at least 1. A config that names no heads: `gpus`."""
    if gpus < 1:
        raise ValueError(f"gpus: must be >= 1, got {gpus}")
    if isinstance(config, (str, os.PathLike)):
        import json

        try:
            with open(os.path.join(config, "config.json")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data = data.get("text_config") or data
        heads, kv = data.get("num_attention_heads"), data.get("num_key_value_heads")
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads, kv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if not heads:
        return int(gpus)
    heads, kv = int(heads), int(kv or heads)
    return max(d for d in range(1, int(gpus) + 1) if heads % d == 0 and kv % d == 0)


def release_vllm(llm, had_process_group: bool) -> None:
    """Shuts down a vLLM engine and frees what vLLM documents to free: the
    engine core (a separate process in vLLM's V1 engine), the model-parallel
    groups, the distributed environment it created (never a process group that
    existed before the engine: that one belongs to accelerate), then
    `gc.collect()` and `torch.cuda.empty_cache()`. Drop your own references to
    `llm` too."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if callable(getattr(core, "shutdown", None)):
        try:
            core.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the engine may be half-built
            pass
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if not had_process_group:
            destroy_distributed_environment()
    except Exception:  # noqa: BLE001 - module layout differs between vLLM versions
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate_vllm(
    model_path: str,
    tok,
    prompts: Sequence,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int = 0,
    *,
    stop_ids: Optional[Sequence[int]] = None,
    max_length: Optional[int] = None,
    indices: Optional[Sequence[int]] = None,
    tensor_parallel_size: Optional[int] = None,
    dtype: str = "bfloat16",
    gpu_memory_utilization: float = 0.9,
    return_logprobs: bool = False,
    progress: bool = True,
):
    """The same as `generate`, through vLLM (GPU machines; not exercised by the
    CPU test suite). One engine over the visible GPUs (tensor parallel over the most that divide the
    model's attention and key-value heads, `tensor_parallel_for`; the driver makes only the run's GPUs visible), on
    the calling process only, shut down before returning (`release_vllm`).
    Prompt `indices[i]` (default i) is sampled under `prompt_seed(seed, indices[i])`;
    generation stops on `stop_ids` (default: the model's generation config's
    end-of-sequence ids, then the tokenizer's); `max_length` caps prompt +
    response (vLLM's `max_model_len`); a prompt that alone reaches it gets
    empty responses (the trainer would drop it). With `return_logprobs`, also
    the Σ log π of each response that vLLM reports, per prompt."""
    from vllm import LLM, SamplingParams

    if stop_ids is None:
        stop_ids = chat.stop_token_ids(None, tok, _generation_config(model_path))
    stop_ids = [int(t) for t in stop_ids]
    stop = set(stop_ids)
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"indices: {len(indices)} indices for {len(prompts)} prompts")
    ids = [_ids(tok, p) for p in prompts]
    send = [i for i, q in enumerate(ids) if max_length is None or len(q) < int(max_length)]
    import torch.distributed as dist

    had_pg = dist.is_available() and dist.is_initialized()
    kw = {"max_model_len": int(max_length)} if max_length is not None else {}
    llm = LLM(
        model=model_path,
        seed=int(seed),
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size or tensor_parallel_for(model_path, max(1, torch.cuda.device_count())),
        **kw,
    )
    try:
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=prompt_seed(seed, indices[i]),
                stop_token_ids=stop_ids,
                detokenize=False,
                logprobs=0 if return_logprobs else None,
            )
            for i in send
        ]
        outs = llm.generate([{"prompt_token_ids": ids[i]} for i in send], params, use_tqdm=progress) if send else []
    finally:
        release_vllm(llm, had_pg)
        del llm
        gc.collect()
    res: List[List[List[int]]] = [[[] for _ in range(n)] for _ in prompts]
    lps: List[List[float]] = [[0.0] * n for _ in prompts]
    for i, o in zip(send, outs):
        seqs, cum = [], []
        for c in sorted(o.outputs, key=lambda c: c.index):
            t = list(c.token_ids)
            if c.finish_reason == "stop" and (not t or t[-1] not in stop):  # stopped on a token vLLM left out
                t.append(int(c.stop_reason) if isinstance(c.stop_reason, int) else stop_ids[0])
            seqs.append(t)
            cum.append(float(c.cumulative_logprob) if c.cumulative_logprob is not None else float("nan"))
        res[i], lps[i] = seqs, cum
    return (res, lps) if return_logprobs else res


# -- transformers generate --


def _generate_chunk(
    model,
    tok,
    prompts: Sequence,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    stop_ids: Optional[Sequence[int]] = None,
) -> List[List[List[int]]]:
    stop_ids = list(stop_ids) if stop_ids is not None else chat.stop_token_ids(model, tok)
    stop = set(stop_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    batch = [_ids(tok, p) for p in prompts]
    width = max(map(len, batch))
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
    attn = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        gen = model.generate(
            input_ids=input_ids,
            attention_mask=attn,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=pad,
            eos_token_id=stop_ids,  # the model's whole stop list, not tok.eos_token_id alone
        )
    gen = gen[:, width:].tolist()
    out = []
    for i in range(len(batch)):
        resp = []
        for seq in gen[i * n : (i + 1) * n]:
            end = next((j for j, t in enumerate(seq) if t in stop), None)
            if end is not None:
                seq = seq[: end + 1]
            elif pad not in stop:
                seq = [t for t in seq if t != pad]
            resp.append(seq)
        out.append(resp)
    return out


def generate(
    model,
    tok,
    prompts: Sequence,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> List[List[List[int]]]:
    """n sampled responses per prompt as token ids (the stop token included
    when one was produced), with transformers' batched generate; chunk c of
    `batch_size` prompts is sampled under `chunk_seed(seed, c)`."""
    from tqdm.auto import tqdm

    model.eval()
    stop_ids = chat.stop_token_ids(model, tok)
    out: List[List[List[int]]] = []
    for c in tqdm(chunks_of(len(prompts), batch_size), desc="generate", disable=not progress):
        out += _generate_chunk(
            model,
            tok,
            prompts[c * batch_size : (c + 1) * batch_size],
            n,
            temperature,
            top_p,
            max_new_tokens,
            chunk_seed(seed, c),
            stop_ids,
        )
    return out


# -- log-probabilities --


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """log_softmax(logits, -1) gathered at `index`, in float32: the label's
    logit minus the logsumexp of its row, `chunk_size` rows (positions of the
    flattened leading dimensions) at a time, so at most `chunk_size` × vocab
    float32 values exist at once (None: every row at once). `logits`
    (..., vocab), `index` (...) → (...)."""
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"index: shape {tuple(index.shape)} does not match logits {tuple(logits.shape)} "
            "without the vocabulary dimension"
        )
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size: must be >= 1 or None, got {chunk_size}")
    flat, idx = logits.reshape(-1, logits.shape[-1]), index.reshape(-1).long()
    n = flat.shape[0]
    step = n if chunk_size is None else int(chunk_size)
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    for s in range(0, n, max(step, 1)):
        lg = flat[s : s + step].float()
        out[s : s + step] = lg.gather(-1, idx[s : s + step, None]).squeeze(-1) - torch.logsumexp(lg, -1)
        del lg
    return out.reshape(index.shape)


_HEAD_SPLIT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _head_split(model):
    """(decoder, output head) when the model's logits are exactly
    head(decoder(x).last_hidden_state), checked once per model on a short probe
    (models that scale or cap their logits after the head fail it); else None
    and the full forward is used."""
    try:
        known = _HEAD_SPLIT.get(model)
    except TypeError:
        known = None
    dec = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if dec is None or head is None or dec is model or known is False:
        return None
    if known is None:
        device = next(model.parameters()).device
        vocab = int(getattr(head, "out_features", 0) or getattr(model.config, "vocab_size", 0) or 2)
        x = (torch.arange(5, device=device) * 7919 + 1) % vocab
        try:
            with torch.no_grad():
                full = model(input_ids=x[None], use_cache=False).logits.float()
                mine = head(_last_hidden(dec, x[None], None)).float()
            known = full.shape == mine.shape and bool(torch.allclose(full, mine, rtol=1e-3, atol=1e-3))
        except Exception:  # noqa: BLE001 - an unusual architecture: use the full forward
            known = False
        try:
            _HEAD_SPLIT[model] = known
        except TypeError:
            pass
        if not known:
            return None
    return dec, head


def _last_hidden(dec, ids, attn):
    out = dec(input_ids=ids, attention_mask=attn, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _sum_logps(model, seqs: Sequence[List[int]], n_scored: Sequence[int], pad: int, chunk_tokens: Optional[int]):
    """Σ log π of the last `n_scored[b]` tokens of each sequence (one forward)."""
    device = next(model.parameters()).device
    width = max(map(len, seqs))
    ids = torch.tensor([list(q) + [pad] * (width - len(q)) for q in seqs], device=device)
    attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=device)
    rows, cols = [], []
    for b, (q, c) in enumerate(zip(seqs, n_scored)):
        for t in range(max(len(q) - c, 1), len(q)):  # token t is predicted from position t − 1
            rows.append(b)
            cols.append(t)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    if not rows:
        return out
    r = torch.tensor(rows, device=device)
    t = torch.tensor(cols, device=device)
    target = ids[r, t]
    split = _head_split(model)
    with torch.no_grad():
        if split is not None:  # the head only at the scored positions, chunk by chunk
            dec, head = split
            h = _last_hidden(dec, ids, attn)[r, t - 1]
            step = h.shape[0] if chunk_tokens is None else int(chunk_tokens)
            lp = torch.cat(
                [
                    selective_log_softmax(head(h[s : s + step]), target[s : s + step])
                    for s in range(0, h.shape[0], max(step, 1))
                ]
            )
            del h
        else:
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
            lp = selective_log_softmax(logits[r, t - 1], target, chunk_tokens)
            del logits
    return out.index_add_(0, r.cpu(), lp.double().cpu())


def tokenize_for_scoring(tok, prompts: Sequence, responses: Sequence, max_length: Optional[int] = None):
    """(sequence ids, number of scored response tokens) per (prompt, response),
    as the trainer sees the pair (`ssapo.chat.completion_ids` then
    `ssapo.chat.truncate`: keep the start, at most `max_length` tokens)."""
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(prompts)} prompts")
    out = []
    for p, r in zip(prompts, responses):
        pi, ci = chat.completion_ids(tok, p, r)
        out.append(chat.truncate(pi, ci, max_length))
    return out


def sequence_logps(
    model,
    tok,
    prompts: Sequence,
    responses: Sequence,
    batch_size: int = 32,
    *,
    max_length: Optional[int] = None,
    chunk_tokens: Optional[int] = 1024,
    cfg=None,
) -> torch.Tensor:
    """Σ log π(y|x) over the response tokens of each (prompt, response), in
    float32 per token, without gradients, on the model's device; returns a
    CPU float64 tensor. A response is token ids (as generated) or a
    completion (a string, or assistant messages) tokenised as trl's
    DPOTrainer does. Each pair is cut to `max_length` (default
    `cfg.max_length` when `cfg` is given, else no limit) as in training; only
    the response tokens left are summed (none when the prompt alone fills
    `max_length`). The log-softmax is taken at the response positions only,
    `chunk_tokens` of them at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if max_length is None and cfg is not None:
        max_length = getattr(cfg, "max_length", None)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else chat.stop_token_ids(model, tok)[0]
    pairs = tokenize_for_scoring(tok, prompts, responses, max_length)
    res = [
        _sum_logps(
            model,
            [q for q, _ in pairs[s : s + batch_size]],
            [c for _, c in pairs[s : s + batch_size]],
            pad,
            chunk_tokens,
        )
        for s in range(0, len(pairs), batch_size)
    ]
    return torch.cat(res) if res else torch.zeros(0, dtype=torch.float64)


def length_aware(
    rewards: Sequence[float],
    lengths: Sequence[int],
    reward: Optional[str] = None,
    length_penalty: Optional[float] = None,
) -> List[float]:
    """The rewards self-annotation ranks by: `reward` "sum" = r as given, "mean" = r / |y| (0 for a
    response with no scored token), then − `length_penalty`·|y| (SPA's r − α·|y|); `lengths` = |y|,
    the scored response tokens. None: RunConfig's defaults ("sum", 0: the rewards unchanged)."""
    from ssapo.config import check_value, default_of

    reward = default_of("annotation_reward") if reward is None else reward
    length_penalty = default_of("annotation_length_penalty") if length_penalty is None else length_penalty
    check_value("annotation_reward", reward)
    check_value("annotation_length_penalty", length_penalty)
    if len(rewards) != len(lengths):
        raise ValueError(f"lengths: {len(lengths)} lengths for {len(rewards)} rewards")
    out = []
    for r, n in zip(rewards, lengths):
        r = float(r)
        if reward == "mean":
            r = r / n if n > 0 else 0.0
        out.append(r - length_penalty * n if length_penalty else r)
    return out


def implicit_reward(
    policy,
    reference,
    tok,
    batch_size: int = 32,
    max_length: Optional[int] = None,
    chunk_tokens: Optional[int] = 1024,
    reward: Optional[str] = None,
    length_penalty: Optional[float] = None,
    unscored: Sequence[int] = (),
) -> Scorer:
    """The scorer r(y) = Σ log π_policy(y|x) − Σ log π_reference(y|x), made length-aware by `reward`
    and `length_penalty` (`length_aware`, over the response tokens scored after the cut to `max_length`;
    None: RunConfig's defaults, the plain sum). A response's last token is left out of the sum (and of
    |y|) when it is one of `unscored` (the stop ids, with `annotation_score_stop: false`)."""
    from ssapo.config import default_of

    reward = default_of("annotation_reward") if reward is None else reward
    length_penalty = default_of("annotation_length_penalty") if length_penalty is None else length_penalty

    drop = set(int(t) for t in unscored)

    def score_fn(prompts, responses):
        if drop:  # token-id responses: score the response's own tokens, not the stop token that ends it
            responses = [r[:-1] if r and r[-1] in drop else r for r in responses]
        kw = dict(max_length=max_length, chunk_tokens=chunk_tokens)
        r = (
            sequence_logps(policy, tok, prompts, responses, batch_size, **kw)
            - sequence_logps(reference, tok, prompts, responses, batch_size, **kw)
        ).tolist()
        if reward == "sum" and not length_penalty:
            return r
        lengths = [n for _, n in tokenize_for_scoring(tok, prompts, responses, max_length)]
        return length_aware(r, lengths, reward, length_penalty)

    return score_fn


def score(prompts: Sequence, responses: Sequence[Sequence[List[int]]], scorer: Scorer) -> List[List[float]]:
    """Rewards of every prompt's responses, each distinct (prompt, response)
    scored exactly once (identical samples get the same reward bit for bit)."""
    flat_p, flat_r, where = [], [], []
    for _i, (p, rs) in enumerate(zip(prompts, responses)):
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


def _text(tok, ids: Sequence[int], stop: Sequence[int] = ()) -> str:
    drop = set(stop) | {tok.eos_token_id}
    return tok.decode([t for t in ids if t not in drop], skip_special_tokens=True).strip()


def _settings(cfg, **kw) -> dict:
    """Annotation settings: keyword arguments win over `cfg`'s fields, which win over RunConfig's
    defaults (declared there only); each checked against its field's choices and bounds."""
    from ssapo.config import check_value, default_of

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
    responses = generate_vllm(
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
    stop_ids = chat.stop_token_ids(None, tok, _generation_config(policy_path))
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
    scorer: Optional[Scorer] = None,
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

    The models run on `device` (default `scoring_device(cfg)`: this process's
    GPU when there is one); they are moved there in place. With vLLM they are
    first moved to the CPU, so that the engine has the GPUs to itself, and
    come to `device` once the engine is shut down: load them anywhere. Each row's `prompt` is the prompt as rendered: with the empty
    system turn when `system_turn` (default `cfg.system_turn`, else 'auto')
    asks for it. Scored sequences are cut to `max_length` (default
    `cfg.max_length`) as in training; `overlong_prompts` counts prompts that
    alone fill it (no response token left to score: every response ties). The implicit reward
    is ranked length-aware by `reward` and `length_penalty` (default `cfg.annotation_reward`,
    `cfg.annotation_length_penalty`; see `length_aware`); the rows' rewards and margin are those values."""
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
    scorer = scorer or implicit_reward(
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
    vllm = responses is None and use_vllm(s["backend"])
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
    target = torch.device(device) if device is not None else scoring_device(cfg)
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
            resp = _generate_chunk(
                policy,
                tok,
                ps,
                s["n"],
                s["temperature"],
                s["top_p"],
                s["max_new_tokens"],
                chunk_seed(s["seed"], c),
                stop_ids,
            )
        t2 = time.time()
        rewards = score(ps, resp, scorer)
        score_s += time.time() - t2
        gen_s += t2 - t1
        pairs, st = pick_pairs(rewards)
        for k, v in st.items():
            stats[k] += v
        stats["prompts"] += len(ps)
        if s["max_length"] is not None:
            stats["overlong_prompts"] += sum(1 for p in ps if len(_ids(tok, p)) >= int(s["max_length"]))
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
