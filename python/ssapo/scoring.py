"""Scoring responses (docs/METHOD.md §4.2): Σ log π(y|x) of each (prompt, response) (`sequence_logps`;
also the implicit-reward margins of labelled pairs, `ssapo.models.pair_margins`), and the implicit reward
that self-annotation ranks by (`implicit_reward`)

    r(y) = Σ_tok log π_t(y|x) − Σ_tok log π_ref(y|x)

made length-aware by `length_aware` (RunConfig `annotation_reward`, `annotation_length_penalty`).
`score` hands a scorer each distinct (prompt, response) exactly once.

`sequence_logps` runs without gradients on the model's device (for annotation `scoring_device(cfg)`: this
process's GPU when there is one), each sequence truncated to `max_length` as trl's DPOTrainer truncates it
(prompt + response, keep the start: `tokenize_for_scoring`), and the log-softmax taken only at the
response tokens, `chunk_tokens` positions at a time (`selective_log_softmax`: label logit minus
logsumexp in float32): memory is bounded whatever the vocabulary, and no (batch, T, vocab) float32
tensor is ever formed.

    from ssapo.scoring import implicit_reward, sequence_logps
    lp = sequence_logps(model, tok, prompts, responses, max_length=1024)   # CPU float64, one per pair
    scorer = implicit_reward(policy, reference, tok, max_length=1024)      # scorer(prompts, responses)
"""

from __future__ import annotations

import os
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ssapo import chat

# scorer(prompts, responses) -> one reward per response (flattened: prompts[i] is responses[i]'s prompt)
Scorer = Callable[[Sequence, Sequence[List[int]]], Sequence[float]]


def scoring_device(cfg=None) -> torch.device:
    """Where the scoring models run: this process's GPU (`LOCAL_RANK`) when
    there is one and `cfg.use_cpu` is not set, else the CPU."""
    if (cfg is not None and getattr(cfg, "use_cpu", False)) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))


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
