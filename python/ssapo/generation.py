"""Sampling n responses per prompt from a policy, as token ids (the stop token included when one was
produced), for self-annotation (`ssapo.annotate`) and the benchmark's answers: transformers' batched
`generate`, or one vLLM engine (`generate_vllm`; `use_vllm` says which a backend means).

Both stop on every end-of-sequence id of the model's generation config (Llama-3 Instruct: <|eot_id|>
too), not on `tok.eos_token_id` alone. With transformers, prompts are taken in chunks of `batch_size`
and chunk c is sampled under its own seed, derived from (seed, c) (`chunk_seed`): the samples do not
depend on how the chunks are shared between processes, so a multi-process run annotates exactly what
one process would. With vLLM, one engine per call over every visible GPU (tensor parallel over
`tensor_parallel_for` of them), each prompt i sampled under its own seed derived from (seed, i)
(`prompt_seed`); the engine is shut down and its GPU memory released before it returns (`release_vllm`).

    from ssapo.generation import generate
    ids = generate(model, tok, prompts, n=4, temperature=0.7, top_p=1.0, max_new_tokens=300, seed=0)
"""

from __future__ import annotations

import gc
import os
from typing import List, Optional, Sequence

import torch

from ssapo import chat
from ssapo.processes import chunks_of


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


def generation_config(path: str):
    """The checkpoint's `GenerationConfig` at `path` (its end-of-sequence ids), or None when it has none."""
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
        stop_ids = chat.stop_token_ids(None, tok, generation_config(model_path))
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


def generate_chunk(
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
        out += generate_chunk(
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
