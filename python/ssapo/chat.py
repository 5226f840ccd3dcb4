"""Prompts and completions as token ids, the way training sees them.

Every pass that scores a response (annotation, held-out margins, SeRA's
margins, the re-solve hook) must read the same tokens as the trainer, or the
margins it reports are margins of sequences nobody trains on. trl 1.16's
DPOTrainer tokenises and truncates a row like this, and so do the functions
here:

- a prompt in message form (a list of {role, content}) goes through the
  tokenizer's chat template with `add_generation_prompt=True`; a plain string
  is tokenised as text, with the tokenizer's own special tokens;
- a completion is tokenised together with its prompt (messages: the whole
  conversation through the template; strings: prompt + completion text, with
  the end-of-sequence text appended when missing), and the completion starts
  where the prompt's ids and the whole sequence's ids stop agreeing;
- prompt + completion is cut to `max_length` keeping the start
  (`truncation_mode="keep_start"`, trl's default and the only mode it keeps:
  the end of a long completion is what goes). There is no separate prompt
  limit in trl ≥ 1: `max_prompt_length` is enforced earlier, by the data split
  skipping longer prompts. A prompt that alone fills `max_length` leaves no
  completion token, and the trainer drops such a row.

System turn (`RunConfig.system_turn`): the released code prepends an empty
system message, `[{"role": "system", "content": ""}] + prompt`, before the
chat template for zephyr-style models and not for Llama ('llama' in the model
path). 'empty' always does, 'none' never does, 'auto' does what the released
code does: an empty system turn when the template knows a system role and the
model's name does not contain 'llama'. It is inserted into the prompt itself
(`with_system_turn`), so the rows handed to the trainer carry it and training
renders exactly what generation rendered.

Stop tokens: a model's generation config may stop on several ids (Llama-3
Instruct: <|end_of_text|> and <|eot_id|>); `stop_token_ids` returns all of
them (and the tokenizer's end-of-sequence id) instead of `tok.eos_token_id`
alone.
"""

from __future__ import annotations

import json
import weakref
from typing import Iterable, List, Optional, Sequence, Tuple

EMPTY_SYSTEM = {"role": "system", "content": ""}


def is_messages(x) -> bool:
    """True for a chat prompt: a non-empty list of {role, content} dicts."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


def _template_text(tok) -> str:
    t = getattr(tok, "chat_template", None)
    if isinstance(t, dict):  # named templates
        return "\n".join(str(v) for v in t.values())
    return t or ""


def wants_system_turn(tok, mode: str = "auto", model_name: Optional[str] = None) -> bool:
    """Whether prompts get an empty system turn under `mode` (see the module
    docstring); `model_name` defaults to the tokenizer's `name_or_path`."""
    from ssapo.config import check_value

    check_value("system_turn", mode)  # the choices are RunConfig's field's
    if mode != "auto":
        return mode == "empty"
    name = model_name if model_name is not None else getattr(tok, "name_or_path", "") or ""
    return "system" in _template_text(tok) and "llama" not in str(name).lower()


def with_system_turn(prompt, on: bool = True):
    """`prompt` with an empty system message first (messages only, once: a
    prompt that already starts with a system message is returned as it is)."""
    if not on or not is_messages(prompt) or prompt[0].get("role") == "system":
        return prompt
    return [dict(EMPTY_SYSTEM)] + [dict(m) for m in prompt]


def system_turn_for(cfg, tok) -> bool:
    """`wants_system_turn` for a RunConfig (its `system_turn` and `model`)."""
    if cfg is None:
        return wants_system_turn(tok, "auto")
    name = getattr(cfg, "tokenizer", None) or getattr(cfg, "model", None)
    return wants_system_turn(tok, getattr(cfg, "system_turn", "auto") or "auto", name)


def prepare_prompts(prompts: Iterable, tok, cfg=None, mode: Optional[str] = None) -> List:
    """Every prompt as the model is shown it: with the empty system turn where
    `mode` (or `cfg.system_turn`) asks for one. Apply it to every row that
    reaches the trainer (seed pairs included), not only to annotated ones."""
    on = wants_system_turn(tok, mode, getattr(cfg, "model", None)) if mode is not None else system_turn_for(cfg, tok)
    return [with_system_turn(p, on) for p in prompts]


def _as_list(out) -> List[int]:
    ids = out["input_ids"] if hasattr(out, "keys") else out
    if len(ids) and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(t) for t in ids]


# tokenizer -> {(its template text, its vocabulary size, generation prompt, the messages): ids}. A run renders
# the same conversations again and again (the split's length checks, every scoring pass, the trainer's
# tokenising, each round's held-out margins): the tiny preset rendered 11,918 of them, 4 s of its 50.
_RENDERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_RENDERED_MAX = 200_000  # entries per tokenizer before its cache starts again


def _template(tok, messages, add_generation_prompt: bool) -> List[int]:
    text = _template_text(tok)
    if not text:
        raise ValueError("prompt: chat messages need a tokenizer with a chat_template (set tok.chat_template)")
    try:
        # what the rendering reads: the template, the vocabulary, the special tokens it may print, the messages
        key = (
            text,
            len(tok),
            str(getattr(tok, "bos_token", None)),
            str(getattr(tok, "eos_token", None)),
            bool(add_generation_prompt),
            json.dumps(list(messages), sort_keys=True),
        )
        cache = _RENDERED.setdefault(tok, {})
    except (TypeError, ValueError):  # messages that are not plain JSON, or a tokenizer without weak references
        key = cache = None
    if cache is not None and key in cache:
        return list(cache[key])
    ids = _as_list(
        tok.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )
    )
    if cache is not None:
        if len(cache) >= _RENDERED_MAX:
            cache.clear()
        cache[key] = tuple(ids)
    return ids


def prompt_ids(tok, prompt) -> List[int]:
    """Token ids of a prompt as trl's DPOTrainer makes them: messages through
    the chat template with the generation prompt, a string as text (with the
    tokenizer's special tokens)."""
    if isinstance(prompt, str):
        return _as_list(tok(text=prompt))
    if is_messages(prompt):
        return _template(tok, prompt, True)
    raise ValueError(f"prompt: expected a string or a list of chat messages, got {type(prompt).__name__}")


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def completion_ids(tok, prompt, completion) -> Tuple[List[int], List[int]]:
    """(prompt ids, completion ids) of one (prompt, completion) row, as trl
    1.16's DPOTrainer tokenises it (`_prepare_dataset`): the completion is what
    follows the longest common prefix of the prompt's ids and the whole
    sequence's ids. `completion`: token ids (taken as they are), a string, or
    assistant messages (a string completion of a chat prompt is one assistant
    message)."""
    p = prompt_ids(tok, prompt)
    if (
        isinstance(completion, (list, tuple))
        and all(isinstance(t, int) for t in completion)
        and not is_messages(completion)
    ):
        return p, [int(t) for t in completion]
    if is_messages(prompt):
        msgs = completion if is_messages(completion) else [{"role": "assistant", "content": str(completion)}]
        full = _template(tok, list(prompt) + list(msgs), False)
    elif isinstance(prompt, str):
        if not isinstance(completion, str):
            raise ValueError("completion: a plain-string prompt needs a string completion (or token ids)")
        eos = tok.eos_token or ""
        text = completion if completion.endswith(eos) else completion + eos
        full = _as_list(tok(text=prompt + text))
    else:
        raise ValueError(f"prompt: expected a string or a list of chat messages, got {type(prompt).__name__}")
    n = _common_prefix(p, full)
    return p[:n], full[n:]


def truncate(prompt: Sequence[int], completion: Sequence[int], max_length: Optional[int]) -> Tuple[List[int], int]:
    """prompt + completion cut to `max_length` keeping the start (trl's
    `keep_start`), and how many completion tokens are left (0 when the prompt
    alone fills `max_length`: the trainer drops that row)."""
    if max_length is not None and int(max_length) < 1:
        raise ValueError(f"max_length: must be >= 1 or None, got {max_length}")
    seq = list(prompt) + list(completion)
    if max_length is not None:
        seq = seq[: int(max_length)]
    return seq, max(0, len(seq) - len(prompt))


def stop_token_ids(model=None, tok=None, generation_config=None) -> List[int]:
    """Every id that ends a response: the generation config's `eos_token_id`
    (an int or a list: Llama-3 Instruct stops on <|eot_id|> as well as
    <|end_of_text|>), then the tokenizer's `eos_token_id` if it is not among
    them. `generation_config` defaults to `model.generation_config`."""
    gc = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    ids: List[int] = []
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    for t in e if isinstance(e, (list, tuple)) else [e]:
        if t is not None and int(t) not in ids:
            ids.append(int(t))
    t = getattr(tok, "eos_token_id", None) if tok is not None else None
    if t is not None and int(t) not in ids:
        ids.append(int(t))
    if not ids:
        raise ValueError("eos_token_id: neither the generation config nor the tokenizer names an end-of-sequence token")
    return ids
