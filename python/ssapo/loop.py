"""The SSAPO loop (DESIGN.md §3): seed DPO, then rounds of annotate → follow → lead.

    from ssapo.config import load_config
    from ssapo.loop import run
    out = run(load_config("tiny", overrides={"output_dir": "runs/tiny"}))      # -> Path
    run(load_config("tiny", overrides={"output_dir": "runs/tiny"}), resume=True)

Steps, in order, each recorded in DIR/state.json once its outputs are written:
`seed` (DPO from π_init on the labelled seed → π_0 in seed/model), then for
t = 1..T: `round_t/annotate` (π_{t−1} samples `num_samples` responses per prompt
of round t, scored by log π_{t−1} − log π_ref with π_ref = π_init, or π_0 with
annotation_reference = 'seed' from round 2 on: in round 1 the policy is π_0 itself,
so round 1 always uses π_init), `round_t/follow` (ssapo only), `round_t/sera`
(sera only) and `round_t/lead` (the leader trains from π_{t−1} on this round's
pairs only, reference π_{t−1}, or π_init with round_reference = 'init'; then the
checkpoint, the held-out reward accuracy and the round report).

Every file is written to a temp name in its directory and renamed; a
checkpoint directory is written to a temp directory and renamed
(`ssapo.tiny.save_pretrained`). `resume=True` skips the steps recorded in
state.json, so a killed run continues where it stopped and loses nothing that
was written; the resumed run's outputs equal an uninterrupted run's (every
step is seeded from (seed, round), never from what ran before it in the
process). Rounds chain from the checkpoint actually written
(round_<t−1>/model), never from a name guessed in advance.

Methods (`method`):
- `ssapo`: the follower's atoms are attached to every pair; leader `leader_loss`
  (default `shift_prob`, the released code's).
- `dpo`: the seed stage only (π_0).
- `iterative-dpo`: self-annotation, no follower, plain DPO (REFERENCE.md §0).
- `spa`: self-annotation, SPA's leader (`leader_loss` "spa": de-coupled
  confidence, label smoothing of the least confident pairs) with
  λ_t = spa_lambdas[t−1] (the last value repeats).
- `sera`: see `sera_round` (REFERENCE.md §2b; our choices are marked there).

Processes (`accelerate launch --num_processes N`): annotation is shared out by
prompt chunks (each chunk has its own sampling seed, so the samples do not
depend on N) and gathered on the main process, which writes
annotations.jsonl; the follower runs once, on the main process, over every
pair (groups in the stable prompt order), and writes follower.npz; every
process then reads both files and attaches the atoms to the dataset before
training. So the follower's input and output do not depend on N. SeRA's
selection and bootstrap and the held-out evaluation run on the main process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ssapo.config import RunConfig
from ssapo.io import atomic_write, read_jsonl, write_json, write_jsonl

# fields that may change between a run and its resumption (they do not change results)
RESUME_MAY_DIFFER = {"output_dir", "report_to", "logging_steps", "accelerate_config", "save_total_limit"}
HELDOUT_PAIRS = 256  # held-out labelled pairs for the reward accuracy of each stage


class State:
    """DIR/state.json: {"done": [steps completed, in order], "last": the last
    one}. Under several processes only the main one writes; `mark` is also the
    barrier after a step."""

    def __init__(self, out: str, resume: bool):
        from accelerate import PartialState

        self.procs = PartialState()
        self.path = os.path.join(out, "state.json")
        self.done: List[str] = []
        if os.path.exists(self.path):
            if not resume:
                raise ValueError(f"output_dir: {out} already holds a run (state.json); pass --resume "
                                 "(resume=True) to continue it, or choose another directory")
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

    def wait(self) -> None:
        self.procs.wait_for_everyone()

    def __contains__(self, step: str) -> bool:
        return step in self.done

    def mark(self, step: str) -> None:
        self.done.append(step)
        if self.main:
            write_json(self.path, {"done": self.done, "last": step})
        self.wait()


def check_resumable(cfg: RunConfig, out: str) -> None:
    """On resume, the run's config.yaml must match `cfg` (but for the fields in RESUME_MAY_DIFFER)."""
    path = os.path.join(out, "config.yaml")
    if not os.path.exists(path):
        return
    old = RunConfig.from_yaml(path).to_dict()
    new = cfg.to_dict()
    diff = [f"{k} ({old.get(k)!r} → {new[k]!r})" for k in new if k not in RESUME_MAY_DIFFER and old.get(k) != new[k]]
    if diff:
        raise ValueError(f"config: resuming {out} with another configuration: {', '.join(diff)}; resume with the "
                         "run's config.yaml or start a new output_dir")


def resolve_model(cfg: RunConfig, out: str) -> Dict[str, Any]:
    """π_init and the data sources; the tiny preset builds (or finds) its task first."""
    if cfg.model == "tiny":
        from ssapo.bench.task import prepare_task

        task = prepare_task(cfg.task_dir or os.path.join(out, "task"), seed=cfg.seed, size=cfg.task_size,
                            flip_rate=cfg.task_flip_rate)
        return {
            "init": task["sft_model"],
            "preference_data": cfg.preference_data or task["preferences"],
            "prompt_data": cfg.prompt_data or task["prompts"],
            "task": task,
        }
    if not cfg.preference_data:
        raise ValueError("preference_data: needed for a model other than the tiny preset")
    return {"init": cfg.model, "preference_data": cfg.preference_data, "prompt_data": cfg.prompt_data, "task": None}


def _tokenizer(cfg: RunConfig, path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load(path: str, cfg: RunConfig, device=None, train: bool = False):
    """(model, tokenizer) from a checkpoint (safetensors). `train` with
    load_in_4bit: the 4-bit base for a LoRA adapter (bitsandbytes, GPU)."""
    from ssapo.tiny import load

    if train and cfg.load_in_4bit:
        import torch
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": PartialState().local_process_index},
                                                     trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
        return model, _tokenizer(cfg, path)
    model, tok = load(path, trust_remote_code=cfg.trust_remote_code, dtype="bfloat16" if cfg.bf16 else None)
    if cfg.tokenizer:
        tok = _tokenizer(cfg, path)
    if device is not None:
        model = model.to(device)
    return model, tok


def _modules(spec: str):
    """peft's target_modules: "all-linear" or a comma-separated list of names."""
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def _response_ids(tok, message) -> List[int]:
    text = message if isinstance(message, str) else message[-1]["content"]
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def pair_margins(model, reference, tok, rows: List[dict], batch_size: int = 32, ref_logps=None):
    """Implicit-reward margins [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]
    of labelled rows (chosen/rejected as text or messages; end-of-sequence appended).
    `ref_logps` (the reference's (chosen, rejected) log-probs) skips the reference."""
    from ssapo.annotate import sequence_logps

    prompts = [r["prompt"] for r in rows]
    ch = [_response_ids(tok, r["chosen"]) for r in rows]
    rj = [_response_ids(tok, r["rejected"]) for r in rows]
    if ref_logps is None:
        ref_logps = (sequence_logps(reference, tok, prompts, ch, batch_size),
                     sequence_logps(reference, tok, prompts, rj, batch_size))
    lw, ll = sequence_logps(model, tok, prompts, ch, batch_size), sequence_logps(model, tok, prompts, rj, batch_size)
    return (lw - ref_logps[0]) - (ll - ref_logps[1]), ref_logps


def _atom_trainer_class():
    """SSAPOTrainer that reads each pair's atoms from a mutable table by
    `pair_index` (the re-solve hook replaces the table's rows mid-round)."""
    from ssapo.trainer import SSAPOTrainer

    class ResolvingTrainer(SSAPOTrainer):
        atom_table: Dict[str, Any] = {}

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


def train_stage(cfg: RunConfig, policy: str, reference: Optional[str], rows: List[dict], lr: float, epochs: float,
                leader_loss: str, save_to: str, work_dir: str, spa_lambda: float = 0.5,
                resolve: Optional[Callable] = None) -> Dict[str, Any]:
    """Trains `policy` on `rows` against `reference` (None or the policy's own
    path: the policy's start, with peft the adapter-disabled model) with
    SSAPOTrainer and writes the checkpoint to `save_to` (safetensors,
    atomically; a LoRA adapter is merged first). `resolve(trainer, rows)`
    (ssapo with resolve_every) returns a follower.Resolver for the round.
    Returns trainer.leader_stats plus steps and pairs."""
    from datasets import Dataset

    from ssapo.tiny import save_pretrained
    from ssapo.trainer import SSAPOConfig, SSAPOTrainer

    from accelerate import PartialState

    procs = PartialState()
    model, tok = _load(policy, cfg, train=True)
    ref_model = _load(reference, cfg)[0] if reference and reference != policy else None
    keep = ["prompt", "chosen", "rejected"] + [c for c in ("shift", "mass", "weight") if c in rows[0]]
    data = [{k: r[k] for k in keep} for r in rows]
    if resolve is not None:
        for i, d in enumerate(data):
            d["pair_index"] = i
    ds = Dataset.from_list(data)
    args = SSAPOConfig(
        output_dir=work_dir, learning_rate=lr, num_train_epochs=epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.accumulation_steps(procs.num_processes),
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio, beta=cfg.beta, seed=cfg.seed,
        data_seed=cfg.seed, bf16=cfg.bf16, use_cpu=cfg.use_cpu, report_to=cfg.report_to,
        logging_steps=cfg.logging_steps, save_strategy="no", save_total_limit=cfg.save_total_limit,
        max_length=cfg.max_length, leader_loss=leader_loss, clamp_min=cfg.clamp_min,
        gradient_checkpointing=cfg.gradient_checkpointing, precompute_ref_log_probs=True, disable_tqdm=False,
        spa_alpha=cfg.spa_alpha, spa_lambda=spa_lambda, spa_quantile=cfg.spa_quantile, spa_window=cfg.spa_window,
        spa_warmup_ratio=cfg.spa_warmup_ratio,
    )
    peft_config = None
    if cfg.use_peft:
        from peft import LoraConfig

        if cfg.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=_modules(cfg.lora_target_modules), task_type="CAUSAL_LM")
    cls = _atom_trainer_class() if resolve is not None else SSAPOTrainer
    trainer = cls(model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok,
                  peft_config=peft_config)
    resolver = None
    if resolve is not None:
        resolver = resolve(trainer, rows)
        trainer.data_collator = _TableCollator(trainer.data_collator, resolver.table)
        trainer.add_callback(resolver.callback())
    trainer.train()
    stats, steps = dict(trainer.leader_stats), trainer.state.global_step
    if resolver is not None:
        stats["resolves"] = resolver.history
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.use_peft and cfg.load_in_4bit:
        trained = _merge_4bit(trained, policy, cfg, work_dir, procs.is_main_process)
    elif cfg.use_peft:
        trained = trained.merge_and_unload()
    if procs.is_main_process:
        save_pretrained(trained, tok, save_to)
    procs.wait_for_everyone()
    del trainer, model, ref_model, trained
    if procs.is_main_process:
        shutil.rmtree(work_dir, ignore_errors=True)  # save_strategy "no": nothing of value there
    _free()
    return {**stats, "steps": steps, "pairs": len(rows)}


def _merge_4bit(peft_model, base_path: str, cfg: RunConfig, work_dir: str, main: bool):
    """A LoRA adapter trained on a 4-bit base, merged into the bfloat16 base
    (merging into 4-bit weights would round them)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = os.path.join(work_dir, "adapter")
    if main:
        peft_model.save_pretrained(adapter)
    from accelerate import PartialState

    PartialState().wait_for_everyone()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16, use_safetensors=True,
                                                trust_remote_code=cfg.trust_remote_code)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload()


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gold_stats(task: Optional[dict], rows: List[dict]) -> Dict[str, float]:
    """Annotation accuracy against the gold reward (the tiny task only); also
    sets each row's chosen_gold / rejected_gold."""
    if not task or not rows:
        return {}
    from ssapo.bench.task import gold_reward, load_spec

    spec = load_spec(task["task"])
    text = lambda m: m if isinstance(m, str) else m[-1]["content"]  # noqa: E731
    right = tie = 0
    for r in rows:
        p = text(r["prompt"])
        gc, gr = gold_reward(spec, p, text(r["chosen"])), gold_reward(spec, p, text(r["rejected"]))
        r["chosen_gold"], r["rejected_gold"] = gc, gr
        right += gc > gr
        tie += gc == gr
    n = len(rows)
    return {"gold_accuracy": right / n, "gold_tie_fraction": tie / n, "gold_accuracy_untied": right / max(n - tie, 1)}


def heldout_accuracy(cfg: RunConfig, model_path: str, init_path: str, rows: List[dict]) -> Dict[str, float]:
    """Reward accuracy on held-out labelled pairs: the fraction whose implicit
    reward log π/π_init ranks the labelled chosen above the rejected (ties
    count as wrong, and are counted)."""
    if not rows:
        return {}
    import torch

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() and not cfg.use_cpu else "cpu"
    model, tok = _load(model_path, cfg, device)
    init_model, _ = _load(init_path, cfg, device)
    m, _ = pair_margins(model, init_model, tok, rows, batch_size=max(8, cfg.generation_batch_size))
    del model, init_model
    _free()
    m = m.numpy()
    return {"heldout_reward_accuracy": float((m > 0).mean()), "heldout_ties": int((m == 0).sum()),
            "heldout_pairs": len(rows), "heldout_margin_mean": float(m.mean()), "seconds": time.time() - t0}


def sera_round(cfg: RunConfig, rows: List[dict], policy_path: str, before_path: Optional[str], init_path: str,
               seed: int, device=None):
    """SeRA's round (REFERENCE.md §2b [CHOICE] spec; SeRA's Algorithm 1 is
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
    Returns (training rows, stats)."""
    import random

    from ssapo import annotate

    policy, tok = _load(policy_path, cfg, device)
    init_model, _ = _load(init_path, cfg, device)
    bs = max(8, cfg.generation_batch_size)
    m = pair_margins(policy, init_model, tok, rows, bs)[0].tolist() if rows else []
    if cfg.sera_gamma_role == "ensemble" and before_path is not None and cfg.sera_gamma > 0:
        before, _ = _load(before_path, cfg, device)
        mb = pair_margins(before, init_model, tok, rows, bs)[0].tolist()
        del before
        m = [(1 - cfg.sera_gamma) * a + cfg.sera_gamma * b for a, b in zip(m, mb)]
    elif cfg.sera_gamma_role == "ensemble" and cfg.sera_gamma > 0:
        m = [(1 - cfg.sera_gamma) * a for a in m]
    order = sorted(range(len(rows)), key=lambda i: (-m[i], i))
    kept = [{**rows[i], "irm": m[i]} for i in order[: max(1, round(cfg.sera_keep * len(rows)))]]
    boot_ds, bstats = annotate.annotate(
        policy, init_model, tok, [r["prompt"] for r in kept], cfg, n=cfg.sera_num_samples, top_p=cfg.sera_top_p,
        seed=seed, policy_path=policy_path, progress=False,
    )
    boot = boot_ds.to_list()
    if cfg.sera_gamma_role == "threshold":
        boot = [b for b in boot if cfg.beta * b["margin"] > cfg.sera_gamma]
    if cfg.sera_gamma_role == "mix" and cfg.sera_gamma > 0:
        n_boot = min(len(boot), round(cfg.sera_gamma / (1 - cfg.sera_gamma) * len(kept)))
        boot = random.Random(seed).sample(boot, n_boot)
    del policy, init_model
    _free()
    keys = ("prompt", "chosen", "rejected", "margin")
    sel = [{k: r[k] for k in keys if k in r} for r in kept] + [{k: b[k] for k in keys} for b in boot]
    return sel, {"pairs_in": len(rows), "kept": len(kept), "bootstrapped": len(boot),
                 "kept_irm_min": float(min(r["irm"] for r in kept)) if kept else 0.0,
                 **{f"bootstrap_{k}": v for k, v in bstats.items() if not isinstance(v, str)}}


def _annotate_step(cfg: RunConfig, state: State, rd: str, policy_path: str, ref_path: str, prompts: List,
                   seed: int) -> Optional[tuple]:
    """Self-annotation shared out over the processes by prompt chunks; returns
    (rows in prompt order, stats) on the main process, None elsewhere."""
    from ssapo import annotate

    vllm = annotate.use_vllm(cfg.generation_backend)
    world = 1 if vllm else state.world
    rows: List[dict] = []
    stats: Dict[str, Any] = {}
    if state.rank < world:
        device = state.procs.device if not cfg.use_cpu else "cpu"
        policy, tok = _load(policy_path, cfg, None if vllm else device)
        ref, _ = _load(ref_path, cfg, None if vllm else device)
        rows, stats = annotate.annotate_rows(policy, ref, tok, prompts, cfg, seed=seed, policy_path=policy_path,
                                             rank=state.rank, world=world)
        del policy, ref
        _free()
    if world == 1:
        return (rows, stats) if state.main else None
    shard_dir = os.path.join(rd, "annotate_shards")
    write_json(os.path.join(shard_dir, f"rank_{state.rank}.json"), {"rows": rows, "stats": stats})
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


def run(cfg: RunConfig, resume: bool = False) -> Path:
    """Runs (or, with `resume`, continues) the whole loop; returns the output directory."""
    from ssapo import annotate, follower, report
    from ssapo.data import load_preferences, load_prompts, split_seed_and_rounds

    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    state = State(out, resume)
    if resume:
        check_resumable(cfg, out)
    # the main process writes the config and builds the task (tiny preset); the others then find it
    if state.main:
        atomic_write(os.path.join(out, "config.yaml"), lambda tmp: Path(tmp).write_text(cfg.to_yaml()))
        src = resolve_model(cfg, out)
    state.wait()
    if not state.main:
        src = resolve_model(cfg, out)
    init = cfg.ref_model or src["init"]
    tok = _tokenizer(cfg, src["init"])
    prefs = load_preferences(src["preference_data"])
    pool = load_prompts(src["prompt_data"]) if src["prompt_data"] else None
    split = split_seed_and_rounds(prefs, cfg.seed_size, cfg.round_sizes[: cfg.num_rounds], cfg.seed, pool,
                                  tokenizer=tok, max_prompt_length=cfg.max_prompt_length)
    heldout = list(split.test.select(range(min(HELDOUT_PAIRS, len(split.test))))) if split.test is not None else []
    accuracy: List[Optional[float]] = []  # held-out reward accuracy of π_0, π_1, ...

    # 0. seed: DPO from π_init on the labelled seed → π_0
    seed_dir = os.path.join(out, "seed")
    seed_model = os.path.join(seed_dir, "model")
    if "seed" not in state:
        t0 = time.time()
        stats = train_stage(cfg, src["init"], init, list(split.seed), cfg.seed_learning_rate, cfg.seed_epochs, "dpo",
                            seed_model, os.path.join(seed_dir, "trainer"))
        if state.main:
            ev = heldout_accuracy(cfg, seed_model, init, heldout)
            write_json(os.path.join(seed_dir, "metrics.json"),
                       {"leader": stats, "split": split.report, "eval": ev, "seconds": time.time() - t0})
        state.mark("seed")
    accuracy.append(_read_metrics(os.path.join(seed_dir, "metrics.json")).get("eval", {}).get("heldout_reward_accuracy"))
    previous = seed_model
    if cfg.method == "dpo":
        return Path(out)
    device = state.procs.device if not cfg.use_cpu else "cpu"

    for t in range(1, cfg.num_rounds + 1):
        rd = os.path.join(out, f"round_{t}")
        os.makedirs(rd, exist_ok=True)
        metrics_path = os.path.join(rd, "metrics.json")
        metrics = _read_metrics(metrics_path)
        ann_path = os.path.join(rd, "annotations.jsonl")
        # a. annotate with π_{t−1}; reward against π_init (or π_0, from round 2 on: in round 1 the
        #    policy is π_0 itself and log π_0 − log π_0 would score every response 0)
        ann_kind = "seed" if cfg.annotation_reference == "seed" and t > 1 else "init"
        ann_ref = seed_model if ann_kind == "seed" else init
        if f"round_{t}/annotate" not in state:
            t0 = time.time()
            got = _annotate_step(cfg, state, rd, previous, ann_ref, list(split.rounds[t - 1]["prompt"]), cfg.seed + t)
            if state.main:
                rows, stats = got
                if not rows:
                    raise RuntimeError(f"round {t}: every prompt's responses tied; no pairs to train on")
                stats = annotate.finish_stats(stats, rows)
                stats.update(gold_stats(src["task"], rows))
                write_jsonl(ann_path, [{k: v for k, v in r.items() if k != "index"} for r in rows])
                metrics = {"annotation": {**stats, "reference": ann_kind, "seconds": time.time() - t0}}
                write_json(metrics_path, metrics)
            state.mark(f"round_{t}/annotate")
            metrics = _read_metrics(metrics_path)
        rows = read_jsonl(ann_path)
        # b. follow: the worst case around the self-labels (main process, every pair)
        fol_path = os.path.join(rd, "follower.npz")
        if cfg.method == "ssapo" and f"round_{t}/follow" not in state:
            if state.main:
                margins = [r["margin"] for r in rows]
                cols, diag = follower.follow(margins, cfg)
                follower.save(fol_path, cols, diag, margins)
                metrics["follower"] = diag
                write_json(metrics_path, metrics)
            state.mark(f"round_{t}/follow")
            metrics = _read_metrics(metrics_path)
        if cfg.method == "ssapo":
            rows = follower.attach(rows, follower.load(fol_path))
            leader_loss = cfg.leader_loss
        elif cfg.method == "spa":
            leader_loss = "spa"
        else:
            leader_loss = "dpo"
        if cfg.method == "sera":
            sera_path = os.path.join(rd, "sera.jsonl")
            if f"round_{t}/sera" not in state:
                if state.main:
                    t0 = time.time()
                    pool_rows = rows
                    if cfg.sera_pool == "cumulative":
                        pool_rows = [dict(r) for r in split.seed] + [
                            r for s in range(1, t) for r in read_jsonl(os.path.join(out, f"round_{s}", "annotations.jsonl"))
                        ] + rows
                    before = None
                    if t > 1:
                        before = seed_model if t == 2 else os.path.join(out, f"round_{t - 2}", "model")
                    sel, stats = sera_round(cfg, pool_rows, previous, before, init, seed=cfg.seed + 100 + t,
                                            device=device)
                    write_jsonl(sera_path, sel)
                    gs = gold_stats(src["task"], [dict(r) for r in sel])
                    metrics["sera"] = {**stats, **{f"selected_{k}": v for k, v in gs.items()},
                                       "seconds": time.time() - t0}
                    write_json(metrics_path, metrics)
                state.mark(f"round_{t}/sera")
                metrics = _read_metrics(metrics_path)
            rows = read_jsonl(sera_path)
        # c. lead: π_θ starts at π_{t−1}; reference π_{t−1} (or π_init)
        model_dir = os.path.join(rd, "model")
        if f"round_{t}/lead" not in state:
            t0 = time.time()
            reference = previous if cfg.round_reference == "previous" else init
            lam = cfg.spa_lambdas[min(t, len(cfg.spa_lambdas)) - 1]
            resolve = None
            if cfg.method == "ssapo" and cfg.resolve_every > 0:
                resolve = _resolver_factory(cfg, ann_ref, state)
            stats = train_stage(cfg, previous, reference, rows, cfg.learning_rate, cfg.num_train_epochs_per_round,
                                leader_loss, model_dir, os.path.join(rd, "trainer"), spa_lambda=lam, resolve=resolve)
            if state.main:
                metrics["leader"] = {**stats, "seconds": time.time() - t0, "loss": leader_loss,
                                     "reference": cfg.round_reference, **({"spa_lambda": lam} if leader_loss == "spa" else {})}
                metrics["eval"] = heldout_accuracy(cfg, model_dir, init, heldout)
                metrics["seconds"] = sum(v.get("seconds", 0.0) for v in metrics.values() if isinstance(v, dict))
                write_json(metrics_path, metrics)
                report.round_report(rd, t, metrics, rows, accuracy + [metrics["eval"].get("heldout_reward_accuracy")])
            state.mark(f"round_{t}/lead")
        accuracy.append(_read_metrics(metrics_path).get("eval", {}).get("heldout_reward_accuracy"))
        previous = model_dir
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
            m, cache["ref"] = pair_margins(model, ref, tok, rows, max(8, cfg.generation_batch_size), cache.get("ref"))
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
