"""A training stage (the seed stage, each round's leader): rows in, a saved checkpoint out.

    stats = train_stage(cfg, policy, reference, rows, lr, epochs, "shift_prob", save_to, work_dir)

Every process reads the rows from one Arrow file in the stage's work directory
(`shared_dataset`); `data_hashes` in the result is each rank's `rows_hash` of
what it read. With cfg.save_steps the trainer checkpoints into the work
directory and a rerun resumes from the last checkpoint there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

import numpy as np

from ssapo import models
from ssapo.atoms import COLUMNS as ATOM_COLUMNS
from ssapo.atoms import Atoms
from ssapo.processes import Solo, broadcast_from_main, exchange, gather_strings, process_group_timeout

TRAIN_COLUMNS = ("prompt", "chosen", "rejected", *ATOM_COLUMNS)  # what a leader trains on


def rows_hash(rows: List[dict]) -> str:
    """sha256 of the rows' training columns (TRAIN_COLUMNS), in order: what a leader rank trained on."""
    h = hashlib.sha256()
    for r in rows:
        keep = {k: r[k] for k in TRAIN_COLUMNS if r.get(k) is not None}
        h.update(json.dumps(keep, sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def shared_dataset(rows: List[dict], path: str, procs=None):
    """`rows` as a `datasets.Dataset` backed by an Arrow file in directory
    `path`, the same file on every process. trl's DPOTrainer (with
    precompute_ref_log_probs) caches the reference log-probs next to the
    dataset's own file under a fingerprint broadcast from the main process,
    which the main process writes and the others then read: with an in-memory
    dataset that cache goes to a per-process random temp directory and the
    other ranks read a file never written (FileNotFoundError on cache-*.arrow).
    The main process writes the file (temp dir, then rename) and the others
    wait for it; caching must be on, so it is switched on."""
    import datasets
    from datasets import Dataset, load_from_disk

    procs = procs if procs is not None else Solo()
    if not datasets.is_caching_enabled():
        datasets.enable_caching()
    if procs.is_main_process:
        shutil.rmtree(path, ignore_errors=True)
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(tmp)
        os.replace(tmp, path)
    procs.wait_for_everyone()
    return load_from_disk(path)


def _resolver(cfg, rows: List[dict], reference_path: str, tok, procs, work_dir: str):
    """The `resolve_every` hook of a round: margins of the round's pairs under
    the policy being trained (implicit reward against `reference_path`, the
    annotation's reference), re-solved every `resolve_every` optimizer steps;
    every process takes the main process's atoms. The margins are
    `_SharedMargins`: shared out over the processes, the same on each."""
    from ssapo import follower

    margins_fn = _SharedMargins(cfg, rows, reference_path, tok, procs, work_dir)
    broadcast = broadcast_from_main if procs.num_processes > 1 else None
    return follower.Resolver(cfg, cfg.resolve_every, margins_fn, Atoms.of_rows(rows), broadcast)


class _SharedMargins:
    """`margins_fn` of a `follower.Resolver`: the implicit-reward margins
    [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] of `rows`, in
    row order, on every process. The rows are shared out by chunks of
    `precompute_ref_batch_size` pairs, the batch of the trainer's own no-grad
    reference pass (else `max(8, generation_batch_size)`; the logits of a forward
    take length × vocabulary × batch: for Llama-3 at 2,048 tokens, 0.5 GB in bf16
    per sequence), chunk c to process c mod world, each chunk one batch, so the
    values do not depend on the process count; the margins are exchanged
    through files in `work_dir`.

    The reference's log-probs are computed here, once: the reference is loaded
    whole on each process (`ssapo.loading.unsharded_loading`: under a DeepSpeed
    ZeRO-3 launch the TrainingArguments switched zero.Init on for the process,
    and a model partitioned by it but never wrapped by an engine cannot run a
    forward; under FSDP ranks other than 0 would load it empty), scores this
    process's chunks, and is freed before training. The policy is called as
    the trainer hands it over (`ResolvingTrainer.scoring_model`: a module whose
    forward gathers its sharded parameters), and under ZeRO-3 or FSDP each of
    its forwards is a collective: every process runs the same number of them
    (the most chunks any process has, padded with a repeat of chunk 0 whose
    result is dropped), each one whole forward, whatever the rows hold."""

    def __init__(self, cfg, rows: List[dict], reference_path: str, tok, procs, work_dir: str):
        from ssapo.loading import unsharded_loading
        from ssapo.processes import chunked, chunks_of

        self.procs, self.dir, self.n = procs, work_dir, len(rows)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        bs = cfg.precompute_ref_batch_size or max(8, cfg.generation_batch_size)
        self.chunks = chunked(self.n, bs, procs)
        self.rounds = len(chunks_of(self.n, bs, 0, procs.num_processes))  # process 0 has the most chunks
        self.forwards = 0  # the policy's forwards so far (the same on every process)

        def tokenized(c: range):
            from ssapo.scoring import tokenize_for_scoring

            part = [rows[i] for i in c]
            prompts = [r["prompt"] for r in part]
            return tuple(
                tokenize_for_scoring(tok, prompts, [r[k] for r in part], cfg.max_length) for k in ("chosen", "rejected")
            )

        self.batches = [tokenized(c) for c in self.chunks]
        self.padding = self.batches[0] if self.batches else tokenized(range(min(bs, self.n)))
        os.makedirs(work_dir, exist_ok=True)
        with unsharded_loading():
            ref, _ = models.load(reference_path, cfg, models.device_of(cfg, procs))
        ref.eval()
        self.ref = [tuple(_batch_logps(ref, b, self.pad) for b in pair) for pair in self.batches]
        del ref
        models.free()

    def __call__(self, model) -> np.ndarray:
        was_training = model.training
        model.eval()
        mine = {}
        for k in range(self.rounds):
            real = k < len(self.batches)
            chosen, rejected = self.batches[k] if real else self.padding
            lw, ll = _batch_logps(model, chosen, self.pad), _batch_logps(model, rejected, self.pad)
            self.forwards += 2
            if real:
                ref_w, ref_l = self.ref[k]
                mine[str(self.chunks[k].start)] = ((lw - ref_w) - (ll - ref_l)).tolist()
        model.train(was_training)
        merged = {
            int(s): v for part in exchange(self.procs, self.dir, "resolve_margins", mine) for s, v in part.items()
        }
        margins = [m for s in sorted(merged) for m in merged[s]]
        if len(margins) != self.n:
            raise RuntimeError(f"resolve: {len(margins)} margins gathered for {self.n} rows")
        return np.asarray(margins, dtype=np.float64)


def _batch_logps(model, pairs, pad: int):
    """Σ log π(y|x) of each (sequence ids, scored tokens) in `pairs` (`scoring.tokenize_for_scoring`), as
    a CPU float64 tensor: one whole forward of `model`, run even when no token is scored (a forward of a
    sharded model is a collective every process joins), without gradients."""
    import torch

    from ssapo.scoring import selective_log_softmax

    device = next(model.parameters()).device
    width = max(len(q) for q, _ in pairs)
    ids = torch.tensor([list(q) + [pad] * (width - len(q)) for q, _ in pairs], device=device)
    attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q, _ in pairs], device=device)
    at = [(b, t) for b, (q, c) in enumerate(pairs) for t in range(max(len(q) - c, 1), len(q))]
    r = torch.tensor([b for b, _ in at], dtype=torch.long, device=device)
    t = torch.tensor([t for _, t in at], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        lp = selective_log_softmax(logits[r, t - 1], ids[r, t], 1024)
    del logits
    return torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, r.cpu(), lp.double().cpu())


def engine_name(trainer) -> str:
    """The engine a trainer runs under, as accelerate set it up: 'DEEPSPEED zero-3', 'FSDP', 'MULTI_GPU'
    (DDP), 'MULTI_CPU', 'NO' (one process)."""
    acc = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        return f"DEEPSPEED zero-{getattr(plugin, 'zero_stage', '?')}"
    if trainer.is_fsdp_enabled:
        return "FSDP"
    return str(acc.distributed_type).split(".")[-1]


def train_stage(
    cfg,
    policy: str,
    reference: Optional[str],
    rows: List[dict],
    lr: float,
    epochs: float,
    leader_loss: str,
    save_to: str,
    work_dir: str,
    leader_params: Optional[Dict[str, Any]] = None,
    resolve_reference: Optional[str] = None,
) -> Dict[str, Any]:
    """Trains `policy` on `rows` against `reference` (None or the policy's own
    path: the policy's start, with peft the adapter-disabled model) with
    SSAPOTrainer and writes the checkpoint to `save_to` (safetensors,
    atomically; a LoRA adapter is merged first). `leader_params`: more
    SSAPOConfig fields (a method's per-round ones, e.g. spa_lambda).
    `resolve_reference` (with cfg.resolve_every > 0): the rows' atoms are
    re-solved during training (`ssapo.resolving.ResolvingTrainer`) on margins
    against that model. Returns trainer.leader_stats plus steps, pairs,
    data_hashes, processes and process_group_timeout_s (and resolves), and
    fp32_start_restored: under DeepSpeed, the number of parameters whose fp32
    master weights the main process set from the policy's file before the
    first step (`ssapo.engines.restore_fp32_start`; ZeRO-3: every trainable
    one; 0 in fp32 or with peft), None otherwise or when the stage resumed
    from a checkpoint."""
    import torch
    from accelerate import PartialState

    from ssapo.checkpoints import last_checkpoint, save_trained
    from ssapo.engines import sharding_engine
    from ssapo.leader_columns import PAIR_INDEX
    from ssapo.trainer import SSAPOConfig, SSAPOTrainer, leader_fields

    procs = PartialState()
    micro, accumulation = cfg.batch_split(procs.num_processes)  # the driver checked it before any launch
    resolving = resolve_reference is not None and cfg.resolve_every > 0
    keep = [c for c in TRAIN_COLUMNS if c in rows[0]]
    data = [{k: r[k] for k in keep} for r in rows]
    if resolving:
        for i, d in enumerate(data):
            d[PAIR_INDEX] = i
    ds = shared_dataset(data, os.path.join(work_dir, "dataset"), procs)
    hashes = gather_strings(procs, rows_hash(ds.to_list()))
    checkpoint = last_checkpoint(work_dir) if cfg.save_steps > 0 else None
    # the arguments first: under DeepSpeed ZeRO-3 they switch on zero.Init, so the models below are loaded
    # partitioned over the ranks (not whole on each); without a GPU the group is gloo (DeepSpeed on CPU too)
    args = SSAPOConfig(
        output_dir=work_dir,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the steps (warmup_ratio is deprecated)
        beta=cfg.beta,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cfg.bf16,
        use_cpu=cfg.use_cpu,
        report_to=cfg.report_to,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=cfg.precompute_ref_batch_size,
        include_num_input_tokens_seen="non_padding",  # the step's training tokens per second (metrics "steps")
        disable_tqdm=False,
        ddp_timeout=cfg.ddp_timeout,
        ddp_backend="gloo" if procs.num_processes > 1 and not torch.cuda.is_available() else None,
        **leader_fields(cfg, leader_loss),
        **(leader_params or {}),
    )
    model, tok = models.load(policy, cfg, train=True)
    ref_model = models.load(reference, cfg)[0] if reference and reference != policy else None
    peft_config = None
    if cfg.use_peft:
        from peft import LoraConfig

        if cfg.load_in_4bit and sharding_engine() is None:
            # one process / DDP: peft's QLoRA preparation (base frozen, its 16-bit norms and embeddings in fp32,
            # input grads for checkpointing). Not under ZeRO-3 / FSDP: their 4-bit storage and every other weight
            # stay bf16, one dtype to shard and gather (peft's QLoRA-with-FSDP/DeepSpeed recipe); get_peft_model
            # freezes the base and trl enables the input grads there
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=models.lora_modules(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
    # start_weights: under DeepSpeed with bf16 the optimizer's fp32 master weights are set from the policy's file
    # before the first step (else they start as its bf16 rounding: every round would lose what the last round's
    # fp32 weights hold below bf16 resolution); not when resuming, the checkpoint has them
    kw = dict(ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config)
    kw["start_weights"] = policy
    if resolving:
        from ssapo.resolving import ResolvingTrainer  # where used: it subclasses ssapo.trainer.SSAPOTrainer at import

        trainer = ResolvingTrainer(model, resolver=_resolver(cfg, rows, resolve_reference, tok, procs, work_dir), **kw)
    else:
        trainer = SSAPOTrainer(model, **kw)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=checkpoint) if checkpoint else trainer.train()
    stats, steps = dict(trainer.leader_stats), trainer.state.global_step
    stats["fp32_start_restored"] = trainer.fp32_start_restored  # None: not DeepSpeed, or resumed
    stats["train_seconds"] = time.time() - t0  # with the reference pass and a resume's load
    stats["train_tokens"] = int(trainer.state.num_input_tokens_seen)  # every process's, non-padding
    stats["engine"] = engine_name(trainer)  # what really ran (the device check fails a run on another)
    stats["resumed_from"] = os.path.basename(checkpoint) if checkpoint else None  # a killed stage's checkpoint
    if resolving:
        stats["resolves"] = trainer.resolver.history
    # through the trainer on every rank: gathers ZeRO-3 / FSDP weights, merges a LoRA adapter into the full
    # base (policy), writes the tokenizer and a model card; atomically
    save_trained(trainer, save_to, base_model=policy if cfg.use_peft else None, trust_remote_code=cfg.trust_remote_code)
    procs.wait_for_everyone()
    del trainer, model, ref_model, ds
    if procs.is_main_process:
        shutil.rmtree(work_dir, ignore_errors=True)  # the dataset and the stage's checkpoints: the model is saved
    models.free()
    return {
        **stats,
        "steps": steps,
        "pairs": len(rows),
        "data_hashes": hashes,
        "processes": procs.num_processes,
        "process_group_timeout_s": process_group_timeout(),
    }
