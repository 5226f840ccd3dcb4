"""The SSAPO loop: seed DPO, then rounds of annotate → follow → lead.

    from ssapo.config import load_config
    from ssapo.loop import run
    run(load_config("tiny", overrides={"output_dir": "runs/tiny"}))

Every step writes its outputs atomically into DIR (see docs/ARCHITECTURE.md)
and then records itself in DIR/state.json; `resume=True` skips the steps
recorded there, so a killed run continues where it stopped and loses nothing
that was written. Rounds chain from the checkpoint actually written
(round_<t-1>/model), never from a name guessed in advance.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

from ssapo.config import RunConfig
from ssapo.io import atomic_write, read_jsonl, write_json, write_jsonl


class State:
    """DIR/state.json: the steps completed so far, in order. Under several
    processes only the main one writes; `mark` is also the barrier after a step."""

    def __init__(self, out: str, resume: bool):
        from accelerate import PartialState

        self.procs = PartialState()
        self.path = os.path.join(out, "state.json")
        self.done: List[str] = []
        if resume and os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)["done"]

    @property
    def main(self) -> bool:
        return self.procs.is_main_process

    def __contains__(self, step: str) -> bool:
        return step in self.done

    def mark(self, step: str) -> None:
        self.done.append(step)
        if self.main:
            write_json(self.path, {"done": self.done})
        self.procs.wait_for_everyone()


def resolve_model(cfg: RunConfig, out: str) -> Dict[str, Any]:
    """π_init and the data sources; the tiny preset builds its task first."""
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


def _load(path: str, cfg: RunConfig):
    from ssapo.tiny import load

    return load(path, trust_remote_code=cfg.trust_remote_code, dtype="bfloat16" if cfg.bf16 else None)


def train_stage(cfg: RunConfig, policy: str, reference: Optional[str], rows: List[dict], lr: float, epochs: float,
                leader_loss: str, save_to: str, work_dir: str, spa_lambda: float = 0.5) -> Dict[str, Any]:
    """Trains `policy` on `rows` against `reference` (None: the policy's own
    start) and writes the checkpoint to `save_to` (safetensors, atomically)."""
    from datasets import Dataset

    from ssapo.tiny import save_pretrained
    from ssapo.trainer import SSAPOConfig, SSAPOTrainer

    model, tok = _load(policy, cfg)
    ref_model = _load(reference, cfg)[0] if reference and reference != policy else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = max(1, cfg.batch_size // (cfg.per_device_train_batch_size * world))
    keep = ["prompt", "chosen", "rejected"] + [c for c in ("shift", "mass", "weight") if c in rows[0]]
    ds = Dataset.from_list([{k: r[k] for k in keep} for r in rows])
    args = SSAPOConfig(
        output_dir=work_dir, learning_rate=lr, num_train_epochs=epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size, gradient_accumulation_steps=accum,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio, beta=cfg.beta, seed=cfg.seed,
        data_seed=cfg.seed, bf16=cfg.bf16, use_cpu=cfg.use_cpu, report_to=cfg.report_to,
        logging_steps=cfg.logging_steps, save_strategy="no", save_total_limit=cfg.save_total_limit, max_length=cfg.max_length,
        leader_loss=leader_loss, clamp_min=cfg.clamp_min, gradient_checkpointing=cfg.gradient_checkpointing,
        precompute_ref_log_probs=True, disable_tqdm=False, spa_alpha=cfg.spa_alpha, spa_lambda=spa_lambda,
        spa_quantile=cfg.spa_quantile, spa_window=cfg.spa_window, spa_warmup_ratio=cfg.spa_warmup_ratio,
    )
    peft_config = None
    if cfg.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=_modules(cfg.lora_target_modules), task_type="CAUSAL_LM")
    trainer = SSAPOTrainer(model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok,
                           peft_config=peft_config)
    trainer.train()
    stats, steps = trainer.leader_stats, trainer.state.global_step
    trained = trainer.model
    if cfg.use_peft:
        trained = trained.merge_and_unload()
    if trainer.accelerator.is_main_process:
        save_pretrained(trained, tok, save_to)
    del trainer, model, ref_model
    return {**stats, "steps": steps, "pairs": len(rows)}


def _modules(spec: str):
    """peft's target_modules: "all-linear" or a comma-separated list of names."""
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def gold_stats(task: Optional[dict], rows: List[dict]) -> Dict[str, float]:
    """Annotation accuracy against the gold reward (the tiny task only)."""
    if not task or not rows:
        return {}
    from ssapo.bench.task import gold_reward, load_spec

    spec = load_spec(task["task"])
    text = lambda m: m if isinstance(m, str) else m[-1]["content"]  # noqa: E731
    right = tie = 0
    for r in rows:
        p = text(r["prompt"])
        gc, gr = gold_reward(spec, p, text(r["chosen"])), gold_reward(spec, p, text(r["rejected"]))
        right += gc > gr
        tie += gc == gr
    n = len(rows)
    return {"gold_accuracy": right / n, "gold_tie_fraction": tie / n, "gold_accuracy_untied": right / max(n - tie, 1)}


def sera_round(cfg: RunConfig, rows: List[dict], policy_path: str, before_path: Optional[str], init_path: str,
               seed: int):
    """SeRA's round, as specified in REFERENCE.md §2b [our choices marked]:
    1. implicit-reward margin of each self-annotated pair under π_{t−1} (vs π_init),
       ensembled with γ with the margin under the model before it [choice: γ role
       'ensemble'; before round 2 that model is π_init, whose margin is 0];
    2. keep the top `sera_keep` fraction, largest margin first;
    3. bootstrap: `sera_num_samples` responses per kept prompt from π_{t−1}
       (temperature, top-p `sera_top_p`), best vs worst by implicit reward
       [choice: sampled from π_{t−1}, the policy the round starts from; not
       filtered again]; with γ role 'mix' they are a γ share of the training set;
    4. train DPO on kept ∪ bootstrapped (the caller)."""
    import random

    from ssapo import annotate

    policy, tok = _load(policy_path, cfg)
    init_model, _ = _load(init_path, cfg)
    m = [r["margin"] for r in rows]
    if cfg.sera_gamma_role == "ensemble" and before_path is not None and cfg.sera_gamma > 0:
        before, _ = _load(before_path, cfg)
        ids = lambda key: [tok(r[key][-1]["content"] if not isinstance(r[key], str) else r[key],  # noqa: E731
                               add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
        prompts = [r["prompt"] for r in rows]
        ch, rj = ids("chosen"), ids("rejected")
        mb = (annotate.sequence_logps(before, tok, prompts, ch) - annotate.sequence_logps(init_model, tok, prompts, ch)
              - annotate.sequence_logps(before, tok, prompts, rj) + annotate.sequence_logps(init_model, tok, prompts, rj))
        m = [(1 - cfg.sera_gamma) * a + cfg.sera_gamma * b for a, b in zip(m, mb.tolist())]
    order = sorted(range(len(rows)), key=lambda i: (-m[i], i))
    kept = [rows[i] for i in order[: max(1, round(cfg.sera_keep * len(rows)))]]
    boot, bstats = annotate.annotate(
        policy, init_model, tok, [r["prompt"] for r in kept], cfg.sera_num_samples, cfg.temperature, cfg.sera_top_p,
        cfg.max_new_tokens, cfg.generation_batch_size, seed=seed, backend=cfg.generation_backend,
        policy_path=policy_path,
    )
    if cfg.sera_gamma_role == "mix" and cfg.sera_gamma > 0:
        n_boot = min(len(boot), round(cfg.sera_gamma / (1 - cfg.sera_gamma) * len(kept)))
        boot = random.Random(seed).sample(boot, n_boot)
    return kept + boot, {"pairs_in": len(rows), "kept": len(kept), "bootstrapped": len(boot),
                         **{f"bootstrap_{k}": v for k, v in bstats.items()}}


# RunConfig fields the loop does not act on yet: a value other than the default
# is refused rather than silently ignored.
NOT_YET = {
    "tokenizer": None,
    "gradient_accumulation_steps": None,
    "annotation_reference": "init",
    "resolve_every": 0,
    "sera_pool": "round",
    "load_in_4bit": False,
}


def check_supported(cfg: RunConfig) -> None:
    for name, default in NOT_YET.items():
        if getattr(cfg, name, default) != default:
            raise ValueError(f"{name}: not supported by the loop yet; leave it at {default!r}")
    if cfg.sera_gamma_role == "threshold":
        raise ValueError("sera_gamma_role: 'threshold' is not implemented yet; use 'ensemble' or 'mix'")


def run(cfg: RunConfig, resume: bool = False) -> str:
    """Runs (or resumes) the whole loop; returns the output directory."""
    check_supported(cfg)
    import numpy as np

    from ssapo import annotate, follower, report
    from ssapo.data import load_preferences, load_prompts, split_seed_and_rounds

    out = os.path.abspath(cfg.output_dir)
    os.makedirs(out, exist_ok=True)
    state = State(out, resume)
    # self-annotation and the follower run once, on the main process, over all
    # pairs; the other processes wait and read the files it wrote, so the
    # follower's input and output do not depend on the number of processes.
    if state.main:
        atomic_write(os.path.join(out, "config.yaml"), lambda tmp: open(tmp, "w").write(cfg.to_yaml()))
        src = resolve_model(cfg, out)
    state.procs.wait_for_everyone()
    if not state.main:
        src = resolve_model(cfg, out)  # the task is built by now: this only finds it
    init = cfg.ref_model or src["init"]
    prefs = load_preferences(src["preference_data"])
    pool = load_prompts(src["prompt_data"]) if src["prompt_data"] else None
    seed_ds, rounds, split_stats = split_seed_and_rounds(prefs, cfg.round_sizes[: cfg.num_rounds], cfg.seed_size, cfg.seed, pool)

    # 0. seed: DPO from π_init on the labelled seed
    seed_model = os.path.join(out, "seed", "model")
    if "seed" not in state:
        t = time.time()
        stats = train_stage(cfg, src["init"], init, list(seed_ds), cfg.seed_learning_rate, cfg.seed_epochs, "dpo",
                            seed_model, os.path.join(out, "seed", "trainer"))
        if state.main:
            write_json(os.path.join(out, "seed", "metrics.json"), {"leader": stats, "split": split_stats, "seconds": time.time() - t})
        state.mark("seed")
    previous = seed_model
    if cfg.method == "dpo":
        return out

    for t in range(1, cfg.num_rounds + 1):
        rd = os.path.join(out, f"round_{t}")
        os.makedirs(rd, exist_ok=True)
        metrics_path = os.path.join(rd, "metrics.json")
        metrics: Dict[str, Any] = json.load(open(metrics_path)) if os.path.exists(metrics_path) else {}
        ann_path = os.path.join(rd, "annotations.jsonl")
        # a. annotate with π_{t-1}, reward against π_init
        if f"round_{t}/annotate" not in state and not state.main:
            state.mark(f"round_{t}/annotate")  # wait for the main process's annotations
        elif f"round_{t}/annotate" not in state:
            t0 = time.time()
            policy, tok = _load(previous, cfg)
            init_model, _ = _load(init, cfg)
            rows, stats = annotate.annotate(
                policy, init_model, tok, list(rounds[t - 1]["prompt"]), cfg.num_samples, cfg.temperature, cfg.top_p,
                cfg.max_new_tokens, cfg.generation_batch_size, seed=cfg.seed + t,
                backend=cfg.generation_backend, policy_path=previous,
            )
            if not rows:
                raise RuntimeError(f"round {t}: every prompt's responses tied; no pairs to train on")
            stats.update(gold_stats(src["task"], rows))
            write_jsonl(ann_path, rows)
            metrics["annotation"] = {**stats, "seconds": time.time() - t0}
            write_json(metrics_path, metrics)
            state.mark(f"round_{t}/annotate")
        rows = read_jsonl(ann_path)
        # b. follow: the worst case around the self-labels
        fol_path = os.path.join(rd, "follower.npz")
        if cfg.method == "ssapo" and f"round_{t}/follow" not in state and not state.main:
            state.mark(f"round_{t}/follow")
        elif cfg.method == "ssapo" and f"round_{t}/follow" not in state:
            t0 = time.time()
            cols, diag, res = follower.follow([r["margin"] for r in rows], cfg.eps, cfg.k, cfg.group_size,
                                              cfg.beta_follower, cfg.follower_space)

            def w(tmp, cols=cols, res=res):
                with open(tmp, "wb") as f:
                    np.savez(f, xi=cols["xi"], loc=res.loc, mass=res.mass, shift=res.shift, weights=res.weights,
                             lam=res.lam, budget_used=res.budget_used, group_sizes=res.group_sizes,
                             value=res.value, dual_value=res.dual_value, eps=res.eps)

            atomic_write(fol_path, w)
            metrics["follower"] = {**diag, "seconds": time.time() - t0}
            write_json(metrics_path, metrics)
            state.mark(f"round_{t}/follow")
        if cfg.method == "ssapo":
            z = np.load(fol_path)
            for i, r in enumerate(rows):
                r["shift"], r["mass"], r["weight"] = z["shift"][i].tolist(), z["mass"][i].tolist(), float(z["weights"][i])
            leader_loss = cfg.leader_loss
        elif cfg.method == "spa":
            leader_loss = "spa"
        else:
            leader_loss = "dpo"
        if cfg.method == "sera":
            sera_path = os.path.join(rd, "sera.jsonl")
            if f"round_{t}/sera" not in state and not state.main:
                state.mark(f"round_{t}/sera")
            elif f"round_{t}/sera" not in state:
                t0 = time.time()
                before = init if t == 1 else (seed_model if t == 2 else os.path.join(out, f"round_{t - 2}", "model"))
                sel, stats = sera_round(cfg, rows, previous, before if t > 1 else None, init, seed=cfg.seed + 100 + t)
                write_jsonl(sera_path, sel)
                metrics["sera"] = {**stats, **{f"kept_{k}": v for k, v in gold_stats(src["task"], sel).items()},
                                   "seconds": time.time() - t0}
                write_json(metrics_path, metrics)
                state.mark(f"round_{t}/sera")
            rows = read_jsonl(sera_path)
        # c. lead: π_θ and its reference start at π_{t-1} (or the reference is π_init)
        model_dir = os.path.join(rd, "model")
        if f"round_{t}/lead" not in state:
            t0 = time.time()
            reference = previous if cfg.round_reference == "previous" else init
            lam = cfg.spa_lambdas[min(t, len(cfg.spa_lambdas)) - 1]
            stats = train_stage(cfg, previous, reference, rows, cfg.learning_rate, cfg.epochs_per_round, leader_loss,
                                model_dir, os.path.join(rd, "trainer"), spa_lambda=lam)
            if state.main:
                metrics["leader"] = {**stats, "seconds": time.time() - t0, "loss": leader_loss}
                write_json(metrics_path, metrics)
                report.round_report(rd, t, metrics, rows)
            state.mark(f"round_{t}/lead")
        previous = model_dir
    return out
