"""A synthetic preference task with a known gold reward.

Prompts are `n_words` words over a vocabulary of V words (w0 … w{V-1}); a good
answer "translates" each prompt word through a hidden permutation m and keeps
the order. The gold reward is graded, so few pairs tie:

    r*(x, y) = (1/L) Σ_j [1 − d(y_j, m(x_j)) / (V/2)],   d = circular distance of word indices

(1 for a perfect answer, about 0.5 for random words; answers have a fixed
length L, so length carries no signal). The SFT policy is a tiny Llama trained
on answers whose words are right with probability `sft_correct` and otherwise
random, so it samples diverse answers and has room to improve. "Human" labels
come from Bradley–Terry on r* with temperature `bt_temperature`, then a
fraction `flip_rate` of them is flipped.

`prepare_task(out_dir, seed, size, flip_rate)` writes everything a run needs and
caches it (a finished task is never rebuilt unless `force`).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from typing import Dict, List

SIZES = {
    # labelled pool, prompt pool, test prompts, SFT examples, SFT epochs
    "tiny": dict(labelled=2048, prompts=1024, test=256, sft_examples=4096, sft_epochs=4),
    "test": dict(labelled=256, prompts=256, test=64, sft_examples=1024, sft_epochs=4),
}


@dataclass(frozen=True)
class TaskSpec:
    seed: int = 0
    size: str = "tiny"
    vocab: int = 16
    n_words: int = 3
    sft_correct: float = 0.3
    bt_temperature: float = 0.05
    flip_rate: float = 0.0
    quality_weight: float = 0.5
    hidden_size: int = 64
    num_layers: int = 2
    version: int = 2

    def words(self) -> List[str]:
        return [f"w{i}" for i in range(self.vocab)]

    def mapping(self) -> List[int]:
        perm = list(range(self.vocab))
        random.Random(10_000 + self.seed).shuffle(perm)
        return perm

    def quality(self) -> List[float]:
        """A hidden quality of each answer word, evenly spread over [0, 1]."""
        q = [i / (self.vocab - 1) for i in range(self.vocab)]
        random.Random(20_000 + self.seed).shuffle(q)
        return q


def _idx(word: str) -> int:
    return int(word[1:])


def gold_reward(spec: TaskSpec, prompt: str, response: str) -> float:
    """r*(x, y) = (1 − q)·(graded agreement with the hidden translation of the
    prompt) + q·(hidden quality of the answer's words), q = quality_weight."""
    m = spec.mapping()
    qual = spec.quality()
    xs = prompt.split()
    ys = response.split()
    half = spec.vocab / 2
    total = 0.0
    for j, x in enumerate(xs):
        if j >= len(ys) or not ys[j].startswith("w") or not ys[j][1:].isdigit() or _idx(ys[j]) >= spec.vocab:
            continue  # a missing or malformed word earns nothing
        d = abs(_idx(ys[j]) - m[_idx(x)])
        total += (1 - spec.quality_weight) * (1.0 - min(d, spec.vocab - d) / half) + spec.quality_weight * qual[
            _idx(ys[j])
        ]
    return total / len(xs)


def _prompt(rng: random.Random, spec: TaskSpec) -> str:
    return " ".join(f"w{rng.randrange(spec.vocab)}" for _ in range(spec.n_words))


def _answer(rng: random.Random, spec: TaskSpec, prompt: str, p_correct: float) -> str:
    m = spec.mapping()
    return " ".join(
        f"w{m[_idx(x)]}" if rng.random() < p_correct else f"w{rng.randrange(spec.vocab)}" for x in prompt.split()
    )


def messages(prompt: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def answer_message(text: str) -> List[Dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def label_pairs(spec: TaskSpec, rng: random.Random, prompt: str, a: str, b: str) -> dict:
    """A labelled pair: Bradley–Terry on r* at the spec's temperature, then a flip with prob flip_rate."""
    ra, rb = gold_reward(spec, prompt, a), gold_reward(spec, prompt, b)
    p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / spec.bt_temperature))
    a_wins = rng.random() < p_a
    flipped = rng.random() < spec.flip_rate
    if flipped:
        a_wins = not a_wins
    chosen, rejected = (a, b) if a_wins else (b, a)
    return {
        "prompt": messages(prompt),
        "chosen": answer_message(chosen),
        "rejected": answer_message(rejected),
        "chosen_gold": gold_reward(spec, prompt, chosen),
        "rejected_gold": gold_reward(spec, prompt, rejected),
        "flipped": flipped,
    }


def sft(spec: TaskSpec, out_dir: str) -> str:
    """Trains the SFT policy with a plain torch loop and saves it (safetensors + tokenizer)."""
    import torch

    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    sz = SIZES[spec.size]
    rng = random.Random(spec.seed)
    tok = build_tokenizer(spec.words())
    model = tiny_llama(tok, hidden_size=spec.hidden_size, num_layers=spec.num_layers, seed=spec.seed)
    torch.manual_seed(spec.seed)
    seqs, masks = [], []
    for _ in range(sz["sft_examples"]):
        p = _prompt(rng, spec)
        a = _answer(rng, spec, p, spec.sft_correct)
        prompt_ids = tok.apply_chat_template(messages(p), add_generation_prompt=True, tokenize=True)
        full_ids = tok.apply_chat_template(messages(p) + answer_message(a), tokenize=True)
        if hasattr(prompt_ids, "keys"):
            prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
        seqs.append(full_ids)
        masks.append([0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids)))
    ids = torch.tensor(seqs)  # fixed length: every prompt and answer has n_words words
    mask = torch.tensor(masks)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    bs = 64
    for _ in range(sz["sft_epochs"]):
        perm = torch.randperm(len(ids))
        for s in range(0, len(ids), bs):
            b = perm[s : s + bs]
            labels = ids[b].masked_fill(mask[b] == 0, -100)
            loss = model(input_ids=ids[b], labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return save_pretrained(model, tok, out_dir)


def prepare_task(out_dir, seed: int = 0, size: str = "tiny", flip_rate: float = 0.0, force: bool = False) -> dict:
    """Builds (or finds) the task in `out_dir`; returns the paths:
    sft_model (dir), preferences (.jsonl: prompt, chosen, rejected as chat
    messages, chosen_gold, rejected_gold, flipped), prompts (.jsonl: prompt),
    test_prompts (.jsonl: prompt), task (task.json: the spec)."""
    if size not in SIZES:
        raise ValueError(f"size: must be one of {sorted(SIZES)}, got {size!r}")
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate: must be in [0, 1], got {flip_rate}")
    spec = TaskSpec(seed=seed, size=size, flip_rate=flip_rate)
    out_dir = os.fspath(out_dir)
    paths = {
        "sft_model": os.path.join(out_dir, "sft"),
        "preferences": os.path.join(out_dir, "preferences.jsonl"),
        "prompts": os.path.join(out_dir, "prompts.jsonl"),
        "test_prompts": os.path.join(out_dir, "test_prompts.jsonl"),
        "task": os.path.join(out_dir, "task.json"),
    }
    record = {**asdict(spec), "sizes": SIZES[size]}
    if not force and os.path.exists(paths["task"]):
        with open(paths["task"]) as f:
            if json.load(f) == record:
                return paths
    os.makedirs(out_dir, exist_ok=True)
    sz = SIZES[size]
    rng = random.Random(1_000 + seed)
    prefs = []
    for _ in range(sz["labelled"]):
        p = _prompt(rng, spec)
        a, b = _answer(rng, spec, p, spec.sft_correct), _answer(rng, spec, p, spec.sft_correct)
        prefs.append(label_pairs(spec, rng, p, a, b))
    from ssapo.io import write_json, write_jsonl

    write_jsonl(paths["preferences"], prefs)
    write_jsonl(paths["prompts"], [{"prompt": messages(_prompt(rng, spec))} for _ in range(sz["prompts"])])
    write_jsonl(paths["test_prompts"], [{"prompt": messages(_prompt(rng, spec))} for _ in range(sz["test"])])
    sft(spec, paths["sft_model"])
    write_json(paths["task"], record)  # last: marks the task complete
    return paths


def load_spec(task_json: str) -> TaskSpec:
    with open(task_json) as f:
        record = json.load(f)
    record.pop("sizes", None)
    return TaskSpec(**record)
