"""Preference data and prompt pools, from a local file or directory or a hub
id, normalised to `datasets.Dataset`s with the columns the loop expects, and
the paper's seed / round / test split.

    prefs = load_preferences("argilla/ultrafeedback-binarized-preferences-cleaned")
    seed, rounds, report = split_seed_and_rounds(prefs, 2000, [8000, 20000, 30000], seed=42)

Sources: `.jsonl` / `.json` (JSON lines or one array of objects), `.parquet`,
`.arrow`, `.csv`, a `save_to_disk` directory (a Dataset or a DatasetDict), a
directory of data files, or a hub id (`id` or `id:split`) read through
`datasets.load_dataset` (nothing else downloads; offline, a missing id is a
ValueError).

Preference schema (UltraFeedback-binarized): `prompt`, `chosen`, `rejected`.
Either all strings, or chat-message lists. When `chosen` is a whole
conversation (the argilla and HuggingFaceH4 copies: user turn + answer), the
prompt becomes `chosen[:-1]` and chosen / rejected their last message, which is
also how a missing `prompt` column is filled. A string prompt with one-message
answers becomes `[{"role": "user", "content": prompt}]`. Extra columns (gold
scores, ids) are kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from ssapo.config import ConfigError
from ssapo.io import InputError

COLUMNS = ("prompt", "chosen", "rejected")
_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


# -- loading --


def _pick_split(dd, split: str, src: str, arg: str):
    if split in dd:
        return dd[split]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise InputError(f"{arg}: {src} has no split {split!r} (splits: {', '.join(dd)}); name one as '{src}:<split>'")


def _load_any(src: str, arg: str, split: str = "train"):
    import datasets

    if not src or not str(src).strip():
        raise InputError(f"{arg}: empty source; give a file, a directory or a hub id")
    src = str(src)
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, "dataset_info.json")) or os.path.exists(
            os.path.join(src, "dataset_dict.json")
        ):
            state = os.path.join(src, "state.json")
            if os.path.isfile(state) and json.load(open(state)).get("_data_files") == []:
                raise InputError(f"{arg}: {src} holds no rows")  # datasets cannot even open an empty save
            try:
                ds = datasets.load_from_disk(src)
            except Exception as e:
                raise InputError(f"{arg}: cannot read the saved dataset {src}: {type(e).__name__}: {e}") from None
            return _pick_split(ds, split, src, arg) if isinstance(ds, datasets.DatasetDict) else ds
        try:
            return _pick_split(datasets.load_dataset(src), split, src, arg)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
            raise InputError(f"{arg}: {src} holds no save_to_disk dataset and no data files ({e})") from None
    if os.path.isfile(src):
        ext = os.path.splitext(src)[1].lower()
        kind = _FILE_TYPES.get(ext)
        if kind is None:
            raise InputError(
                f"{arg}: unknown file type {ext!r} of {src} (use .jsonl, .json, .parquet, .arrow, .csv or a directory)"
            )
        if os.path.getsize(src) == 0:
            raise InputError(f"{arg}: {src} holds no rows")
        try:
            return datasets.load_dataset(kind, data_files=src, split="train")
        except Exception as e:
            if "corresponds to no data" in str(e):
                raise InputError(
                    f"{arg}: {src} holds no rows"
                ) from None  # a parse error of the user's file: say which file
            raise InputError(f"{arg}: cannot read {src} as {kind}: {type(e).__name__}: {e}") from None
    if src.startswith((".", "/", "~")) or os.path.splitext(src)[1].lower() in _FILE_TYPES or src.count("/") > 1:
        raise InputError(f"{arg}: no such file or directory: {src}")
    hub_id, _, hub_split = src.partition(":")
    try:
        ds = datasets.load_dataset(hub_id, split=hub_split or split)
    except Exception as e:
        raise InputError(
            f"{arg}: {src!r} is not a local file or directory and could not be loaded from the hub "
            f"({type(e).__name__}: {e})"
        ) from None
    return _pick_split(ds, split, src, arg) if isinstance(ds, datasets.DatasetDict) else ds


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], dict) and "content" in x[0]


def _user(text: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": text}]


def _normalise(batch: Dict[str, list], has_prompt: bool) -> Dict[str, list]:
    out = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(len(batch["chosen"])):
        p = batch["prompt"][i] if has_prompt else None
        c, r = batch["chosen"][i], batch["rejected"][i]
        if _is_messages(c) or _is_messages(r):
            if not (_is_messages(c) and _is_messages(r)):
                raise InputError(
                    "preference_data: 'chosen' and 'rejected' must both be strings or both chat-message "
                    f"lists (row {i} of a batch mixes them)"
                )
            if len(c) > 1:  # whole conversations: the shared turns are the prompt
                p, c, r = c[:-1], c[-1:], r[-1:]
            elif p is None:
                raise InputError("prompt: the data has no 'prompt' column and 'chosen' holds only the answer")
            elif isinstance(p, str):
                p = _user(p)
        elif isinstance(c, str) or c is None:
            if p is None and not has_prompt:
                raise InputError("preference_data: has no 'prompt' column and 'chosen' is not a chat-message list")
            if _is_messages(p):
                raise InputError(
                    "chosen: a string while 'prompt' is a chat-message list; give all three as messages "
                    "or all three as strings"
                )
        out["prompt"].append(p)
        out["chosen"].append(c)
        out["rejected"].append(r)
    return out


def load_preferences(src: str, split: str = "train"):
    """Labelled pairs with columns prompt, chosen, rejected (then the source's
    extra columns). ValueError naming the source or column when it cannot."""
    ds = _load_any(src, "preference_data", split)
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise InputError(f"preference_data: missing column(s) {missing} in {src} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise InputError(f"preference_data: {src} holds no rows")
    has_prompt = "prompt" in ds.column_names
    ds = ds.map(_normalise, batched=True, fn_kwargs={"has_prompt": has_prompt}, desc="normalising pairs")
    return ds.select_columns(list(COLUMNS) + [c for c in ds.column_names if c not in COLUMNS])


def load_prompts(src: str, split: str = "train"):
    """A prompt pool with one column, `prompt` (strings or chat messages). Pairs
    are accepted too: their prompts are used and their labels dropped."""
    ds = _load_any(src, "prompt_data", split)
    if len(ds) == 0:
        raise InputError(f"prompt_data: {src} holds no rows")
    if "chosen" in ds.column_names and "rejected" in ds.column_names:
        ds = ds.map(_normalise, batched=True, fn_kwargs={"has_prompt": "prompt" in ds.column_names})
    elif "prompt" not in ds.column_names:
        raise InputError(f"prompt_data: missing column 'prompt' in {src} (columns: {ds.column_names})")
    return ds.select_columns(["prompt"])


# -- the split --


def prompt_key(prompt) -> str:
    """One key per prompt, whether given as a string or as messages (a string
    is the same prompt as one user message holding it)."""
    if isinstance(prompt, str):
        prompt = _user(prompt)
    return json.dumps([[m.get("role"), m.get("content")] for m in prompt], ensure_ascii=False)


def _empty(x) -> bool:
    if x is None:
        return True
    if isinstance(x, str):
        return not x.strip()
    if isinstance(x, list):
        return len(x) == 0 or all(_empty(m.get("content")) if isinstance(m, dict) else _empty(m) for m in x)
    return False


def prompt_length(tokenizer, prompt) -> int:
    """Tokens of a prompt as the model sees it (the chat template with the
    generation prompt when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            prompt if not isinstance(prompt, str) else _user(prompt), add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
    text = prompt if isinstance(prompt, str) else "\n".join(str(m.get("content", "")) for m in prompt)
    return len(tokenizer(text)["input_ids"])


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
    """Walks rows in order, skipping (and counting) empty, duplicate and over-long prompts."""

    def __init__(self, tokenizer, max_prompt_length):
        self.seen: set = set()
        self.tokenizer, self.max_prompt_length = tokenizer, max_prompt_length
        self.counts = {"duplicates_skipped": 0, "too_long_skipped": 0, "empty_skipped": 0}

    def take(self, prompts: Sequence, start: int, n: int, extra_ok=None) -> tuple:
        picked, i = [], start
        while len(picked) < n and i < len(prompts):
            p = prompts[i]
            i += 1
            if _empty(p) or (extra_ok is not None and not extra_ok(i - 1)):
                self.counts["empty_skipped"] += 1
                continue
            key = prompt_key(p)
            if key in self.seen:
                self.counts["duplicates_skipped"] += 1
                continue
            if (
                self.tokenizer is not None
                and self.max_prompt_length
                and prompt_length(self.tokenizer, p) > self.max_prompt_length
            ):
                self.counts["too_long_skipped"] += 1
                continue
            self.seen.add(key)
            picked.append(i - 1)
        return picked, i


def split_seed_and_rounds(
    ds, seed_size, round_sizes, seed: int = 42, prompts=None, tokenizer=None, max_prompt_length: Optional[int] = None
) -> Split:
    """The paper's split (docs/METHOD.md §4.5): shuffle the pairs with `seed`; the
    first `seed_size` pairs are the labelled seed; the rounds take consecutive
    blocks of `round_sizes` prompts after it (labels dropped), or from
    `prompts` (shuffled with the same seed) when a separate pool is given; the
    labelled rows left over are the test set (prompts of the seed or a round
    dropped). Empty, duplicate and (with a tokenizer) over-long prompts are
    skipped and counted in the report:
    {"duplicates_skipped", "too_long_skipped", "empty_skipped",
     "seed", "rounds", "test", "test_overlap_dropped"}.
    With no skips this is exactly rows [0, seed_size), then the blocks."""
    round_sizes = [int(n) for n in round_sizes]
    if seed_size < 1:
        raise ConfigError(f"seed_size: must be >= 1, got {seed_size}")
    if any(n < 1 for n in round_sizes):
        raise ConfigError(f"round_sizes: sizes must be >= 1, got {round_sizes}")
    for c in COLUMNS:
        if c not in ds.column_names:
            raise InputError(f"preference_data: missing column {c!r} (columns: {ds.column_names})")
    ds = ds.shuffle(seed=seed).flatten_indices()
    pick = _Picker(tokenizer, max_prompt_length)
    labels_ok = lambda i, ch=ds["chosen"], rj=ds["rejected"]: not (_empty(ch[i]) or _empty(rj[i]))  # noqa: E731
    rows = ds["prompt"]
    seed_idx, end = pick.take(rows, 0, seed_size, labels_ok)
    if len(seed_idx) < seed_size:
        raise InputError(
            f"seed_size: {seed_size} seed pairs requested but preference_data has only {len(seed_idx)} "
            f"usable rows of {len(ds)} ({_skips(pick.counts)})"
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
        raise InputError(
            f"round_sizes: {need} prompts needed for rounds {round_sizes}, but {pool_name} has only "
            f"{len(picked)} usable ({_skips(pick.counts)}); lower round_sizes or num_rounds, or give more "
            "prompts"
        )
    rounds, s = [], 0
    for n in round_sizes:
        rounds.append(pool.select(picked[s : s + n]).select_columns(["prompt"]))
        s += n
    rest = range(pool_end if prompts is None else end, len(ds))
    test_idx = [i for i in rest if _empty(rows[i]) or prompt_key(rows[i]) not in pick.seen]
    report = {
        **pick.counts,
        "seed": seed_size,
        "rounds": list(round_sizes),
        "test": len(test_idx),
        "test_overlap_dropped": len(rest) - len(test_idx),
    }
    return Split(ds.select(seed_idx), rounds, report, ds.select(test_idx))


def _skips(counts: Dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items())


def write_run_data(cfg, d: str, tokenizer, heldout_pairs: int = 256) -> None:
    """A run's inputs, split once, in directory `d` (DIR/data/): seed.jsonl (the
    labelled seed pairs), round_<t>.jsonl (round t's prompts), heldout.jsonl
    (at most `heldout_pairs` labelled test pairs), split.json (the split's
    counts, written last: it marks the data complete). Every prompt is written
    as the model is shown it (the system turn cfg.system_turn asks for,
    `chat.prepare_prompts`), so training and scoring render what annotation
    renders. Sources: cfg.preference_data, cfg.prompt_data."""
    from ssapo.chat import prepare_prompts
    from ssapo.io import write_json, write_jsonl

    prefs = load_preferences(cfg.preference_data)
    pool = load_prompts(cfg.prompt_data) if cfg.prompt_data else None
    split = split_seed_and_rounds(
        prefs,
        cfg.seed_size,
        cfg.round_sizes[: cfg.num_rounds],
        cfg.seed,
        pool,
        tokenizer=tokenizer,
        max_prompt_length=cfg.max_prompt_length,
    )

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
