"""A synthetic preference task with a known gold reward.

Prompts are `n_words` words over a vocabulary of V words (w0 … w{V-1}); a good
answer "translates" each prompt word through a hidden permutation m and keeps
the order. The gold reward is graded, so few pairs tie:

    r*(x, y) = (1/L) Σ_{j<L} [(1 − q)(1 − d(y_j, m(x_j)) / (V/2)) + q·u(y_j)]  +  λ · min(n(y), C) / L

d = circular distance of word indices, u = a hidden quality of each word
(evenly spread over [0, 1]), q = quality_weight, L = n_words. The first term is
1 for a perfect answer (q = 0), about 0.5 for random words; a missing word earns
nothing, words past L count for nothing in it. The second is a length bonus: λ =
`length_weight` per L words of the vocabulary the answer emits, right or wrong
and past L too, up to C = `length_cap` words (0: C = L). With λ = 0 (the default)
it is absent and r* is the first term alone. With λ > 0 and C > L a policy that
pads its answers gains gold reward without being any more right: the LC win rate
(ssapo.bench.metrics.win_rates) tells that from quality.

The SFT policy is a tiny Llama trained on answers whose words are right with
probability `sft_correct` and otherwise random, so it samples diverse answers
and has room to improve; with `short_answer_rate` > 0 that fraction of its (and
the labelled pool's) answers is cut to 1..L−1 words, and with
`long_answer_rate` > 0 that fraction (of the rest) gets 1..C−L random words
appended, so answer length varies and matters. "Human" labels come from
Bradley–Terry on r* with temperature `bt_temperature`, then a fraction
`flip_rate` of them is flipped.

Two scales: the sizes "tiny" and "test" (16 words, 3-word prompts, a 2-layer
hidden-64 model, no length term) and "medium" (SIZE_SPECS: 256 words, 8-word
prompts, a 4-layer hidden-128 model, SFT words right with probability 0.8,
answers cut short or padded, and a length bonus up to 2L words). `prepare_task`'s design overrides either.

`prepare_task(out_dir, seed, size, flip_rate, design)` writes everything a run
needs and caches it (a finished task is never rebuilt unless `force`). The
prompts of the test set, the validation set (every tuning choice), the labelled
pool (the seed) and the round pool are disjoint: one sample without
replacement from the vocab^n_words possible prompts, cut into four slices. The
SFT model and the unlabelled files do not depend on the flip rate, so one task
directory serves every flip rate (preferences_flip<r>.jsonl per rate; the
flipped rows of a lower rate are flipped at every higher one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

SIZES = {
    # labelled pool, round prompt pool, validation prompts, test prompts, SFT examples, SFT epochs
    "tiny": dict(labelled=2048, prompts=1024, val=256, test=256, sft_examples=4096, sft_epochs=4),
    "test": dict(labelled=256, prompts=256, val=64, test=64, sft_examples=1024, sft_epochs=4),
    # the second scale (SIZE_SPECS["medium"]); 3584 prompts of 256^8
    "medium": dict(labelled=2048, prompts=1024, val=256, test=256, sft_examples=4096, sft_epochs=5),
}
SIZE_KEYS = ("labelled", "prompts", "val", "test", "sft_examples", "sft_epochs")
# TaskSpec fields a size sets (a design's own keys win): the second scale's vocabulary, answer length, model and
# length term; "tiny" and "test" keep TaskSpec's defaults
SIZE_SPECS = {
    "medium": dict(
        vocab=256,
        n_words=8,
        # at 0.3 (the tiny task's) the 4-layer model learnt no translation in 8192 examples x 4 epochs (4 minutes
        # here; its samples' word accuracy 0.2 %), at 0.6 none in 4096 x 5 on seed 0 (4 %); at 0.8 its samples'
        # word accuracy is 79 % (gold 0.85 against 0.75 for random 8-word answers) in 4096 x 5, 93 s on one core
        sft_correct=0.8,
        hidden_size=128,
        num_layers=4,
        short_answer_rate=0.25,
        long_answer_rate=0.25,
        length_weight=0.25,
        length_cap=16,
    ),
}
# fields added after version 3: left out of task.json at their defaults, so the record of a task that does not
# use them (every tiny/test task) stays byte-identical and its cache valid
_OPTIONAL_FIELDS = {"long_answer_rate": 0.0, "length_weight": 0.0, "length_cap": 0, "sft_near": 0}


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
    short_answer_rate: float = 0.0  # SFT/pool answers cut to 1..n_words-1 words with this probability
    # the SFT model's sampler never emits the chat markup (<user>, <assistant>, <s>, <pad>, <unk>) inside an
    # answer, as a chat model's sampler never emits its template's special tokens as content
    suppress_markup: bool = False
    hidden_size: int = 64
    num_layers: int = 2
    version: int = 3
    # the length term (module docstring): λ per n_words emitted words, up to length_cap words (0: n_words)
    length_weight: float = 0.0
    length_cap: int = 0
    long_answer_rate: float = 0.0  # SFT/pool answers padded with 1..length_cap-n_words random words
    # > 0: an SFT/pool word that is not right is a near miss, drawn from the 2·sft_near words at circular
    # distance 1..sft_near from the translation (0: any word of the vocabulary)
    sft_near: int = 0

    def cap(self) -> int:
        """C: the most words the length bonus pays for."""
        return self.length_cap or self.n_words

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


def _is_word(spec: TaskSpec, w: str) -> bool:
    return w.startswith("w") and w[1:].isdigit() and _idx(w) < spec.vocab


def length_bonus(spec: TaskSpec, response: str) -> float:
    """λ · min(n(y), C) / L: length_weight per n_words words of the vocabulary in the answer, right or
    wrong, up to C = spec.cap() words."""
    if not spec.length_weight:
        return 0.0
    n = sum(_is_word(spec, w) for w in response.split())
    return spec.length_weight * min(n, spec.cap()) / spec.n_words


def gold_reward(spec: TaskSpec, prompt: str, response: str) -> float:
    """r*(x, y) = (1 − q)·(graded agreement with the hidden translation of the
    prompt) + q·(hidden quality of the answer's words), q = quality_weight, each
    averaged over the prompt's L words; plus `length_bonus` when length_weight > 0."""
    m = spec.mapping()
    qual = spec.quality()
    xs = prompt.split()
    ys = response.split()
    half = spec.vocab / 2
    total = 0.0
    for j, x in enumerate(xs):
        if j >= len(ys) or not _is_word(spec, ys[j]):
            continue  # a missing or malformed word earns nothing
        d = abs(_idx(ys[j]) - m[_idx(x)])
        total += (1 - spec.quality_weight) * (1.0 - min(d, spec.vocab - d) / half) + spec.quality_weight * qual[
            _idx(ys[j])
        ]
    if spec.length_weight:
        return total / len(xs) + length_bonus(spec, response)
    return total / len(xs)


def _prompt(rng: random.Random, spec: TaskSpec) -> str:
    return " ".join(f"w{rng.randrange(spec.vocab)}" for _ in range(spec.n_words))


def _wrong(rng: random.Random, spec: TaskSpec, right: int) -> str:
    """A word that is not (necessarily) right: any word, or with sft_near > 0 a near miss of `right`."""
    if spec.sft_near <= 0:
        return f"w{rng.randrange(spec.vocab)}"
    d = rng.randrange(1, spec.sft_near + 1) * (1 if rng.random() < 0.5 else -1)
    return f"w{(right + d) % spec.vocab}"


def _answer(rng: random.Random, spec: TaskSpec, prompt: str, p_correct: float) -> str:
    m = spec.mapping()
    words = [f"w{m[_idx(x)]}" if rng.random() < p_correct else _wrong(rng, spec, m[_idx(x)]) for x in prompt.split()]
    if spec.short_answer_rate > 0 and rng.random() < spec.short_answer_rate:
        words = words[: rng.randrange(1, len(words))] if len(words) > 1 else words
    elif spec.long_answer_rate > 0 and spec.cap() > len(words) and rng.random() < spec.long_answer_rate:
        words += [f"w{rng.randrange(spec.vocab)}" for _ in range(rng.randrange(1, spec.cap() - len(words) + 1))]
    return " ".join(words)


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


def sft(spec: TaskSpec, out_dir: str, sizes: Optional[dict] = None) -> str:
    """Trains the SFT policy with a plain torch loop and saves it (safetensors + tokenizer);
    `sizes` (default SIZES[spec.size]) gives sft_examples and sft_epochs. Its prompts are
    drawn from every possible prompt (test ones included): SFT is the task's π_init, not
    the preference training the benchmark measures."""
    import torch

    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    sz = sizes or SIZES[spec.size]
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
    width = max(map(len, seqs))
    ragged = any(len(q) != width for q in seqs)  # short answers (short_answer_rate): right-padded
    attn = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
    ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q in seqs])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    bs = 64
    for _ in range(sz["sft_epochs"]):
        perm = torch.randperm(len(ids))
        for s in range(0, len(ids), bs):
            b = perm[s : s + bs]
            labels = ids[b].masked_fill(mask[b] == 0, -100)
            loss = model(input_ids=ids[b], attention_mask=attn[b] if ragged else None, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    if spec.suppress_markup:
        from ssapo.tiny import SPECIAL

        markup = [t for t in SPECIAL if t != tok.eos_token]
        model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(markup)
    return save_pretrained(model, tok, out_dir)


def prompt_of(spec: TaskSpec, i: int) -> str:
    """The i-th of the vocab^n_words possible prompts (word j = digit j of i in base vocab)."""
    words = []
    for _ in range(spec.n_words):
        i, d = divmod(i, spec.vocab)
        words.append(f"w{d}")
    return " ".join(words)


def prompt_partition(spec: TaskSpec, sizes: dict) -> Dict[str, List[str]]:
    """Disjoint prompt sets {"test", "val", "labelled", "prompts"} of the sizes given: one
    sample without replacement from every possible prompt (seeded by the spec's seed),
    cut in that order. ValueError naming `design` when the prompt space is too small."""
    space = spec.vocab**spec.n_words
    order = ("test", "val", "labelled", "prompts")
    need = sum(int(sizes[k]) for k in order)
    if need > space:
        raise ValueError(
            f"design: {need} distinct prompts needed (test + val + labelled + prompts), but vocab^n_words = "
            f"{spec.vocab}^{spec.n_words} = {space}; raise vocab or n_words, or lower the sizes"
        )
    rng = random.Random(30_000 + spec.seed)
    if space <= sys.maxsize:
        idx = rng.sample(range(space), need)
    else:  # too large for range's len (256^8 = 2^64): distinct draws, rejecting repeats
        seen, idx = set(), []
        while len(idx) < need:
            i = rng.randrange(space)
            if i not in seen:
                seen.add(i)
                idx.append(i)
    out, s = {}, 0
    for k in order:
        out[k] = [prompt_of(spec, i) for i in idx[s : s + int(sizes[k])]]
        s += int(sizes[k])
    return out


def preferences_file(out_dir: str, flip_rate: float) -> str:
    name = "preferences.jsonl" if flip_rate == 0 else f"preferences_flip{flip_rate:g}.jsonl"
    return os.path.join(os.fspath(out_dir), name)


def labelled_rows(spec: TaskSpec, prompts: List[str], flip_rate: float) -> List[dict]:
    """The labelled pool: two SFT-like answers per prompt, Bradley–Terry labels on the gold
    reward, then a fraction flip_rate of them turned around. The answers and BT draws do not
    depend on the flip rate, and row i is flipped when u_i < flip_rate for one fixed uniform
    u_i, so the rows flipped at 10 % are flipped at 25 % too."""
    rng = random.Random(1_000 + spec.seed)
    flips = random.Random(5_000 + spec.seed)
    clean = dataclasses.replace(spec, flip_rate=0.0)
    rows = []
    for p in prompts:
        a, b = _answer(rng, spec, p, spec.sft_correct), _answer(rng, spec, p, spec.sft_correct)
        r = label_pairs(clean, rng, p, a, b)
        if flips.random() < flip_rate:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            r["chosen_gold"], r["rejected_gold"] = r["rejected_gold"], r["chosen_gold"]
            r["flipped"] = True
        rows.append(r)
    return rows


def gold_rows(spec: TaskSpec, prompts: List[str]) -> List[dict]:
    """Pairs labelled by the gold reward itself (no Bradley–Terry noise, no flips; gold ties
    dropped): the data of the "DPO on gold labels for every pair" oracle."""
    rng = random.Random(7_000 + spec.seed)
    rows = []
    for p in prompts:
        a, b = _answer(rng, spec, p, spec.sft_correct), _answer(rng, spec, p, spec.sft_correct)
        ga, gb = gold_reward(spec, p, a), gold_reward(spec, p, b)
        if ga == gb:
            continue
        c, r = (a, b) if ga > gb else (b, a)
        rows.append(
            {
                "prompt": messages(p),
                "chosen": answer_message(c),
                "rejected": answer_message(r),
                "chosen_gold": max(ga, gb),
                "rejected_gold": min(ga, gb),
                "flipped": False,
            }
        )
    return rows


def prepare_task(
    out_dir,
    seed: int = 0,
    size: str = "tiny",
    flip_rate: float = 0.0,
    force: bool = False,
    design: Optional[dict] = None,
) -> dict:
    """Builds (or finds) the task in `out_dir`; returns the paths:
    sft_model (dir), preferences (.jsonl at this flip rate: prompt, chosen, rejected as
    chat messages, chosen_gold, rejected_gold, flipped), gold_preferences (.jsonl: the
    labelled pool's and the round pool's prompts, each with a pair labelled by gold),
    prompts (.jsonl: the round pool), val_prompts and test_prompts (.jsonl: prompt), task
    (task.json: the spec and sizes). `design` overrides TaskSpec fields and SIZES keys
    (e.g. {"vocab": 20, "prompts": 2048}). The SFT model and every file but the
    preferences are shared by all flip rates."""
    if size not in SIZES:
        raise ValueError(f"size: must be one of {sorted(SIZES)}, got {size!r}")
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate: must be in [0, 1], got {flip_rate}")
    design = dict(design or {})
    fields = {f.name for f in dataclasses.fields(TaskSpec)} - {"seed", "size", "flip_rate", "version"}
    bad = sorted(set(design) - fields - set(SIZE_KEYS))
    if bad:
        raise ValueError(f"design: unknown keys {bad}; known: {sorted(fields | set(SIZE_KEYS))}")
    sizes = {**SIZES[size], **{k: int(v) for k, v in design.items() if k in SIZE_KEYS}}
    spec = TaskSpec(
        seed=seed, size=size, **{**SIZE_SPECS.get(size, {}), **{k: v for k, v in design.items() if k in fields}}
    )
    out_dir = os.fspath(out_dir)
    paths = {
        "sft_model": os.path.join(out_dir, "sft"),
        "preferences": preferences_file(out_dir, flip_rate),
        "gold_preferences": os.path.join(out_dir, "gold_preferences.jsonl"),
        "prompts": os.path.join(out_dir, "prompts.jsonl"),
        "val_prompts": os.path.join(out_dir, "val_prompts.jsonl"),
        "test_prompts": os.path.join(out_dir, "test_prompts.jsonl"),
        "task": os.path.join(out_dir, "task.json"),
    }
    from ssapo.io import write_json, write_jsonl

    record = task_record(spec, sizes)
    built = False
    if not force and os.path.exists(paths["task"]):
        with open(paths["task"]) as f:
            built = json.load(f) == record
    if not built:
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(out_dir):  # another design's preferences must not survive
            if name.startswith("preferences"):
                os.remove(os.path.join(out_dir, name))
        part = prompt_partition(spec, sizes)
        write_jsonl(paths["gold_preferences"], gold_rows(spec, part["labelled"] + part["prompts"]))
        write_jsonl(paths["prompts"], [{"prompt": messages(p)} for p in part["prompts"]])
        write_jsonl(paths["val_prompts"], [{"prompt": messages(p)} for p in part["val"]])
        write_jsonl(paths["test_prompts"], [{"prompt": messages(p)} for p in part["test"]])
        write_jsonl(
            os.path.join(out_dir, "labelled_prompts.jsonl"), [{"prompt": messages(p)} for p in part["labelled"]]
        )
        sft(spec, paths["sft_model"], sizes)
        write_json(paths["task"], record)  # last: marks the task complete
    if not os.path.exists(paths["preferences"]):
        from ssapo.io import read_jsonl

        labelled = [r["prompt"][0]["content"] for r in read_jsonl(os.path.join(out_dir, "labelled_prompts.jsonl"))]
        write_jsonl(paths["preferences"], labelled_rows(spec, labelled, flip_rate))
    return paths


def task_record(spec: TaskSpec, sizes: dict) -> dict:
    """task.json's content: the spec (its fields added after version 3 only where they differ from their
    defaults) and the sizes."""
    rec = asdict(spec)
    for k, default in _OPTIONAL_FIELDS.items():
        if rec[k] == default:
            del rec[k]
    return {**rec, "sizes": sizes}


def load_spec(task_json: str) -> TaskSpec:
    with open(task_json) as f:
        record = json.load(f)
    record.pop("sizes", None)
    return TaskSpec(**record)
