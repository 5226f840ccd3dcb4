"""Chat prompts as the model and the trainer see them: Llama-3- and zephyr-style
templates written here (no hub), the released code's empty system turn, trl's
completion split, keep-start truncation, and the model's own stop tokens."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ssapo import chat  # noqa: E402
from ssapo.annotate import annotate_rows  # noqa: E402
from ssapo.config import load_config  # noqa: E402
from ssapo.generation import generate  # noqa: E402
from ssapo.tiny import build_tokenizer, tiny_llama  # noqa: E402

torch.set_num_threads(1)

# Meta-Llama-3-8B-Instruct's template (as published with the model).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# zephyr-7b-sft-full's template (alignment-handbook).
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
WORDS = ["user", "assistant", "system", "a", "b", "c", "d"]


def make_tok(specials, bos, eos, template, name):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>"] + specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=[s for s in specials if s not in (bos, eos)],
    )
    tok.chat_template = template
    tok.name_or_path = name
    return tok


@pytest.fixture(scope="module")
def llama3():
    return make_tok(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        LLAMA3,
        "meta-llama/Meta-Llama-3-8B-Instruct",
    )


@pytest.fixture(scope="module")
def zephyr():
    return make_tok(
        ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        "<s>",
        "</s>",
        ZEPHYR,
        "alignment-handbook/zephyr-7b-sft-full",
    )


def toks(tok, ids):
    return tok.convert_ids_to_tokens(ids)


USER = [{"role": "user", "content": "a b"}]


def test_llama3_prompt_has_the_generation_prompt_and_no_system_turn_by_default(llama3):
    assert chat.wants_system_turn(llama3, "auto") is False  # the released code: none for 'llama' models
    p = chat.prepare_prompts([USER], llama3, mode="auto")[0]
    assert p == USER
    assert toks(llama3, chat.prompt_ids(llama3, p)) == [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "user",
        "<|end_header_id|>",
        "a",
        "b",
        "<|eot_id|>",
        "<|start_header_id|>",
        "assistant",
        "<|end_header_id|>",
    ]
    forced = chat.prepare_prompts([USER], llama3, mode="empty")[0]
    assert toks(llama3, chat.prompt_ids(llama3, forced))[:5] == [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "system",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]


def test_zephyr_prompt_gets_the_empty_system_turn_as_the_released_code(zephyr):
    assert chat.wants_system_turn(zephyr, "auto") is True
    p = chat.prepare_prompts([USER], zephyr, mode="auto")[0]
    assert p == [{"role": "system", "content": ""}] + USER
    ids = chat.prompt_ids(zephyr, p)
    assert toks(zephyr, ids) == ["<|system|>", "</s>", "<|user|>", "a", "b", "</s>", "<|assistant|>"]
    # what the released online_generation.py renders: [{system: ""}] + chosen[:-1], add_generation_prompt=True
    released = zephyr.apply_chat_template(
        [{"role": "system", "content": ""}] + USER, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert ids == list(released)
    assert toks(zephyr, chat.prompt_ids(zephyr, USER)) == ["<|user|>", "a", "b", "</s>", "<|assistant|>"]
    assert chat.prepare_prompts([USER], zephyr, mode="none")[0] == USER


def test_system_turn_is_inserted_once_and_never_over_a_given_one(zephyr):
    once = chat.with_system_turn(USER)
    assert chat.with_system_turn(once) == once
    own = [{"role": "system", "content": "be brief"}] + USER
    assert chat.with_system_turn(own) == own
    assert chat.with_system_turn("a plain prompt") == "a plain prompt"
    assert USER == [{"role": "user", "content": "a b"}]  # the input is not modified


def test_system_turn_follows_the_config(zephyr):
    tiny = build_tokenizer(["a", "b"])
    assert chat.wants_system_turn(tiny, "auto") is False  # the tiny template has no system role
    cfg = load_config("mistral-7b")
    assert cfg.system_turn == "empty" and chat.system_turn_for(cfg, zephyr) is True
    assert load_config("llama3-8b").system_turn == "none"
    cfg = load_config("tiny", overrides={"system_turn": "auto", "model": "org/zephyr-like"})
    assert chat.system_turn_for(cfg, zephyr) is True
    cfg = load_config("tiny", overrides={"system_turn": "auto", "model": "org/Llama-3-SFT"})
    assert chat.system_turn_for(cfg, zephyr) is False
    with pytest.raises(ValueError, match="^system_turn: must be one of"):
        chat.wants_system_turn(zephyr, "always")
    with pytest.raises(ValueError, match="^system_turn: must be one of"):
        load_config("tiny", overrides={"system_turn": "always"})


def test_completion_split_matches_the_template(llama3, zephyr):
    p, c = chat.completion_ids(llama3, USER, [{"role": "assistant", "content": "c d"}])
    assert p == chat.prompt_ids(llama3, USER)
    assert toks(llama3, c) == ["c", "d", "<|eot_id|>"]  # Llama-3's turn ends on <|eot_id|>, not <|end_of_text|>
    p, c = chat.completion_ids(zephyr, chat.with_system_turn(USER), "c d")  # a string: one assistant message
    assert toks(zephyr, c) == ["c", "d", "</s>"]
    p, c = chat.completion_ids(zephyr, "a b ", "c d")  # plain strings: concatenated, the eos text appended (trl)
    assert toks(zephyr, p) == ["a", "b"] and toks(zephyr, c) == ["c", "d", "</s>"]
    p, c = chat.completion_ids(zephyr, "a b", "c d")  # no separator: "bc" is one (unknown) word, as in trl
    assert toks(zephyr, p) == ["a"] and toks(zephyr, c) == ["<unk>", "d", "</s>"]
    assert chat.completion_ids(zephyr, "a b", [7, 8]) == (chat.prompt_ids(zephyr, "a b"), [7, 8])  # ids as given
    with pytest.raises(ValueError, match="^completion: "):
        chat.completion_ids(zephyr, "a b", [{"role": "assistant", "content": "c"}])
    with pytest.raises(ValueError, match="^prompt: "):
        chat.prompt_ids(zephyr, 3)


def test_truncation_keeps_the_start():
    assert chat.truncate([1, 2, 3], [4, 5, 6], None) == ([1, 2, 3, 4, 5, 6], 3)
    assert chat.truncate([1, 2, 3], [4, 5, 6], 5) == ([1, 2, 3, 4, 5], 2)
    assert chat.truncate([1, 2, 3], [4, 5, 6], 3) == ([1, 2, 3], 0)  # the trainer drops this row
    assert chat.truncate([1, 2, 3], [4, 5, 6], 2) == ([1, 2], 0)
    with pytest.raises(ValueError, match="^max_length: "):
        chat.truncate([1], [2], 0)


def test_stop_tokens_come_from_the_generation_config(llama3):
    from transformers import GenerationConfig

    eos, eot = llama3.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert chat.stop_token_ids(None, llama3, GenerationConfig(eos_token_id=[eos, eot])) == [eos, eot]
    assert chat.stop_token_ids(None, llama3, GenerationConfig(eos_token_id=eot)) == [eot, eos]
    assert chat.stop_token_ids(None, llama3, None) == [eos]
    with pytest.raises(ValueError, match="^eos_token_id: "):
        chat.stop_token_ids(None, None, GenerationConfig())


def _llama3_model(tok, seed=0):
    model = tiny_llama(tok, hidden_size=32, num_layers=1, seed=seed).eval()
    eos, eot = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    model.generation_config.eos_token_id = [eos, eot]
    with torch.no_grad():  # make <|eot_id|> a likely next token, so that samples end on it
        model.get_output_embeddings().weight[eot] *= 4
    return model, eot, eos


def test_transformers_generation_stops_on_every_stop_token_of_the_model(llama3):
    model, eot, eos = _llama3_model(llama3)
    prompts = [[{"role": "user", "content": w}] for w in ["a", "b c", "d", "a b"]]
    out = generate(model, llama3, prompts, 4, 1.0, 1.0, 12, batch_size=2, seed=3, progress=False)
    flat = [r for rs in out for r in rs]
    ended = [r for r in flat if r and r[-1] == eot]
    assert ended, "no sample ended on <|eot_id|> (the test's model should make it likely)"
    for r in flat:  # nothing after the first stop token of either kind
        stops = [j for j, t in enumerate(r) if t in (eot, eos)]
        assert stops in ([], [len(r) - 1])
    rows, st = annotate_rows(
        model,
        tiny_llama(llama3, hidden_size=32, num_layers=1, seed=1),
        llama3,
        prompts,
        n=4,
        max_new_tokens=12,
        batch_size=2,
        seed=3,
        temperature=1.0,
        progress=False,
    )
    assert st["truncated_responses"] == sum(1 for r in flat if not r or r[-1] not in (eot, eos))
    for r in rows:  # the texts handed to training hold no stop token
        assert "<|eot_id|>" not in r["chosen"][0]["content"] and "<|eot_id|>" not in r["rejected"][0]["content"]


def test_annotated_rows_carry_the_rendered_prompt(zephyr):
    model = tiny_llama(zephyr, hidden_size=32, num_layers=1, seed=0).eval()
    ref = tiny_llama(zephyr, hidden_size=32, num_layers=1, seed=1).eval()
    prompts = [[{"role": "user", "content": w}] for w in ["a", "b c"]]
    kw = dict(n=3, max_new_tokens=4, batch_size=2, seed=0, progress=False)
    rows, _ = annotate_rows(model, ref, zephyr, prompts, **kw)
    assert rows and all(r["prompt"][0] == {"role": "system", "content": ""} for r in rows)
    plain, _ = annotate_rows(model, ref, zephyr, prompts, system_turn="none", **kw)
    assert all(r["prompt"][0]["role"] == "user" for r in plain)


def test_rendered_conversations_are_cached_and_follow_the_template(zephyr, llama3):
    """`chat._template` renders a conversation once per tokenizer state: a second call gives the same ids
    without calling apply_chat_template, a caller mutating its list does not reach the cache, and a new
    template, another tokenizer or a different message renders again."""
    from unittest import mock

    msgs = [{"role": "user", "content": "b a"}]
    first = chat.prompt_ids(zephyr, msgs)
    with mock.patch.object(type(zephyr), "apply_chat_template", side_effect=AssertionError("rendered again")):
        again = chat.prompt_ids(zephyr, msgs)
        assert again == first
        again.append(-1)  # the caller's copy
        assert chat.prompt_ids(zephyr, msgs) == first
        with pytest.raises(AssertionError, match="rendered again"):
            chat.prompt_ids(zephyr, [{"role": "user", "content": "b a b"}])
    assert chat.prompt_ids(llama3, msgs) != first  # the cache is per tokenizer
    # the same conversation through another template is rendered with that template
    tok = make_tok(["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>", "</s>", ZEPHYR, "z")
    base = chat.prompt_ids(tok, msgs)
    tok.chat_template = ZEPHYR.replace("<|user|>", "<|system|>")
    assert chat.prompt_ids(tok, msgs) != base
    assert chat.prompt_ids(tok, msgs) == chat._as_list(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    )
