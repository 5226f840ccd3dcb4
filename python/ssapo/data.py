"""Preference data and prompt pools, from a local file or directory or a hub
id, normalised to `datasets.Dataset`s with the columns the loop expects.

Preference schema (UltraFeedback-binarized): `prompt`, `chosen`, `rejected`,
each a string or a chat-message list; if `prompt` is missing and `chosen` is a
message list, the prompt is `chosen[:-1]` and the completions their last turn.
Extra columns (gold scores, ids) are kept.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple


def _load_any(src: str, arg: str):
    import datasets

    if os.path.isdir(src):
        try:
            return datasets.load_from_disk(src)
        except FileNotFoundError:
            pass
    if os.path.exists(src):
        ext = os.path.splitext(src)[1].lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}.get(ext)
        if kind is None:
            raise ValueError(f"{arg}: unknown file type {ext!r} of {src} (use .jsonl, .json, .parquet, .arrow or a directory)")
        return datasets.load_dataset(kind, data_files=src, split="train")
    if src.startswith((".", "/")) or src.endswith((".jsonl", ".json", ".parquet", ".arrow")):
        raise ValueError(f"{arg}: no such file or directory: {src}")
    return datasets.load_dataset(src, split="train")  # a hub id: the normal datasets call


def _split_messages(row):
    """prompt = chosen[:-1] when the data carries whole conversations."""
    if isinstance(row["chosen"], list) and row["chosen"] and isinstance(row["chosen"][0], dict):
        return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
    raise ValueError("preference_data: has no 'prompt' column and 'chosen' is not a chat-message list")


def load_preferences(src: str):
    """Labelled pairs with columns prompt, chosen, rejected (+ extras)."""
    ds = _load_any(src, "preference_data")
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        ds = ds["train"]
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise ValueError(f"preference_data: missing column(s) {missing} in {src} (columns: {ds.column_names})")
    if "prompt" not in ds.column_names:
        ds = ds.map(_split_messages)
    if len(ds) == 0:
        raise ValueError(f"preference_data: {src} holds no rows")
    return ds


def load_prompts(src: str):
    """A prompt pool with a `prompt` column (or pairs, whose prompts are used)."""
    ds = _load_any(src, "prompt_data")
    if "prompt" not in ds.column_names:
        if "chosen" in ds.column_names:
            ds = ds.map(_split_messages)
        else:
            raise ValueError(f"prompt_data: missing column 'prompt' in {src} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise ValueError(f"prompt_data: {src} holds no rows")
    return ds.select_columns(["prompt"])


def prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_seed_and_rounds(prefs, round_sizes: List[int], seed_size: int, seed: int, prompts=None) -> Tuple[object, List[object], Dict[str, int]]:
    """The paper's split: shuffle with `seed`; the first `seed_size` pairs are
    the labelled seed; the rounds take consecutive blocks of prompts (from
    `prompts` when given, else from the pairs after the seed, labels dropped).
    Prompts seen in the seed or an earlier round are skipped and counted."""
    prefs = prefs.shuffle(seed=seed)
    if len(prefs) < seed_size:
        raise ValueError(f"seed_size: {seed_size} seed pairs requested but preference_data has {len(prefs)}")
    seed_ds = prefs.select(range(seed_size))
    pool = prompts.shuffle(seed=seed) if prompts is not None else prefs.select(range(seed_size, len(prefs)))
    seen = {prompt_key(p) for p in seed_ds["prompt"]}
    need = sum(round_sizes)
    picked, dup = [], 0
    for i, p in enumerate(pool["prompt"]):
        k = prompt_key(p)
        if k in seen:
            dup += 1
            continue
        seen.add(k)
        picked.append(i)
        if len(picked) == need:
            break
    if len(picked) < need:
        raise ValueError(
            f"round_sizes: {need} fresh prompts needed for rounds {round_sizes}, but the pool has only {len(picked)} "
            f"after the {seed_size} seed pairs ({dup} duplicates skipped)"
        )
    rounds, s = [], 0
    for n in round_sizes:
        rounds.append(pool.select(picked[s : s + n]).select_columns(["prompt"]))
        s += n
    return seed_ds, rounds, {"duplicates_skipped": dup}
