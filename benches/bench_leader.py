"""One leader step (SSAPOTrainer, shift_prob) against one plain trl DPOTrainer
step on the same tiny model, batch and data, side by side in one run.

    python benches/bench_leader.py [--steps 40] [--rounds 5] [--out benches/results/leader.md]

Each round trains both trainers for `steps` optimizer steps (alternating which
goes first); a callback times every step (forward, backward, optimizer); the
first 5 steps of each run are warm-up and dropped. Reported: the median step
time of each over all rounds, their ratio (target <= 1.05), and the ratio of
medians within each round (its spread shows the machine's noise).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from ssapo.tiny import build_tokenizer, tiny_args, tiny_llama  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def data(n, words):
    import random

    rng = random.Random(0)
    rows = []
    for _i in range(n):
        p = " ".join(rng.choice(words) for _ in range(8))
        c = " ".join(rng.choice(words) for _ in range(12))
        r = " ".join(rng.choice(words) for _ in range(12))
        rows.append(
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": r}],
                "shift": [0.0, 0.3],
                "mass": [0.8, 0.2],
            }
        )
    return rows


def one(kind, steps, batch, rows, tok, out):
    timer = StepTimer()
    model = tiny_llama(tok, hidden_size=128, num_layers=2, seed=0)
    common = dict(  # over ssapo.tiny.tiny_args' CPU defaults (data_seed unset, as trl's default)
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1000,
        data_seed=None,
        precompute_ref_log_probs=True,
    )
    if kind == "ssapo":
        tr = SSAPOTrainer(
            model,
            args=tiny_args(SSAPOConfig, out, leader_loss="shift_prob", **common),
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[timer],
        )
    else:
        plain = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        tr = DPOTrainer(
            model,
            args=tiny_args(DPOConfig, out, **common),
            train_dataset=Dataset.from_list(plain),
            processing_class=tok,
            callbacks=[timer],
        )
    tr.train()
    return timer.times[5:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "leader.md"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    words = [f"t{i}" for i in range(200)]
    tok = build_tokenizer(words)
    rows = data(a.steps * a.batch, words)
    times = {"ssapo": [], "dpo": []}
    per_round = []
    load0 = os.getloadavg()[0]
    for r in range(a.rounds):
        order = ["ssapo", "dpo"] if r % 2 == 0 else ["dpo", "ssapo"]
        got = {}
        for kind in order:
            got[kind] = one(kind, a.steps, a.batch, rows, tok, f"/tmp/bench_leader_{kind}")
            times[kind] += got[kind]
        per_round.append(statistics.median(got["ssapo"]) / statistics.median(got["dpo"]))
    load1 = os.getloadavg()[0]
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = ms["ssapo"] / ms["dpo"]
    import transformers
    import trl

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    doc = f"""# One leader step: SSAPOTrainer vs trl DPOTrainer

Measured {datetime.date.today()} on {cpu} ({os.cpu_count()} cores, load average {load0:.1f} before and
{load1:.1f} after: other sessions share this machine), CPU only, 1 torch thread, torch {torch.__version__},
transformers {transformers.__version__}, trl {trl.__version__}, in one run of

    python benches/bench_leader.py --steps {a.steps} --rounds {a.rounds} --batch {a.batch}

Tiny Llama (hidden 128, 2 layers), batch {a.batch} pairs of 8-word prompts and 12-word responses, reference
log-probabilities precomputed for both; {a.rounds} alternating rounds of {a.steps} steps each, first 5 steps dropped.

| trainer | median step | steps timed |
|---|---|---|
| trl DPOTrainer (sigmoid) | {ms["dpo"]:.2f} ms | {len(times["dpo"])} |
| SSAPOTrainer (shift_prob, per-pair atoms) | {ms["ssapo"]:.2f} ms | {len(times["ssapo"])} |
| ratio SSAPO / DPO | {ratio:.3f} | target <= 1.05 |

Ratio of the two medians within each round: {", ".join(f"{x:.3f}" for x in per_round)}
(median {statistics.median(per_round):.3f}).

The SSAPO step does what the DPO step does (one policy forward and backward with trl's fused LM head, reference
log-probabilities read from the batch) plus the per-pair atoms: a (B, 2) tensor built in the collator, the
clamped-shift loss on B pairs, and the clamp count (one host sync per micro-batch).
"""
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        f.write(doc)
    os.replace(a.out + ".tmp", a.out)
    print(doc)


if __name__ == "__main__":
    main()
