"""Every input rule (ssapo.inputs.RULES and the refusals), one example each: a row
that is common but unusable is dropped at load and counted, with its line; a
problem of the file refuses it in one line naming the file and the line (row
index for parquet); the held-out rows go through the same check as the seed's
and the rounds'; and the issue's files through the real `ssapo train` exit 2
with one line before anything trains. Every file is written by the test."""

import json
import os

import pytest

from ssapo.errors import InputError
from ssapo.inputs import read_preferences, read_prompts
from ssapo.io import read_jsonl


def msg(role, content):
    return {"role": role, "content": content}


def row(i, **kw):
    """A good pair in message form (prompt w<i>, distinct answers), with fields replaced by kw."""
    r = {
        "prompt": [msg("user", f"w1 w{i % 16} n{i}")],
        "chosen": [msg("assistant", "w2")],
        "rejected": [msg("assistant", "w3")],
    }
    r.update(kw)
    return r


def text_row(i, **kw):
    return {"prompt": f"w1 n{i}", "chosen": "w2", "rejected": "w3", **kw}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path))
    return str(path)


def tokenizer():
    from ssapo.tiny import build_tokenizer

    return build_tokenizer([f"w{i}" for i in range(16)] + [f"n{i}" for i in range(64)])


# -- rows that are dropped, counted by rule, with their lines --


DROPS = {
    "null": [
        text_row(0, prompt=None),
        text_row(1, chosen=None),
        text_row(2, rejected=None),
        {"prompt": "w1 n3", "chosen": "w2"},  # the key missing in this row
    ],
    "empty": [
        text_row(0, prompt=""),
        text_row(1, chosen="   "),
        text_row(2, rejected="\n\t"),
    ],
    "chosen_equals_rejected": [text_row(0, rejected="w2"), text_row(1, chosen=" w3 ", rejected="w3")],
    "duplicate_prompt": [text_row(0, chosen="w4"), text_row(0, rejected="w5")],  # the good row 0 comes first
}


@pytest.mark.parametrize("rule", list(DROPS))
def test_a_row_that_breaks_a_drop_rule_is_dropped_with_its_line(tmp_path, rule):
    good = [text_row(i) for i in range(10)]
    bad = DROPS[rule]
    path = jsonl(tmp_path / "p.jsonl", good + bad)
    ds, checked = read_preferences(path)
    assert len(ds) == 10 and checked.rows == 10 + len(bad) and checked.kept == 10
    assert checked.dropped[rule] == list(range(11, 11 + len(bad)))  # 1-based lines
    assert sum(checked.counts().values()) == len(bad)
    assert list(ds["prompt"]) == [f"w1 n{i}" for i in range(10)]  # the first of a duplicate is kept
    assert None not in ds["chosen"] and None not in ds["rejected"]


def test_message_rows_break_the_same_rules(tmp_path):
    rows = [
        row(0),
        row(1, prompt=None),
        row(2, chosen=[msg("assistant", "")]),
        row(3, rejected=[]),
        row(4, rejected=[msg("assistant", "w2")]),
        row(0, chosen=[msg("assistant", "w9")]),
        row(5, prompt="w1 w0 n0"),  # a string prompt is the same prompt as one user message holding it
    ]
    ds, checked = read_preferences(jsonl(tmp_path / "m.jsonl", rows))
    assert len(ds) == 1
    assert {r: v for r, v in checked.dropped.items() if v} == {
        "null": [2],
        "empty": [3, 4],
        "chosen_equals_rejected": [5],
        "duplicate_prompt": [6, 7],
    }


def test_prompts_too_long_for_max_prompt_length_are_dropped_by_the_tokenizer(tmp_path):
    tok = tokenizer()
    rows = [text_row(i) for i in range(6)] + [
        text_row(6, prompt="w1 " * 40 + "n6"),
        text_row(7, prompt="w1 " * 100_000),
    ]
    path = jsonl(tmp_path / "p.jsonl", rows)
    ds, checked = read_preferences(path, tokenizer=tok, max_prompt_length=12)
    assert checked.dropped["too_long"] == [7, 8] and len(ds) == 6
    pool, pool_checked = read_prompts(path, tokenizer=tok, max_prompt_length=12)  # a pool too
    assert pool_checked.dropped["too_long"] == [7, 8] and len(pool) == 6


def test_parquet_drops_are_named_by_row_index(tmp_path):
    path = parquet(
        tmp_path / "p.parquet",
        {"prompt": ["w1 n0", None, "w1 n2", "w1 n0"], "chosen": ["w2", "w2", "", "w2"], "rejected": ["w3"] * 4},
    )
    _, checked = read_preferences(path)
    assert checked.unit == "row index" and {r: v for r, v in checked.dropped.items() if v} == {
        "null": [1],
        "empty": [2],
        "duplicate_prompt": [3],
    }
    assert checked.warning() == (
        f"warning: preference_data: dropped 3 of 4 rows of {path}: null 1 (row index 1); empty 1 (row index 2); "
        "duplicate_prompt 1 (row index 3)"
    )


def test_a_file_whose_every_row_is_dropped_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"^preference_data: .*same.jsonl: chosen equals rejected in every row"):
        read_preferences(jsonl(tmp_path / "same.jsonl", [text_row(i, rejected="w2") for i in range(5)]))
    with pytest.raises(InputError, match=r"^preference_data: .*nulls.jsonl: every row is dropped \(null 2, empty 1\)$"):
        read_preferences(
            jsonl(
                tmp_path / "nulls.jsonl", [text_row(0, prompt=None), text_row(1, chosen=None), text_row(2, rejected="")]
            )
        )
    with pytest.raises(InputError, match=r"^prompt_data: .*pool.jsonl: every row is dropped \(null 1, empty 1\)$"):
        read_prompts(jsonl(tmp_path / "pool.jsonl", [{"prompt": None}, {"prompt": " "}]))


# -- problems of the file: refused in one line naming the file and the line --


def _refuses(path, match, reader=read_preferences, **kw):
    with pytest.raises(InputError) as e:
        reader(path, **kw)
    text = str(e.value)
    assert "\n" not in text and text.startswith(("preference_data: ", "prompt_data: ")) and path in text
    assert __import__("re").search(match, text), text
    return text


REFUSE_ROWS = {
    "a number": (text_row(5, chosen=0.5), r" line 6: 'chosen' is a number \(0.5\), not a string"),
    "a bool": (text_row(5, prompt=True), r" line 6: 'prompt' is a bool"),
    "an object": (text_row(5, rejected={"text": "w2"}), r" line 6: 'rejected' is an object"),
    "a list of strings": (text_row(5, chosen=["w2", "w3"]), r" line 6: 'chosen' is a list holding a str, not chat"),
    "not an object": ([1, 2, 3], r" line 6: a row must be an object, got a list"),
    "messages mixed with strings": (
        row(5),
        r" line 6: chat messages while line 1 holds strings; give every row in one",
    ),
    "one row mixes": (text_row(5, rejected=[msg("assistant", "w3")]), r" line 6: 'chosen' and 'rejected' must both"),
    "a string chosen with a message prompt": (
        text_row(5, prompt=[msg("user", "w1")]),
        r" line 6: 'chosen' is a string while 'prompt' is a chat-message list",
    ),
    "an unpaired surrogate": (
        text_row(5, prompt="w1 \ud800"),
        r" line 6: 'prompt' holds text that is not valid Unicode",
    ),
}


@pytest.mark.parametrize("case", list(REFUSE_ROWS))
def test_a_value_of_the_wrong_type_refuses_the_file_at_its_line(tmp_path, case):
    bad, match = REFUSE_ROWS[case]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [text_row(i) for i in range(5)] + [bad]))
    _refuses(str(path), match)


CONVERSATION_REFUSALS = {
    "an unknown role": (
        row(5, prompt=[msg("narrator", "w1")]),
        r" line 6: unknown conversation role 'narrator' in 'prompt' \(known: user, assistant, system, and the aliases",
    ),
    "a tool role": (row(5, chosen=[msg("tool", "w1")]), r" line 6: unknown conversation role 'tool' in 'chosen'"),
    "a prompt spoken by the assistant": (
        row(5, prompt=[msg("assistant", "w1")]),
        r" line 6: the prompt's last message is spoken by 'assistant', not the user",
    ),
    "an answer spoken by the user": (row(5, rejected=[msg("user", "w1")]), r" line 6: 'rejected' is spoken by 'user'"),
    "a system message in the middle": (
        row(5, prompt=[msg("user", "w1"), msg("system", "w2"), msg("user", "w3")]),
        r" line 6: a system message after the first message of the prompt",
    ),
    "a message without a role": (row(5, prompt=[{"content": "w1"}]), r" line 6: a message of 'prompt' has no 'role'"),
    "a message without content": (
        row(5, chosen=[{"role": "assistant"}]),
        r" line 6: a message of 'chosen' has no 'content'",
    ),
    "content that is not text": (
        row(5, prompt=[msg("user", [{"type": "text", "text": "w1"}])]),
        r" line 6: a message's content in 'prompt' is a list, not a string",
    ),
    "strings among messages": (text_row(5), r" line 6: strings while line 1 holds chat messages"),
}


@pytest.mark.parametrize("case", list(CONVERSATION_REFUSALS))
def test_a_conversation_that_cannot_be_read_refuses_the_file_naming_what(tmp_path, case):
    bad, match = CONVERSATION_REFUSALS[case]
    _refuses(jsonl(tmp_path / "c.jsonl", [row(i) for i in range(5)] + [bad]), match)


def test_role_aliases_and_sharegpt_keys_are_read_as_user_and_assistant(tmp_path):
    rows = [
        {
            "chosen": [{"from": "human", "value": f"w1 n{i}"}, {"from": "gpt", "value": "w2"}],
            "rejected": [{"from": "Human", "value": f"w1 n{i}"}, {"from": alias, "value": "w3"}],
        }
        for i, alias in enumerate(["bot", "model", "Chatbot", "ASSISTANT"])
    ] + [row(9, prompt=[msg("System", "be brief"), msg("USER", "w9")])]
    ds, checked = read_preferences(jsonl(tmp_path / "sharegpt.jsonl", rows))
    assert checked.kept == 5
    assert ds[0] == {
        "prompt": [msg("user", "w1 n0")],
        "chosen": [msg("assistant", "w2")],
        "rejected": [msg("assistant", "w3")],
    }
    assert ds[4]["prompt"] == [msg("system", "be brief"), msg("user", "w9")]
    assert {m["role"] for r in ds for m in r["prompt"] + r["chosen"] + r["rejected"]} == {"system", "user", "assistant"}


def test_bytes_that_are_not_utf8_refuse_the_file_at_their_line(tmp_path):
    good = "".join(json.dumps(text_row(i)) + "\n" for i in range(3)).encode()
    (tmp_path / "l.jsonl").write_bytes(good + b'{"prompt": "caf\xe9", "chosen": "w2", "rejected": "w3"}\n')
    _refuses(str(tmp_path / "l.jsonl"), r"l.jsonl line 4: not UTF-8 \(byte 0xe9 at column 16\); save the file as UTF-8")
    (tmp_path / "l.csv").write_bytes(b"prompt,chosen,rejected\nw1,w2,w3\n\xff,w2,w3\n")
    _refuses(str(tmp_path / "l.csv"), r"l.csv line 3: not UTF-8 \(byte 0xff at column 1\)")
    (tmp_path / "l.json").write_bytes(b'[\n{"prompt": "w1", "chosen": "w2", "rejected": "w3"},\n{"prompt": "\xe9"}\n]')
    _refuses(str(tmp_path / "l.json"), r"l.json line 3: not UTF-8")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good)  # a byte-order mark is fine
    assert len(read_preferences(str(tmp_path / "bom.jsonl"))[0]) == 3


def test_json_that_does_not_parse_is_named_by_its_line(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(text_row(0)) + "\n\n" + '{"prompt": "w1", "chosen": }\n')
    _refuses(str(tmp_path / "b.jsonl"), r"b.jsonl line 3: not JSON \(Expecting value at column 28\)")
    rows = ",\n".join(json.dumps(text_row(i)) for i in range(3))
    (tmp_path / "a.json").write_text("[\n" + rows + ",\n" + json.dumps(text_row(3, chosen=1.5)) + "\n]\n")
    _refuses(str(tmp_path / "a.json"), r"a.json line 5: 'chosen' is a number")
    (tmp_path / "c.json").write_text("[\n" + rows + "\n" + json.dumps(text_row(3)) + "\n]\n")
    _refuses(str(tmp_path / "c.json"), r"c.json line 5: not JSON")
    # JSON lines, one array and one object of columns all load
    (tmp_path / "cols.json").write_text(
        json.dumps({"prompt": ["w1", "w2"], "chosen": ["w3", "w4"], "rejected": ["w4", "w3"]}, indent=1)
    )
    assert len(read_preferences(str(tmp_path / "cols.json"))[0]) == 2


@pytest.mark.parametrize(
    "kind, values, match",
    [
        ("float", [0.5] * 4, r"row index 0: 'chosen' is a number \(0.5\)"),
        ("bool", [None, True, True, False], r"row index 1: 'chosen' is a bool"),
        ("list", [["w2", "w3"]] * 4, r"row index 0: 'chosen' is a list holding a str"),
        ("struct", [{"text": "w2"}] * 4, r"row index 0: 'chosen' is an object"),
    ],
)
def test_a_parquet_column_of_the_wrong_type_is_refused_at_its_first_row(tmp_path, kind, values, match):
    path = parquet(
        tmp_path / f"{kind}.parquet",
        {"prompt": [f"w1 n{i}" for i in range(4)], "chosen": values, "rejected": ["w3"] * 4},
    )
    _refuses(path, match)


def test_an_extra_column_of_mixed_types_is_refused_by_name(tmp_path):
    rows = [text_row(0, score=1), text_row(1, score="high")]
    _refuses(jsonl(tmp_path / "x.jsonl", rows), r"x.jsonl: column 'score' mixes values of different types")


def test_a_prompt_the_chat_template_refuses_is_named_by_its_line(tmp_path):
    tok = tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    rows = [row(i) for i in range(4)] + [row(4, prompt=[msg("user", "w1"), msg("user", "w2")])]
    _refuses(
        jsonl(tmp_path / "t.jsonl", rows),
        r"t.jsonl line 5: the chat template refuses the prompt \(.*roles must alternate",
        tokenizer=tok,
        max_prompt_length=32,
    )


def test_a_prompt_pool_is_checked_like_the_pairs(tmp_path):
    pool = [{"prompt": f"w1 n{i}"} for i in range(4)] + [{"prompt": None}, {"prompt": "w1 n0"}, {"prompt": ""}]
    ds, checked = read_prompts(jsonl(tmp_path / "pool.jsonl", pool))
    assert len(ds) == 4 and {r: v for r, v in checked.dropped.items() if v} == {
        "null": [5],
        "empty": [7],
        "duplicate_prompt": [6],
    }
    _refuses(
        jsonl(tmp_path / "bad.jsonl", pool[:4] + [{"prompt": 3}]),
        r"bad.jsonl line 5: 'prompt' is a number",
        read_prompts,
    )
    _refuses(
        jsonl(tmp_path / "asst.jsonl", [{"prompt": [msg("assistant", "w1")]}]),
        r"asst.jsonl line 1: the prompt's last message is spoken by 'assistant'",
        read_prompts,
    )


# -- every role: seed, rounds and held-out rows all come from checked rows --


def small_cfg(path, **kw):
    from ssapo.config import load_config

    over = {"preference_data": path, "seed_size": "4", "round_sizes": "4", "num_rounds": "1", "max_prompt_length": "12"}
    return load_config("tiny", overrides={**over, **kw})


def test_the_held_out_rows_are_checked_like_the_seed_and_the_rounds(tmp_path, capsys):
    from ssapo.data import write_run_data

    rows = [text_row(i) for i in range(30)]
    for i in range(0, 30, 3):  # a third of the rows broken, one rule each
        rows[i] = [text_row(i, prompt=None), text_row(i, chosen=""), text_row(i, rejected="w2")][i % 9 // 3]
    rows += [text_row(1), text_row(2, prompt="w1 " * 50_000)]  # a duplicate, a 50k-word prompt
    path = jsonl(tmp_path / "p.jsonl", rows)
    d = tmp_path / "data"
    write_run_data(small_cfg(path), str(d), tokenizer())
    split = json.loads((d / "split.json").read_text())
    assert split["dropped"] == {
        "null": 4,
        "empty": 3,
        "chosen_equals_rejected": 3,
        "duplicate_prompt": 1,
        "too_long": 1,
    }
    assert split["inputs"]["preference_data"]["rows"] == 32 and split["inputs"]["preference_data"]["kept"] == 20
    assert split["seed"] == 4 and split["rounds"] == [4] and split["test"] == 12
    held, seed = read_jsonl(d / "heldout.jsonl"), read_jsonl(d / "seed.jsonl")
    rounds = read_jsonl(d / "round_1.jsonl")
    assert len(held) == 12 and len(seed) == 4 and len(rounds) == 4
    for r in held + seed:
        assert r["prompt"] and r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]
    prompts = [r["prompt"] for r in held + seed + rounds]
    assert len({json.dumps(p) for p in prompts}) == 20 and all(len(json.dumps(p)) < 100 for p in prompts)
    warning = [e for e in capsys.readouterr().err.splitlines() if e.startswith("warning:")]
    assert warning == [
        f"warning: preference_data: dropped 12 of 32 rows of {path}: null 4 (lines 1, 10, 19, 28); empty 3 "
        f"(lines 4, 13, 22); chosen_equals_rejected 3 (lines 7, 16, 25); duplicate_prompt 1 (line 31); "
        f"too_long 1 (line 32) (counted in {d / 'split.json'})"
    ]


# -- the issue's files through the real command: exit 2, one line, before anything trains --


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny random model and its tokenizer, as a model directory."""
    from ssapo.tiny import save_pretrained, tiny_llama

    tok = tokenizer()
    return save_pretrained(tiny_llama(tok), tok, tmp_path_factory.mktemp("sft") / "m")


def train(out, model, data, capsys, *extra):
    from ssapo.cli import main
    from ssapo.config import recipe_path

    argv = ["train", "--config", recipe_path("tiny"), "--model", str(model), "--preference-data", data]
    argv += [
        "--output-dir",
        str(out),
        "--seed-size",
        "4",
        "--round-sizes",
        "4",
        "--num-rounds",
        "0",
        "--seed-epochs",
        "1",
    ]
    rc = main([*argv, *extra])
    return rc, capsys.readouterr().err


ISSUE_FILES = {
    "not UTF-8": (b'{"prompt": "caf\xe9", "chosen": "w2", "rejected": "w3"}\n', r"x.jsonl line 5: not UTF-8"),
    "strings mixed with conversations": (json.dumps(row(9)).encode() + b"\n", r"x.jsonl line 5: chat messages while"),
    "an unknown role": (
        json.dumps(row(9, prompt=[msg("narrator", "w1")])).encode() + b"\n",
        r"line 5: unknown .*'narrator'",
    ),
    "a prompt spoken by the assistant": (
        json.dumps(
            text_row(
                9, prompt=[msg("assistant", "w1")], chosen=[msg("assistant", "w2")], rejected=[msg("assistant", "w3")]
            )
        ).encode()
        + b"\n",
        r"x.jsonl line 5: the prompt's last message is spoken by 'assistant'",
    ),
}


@pytest.mark.parametrize("case", list(ISSUE_FILES))
def test_a_refused_file_is_one_line_and_exit_2_before_the_seed_trains(tmp_path, sft, capsys, case):
    tail, match = ISSUE_FILES[case]
    path = tmp_path / "x.jsonl"
    path.write_bytes("".join(json.dumps(text_row(i)) + "\n" for i in range(4)).encode() + tail)
    rc, err = train(tmp_path / "run", sft, str(path), capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"ssapo train: error: preference_data: {path} ")
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "run" / "seed") and not os.path.exists(
        tmp_path / "run" / "data" / "split.json"
    )


@pytest.mark.parametrize("kind", ["float", "bool", "list", "struct"])
def test_a_parquet_column_of_the_wrong_type_is_one_line_through_the_command(tmp_path, sft, capsys, kind):
    value = {"float": 0.5, "bool": True, "list": ["w2"], "struct": {"text": "w2"}}[kind]
    path = parquet(
        tmp_path / "x.parquet",
        {"prompt": [f"w1 n{i}" for i in range(12)], "chosen": [value] * 12, "rejected": ["w3"] * 12},
    )
    rc, err = train(tmp_path / "run", sft, path, capsys)
    assert rc == 2 and err.strip().splitlines() == [err.strip()]
    assert err.startswith(f"ssapo train: error: preference_data: {path} row index 0: 'chosen' is ")


def test_chosen_equal_to_rejected_everywhere_is_refused_through_the_command(tmp_path, sft, capsys):
    path = jsonl(tmp_path / "same.jsonl", [text_row(i, rejected="w2") for i in range(12)])
    rc, err = train(tmp_path / "run", sft, path, capsys)
    assert rc == 2 and err.strip() == (
        f"ssapo train: error: preference_data: {path}: chosen equals rejected in every row (nothing would be learned: "
        "the DPO loss stays log 2)"
    )
