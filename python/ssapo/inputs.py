"""The input files: preference data and prompt pools, from a local file or
directory or a hub id, every row checked once (the input rules) and normalised
to `datasets.Dataset`s with the columns the loop expects. The split of these
rows into seed, rounds and test is `ssapo.data`'s.

    prefs = load_preferences("argilla/ultrafeedback-binarized-preferences-cleaned")
    prefs, checked = read_preferences("uf.jsonl", tokenizer=tok, max_prompt_length=1024)

Sources: `.jsonl` / `.json` (JSON lines, one array of objects, or one object
of columns), `.csv`, `.parquet`, `.arrow`, a `save_to_disk` directory (a
Dataset or a DatasetDict), a directory of data files, or a hub id (`id` or
`id:split`) read through `datasets.load_dataset` (nothing else downloads;
offline, a missing id is a ValueError). `.jsonl`, `.json` and `.csv` files
are read here (UTF-8; a problem is named by its 1-based line), the others
through `datasets` (named by the 0-based row index).

Preference schema (UltraFeedback-binarized): `prompt`, `chosen`, `rejected`.
Either all strings, or chat-message lists. When `chosen` is a whole
conversation (the argilla and HuggingFaceH4 copies: user turn + answer), the
prompt becomes `chosen[:-1]` and chosen / rejected their last message, which is
also how a missing `prompt` column is filled. A string prompt with one-message
answers becomes `[{"role": "user", "content": prompt}]`. Messages are
`{"role", "content"}` (ShareGPT's `{"from", "value"}` too); the roles human /
gpt / bot / model / chatbot are read as user / assistant (`ROLE_ALIASES`).
Extra columns (gold scores, ids) are kept.

Every row of every source is checked once, at load (`RULES`): a row that is
common in real data but unusable (a null or empty prompt / chosen / rejected,
chosen == rejected, a prompt seen before, a prompt longer than
max_prompt_length tokens when a tokenizer is given) is DROPPED and counted by
rule, with the first few line numbers in one warning line on stderr; a
problem of the file itself (bytes that are not UTF-8, a line that is not JSON,
a value of the wrong type, an unknown conversation role, string rows mixed
with conversation rows, a prompt spoken by the assistant or an answer by the
user) REFUSES the file: an `InputError` of one line naming the file and the
line. A file whose every row is dropped is refused too (nothing to learn).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ssapo.errors import InputError

COLUMNS = ("prompt", "chosen", "rejected")
_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_READ_HERE = {".jsonl", ".json", ".csv"}  # read line by line here; the others through `datasets`

# how a role is written in the wild -> the role the chat templates know (lower-cased before the look-up)
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatbot": "assistant",
    "system": "system",
}

# the rules that drop a row (counted in the split report by these names), in the order they are checked
RULES = {
    "null": "prompt, chosen or rejected is null or missing",
    "empty": "prompt, chosen or rejected is empty or whitespace",
    "chosen_equals_rejected": "chosen and rejected are the same answer",
    "duplicate_prompt": "the prompt was seen in an earlier row (the first is kept)",
    "too_long": "the prompt has more than max_prompt_length tokens",
}
SHOWN_LOCATIONS = 5  # line numbers per rule in the warning line


# -- reading: rows (dicts) and where each one is --


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _pick_split(dd, split: str, src: str, arg: str):
    if split in dd:
        return dd[split]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise InputError(f"{arg}: {src} has no split {split!r} (splits: {', '.join(dd)}); name one as '{src}:<split>'")


def _load_any(src: str, arg: str, split: str = "train"):
    """A `datasets.Dataset` of a directory, a .parquet / .arrow file or a hub id."""
    import datasets

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
                raise InputError(f"{arg}: cannot read the saved dataset {src}: {_one_line(e)}") from None
            return _pick_split(ds, split, src, arg) if isinstance(ds, datasets.DatasetDict) else ds
        try:
            return _pick_split(datasets.load_dataset(src), split, src, arg)
        except (FileNotFoundError, datasets.exceptions.DataFilesNotFoundError) as e:
            raise InputError(f"{arg}: {src} holds no save_to_disk dataset and no data files ({e})") from None
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{arg}: cannot read the data files of {src}: {_one_line(e)}") from None
    if os.path.isfile(src):
        kind = _FILE_TYPES[os.path.splitext(src)[1].lower()]
        try:
            return datasets.load_dataset(kind, data_files=src, split="train")
        except Exception as e:
            if "corresponds to no data" in str(e):
                raise InputError(f"{arg}: {src} holds no rows") from None
            raise InputError(f"{arg}: cannot read {src} as {kind}: {_one_line(e)}") from None
    hub_id, _, hub_split = src.partition(":")
    try:
        ds = datasets.load_dataset(hub_id, split=hub_split or split)
    except Exception as e:
        raise InputError(
            f"{arg}: {src!r} is not a local file or directory and could not be loaded from the hub ({_one_line(e)})"
        ) from None
    return _pick_split(ds, split, src, arg) if isinstance(ds, datasets.DatasetDict) else ds


def _text_of(src: str, arg: str) -> str:
    """The file's text, UTF-8 (a byte-order mark allowed); refused at the first byte that is not."""
    with open(src, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(
            f"{arg}: {src} line {line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _json_lines(text: str, src: str, arg: str, first_error=None) -> Tuple[List[Any], List[int]]:
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if first_error is not None and not rows:  # its first object is not one line: not JSON lines
                return first_error(e)
            raise InputError(f"{arg}: {src} line {n}: not JSON ({e.msg} at column {e.colno})") from None
        lines.append(n)
    return rows, lines


def _json_array(text: str, src: str, arg: str) -> Tuple[List[Any], List[int]]:
    """The elements of one JSON array, each with the line it starts on."""
    dec, rows, lines = json.JSONDecoder(), [], []
    i, n = text.index("[") + 1, len(text)
    line, counted = 1, 0

    def skip(i):
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        i = skip(i)
        if i < n and text[i] == "]" and not rows:
            break
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{arg}: {src} line {e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
        line += text.count("\n", counted, i)
        counted = i
        rows.append(obj)
        lines.append(line)
        i = skip(j)
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] == "]":
            break
        else:
            ln = line + text.count("\n", counted, min(i, n))
            raise InputError(f"{arg}: {src} line {ln}: not JSON (expected ',' or ']' after an element)")
    return rows, lines


def _json_file(text: str, src: str, arg: str) -> Tuple[List[Any], List[int]]:
    """JSON lines, one array of objects, or one object of equally long columns."""
    body = text.lstrip()
    if body.startswith("["):
        return _json_array(text, src, arg)

    def whole(e):  # not JSON lines: one (pretty-printed) object
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e2:
            raise InputError(f"{arg}: {src} line {e2.lineno}: not JSON ({e2.msg} at column {e2.colno})") from None
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            lengths = {len(v) for v in obj.values()}
            if len(lengths) > 1:
                raise InputError(f"{arg}: {src}: an object of columns of different lengths {sorted(lengths)}")
            cols = list(obj)
            return [dict(zip(cols, vals)) for vals in zip(*obj.values())], [1] * lengths.pop()
        return [obj], [1]

    return _json_lines(text, src, arg, first_error=whole)


def _number(values: List[Any]) -> List[Any]:
    """A CSV column of numbers as numbers (as `datasets` reads it), else as it is."""
    for conv in (int, float):
        try:
            return [None if v in (None, "") else conv(v) for v in values]
        except ValueError:
            continue
    return values


def _csv_file(text: str, src: str, arg: str) -> Tuple[List[Any], List[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines, end = [], [], 1
    try:
        for r in reader:
            rows.append({k: v for k, v in r.items() if k is not None})
            lines.append(end + 1)
            end = reader.line_num
    except csv.Error as e:
        raise InputError(f"{arg}: {src} line {reader.line_num}: not CSV ({e})") from None
    extra = [c for c in (reader.fieldnames or []) if c not in COLUMNS]
    for c in extra:
        for r, v in zip(rows, _number([r.get(c) for r in rows])):
            r[c] = v
    return rows, lines


@dataclass
class _Source:
    """A source's rows as read: objects (dicts, if the file is right), where each one is, and how it is named."""

    src: str
    arg: str
    rows: List[Any]
    locs: List[int]
    unit: str  # "line" (1-based, files read here) or "row index" (0-based, read through datasets)

    def at(self, i: int) -> str:
        return f"{self.src} {self.unit} {self.locs[i]}"


def _read(src, arg: str, split: str = "train") -> _Source:
    if not src or not str(src).strip():
        raise InputError(f"{arg}: empty source; give a file, a directory or a hub id")
    src = str(src)
    ext = os.path.splitext(src)[1].lower()
    if os.path.isfile(src):
        if ext not in _FILE_TYPES:
            raise InputError(
                f"{arg}: unknown file type {ext!r} of {src} (use .jsonl, .json, .parquet, .arrow, .csv or a directory)"
            )
        if os.path.getsize(src) == 0:
            raise InputError(f"{arg}: {src} holds no rows")
        if ext in _READ_HERE:
            text = _text_of(src, arg)
            if ext == ".csv":
                rows, lines = _csv_file(text, src, arg)
            else:
                rows, lines = (_json_file if ext == ".json" else _json_lines)(text, src, arg)
            if not rows:
                raise InputError(f"{arg}: {src} holds no rows")
            return _Source(src, arg, rows, lines, "line")
    elif not os.path.isdir(src) and (src.startswith((".", "/", "~")) or ext in _FILE_TYPES or src.count("/") > 1):
        raise InputError(f"{arg}: no such file or directory: {src}")
    from datasets import utils as progress

    quiet = progress.are_progress_bars_disabled()
    progress.disable_progress_bars()  # an error stays one line
    try:
        ds = _load_any(src, arg, split)
        rows = ds.to_list()
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{arg}: cannot read the rows of {src}: {_one_line(e)}") from None
    finally:
        if not quiet:
            progress.enable_progress_bars()
    return _Source(src, arg, rows, list(range(len(rows))), "row index")


# -- checking: one pass over every row --


class _Refuse(Exception):
    """A problem of the file at one row (the message says what; the caller says where)."""


def _type_name(x) -> str:
    return {dict: "an object", list: "a list", bool: "a bool", float: "a number", int: "a number"}.get(
        type(x), f"a {type(x).__name__}"
    )


def _check_text(s: str, col: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refuse(f"'{col}' holds text that is not valid Unicode (an unpaired surrogate such as \\ud800)") from None
    return s


def _message(m, col: str) -> Dict[str, str]:
    if not isinstance(m, dict):
        raise _Refuse(f"'{col}' is a list holding {_type_name(m)}, not chat messages ({{role, content}} objects)")
    role = m["role"] if "role" in m else m.get("from")
    if "content" in m:
        content = m["content"]
    elif "value" in m:
        content = m["value"]
    else:
        raise _Refuse(f"a message of '{col}' has no 'content' (or ShareGPT 'value'); its keys: {sorted(m)}")
    if role is None:
        raise _Refuse(f"a message of '{col}' has no 'role' (or ShareGPT 'from'); its keys: {sorted(m)}")
    if not isinstance(role, str) or role.strip().lower() not in ROLE_ALIASES:
        raise _Refuse(
            f"unknown conversation role {role!r} in '{col}' (known: user, assistant, system, and the aliases "
            "human, gpt, bot, model, chatbot)"
        )
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise _Refuse(f"a message's content in '{col}' is {_type_name(content)}, not a string")
    return {"role": ROLE_ALIASES[role.strip().lower()], "content": _check_text(content, col)}


def _value(x, col: str):
    """None, a string, or a list of normalised messages; anything else refuses the file."""
    if x is None or isinstance(x, str):
        return x if x is None else _check_text(x, col)
    if isinstance(x, (list, tuple)):
        return [_message(m, col) for m in x]
    raise _Refuse(f"'{col}' is {_type_name(x)} ({str(x)[:40]}), not a string or a list of chat messages")


def _empty(x) -> bool:
    if x is None:
        return True
    if isinstance(x, str):
        return not x.strip()
    if isinstance(x, list):
        return len(x) == 0 or all(_empty(m.get("content")) if isinstance(m, dict) else _empty(m) for m in x)
    return False


def _user(text: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": text}]


def _check_roles(p, c, r) -> None:
    if isinstance(p, list):
        if any(m["role"] == "system" for m in p[1:]):
            raise _Refuse("a system message after the first message of the prompt")
        last = p[-1]["role"]
        if last != "user":
            raise _Refuse(f"the prompt's last message is spoken by '{last}', not the user (the model answers it)")
    for col, a in (("chosen", c), ("rejected", r)):
        if isinstance(a, list) and a and a[-1]["role"] != "assistant":
            raise _Refuse(f"'{col}' is spoken by '{a[-1]['role']}', not the assistant")


def _pair(row: dict, has_prompt: bool):
    """(prompt, chosen, rejected, form) of one row, or the name of the rule that drops it; _Refuse when the
    row cannot be read at all. form: "text" (three strings) or "messages"."""
    p = _value(row.get("prompt"), "prompt") if has_prompt else None
    c, r = _value(row.get("chosen"), "chosen"), _value(row.get("rejected"), "rejected")
    if isinstance(c, list) or isinstance(r, list):
        if isinstance(c, str) or isinstance(r, str):
            raise _Refuse(
                "'chosen' and 'rejected' must both be strings or both chat-message lists; this row mixes them"
            )
        if c is None or r is None:
            return "null"
        whole = c if len(c) > 1 else r if len(r) > 1 else None
        if whole is not None:  # whole conversations: the shared turns are the prompt
            p, c, r = whole[:-1], c[-1:], r[-1:]
        elif not has_prompt:
            raise _Refuse("no 'prompt' column, and 'chosen' holds only the answer (not the whole conversation)")
        elif isinstance(p, str):
            p = _user(p)
        form = "messages"
    else:
        if not has_prompt:
            raise _Refuse("no 'prompt' column, and 'chosen' is a string, not the whole conversation")
        if isinstance(p, list):
            raise _Refuse(
                "'chosen' is a string while 'prompt' is a chat-message list; give all three as messages or all "
                "three as strings"
            )
        form = "text"
    if p is None or c is None or r is None:
        return "null"
    if _empty(p) or _empty(c) or _empty(r):
        return "empty"
    _check_roles(p, c, r)
    if _answer(c) == _answer(r):
        return "chosen_equals_rejected"
    return p, c, r, form


def _answer(a):
    return a.strip() if isinstance(a, str) else [(m["role"], m["content"].strip()) for m in a]


def _pool_prompt(row: dict, cols: Sequence[str]):
    """(prompt, form) of a prompt pool's row, or the rule that drops it."""
    if "chosen" in cols and "rejected" in cols:
        c = _value(row.get("chosen"), "chosen")
        if isinstance(c, list) and len(c) > 1:
            p = c[:-1]
        elif "prompt" in cols:
            p = _value(row.get("prompt"), "prompt")
        elif c is None:
            return "null"
        else:
            raise _Refuse("no 'prompt' column, and 'chosen' is not a whole conversation")
    else:
        p = _value(row.get("prompt"), "prompt")
    if p is None:
        return "null"
    if _empty(p):
        return "empty"
    _check_roles(p, None, None)
    return p, "messages" if isinstance(p, list) else "text"


def prompt_key(prompt) -> str:
    """One key per prompt, whether given as a string or as messages (a string
    is the same prompt as one user message holding it)."""
    if isinstance(prompt, str):
        prompt = _user(prompt)
    return json.dumps([[m.get("role"), m.get("content")] for m in prompt], ensure_ascii=False)


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


def _prompt_lengths(tokenizer, prompts: List[Any], where, chunk: int = 512) -> List[int]:
    """prompt_length of every prompt, in batches (one template render and one tokenizer call per chunk); a
    prompt the chat template refuses refuses the file (`where(i)` names its row)."""
    out: List[int] = []
    templated = bool(getattr(tokenizer, "chat_template", None))
    for s in range(0, len(prompts), chunk):
        part = prompts[s : s + chunk]
        if templated:
            convs = [_user(p) if isinstance(p, str) else p for p in part]
            try:
                texts = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
            except Exception:  # find the row the template refuses
                for i, conv in enumerate(convs):
                    try:
                        tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
                    except Exception as e:
                        raise InputError(
                            f"{where(s + i)}: the chat template refuses the prompt ({_one_line(e)})"
                        ) from None
                raise
            ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        else:
            texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in part]
            ids = tokenizer(texts)["input_ids"]
        out.extend(len(x) for x in ids)
    return out


@dataclass
class Checked:
    """What the check of one source kept and dropped: `rows` read, `kept`, and per rule the locations of the
    rows it dropped (lines of a file read here, row indices of the others: `unit`)."""

    src: str
    arg: str
    unit: str
    rows: int
    kept: int = 0
    dropped: Dict[str, List[int]] = field(default_factory=dict)

    def counts(self) -> Dict[str, int]:
        return {rule: len(self.dropped.get(rule, [])) for rule in RULES}

    def report(self) -> Dict[str, Any]:
        """The split report's entry for this source."""
        return {
            "source": self.src,
            "rows": self.rows,
            "kept": self.kept,
            "dropped": self.counts(),
            "first_dropped": {r: v[:SHOWN_LOCATIONS] for r, v in self.dropped.items() if v},
            "located_by": self.unit + (" (1-based)" if self.unit == "line" else " (0-based)"),
        }

    def warning(self) -> Optional[str]:
        """One line saying what was dropped and where (None when nothing was)."""
        parts = []
        for rule, locs in self.dropped.items():
            if locs:
                more = ", ..." if len(locs) > SHOWN_LOCATIONS else ""
                units = self.unit + ("s" if self.unit == "line" else "") if len(locs) > 1 else self.unit
                units = "row indices" if self.unit == "row index" and len(locs) > 1 else units
                shown = ", ".join(str(x) for x in locs[:SHOWN_LOCATIONS])
                parts.append(f"{rule} {len(locs)} ({units} {shown}{more})")
        if not parts:
            return None
        n = self.rows - self.kept
        return f"warning: {self.arg}: dropped {n} of {self.rows} rows of {self.src}: {'; '.join(parts)}"


def _check(source: _Source, pairs: bool, tokenizer=None, max_prompt_length: Optional[int] = None):
    """The one pass over a source's rows (RULES): the kept rows' columns, and the Checked record."""
    rows, arg = source.rows, source.arg
    done = Checked(source.src, arg, source.unit, len(rows), dropped={rule: [] for rule in RULES})
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{arg}: {source.at(i)}: a row must be an object, got {_type_name(row)}")
    cols: List[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    need = ["chosen", "rejected"] if pairs else ([] if "chosen" in cols and "rejected" in cols else ["prompt"])
    missing = [c for c in need if c not in cols]
    if missing:
        if pairs:
            raise InputError(f"{arg}: missing column(s) {missing} in {source.src} (columns: {cols})")
        raise InputError(f"{arg}: missing column 'prompt' in {source.src} (columns: {cols})")
    has_prompt = "prompt" in cols
    kept: List[int] = []
    out: Dict[str, list] = {c: [] for c in (COLUMNS if pairs else ("prompt",))}
    first_form: Optional[Tuple[str, int]] = None
    seen: set = set()
    for i, row in enumerate(rows):
        try:
            got = _pair(row, has_prompt) if pairs else _pool_prompt(row, cols)
        except _Refuse as e:
            raise InputError(f"{arg}: {source.at(i)}: {e}") from None
        if isinstance(got, str):
            done.dropped[got].append(source.locs[i])
            continue
        form = got[-1]
        if first_form is None:
            first_form = (form, i)
        elif form != first_form[0]:
            raise InputError(
                f"{arg}: {source.at(i)}: {'chat messages' if form == 'messages' else 'strings'} while "
                f"{source.unit} {source.locs[first_form[1]]} holds "
                f"{'chat messages' if first_form[0] == 'messages' else 'strings'}; give every row in one form"
            )
        key = prompt_key(got[0])
        if key in seen:
            done.dropped["duplicate_prompt"].append(source.locs[i])
            continue
        seen.add(key)
        kept.append(i)
        for c, v in zip(out, got[:-1]):
            out[c].append(v)
    if tokenizer is not None and max_prompt_length and kept:
        lengths = _prompt_lengths(tokenizer, out["prompt"], lambda j: f"{arg}: {source.at(kept[j])}")
        short = [j for j, n in enumerate(lengths) if n <= max_prompt_length]
        done.dropped["too_long"] = [source.locs[kept[j]] for j, n in enumerate(lengths) if n > max_prompt_length]
        out = {c: [v[j] for j in short] for c, v in out.items()}
        kept = [kept[j] for j in short]
    done.kept = len(kept)
    if not kept:
        counts = ", ".join(f"{rule} {n}" for rule, n in done.counts().items() if n)
        if done.counts()["chosen_equals_rejected"] == done.rows:
            why = "chosen equals rejected in every row (nothing would be learned: the DPO loss stays log 2)"
        else:
            why = f"every row is dropped ({counts})"
        raise InputError(f"{arg}: {source.src}: {why}")
    if pairs:
        for c in cols:
            if c not in COLUMNS:
                out[c] = [rows[i].get(c) for i in kept]
    return out, done


def _dataset(columns: Dict[str, list], done: Checked):
    from datasets import Dataset

    try:
        return Dataset.from_dict(columns)
    except Exception:
        pass
    for c in columns:  # the column arrow cannot store as one type
        try:
            Dataset.from_dict({c: columns[c]})
        except Exception as e:
            raise InputError(
                f"{done.arg}: {done.src}: column {c!r} mixes values of different types ({_one_line(e)}); "
                "give it one type or remove it"
            ) from None
    return Dataset.from_dict(columns)


def read_preferences(src: str, split: str = "train", tokenizer=None, max_prompt_length: Optional[int] = None):
    """(pairs, Checked): `load_preferences`' dataset and what its check dropped, without the warning."""
    source = _read(src, "preference_data", split)
    columns, done = _check(source, True, tokenizer, max_prompt_length)
    return _dataset(columns, done), done


def read_prompts(src: str, split: str = "train", tokenizer=None, max_prompt_length: Optional[int] = None):
    """(pool, Checked): `load_prompts`' dataset and what its check dropped, without the warning."""
    source = _read(src, "prompt_data", split)
    columns, done = _check(source, False, tokenizer, max_prompt_length)
    return _dataset(columns, done), done


def warn_dropped(done: Checked, where: str = "") -> None:
    line = done.warning()
    if line:
        print(line + where, file=sys.stderr, flush=True)


def load_preferences(src: str, split: str = "train", tokenizer=None, max_prompt_length: Optional[int] = None):
    """Labelled pairs with columns prompt, chosen, rejected (then the source's
    extra columns), every row checked (`RULES`; with a tokenizer, prompts over
    `max_prompt_length` tokens dropped too): the dropped rows in one warning
    line on stderr, a refused file an InputError naming it and the line."""
    ds, done = read_preferences(src, split, tokenizer, max_prompt_length)
    warn_dropped(done)
    return ds


def load_prompts(src: str, split: str = "train", tokenizer=None, max_prompt_length: Optional[int] = None):
    """A prompt pool with one column, `prompt` (strings or chat messages),
    checked like `load_preferences`' prompts. Pairs are accepted too: their
    prompts are used and their labels dropped."""
    ds, done = read_prompts(src, split, tokenizer, max_prompt_length)
    warn_dropped(done)
    return ds
