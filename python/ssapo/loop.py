"""The SSAPO loop (docs/METHOD.md §4): seed DPO, then rounds of annotate → follow → lead.

    from ssapo.config import load_config
    from ssapo.loop import run
    out = run(load_config("tiny", overrides={"output_dir": "runs/tiny"}))      # -> Path
    run(load_config("tiny", overrides={"output_dir": "runs/tiny"}), resume=True)

Steps, in order (`steps_of(cfg)`), each recorded in DIR/state.json once its
outputs are written:
- `seed`: DPO from π_init on the labelled seed → π_0 in seed/model;
- `seed/eval`: π_0's held-out reward accuracy (seed/metrics.json);
- for t = 1..T:
  `round_t/annotate` (π_{t−1} samples `num_samples` responses per prompt of
  round t, scored by log π_{t−1} − log π_ref with π_ref = π_init, or π_0 with
  annotation_reference = 'seed' from round 2 on: in round 1 the policy is π_0
  itself, so round 1 always uses π_init), `round_t/follow` (ssapo only),
  `round_t/sera` (sera only), `round_t/lead` (the leader trains from π_{t−1} on
  this round's pairs only, reference π_{t−1}, or π_init with round_reference =
  'init'; the checkpoint in round_t/model) and `round_t/eval` (held-out reward
  accuracy, the round's report).

Steps talk to each other through files only: DIR/config.yaml (the run's
RunConfig), DIR/data/ (the seed pairs, each round's prompts and the held-out
pairs, written once by `prepare`), annotations.jsonl, follower.npz, sera.jsonl,
the model directories and metrics.json. So each step can run in its own
processes:

- `run(cfg)` (one process, and `ssapo train` without --num-processes) runs every
  step in the calling process, one after the other;
- `run(cfg, launcher=...)` (`ssapo train --num-processes N`, see
  `ssapo.stage`) is a driver: it prepares the run, then starts each step as
  its own `accelerate launch ... -m ssapo.stage --run-dir DIR --step S`:
  training steps (seed, lead) under the recipe's engine (ddp / zero3 / fsdp),
  the others (annotation, SeRA's passes, evaluation) as plain data-parallel
  processes, each loading whole models on its own device; the follower
  (milliseconds, numpy) runs in the driver itself. Consecutive steps that
  need the same launch share one (under the ddp engine, e.g. a round's
  eval and the next round's annotation); under zero3/fsdp a training step
  is always alone in its launch, so no engine state reaches another step.
- inside an existing launch (every rank runs `run`), the ranks run every
  step together (`State` on accelerate's PartialState).

Every file is written to a temp name in its directory and renamed; a
checkpoint directory is written to a temp directory and renamed. State.json
is written by one process at a time: the driver between launches, the main
rank of a launch inside it. `resume=True` skips the steps recorded in
state.json, so a killed run continues where it stopped and loses nothing
that was written; the resumed run's outputs equal an uninterrupted run's
(every step is seeded from (seed, round), never from what ran before it in
the process). Rounds chain from the checkpoint actually written
(round_<t−1>/model), never from a name guessed in advance.

Methods (`method`):
- `ssapo`: the follower's atoms are attached to every pair; leader `leader_loss`
  (default `shift_prob`, the released code's).
- `dpo`: the seed stage only (π_0).
- `iterative-dpo`: self-annotation, no follower, plain DPO (docs/METHOD.md §5.2).
- `spa`: self-annotation, SPA's leader (`leader_loss` "spa": de-coupled
  confidence, label smoothing of the least confident pairs) with
  λ_t = spa_lambdas[t−1] (the last value repeats).
- `sera`: see `sera_round` (docs/METHOD.md §5.4; our choices are marked there).

Processes: annotation is shared out by prompt chunks (each chunk has its own
sampling seed, so the samples do not depend on N) and gathered on the main
process, which writes annotations.jsonl; the follower runs once over every
pair (groups in the stable prompt order) and writes follower.npz; every
training process reads both files and attaches the atoms to its dataset,
which it reads from an Arrow file in the stage's work directory (so every
rank trains on the same bytes; each rank's hash of them is in the leader's
metrics, `data_hashes`). SeRA's margin pass and bootstrap, and the held-out
evaluation, are shared out by chunks as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ssapo.config import RunConfig
from ssapo.io import atomic_write, read_jsonl, write_json, write_jsonl

# fields that may change between a run and its resumption (they do not change results)
RESUME_MAY_DIFFER = {
    "output_dir",
    "report_to",
    "logging_steps",
    "accelerate_config",
    "save_total_limit",
    "save_steps",
    "ddp_timeout",
}
HELDOUT_PAIRS = 256  # held-out labelled pairs for the reward accuracy of each stage
KEEP_COLUMNS = ("prompt", "chosen", "rejected", "shift", "mass", "weight")  # what the leader trains on


class Solo:
    """The processes of a one-process run (the driver): rank 0 of 1."""

    is_main_process = True
    process_index = 0
    num_processes = 1
    device = None

    def wait_for_everyone(self) -> None:
        pass


class State:
    """DIR/state.json: {"done": [steps completed, in order], "last": the last
    one}. Only the main process of `procs` (accelerate's PartialState inside a
    launch; `Solo()` by default) writes; `mark` is also the barrier after a step."""

    def __init__(self, out: str, resume: bool, procs=None):
        self.procs = procs if procs is not None else Solo()
        self.path = os.path.join(out, "state.json")
        self.done: List[str] = []
        if os.path.exists(self.path):
            if not resume:
                raise ValueError(
                    f"output_dir: {out} already holds a run (state.json); pass --resume "
                    "(resume=True) to continue it, or choose another directory"
                )
            self.reload()

    def reload(self) -> None:
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.done = list(json.load(f)["done"])

    @property
    def main(self) -> bool:
        return self.procs.is_main_process

    @property
    def rank(self) -> int:
        return self.procs.process_index

    @property
    def world(self) -> int:
        return self.procs.num_processes

    @property
    def device(self):
        return getattr(self.procs, "device", None)

    def wait(self) -> None:
        self.procs.wait_for_everyone()

    def __contains__(self, step: str) -> bool:
        return step in self.done

    def mark(self, step: str) -> None:
        if step not in self.done:
            self.done.append(step)
        if self.main:
            write_json(self.path, {"done": self.done, "last": step})
        self.wait()


def steps_of(cfg: RunConfig) -> List[str]:
    """Every step of a run of `cfg`, in order."""
    steps = ["seed/eval"] if cfg.seed_model else ["seed", "seed/eval"]
    if cfg.method == "dpo":
        return steps
    for t in range(1, cfg.num_rounds + 1):
        steps.append(f"round_{t}/annotate")
        if cfg.method == "ssapo":
            steps.append(f"round_{t}/follow")
        if cfg.method == "sera":
            steps.append(f"round_{t}/sera")
        steps += [f"round_{t}/lead", f"round_{t}/eval"]
    return steps


def step_kind(step: str) -> str:
    """'train' (the recipe's engine), 'follow' (the driver, no torch) or 'data' (data-parallel, whole models)."""
    name = step.split("/")[-1]
    if name in ("seed", "lead"):
        return "train"
    if name == "follow":
        return "follow"
    return "data"


def rows_hash(rows: List[dict]) -> str:
    """sha256 of the rows' training columns (KEEP_COLUMNS), in order: what a leader rank trained on."""
    h = hashlib.sha256()
    for r in rows:
        h.update(
            json.dumps(
                {k: r[k] for k in KEEP_COLUMNS if r.get(k) is not None}, sort_keys=True, separators=(",", ":")
            ).encode()
        )
        h.update(b"\n")
    return h.hexdigest()


def _write_ordered(path: str, obj: Any) -> None:
    """JSON with the keys in their own order (rows merged from processes are written as one process writes them)."""
    from ssapo.io import _jsonable

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, default=_jsonable)

    atomic_write(path, w)


def _exchange(state: State, d: str, name: str, obj: Any) -> List[Any]:
    """Every process's `obj` (JSON), in rank order, on every process (through files in `d`)."""
    if state.world == 1:
        return [obj]
    _write_ordered(os.path.join(d, f".{name}.rank_{state.rank}.json"), obj)
    state.wait()
    parts = []
    for r in range(state.world):
        with open(os.path.join(d, f".{name}.rank_{r}.json")) as f:
            parts.append(json.load(f))
    state.wait()
    if state.main:
        for r in range(state.world):
            os.remove(os.path.join(d, f".{name}.rank_{r}.json"))
    return parts


def _chunked(n: int, bs: int, state: Optional[State]) -> List[range]:
    """This process's share of n items, as chunks of `bs` consecutive items
    (chunk c to process c mod world), so each chunk is one batch at any process count."""
    world, rank = (state.world, state.rank) if state is not None else (1, 0)
    return [range(c * bs, min((c + 1) * bs, n)) for c in range(rank, (n + bs - 1) // bs, world)]


def check_resumable(cfg: RunConfig, out: str) -> None:
    """On resume, the run's config.yaml must match `cfg` (but for the fields in RESUME_MAY_DIFFER)."""
    path = os.path.join(out, "config.yaml")
    if not os.path.exists(path):
        return
    old = RunConfig.from_yaml(path).to_dict()
    new = cfg.to_dict()
    diff = [f"{k} ({old.get(k)!r} → {new[k]!r})" for k in new if k not in RESUME_MAY_DIFFER and old.get(k) != new[k]]
    if diff:
        raise ValueError(
            f"config: resuming {out} with another configuration: {', '.join(diff)}; resume with the "
            "run's config.yaml or start a new output_dir"
        )


def resolve_model(cfg: RunConfig, out: str) -> Dict[str, Any]:
    """π_init and the data sources: paths (the tiny preset's task is built by its command, not here)."""
    if cfg.model == "tiny":
        raise ValueError(
            "model: 'tiny' is a preset whose task `ssapo train --model tiny` builds "
            "(ssapo.commands.train.with_tiny_task); the loop takes the SFT model's path"
        )
    if not cfg.preference_data:
        raise ValueError("preference_data: needed (labelled pairs for the seed stage and the held-out evaluation)")
    if cfg.seed_model and not os.path.isdir(cfg.seed_model):
        raise ValueError(f"seed_model: no checkpoint directory at {cfg.seed_model}")
    return {"init": cfg.model, "preference_data": cfg.preference_data, "prompt_data": cfg.prompt_data}


def _tokenizer(cfg: RunConfig, path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load(path: str, cfg: RunConfig, device=None, train: bool = False):
    """(model, tokenizer) from a checkpoint (safetensors). `train`: the policy
    a leader trains, through ssapo.trainer.load_policy (fp32 master weights;
    with load_in_4bit the 4-bit base for a LoRA adapter); otherwise a model
    that only scores or generates (bfloat16 with bf16)."""
    if train:
        from ssapo.trainer import load_policy

        return load_policy(path, cfg, train=True), _tokenizer(cfg, path)
    from ssapo.tiny import load

    model, tok = load(path, trust_remote_code=cfg.trust_remote_code, dtype="bfloat16" if cfg.bf16 else None)
    if cfg.tokenizer:
        tok = _tokenizer(cfg, path)
    if device is not None:
        model = model.to(device)
    return model, tok


def _modules(spec: str):
    """peft's target_modules: "all-linear" or a comma-separated list of names."""
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def pair_margins(
    model, reference, tok, rows: List[dict], batch_size: int = 32, ref_logps=None, max_length: Optional[int] = None
):
    """Implicit-reward margins [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]
    of labelled rows (chosen/rejected as text or messages), each completion
    tokenised and cut to `max_length` exactly as the trainer does
    (`annotate.sequence_logps`). `ref_logps` (the reference's (chosen,
    rejected) log-probs) skips the reference."""
    from ssapo.annotate import sequence_logps

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


def _atom_trainer_class():
    """SSAPOTrainer that reads each pair's atoms from a mutable table by
    `pair_index` (the re-solve hook replaces the table's rows mid-round)."""
    from ssapo.trainer import SSAPOTrainer

    class ResolvingTrainer(SSAPOTrainer):
        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "pair_index" not in self._signature_columns:
                self._signature_columns = list(self._signature_columns) + ["pair_index"]

    return ResolvingTrainer


class _TableCollator:
    def __init__(self, inner, table):
        self.inner, self.table = inner, table

    def __call__(self, examples):
        out = []
        for ex in examples:
            ex = dict(ex)
            i = int(ex.pop("pair_index"))
            for key in ("shift", "mass"):
                if key in ex:
                    ex[key] = [float(v) for v in self.table[key][i]]
            if "weight" in ex:
                ex["weight"] = float(self.table["weight"][i])
            out.append(ex)
        return self.inner(out)


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


def _gather_strings(procs, value: str) -> List[str]:
    """`value` of every process, in rank order."""
    if procs.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def process_group_timeout() -> Optional[float]:
    """Seconds the default process group's collectives wait (None: no group, or not readable)."""
    try:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None
        device = torch.device("cuda" if "nccl" in str(dist.get_backend()) else "cpu")
        return float(dist.group.WORLD._get_backend(device).options._timeout.total_seconds())
    except Exception:  # a backend without readable options (mpi, ucc): nothing to report
        return None


def train_stage(
    cfg: RunConfig,
    policy: str,
    reference: Optional[str],
    rows: List[dict],
    lr: float,
    epochs: float,
    leader_loss: str,
    save_to: str,
    work_dir: str,
    spa_lambda: float = 0.5,
    resolve: Optional[Callable] = None,
) -> Dict[str, Any]:
    """Trains `policy` on `rows` against `reference` (None or the policy's own
    path: the policy's start, with peft the adapter-disabled model) with
    SSAPOTrainer and writes the checkpoint to `save_to` (safetensors,
    atomically; a LoRA adapter is merged first). Every process reads the
    rows from one Arrow file in `work_dir` (`shared_dataset`); `data_hashes`
    in the result is each rank's `rows_hash` of what it read. With
    cfg.save_steps the trainer checkpoints into `work_dir` every save_steps
    optimizer steps and a rerun resumes from the last checkpoint there.
    `resolve(trainer, rows)` (ssapo with resolve_every) returns a
    follower.Resolver for the round. Returns trainer.leader_stats plus
    steps, pairs and data_hashes."""
    from accelerate import PartialState

    from ssapo.trainer import SSAPOConfig, SSAPOTrainer, last_checkpoint, save_trained

    procs = PartialState()
    keep = [c for c in KEEP_COLUMNS if c in rows[0]]
    data = [{k: r[k] for k in keep} for r in rows]
    if resolve is not None:
        for i, d in enumerate(data):
            d["pair_index"] = i
    ds = shared_dataset(data, os.path.join(work_dir, "dataset"), procs)
    hashes = _gather_strings(procs, rows_hash(ds.to_list()))
    checkpoint = last_checkpoint(work_dir) if cfg.save_steps > 0 else None
    import torch

    # the arguments first: under DeepSpeed ZeRO-3 they switch on zero.Init, so the models below are loaded
    # partitioned over the ranks (not whole on each); without a GPU the group is gloo (DeepSpeed on CPU too)
    args = SSAPOConfig(
        output_dir=work_dir,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(procs.num_processes),
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
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
        leader_loss=leader_loss,
        clamp_min=cfg.clamp_min,
        gradient_checkpointing=cfg.gradient_checkpointing,
        precompute_ref_log_probs=True,
        disable_tqdm=False,
        spa_alpha=cfg.spa_alpha,
        spa_lambda=spa_lambda,
        spa_quantile=cfg.spa_quantile,
        spa_window=cfg.spa_window,
        spa_warmup_ratio=cfg.spa_warmup_ratio,
        ddp_timeout=cfg.ddp_timeout,
        ddp_backend="gloo" if procs.num_processes > 1 and not torch.cuda.is_available() else None,
    )
    model, tok = _load(policy, cfg, train=True)
    ref_model = _load(reference, cfg)[0] if reference and reference != policy else None
    peft_config = None
    if cfg.use_peft:
        from peft import LoraConfig

        if cfg.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=_modules(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
    cls = _atom_trainer_class() if resolve is not None else SSAPOTrainer
    trainer = cls(
        model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config
    )
    resolver = None
    if resolve is not None:
        resolver = resolve(trainer, rows)
        trainer.data_collator = _TableCollator(trainer.data_collator, resolver.table)
        trainer.add_callback(resolver.callback())
    trainer.train(resume_from_checkpoint=checkpoint) if checkpoint else trainer.train()
    stats, steps = dict(trainer.leader_stats), trainer.state.global_step
    if resolver is not None:
        stats["resolves"] = resolver.history
    # through the trainer on every rank: gathers ZeRO-3 / FSDP weights, merges a LoRA adapter into the full
    # base (policy), writes the tokenizer and a model card; atomically
    save_trained(trainer, save_to, base_model=policy if cfg.use_peft else None, trust_remote_code=cfg.trust_remote_code)
    procs.wait_for_everyone()
    del trainer, model, ref_model, ds
    if procs.is_main_process:
        shutil.rmtree(work_dir, ignore_errors=True)  # the dataset and the stage's checkpoints: the model is saved
    _free()
    return {
        **stats,
        "steps": steps,
        "pairs": len(rows),
        "data_hashes": hashes,
        "processes": procs.num_processes,
        "process_group_timeout_s": process_group_timeout(),
    }


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _margins(
    model,
    reference,
    tok,
    rows: List[dict],
    bs: int,
    state: Optional[State],
    d: str,
    name: str,
    max_length: Optional[int] = None,
) -> List[float]:
    """pair_margins of every row, shared out by chunks of `bs` over the
    processes of `state` (each chunk one batch, so the values do not depend on
    the process count); every process gets all of them, in row order."""
    mine = {}
    for c in _chunked(len(rows), bs, state):
        if len(c):
            part = [rows[i] for i in c]
            mine[str(c.start)] = pair_margins(model, reference, tok, part, bs, max_length=max_length)[0].tolist()
    parts = _exchange(state, d, name, mine) if state is not None else [mine]
    merged = {int(k): v for p in parts for k, v in p.items()}
    return [m for k in sorted(merged) for m in merged[k]]


def heldout_accuracy(
    cfg: RunConfig,
    model_path: str,
    init_path: str,
    rows: List[dict],
    state: Optional[State] = None,
    work_dir: Optional[str] = None,
) -> Dict[str, float]:
    """Reward accuracy on held-out labelled pairs: the fraction whose implicit
    reward log π/π_init ranks the labelled chosen above the rejected (ties
    count as wrong, and are counted). Shared out over the processes of
    `state` (exchanging through `work_dir`); the same result on every one."""
    if not rows:
        return {}
    import numpy as np

    t0 = time.time()
    device = _device(cfg, state)
    model, tok = _load(model_path, cfg, device)
    init_model, _ = _load(init_path, cfg, device)
    m = np.asarray(
        _margins(
            model,
            init_model,
            tok,
            rows,
            max(8, cfg.generation_batch_size),
            state,
            work_dir or os.path.dirname(model_path),
            "heldout",
            max_length=cfg.max_length,
        )
    )
    del model, init_model
    _free()
    return {
        "heldout_reward_accuracy": float((m > 0).mean()),
        "heldout_ties": int((m == 0).sum()),
        "heldout_pairs": len(rows),
        "heldout_margin_mean": float(m.mean()),
        "seconds": time.time() - t0,
    }


def _device(cfg: RunConfig, state: Optional[State]):
    """Where this process's whole models go: its own accelerator device (or the CPU)."""
    import torch

    if cfg.use_cpu or not torch.cuda.is_available():
        return "cpu"
    dev = state.device if state is not None else None
    return dev if dev is not None else "cuda"


def sera_round(
    cfg: RunConfig,
    rows: List[dict],
    policy_path: str,
    before_path: Optional[str],
    init_path: str,
    seed: int,
    device=None,
    state: Optional[State] = None,
    work_dir: Optional[str] = None,
):
    """SeRA's round (docs/METHOD.md §5.4, our choices marked; SeRA's Algorithm 1 is
    unpublished, so each unknown is a named option):
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
    The margin passes and the bootstrap are shared out by chunks over the
    processes of `state` (exchanging through `work_dir`; vLLM bootstraps on the
    main process alone). Returns (training rows, stats), the same on every process."""
    import random

    from ssapo import annotate

    d = work_dir or os.path.dirname(os.path.abspath(policy_path))
    if device is None and state is not None:
        device = _device(cfg, state)
    policy, tok = _load(policy_path, cfg, device)
    init_model, _ = _load(init_path, cfg, device)
    bs = max(8, cfg.generation_batch_size)
    m = _margins(policy, init_model, tok, rows, bs, state, d, "sera_margins", max_length=cfg.max_length) if rows else []
    if cfg.sera_gamma_role == "ensemble" and before_path is not None and cfg.sera_gamma > 0:
        before, _ = _load(before_path, cfg, device)
        mb = _margins(before, init_model, tok, rows, bs, state, d, "sera_before", max_length=cfg.max_length)
        del before
        m = [(1 - cfg.sera_gamma) * a + cfg.sera_gamma * b for a, b in zip(m, mb)]
    elif cfg.sera_gamma_role == "ensemble" and cfg.sera_gamma > 0:
        m = [(1 - cfg.sera_gamma) * a for a in m]
    order = sorted(range(len(rows)), key=lambda i: (-m[i], i))
    kept = [{**rows[i], "irm": m[i]} for i in order[: max(1, round(cfg.sera_keep * len(rows)))]]
    world, rank = (state.world, state.rank) if state is not None else (1, 0)
    if annotate.use_vllm(cfg.generation_backend):
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
    if state is not None and state.world > 1:
        parts = _exchange(state, d, "sera_boot", {"rows": boot, "stats": bstats})
        boot, bstats = [], {}
        for part in parts:
            boot += part["rows"]
            for k, v in part["stats"].items():
                bstats[k] = v if isinstance(v, str) else bstats.get(k, 0) + v
    boot.sort(key=lambda r: r["index"])
    bstats = annotate.finish_stats(bstats, boot)
    if cfg.sera_gamma_role == "threshold":
        boot = [b for b in boot if cfg.beta * b["margin"] > cfg.sera_gamma]
    if cfg.sera_gamma_role == "mix" and cfg.sera_gamma > 0:
        n_boot = min(len(boot), round(cfg.sera_gamma / (1 - cfg.sera_gamma) * len(kept)))
        boot = random.Random(seed).sample(boot, n_boot)
    del policy, init_model
    _free()
    keys = ("prompt", "chosen", "rejected", "margin")
    sel = [{k: r[k] for k in keys if k in r} for r in kept] + [{k: b[k] for k in keys} for b in boot]
    return sel, {
        "pairs_in": len(rows),
        "kept": len(kept),
        "bootstrapped": len(boot),
        "kept_irm_min": float(min(r["irm"] for r in kept)) if kept else 0.0,
        **{f"bootstrap_{k}": v for k, v in bstats.items() if not isinstance(v, str)},
    }


def _annotate_step(
    cfg: RunConfig, state: State, rd: str, policy_path: str, ref_path: str, prompts: List, seed: int
) -> Optional[tuple]:
    """Self-annotation shared out over the processes by prompt chunks; returns
    (rows in prompt order, stats) on the main process, None elsewhere."""
    from ssapo import annotate, chat
    from ssapo.annotators import load_annotator, text_scorer

    vllm = annotate.use_vllm(cfg.generation_backend)
    world = 1 if vllm else state.world
    rows: List[dict] = []
    stats: Dict[str, Any] = {}
    if state.rank < world:
        device = _device(cfg, state)
        policy, tok = _load(policy_path, cfg, None if vllm else device)
        ref, _ = _load(ref_path, cfg, None if vllm else device)
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
            rank=state.rank,
            world=world,
            scorer=scorer,
        )
        del policy, ref
        _free()
    if world == 1:
        return (rows, stats) if state.main else None
    shard_dir = os.path.join(rd, "annotate_shards")
    _write_ordered(os.path.join(shard_dir, f"rank_{state.rank}.json"), {"rows": rows, "stats": stats})
    state.wait()
    if not state.main:
        return None
    rows, total = [], {}
    for r in range(world):
        with open(os.path.join(shard_dir, f"rank_{r}.json")) as f:
            part = json.load(f)
        rows += part["rows"]
        for k, v in part["stats"].items():
            total[k] = v if isinstance(v, str) else total.get(k, 0) + v
    shutil.rmtree(shard_dir, ignore_errors=True)
    rows.sort(key=lambda r: r["index"])
    return rows, total


def _read_metrics(path: str) -> Dict[str, Any]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


class StepFailed(RuntimeError):
    """A step's launch ended without completing the step (its log names the cause)."""


def prepare(cfg: RunConfig, out: str, state: State) -> None:
    """The run's inputs, once, by the main process: config.yaml, the tiny
    preset's task, and DIR/data/ (seed.jsonl, round_<t>.jsonl with each round's
    prompts, heldout.jsonl, split.json with the split's counts, written last),
    which every step reads instead of splitting the data again."""
    if state.main:
        atomic_write(os.path.join(out, "config.yaml"), lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        d = os.path.join(out, "data")
        if not os.path.exists(os.path.join(d, "split.json")):
            from ssapo.data import load_preferences, load_prompts, split_seed_and_rounds

            src = resolve_model(cfg, out)
            tok = _tokenizer(cfg, src["init"])
            prefs = load_preferences(src["preference_data"])
            pool = load_prompts(src["prompt_data"]) if src["prompt_data"] else None
            split = split_seed_and_rounds(
                prefs,
                cfg.seed_size,
                cfg.round_sizes[: cfg.num_rounds],
                cfg.seed,
                pool,
                tokenizer=tok,
                max_prompt_length=cfg.max_prompt_length,
            )
            from ssapo.chat import prepare_prompts

            def shown(rows):
                # every prompt as the model is shown it (the system turn where cfg.system_turn asks for one),
                # written into the rows, so training and scoring render what annotation renders
                rows = [dict(r) for r in rows]
                for r, p in zip(rows, prepare_prompts([r["prompt"] for r in rows], tok, cfg)):
                    r["prompt"] = p
                return rows

            write_jsonl(os.path.join(d, "seed.jsonl"), shown(split.seed))
            for t, rnd in enumerate(split.rounds, start=1):
                write_jsonl(os.path.join(d, f"round_{t}.jsonl"), [{"prompt": p} for p in rnd["prompt"]])
            test = split.test
            held = shown(test.select(range(min(HELDOUT_PAIRS, len(test))))) if test is not None else []
            write_jsonl(os.path.join(d, "heldout.jsonl"), held)
            write_json(os.path.join(d, "split.json"), split.report)
    state.wait()


class Run:
    """What every step of a run reads: its config, π_init and the data sources
    (`resolve_model`), and the split written by `prepare`."""

    def __init__(self, cfg: RunConfig, out: str):
        self.cfg, self.out = cfg, out
        self.src = resolve_model(cfg, out)
        self.init = cfg.ref_model or self.src["init"]
        d = os.path.join(out, "data")
        self.seed_rows = read_jsonl(os.path.join(d, "seed.jsonl"))
        self.heldout = read_jsonl(os.path.join(d, "heldout.jsonl"))
        with open(os.path.join(d, "split.json")) as f:
            self.split_report = json.load(f)

    def prompts(self, t: int) -> List:
        return [r["prompt"] for r in read_jsonl(os.path.join(self.out, "data", f"round_{t}.jsonl"))]

    def dir(self, t: int) -> str:
        return os.path.join(self.out, "seed" if t == 0 else f"round_{t}")

    def model(self, t: int) -> str:
        """π_t's checkpoint: seed/model (or the given seed_model) for t = 0, else round_<t>/model."""
        if t == 0 and self.cfg.seed_model:
            return self.cfg.seed_model
        return os.path.join(self.dir(t), "model")

    def metrics_path(self, t: int) -> str:
        return os.path.join(self.dir(t), "metrics.json")

    def annotation_reference(self, t: int):
        """(kind, path) of round t's implicit-reward reference."""
        # π_init, or π_0 from round 2 on: in round 1 the policy is π_0 itself and log π_0 − log π_0 is 0
        if self.cfg.annotation_reference == "seed" and t > 1:
            return "seed", self.model(0)
        return "init", self.init

    def round_rows(self, t: int) -> List[dict]:
        """Round t's training pairs: the annotations, with the follower's atoms (ssapo), or SeRA's selection."""
        rd = self.dir(t)
        if self.cfg.method == "sera":
            return read_jsonl(os.path.join(rd, "sera.jsonl"))
        rows = read_jsonl(os.path.join(rd, "annotations.jsonl"))
        if self.cfg.method == "ssapo":
            from ssapo import follower

            rows = follower.attach(rows, follower.load(os.path.join(rd, "follower.npz")))
        return rows

    def leader_loss(self) -> str:
        return {"ssapo": self.cfg.leader_loss, "spa": "spa"}.get(self.cfg.method, "dpo")


def _step_seed(run: Run, state: State, t: int) -> None:
    cfg = run.cfg
    t0 = time.time()
    stats = train_stage(
        cfg,
        run.src["init"],
        run.init,
        run.seed_rows,
        cfg.seed_learning_rate,
        cfg.seed_epochs,
        "dpo",
        run.model(0),
        os.path.join(run.dir(0), "trainer"),
    )
    if state.main:
        write_json(run.metrics_path(0), {"leader": {**stats, "seconds": time.time() - t0}, "split": run.split_report})


def _step_eval(run: Run, state: State, t: int) -> None:
    """Held-out reward accuracy of π_t; for a round, the round's total time and its report."""
    ev = heldout_accuracy(run.cfg, run.model(t), run.init, run.heldout, state, run.dir(t))
    if not state.main:
        return
    metrics = _read_metrics(run.metrics_path(t))
    metrics["eval"] = ev
    metrics["seconds"] = sum(v.get("seconds", 0.0) for v in metrics.values() if isinstance(v, dict))
    write_json(run.metrics_path(t), metrics)
    if t > 0:
        from ssapo import report

        accuracy = [
            _read_metrics(run.metrics_path(s)).get("eval", {}).get("heldout_reward_accuracy") for s in range(t + 1)
        ]
        report.round_report(run.dir(t), t, metrics, run.round_rows(t), accuracy)


def _step_annotate(run: Run, state: State, t: int) -> None:
    """π_{t−1} annotates round t's prompts (shared out by chunks); then annotation_flip_rate turns pairs around."""
    from ssapo import annotate
    from ssapo.annotators import flip_pairs

    cfg, rd = run.cfg, run.dir(t)
    os.makedirs(rd, exist_ok=True)
    t0 = time.time()
    kind, ref = run.annotation_reference(t)
    got = _annotate_step(cfg, state, rd, run.model(t - 1), ref, run.prompts(t), cfg.seed + t)
    if state.main:
        rows, stats = got
        if not rows:
            raise RuntimeError(f"round {t}: every prompt's responses tied; no pairs to train on")
        stats = annotate.finish_stats(stats, rows)
        rows = flip_pairs(
            [{k: v for k, v in r.items() if k != "index"} for r in rows], cfg.annotation_flip_rate, (cfg.seed, t)
        )
        stats["flipped"] = sum(r["flipped"] for r in rows)
        write_jsonl(os.path.join(rd, "annotations.jsonl"), rows)
        stats.update(reference=kind, annotator=cfg.annotator, seconds=time.time() - t0)
        write_json(run.metrics_path(t), {"annotation": stats})


def _step_follow(run: Run, state: State, t: int) -> None:
    """The worst case around the self-labels (one process, every pair)."""
    if not state.main:
        return
    from ssapo import follower

    rd = run.dir(t)
    rows = read_jsonl(os.path.join(rd, "annotations.jsonl"))
    margins = [r["margin"] for r in rows]
    cols, diag = follower.follow(margins, run.cfg)
    follower.save(os.path.join(rd, "follower.npz"), cols, diag, margins)
    metrics = _read_metrics(run.metrics_path(t))
    metrics["follower"] = diag
    write_json(run.metrics_path(t), metrics)


def _step_sera(run: Run, state: State, t: int) -> None:
    cfg, out, rd = run.cfg, run.out, run.dir(t)
    t0 = time.time()
    rows = read_jsonl(os.path.join(rd, "annotations.jsonl"))
    pool_rows = rows
    if cfg.sera_pool == "cumulative":
        pool_rows = (
            [dict(r) for r in run.seed_rows]
            + [r for s in range(1, t) for r in read_jsonl(os.path.join(out, f"round_{s}", "annotations.jsonl"))]
            + rows
        )
    before = None
    if t > 1:
        before = run.model(t - 2)
    sel, stats = sera_round(
        cfg, pool_rows, run.model(t - 1), before, run.init, seed=cfg.seed + 100 + t, state=state, work_dir=rd
    )
    if state.main:
        write_jsonl(os.path.join(rd, "sera.jsonl"), sel)
        metrics = _read_metrics(run.metrics_path(t))
        metrics["sera"] = {**stats, "seconds": time.time() - t0}
        write_json(run.metrics_path(t), metrics)


def _step_lead(run: Run, state: State, t: int) -> None:
    """π_θ starts at π_{t−1}; reference π_{t−1} (or π_init)."""
    cfg, rd = run.cfg, run.dir(t)
    t0 = time.time()
    previous = run.model(t - 1)
    reference = previous if cfg.round_reference == "previous" else run.init
    lam = cfg.spa_lambdas[min(t, len(cfg.spa_lambdas)) - 1]
    leader_loss = run.leader_loss()
    resolve = None
    if cfg.method == "ssapo" and cfg.resolve_every > 0:
        resolve = _resolver_factory(cfg, run.annotation_reference(t)[1], state)
    stats = train_stage(
        cfg,
        previous,
        reference,
        run.round_rows(t),
        cfg.learning_rate,
        cfg.num_train_epochs_per_round,
        leader_loss,
        run.model(t),
        os.path.join(rd, "trainer"),
        spa_lambda=lam,
        resolve=resolve,
    )
    if state.main:
        metrics = _read_metrics(run.metrics_path(t))
        metrics["leader"] = {
            **stats,
            "seconds": time.time() - t0,
            "loss": leader_loss,
            "reference": cfg.round_reference,
            **({"spa_lambda": lam} if leader_loss == "spa" else {}),
        }
        write_json(run.metrics_path(t), metrics)


_STEPS = {
    "seed": _step_seed,
    "eval": _step_eval,
    "annotate": _step_annotate,
    "follow": _step_follow,
    "sera": _step_sera,
    "lead": _step_lead,
}


def run_step(run: Run, state: State, step: str) -> None:
    """Runs one step on every process of `state` and records it in state.json."""
    head, _, name = step.partition("/")
    if head == "seed":
        t, name = 0, name or "seed"
    elif head.startswith("round_") and head[6:].isdigit() and name in _STEPS and name != "seed":
        t = int(head[6:])
    else:
        raise ValueError(
            f"step: unknown step {step!r} (steps: seed, seed/eval, round_<t>/annotate|follow|sera|lead|eval)"
        )
    _STEPS[name](run, state, t)
    state.mark(step)


def run_steps(cfg: RunConfig, out: str, steps: List[str], procs=None) -> None:
    """Runs `steps` of the prepared run in `out` (those not yet in state.json) on
    the processes of `procs` (accelerate's PartialState inside a launch): what
    `python -m ssapo.stage` does."""
    state = State(out, resume=True, procs=procs)
    known = steps_of(cfg)
    for s in steps:
        if s not in known:
            raise ValueError(f"step: {s!r} is not a step of this run ({', '.join(known)})")
    run_ctx = Run(cfg, out)
    for s in steps:
        if s not in state:
            run_step(run_ctx, state, s)


def run(cfg: RunConfig, resume: bool = False, launcher=None, procs=None) -> Path:
    """Runs (or, with `resume`, continues) the whole loop; returns the output directory.

    `launcher` (an `ssapo.stage.Launcher`): the driver, each step in its own
    launch. Without it every step runs here, on the processes of `procs`
    (default: this process alone; accelerate's PartialState when every rank
    of an existing launch calls `run`)."""
    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    state = State(out, resume, procs)
    if resume:
        check_resumable(cfg, out)
    prepare(cfg, out, state)
    todo = [s for s in steps_of(cfg) if s not in state]
    if not todo:
        return Path(out)
    if launcher is None:
        run_ctx = Run(cfg, out)
        for s in todo:
            run_step(run_ctx, state, s)
        return Path(out)
    run_ctx = None
    for steps, how in launcher.plan(cfg, todo):
        if how is None:  # the follower: here, in the driver
            run_ctx = run_ctx or Run(cfg, out)
            for s in steps:
                launcher.in_driver(lambda s=s, ctx=run_ctx: run_step(ctx, state, s), s, state)
            continue
        launcher.launch(steps, how)
        state.reload()
        missing = [s for s in steps if s not in state]
        if missing:
            raise StepFailed(
                f"step {missing[0]}: its launch ended without recording it in {state.path}; see {launcher.last_log}"
            )
    return Path(out)


def _resolver_factory(cfg: RunConfig, ann_ref: str, state: State):
    """The `resolve_every` hook of an ssapo round: margins of the round's pairs
    under the policy being trained (implicit reward against the annotation
    reference, as the annotation's), re-solved every `resolve_every` optimizer
    steps; the main process's atoms are broadcast to every process."""
    import numpy as np

    from ssapo import follower

    def make(trainer, rows):
        tok = trainer.processing_class
        ref, _ = _load(ann_ref, cfg, trainer.accelerator.device)
        cache: Dict[str, Any] = {}

        def margins_fn():
            model = trainer.accelerator.unwrap_model(trainer.model)
            was_training = model.training
            m, cache["ref"] = pair_margins(
                model, ref, tok, rows, max(8, cfg.generation_batch_size), cache.get("ref"), max_length=cfg.max_length
            )
            model.train(was_training)
            return m.numpy()

        broadcast = _broadcast_from_main if state.world > 1 else None
        table = {k: np.asarray([r[k] for r in rows], dtype=np.float64) for k in ("shift", "mass", "weight")}
        return follower.Resolver(cfg, cfg.resolve_every, margins_fn, table, broadcast)

    return make


def _broadcast_from_main(obj):
    """`obj` as the main process has it, on every process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    box = [obj if PartialState().is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]
