"""The paper's seed / round / test split of checked input rows (`ssapo.inputs`), a run's DIR/data/, and the
fingerprint of what made it.

    prefs, checked = read_preferences(cfg.preference_data, tokenizer=tok, max_prompt_length=1024)
    seed, rounds, report = split_seed_and_rounds(prefs, 2000, [8000, 20000, 30000], seed=42, checked=[checked])
    write_run_data(cfg, "runs/x/data", tok)      # seed.jsonl, round_<t>.jsonl, heldout.jsonl, split.json
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

from ssapo.errors import ConfigError, InputError
from ssapo.inputs import COLUMNS, RULES, prompt_key, read_preferences, read_prompts, warn_dropped

# -- the split --


@dataclass
class Split:
    """The seed pairs, one prompt set per round, the counts, and the test rows.
    Unpacks as `seed, rounds, report = split`."""

    seed: Any
    rounds: List[Any]
    report: Dict[str, Any]
    test: Any = None

    def __iter__(self):
        return iter((self.seed, self.rounds, self.report))


class _Picker:
    """Walks rows in order, skipping (and counting) prompts already taken (a separate prompt pool's prompts
    that are seed prompts; within one checked source every prompt is distinct)."""

    def __init__(self):
        self.seen: set = set()
        self.skipped = 0

    def take(self, prompts: Sequence, start: int, n: int) -> tuple:
        picked, i = [], start
        while len(picked) < n and i < len(prompts):
            key = prompt_key(prompts[i])
            i += 1
            if key in self.seen:
                self.skipped += 1
                continue
            self.seen.add(key)
            picked.append(i - 1)
        return picked, i


def split_seed_and_rounds(ds, seed_size, round_sizes, seed: int = 42, prompts=None, checked=()) -> Split:
    """The paper's split (docs/METHOD.md §4.5) of pairs and a pool that
    `load_preferences` / `load_prompts` checked: shuffle the pairs with `seed`;
    the first `seed_size` pairs are the labelled seed; the rounds take
    consecutive blocks of `round_sizes` prompts after it (labels dropped), or
    from `prompts` (shuffled with the same seed) when a separate pool is given
    (its prompts that are seed prompts skipped); the labelled rows left over
    are the test set (prompts of a round dropped). The report:
    {"seed", "rounds", "test", "test_overlap_dropped", "pool_overlap_skipped",
     "dropped": {rule: rows dropped at load, all sources}, "inputs": {arg: Checked.report()}}
    for the `checked` records given. This is exactly rows [0, seed_size), then the blocks."""
    round_sizes = [int(n) for n in round_sizes]
    if seed_size < 1:
        raise ConfigError(f"seed_size: must be >= 1, got {seed_size}")
    if any(n < 1 for n in round_sizes):
        raise ConfigError(f"round_sizes: sizes must be >= 1, got {round_sizes}")
    for c in COLUMNS:
        if c not in ds.column_names:
            raise InputError(f"preference_data: missing column {c!r} (columns: {ds.column_names})")
    drops = ", ".join(f"{n} {rule}" for d in checked for rule, n in d.counts().items() if n)
    dropped = f"; dropped at load: {drops}" if drops else ""
    ds = ds.shuffle(seed=seed).flatten_indices()
    pick = _Picker()
    rows = ds["prompt"]
    seed_idx, end = pick.take(rows, 0, seed_size)
    if len(seed_idx) < seed_size:
        raise InputError(
            f"seed_size: {seed_size} seed pairs requested but preference_data has only {len(seed_idx)} "
            f"usable rows{dropped}"
        )
    need = sum(round_sizes)
    if prompts is None:
        pool, pool_rows, start, pool_name = ds, rows, end, "preference_data after the seed"
    else:
        if "prompt" not in prompts.column_names:
            raise InputError(f"prompt_data: missing column 'prompt' (columns: {prompts.column_names})")
        pool = prompts.shuffle(seed=seed).flatten_indices()
        pool_rows, start, pool_name = pool["prompt"], 0, "prompt_data"
    picked, pool_end = pick.take(pool_rows, start, need)
    if len(picked) < need:
        overlap = f"; {pick.skipped} are seed prompts" if pick.skipped else ""
        raise InputError(
            f"round_sizes: {need} prompts needed for rounds {round_sizes}, but {pool_name} has only "
            f"{len(picked)} usable{overlap}{dropped}; lower round_sizes or num_rounds, or give more prompts"
        )
    rounds, s = [], 0
    for n in round_sizes:
        rounds.append(pool.select(picked[s : s + n]).select_columns(["prompt"]))
        s += n
    rest = range(pool_end if prompts is None else end, len(ds))
    test_idx = [i for i in rest if prompt_key(rows[i]) not in pick.seen]
    total = {rule: sum(d.counts()[rule] for d in checked) for rule in RULES}
    report = {
        "seed": seed_size,
        "rounds": list(round_sizes),
        "test": len(test_idx),
        "test_overlap_dropped": len(rest) - len(test_idx),
        "pool_overlap_skipped": pick.skipped,
        "dropped": total,
        "inputs": {d.arg: d.report() for d in checked},
    }
    return Split(ds.select(seed_idx), rounds, report, ds.select(test_idx))


def write_run_data(cfg, d: str, tokenizer, heldout_pairs: int = 256) -> None:
    """A run's inputs, split once, in directory `d` (DIR/data/): seed.jsonl (the
    labelled seed pairs), round_<t>.jsonl (round t's prompts), heldout.jsonl
    (at most `heldout_pairs` labelled test pairs), split.json (the split's
    counts, written last: it marks the data complete). Every prompt is written
    as the model is shown it (the system turn cfg.system_turn asks for,
    `chat.prepare_prompts`), so training and scoring render what annotation
    renders. Sources: cfg.preference_data, cfg.prompt_data, each checked
    once here, for every role (seed, rounds, held-out), prompt lengths by
    `tokenizer` against cfg.max_prompt_length: the rows dropped are counted in
    split.json (its "dropped" and "inputs"), a refused source is an InputError."""
    from ssapo.chat import prepare_prompts
    from ssapo.io import write_json, write_jsonl

    counted = f" (counted in {os.path.join(d, 'split.json')})"
    prefs, checked = read_preferences(cfg.preference_data, tokenizer=tokenizer, max_prompt_length=cfg.max_prompt_length)
    warn_dropped(checked, counted)
    pool, checks = None, [checked]
    if cfg.prompt_data:
        pool, pool_checked = read_prompts(cfg.prompt_data, tokenizer=tokenizer, max_prompt_length=cfg.max_prompt_length)
        warn_dropped(pool_checked, counted)
        checks.append(pool_checked)
    split = split_seed_and_rounds(prefs, cfg.seed_size, cfg.round_sizes[: cfg.num_rounds], cfg.seed, pool, checks)

    def shown(rows):
        rows = [dict(r) for r in rows]
        for r, p in zip(rows, prepare_prompts([r["prompt"] for r in rows], tokenizer, cfg)):
            r["prompt"] = p
        return rows

    write_jsonl(os.path.join(d, "seed.jsonl"), shown(split.seed))
    for t, rnd in enumerate(split.rounds, start=1):
        write_jsonl(os.path.join(d, f"round_{t}.jsonl"), [{"prompt": p} for p in rnd["prompt"]])
    test = split.test
    held = shown(test.select(range(min(heldout_pairs, len(test))))) if test is not None else []
    write_jsonl(os.path.join(d, "heldout.jsonl"), held)
    write_json(os.path.join(d, "split.json"), split.report)


# -- what made a split (DIR/data/inputs.json, written by ssapo.loop.prepare) --

# the RunConfig fields that choose or render the split's rows (the tokenizer's model counts prompt lengths)
SPLIT_FIELDS = (
    "seed",
    "seed_size",
    "round_sizes",
    "num_rounds",
    "max_prompt_length",
    "max_length",
    "system_turn",
    "model",
    "tokenizer",
)


def _hash_file(h, path: str) -> int:
    with open(path, "rb") as f:
        n = 0
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return n


def source_digest(src: str) -> Dict[str, Any]:
    """The fingerprint of a data source's contents: {"source", "sha256", "bytes"} of a file, or of a
    directory's files (names and contents, in name order; datasets' own `cache-*` files and hidden files
    left out); {"source", "hub"} for a hub id, named by its id alone (its contents are not read here)."""
    import hashlib

    src = str(src)
    h = hashlib.sha256()
    if os.path.isfile(src):
        n = _hash_file(h, src)
    elif os.path.isdir(src):
        n = 0
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or name.startswith("cache-"):
                    continue
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, src).encode() + b"\0")
                n += _hash_file(h, path)
    else:
        return {"source": src, "hub": src}
    return {"source": os.path.abspath(src), "sha256": h.hexdigest(), "bytes": n}
