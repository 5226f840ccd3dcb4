"""Models as the loop's steps use them: loading a checkpoint, where it goes, and
the implicit-reward margins of labelled pairs.

    model, tok = load(path, cfg, device)          # scores or generates (bfloat16 with bf16)
    model, tok = load(path, cfg, train=True)      # the policy a leader trains (ssapo.loading.load_policy)
    m, ref_logps = pair_margins(model, reference, tok, rows, max_length=cfg.max_length)
    m = shared_margins(model, reference, tok, rows, bs, procs, work_dir, "heldout", max_length=...)
"""

from __future__ import annotations

from typing import List, Optional

from ssapo.errors import InputError
from ssapo.processes import chunked, exchange


def tokenizer(cfg, path: str):
    """The run's tokenizer (cfg.tokenizer, else the checkpoint's own), with a pad token."""
    from transformers import AutoTokenizer

    src = cfg.tokenizer or path
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:  # no such directory / hub id, or no tokenizer files in it
        raise InputError(
            f"{'tokenizer' if cfg.tokenizer else 'model'}: cannot load a tokenizer from {src}: {e}"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(path: str, cfg, device=None, train: bool = False):
    """(model, tokenizer) from a checkpoint (safetensors). `train`: the policy
    a leader trains, through ssapo.loading.load_policy (fp32 master weights;
    with load_in_4bit the 4-bit base for a LoRA adapter); otherwise a model
    that only scores or generates (bfloat16 with bf16), loaded onto `device`
    (`device_map`, not through host memory)."""
    if train:
        from ssapo.loading import load_policy

        return load_policy(path, cfg, train=True), tokenizer(cfg, path)
    from ssapo.loading import load_checkpoint

    dtype = "bfloat16" if cfg.bf16 else None
    # straight onto this process's device: 8 ranks each building two whole 8B models in host memory first
    # would need about 128 GB of it at once
    model, tok = load_checkpoint(path, trust_remote_code=cfg.trust_remote_code, dtype=dtype, device=device)
    if cfg.tokenizer:
        tok = tokenizer(cfg, path)
    if device is not None and str(device) == "cpu":
        model = model.to(device)
    return model, tok


def lora_modules(spec: str):
    """peft's target_modules: "all-linear" or a comma-separated list of names."""
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def device_of(cfg, procs=None):
    """Where this process's whole models go: its own accelerator device (or the CPU)."""
    import torch

    if cfg.use_cpu or not torch.cuda.is_available():
        return "cpu"
    dev = getattr(procs, "device", None) if procs is not None else None
    return dev if dev is not None else "cuda"


def settle_heap() -> None:
    """One full collection, then what survives it (the imported libraries: about 600,000 objects once torch,
    transformers and trl are in) is moved out of the collector's sight (`gc.freeze`). Every later
    `gc.collect()` (`free`, after each model) then walks only what the run itself made: 0.9 s a
    collection → milliseconds on this machine. Objects made before the call are still freed by
    reference counting; only their cycles are never collected. Called before a run's steps."""
    import gc

    gc.collect()
    gc.freeze()


def free() -> None:
    """Drops unreferenced models (and the GPU cache)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pair_margins(
    model, reference, tok, rows: List[dict], batch_size: int = 32, ref_logps=None, max_length: Optional[int] = None
):
    """Implicit-reward margins [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]
    of labelled rows (chosen/rejected as text or messages), each completion
    tokenised and cut to `max_length` exactly as the trainer does
    (`scoring.sequence_logps`). `ref_logps` (the reference's (chosen,
    rejected) log-probs) skips the reference. Returns (margins, ref_logps)."""
    from ssapo.scoring import sequence_logps

    prompts = [r["prompt"] for r in rows]
    ch = [r["chosen"] for r in rows]
    rj = [r["rejected"] for r in rows]
    kw = dict(max_length=max_length)
    if ref_logps is None:
        ref_logps = (
            sequence_logps(reference, tok, prompts, ch, batch_size, **kw),
            sequence_logps(reference, tok, prompts, rj, batch_size, **kw),
        )
    lw = sequence_logps(model, tok, prompts, ch, batch_size, **kw)
    ll = sequence_logps(model, tok, prompts, rj, batch_size, **kw)
    return (lw - ref_logps[0]) - (ll - ref_logps[1]), ref_logps


def shared_margins(
    model, reference, tok, rows: List[dict], bs: int, procs, d: str, name: str, max_length: Optional[int] = None
) -> List[float]:
    """`pair_margins` of every row, shared out by chunks of `bs` over `procs`
    (each chunk one batch, so the values do not depend on the process count,
    exchanged through files in `d`); every process gets all of them, in row order."""
    mine = {}
    for c in chunked(len(rows), bs, procs):
        if len(c):
            part = [rows[i] for i in c]
            mine[str(c.start)] = pair_margins(model, reference, tok, part, bs, max_length=max_length)[0].tolist()
    merged = {int(k): v for p in exchange(procs, d, name, mine) for k, v in p.items()}
    return [m for k in sorted(merged) for m in merged[k]]
