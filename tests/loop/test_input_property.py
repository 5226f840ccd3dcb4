"""Property: a preference file mixing good rows with rows that break every input
rule (ssapo.inputs: nulls, empties, chosen == rejected, duplicates, over-long
prompts; wrong types, unknown roles, a prompt spoken by the assistant, an
answer by the user, string rows among conversations, bytes that are not UTF-8,
lines that are not JSON, rows that are not objects), in JSON lines or one JSON
array, as strings, messages or ShareGPT conversations, either is refused in
one line naming the file and the first line at fault before anything is
written, or is split with exactly the drops the rows call for counted in
split.json and only good rows in the seed, the rounds and the held-out set.
hypothesis draws the files (few examples, through `write_run_data` with a tiny
tokenizer); the real `ssapo train` runs one mixed file to the end and refuses
another in one line, exit 2."""

import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ssapo.errors import InputError
from ssapo.io import read_jsonl

DROPS = ["null", "empty", "equal", "dup", "long"]
REFUSALS = ["float", "bool", "role", "asst_prompt", "user_answer", "mixed", "bytes", "notjson", "notobject"]
RULE_OF = {
    "null": "null",
    "empty": "empty",
    "equal": "chosen_equals_rejected",
    "dup": "duplicate_prompt",
    "long": "too_long",
}
MAX_PROMPT = 16


def m(role, content, sharegpt=False):
    return {"from": role, "value": content} if sharegpt else {"role": role, "content": content}


def make_row(form, prompt, chosen="w2 w3", rejected="w4 w5"):
    """A row of `form` (text, messages or sharegpt: whole conversations with human / gpt, no prompt column)."""
    if form == "text":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if form == "messages":
        return {
            "prompt": [m("user", prompt)],
            "chosen": [m("assistant", chosen)],
            "rejected": [m("assistant", rejected)],
        }
    return {
        "chosen": [m("human", prompt, True), m("gpt", chosen, True)],
        "rejected": [m("human", prompt, True), m("gpt", rejected, True)],
    }


def bad_row(kind, form, i, choice):
    """The JSON text of one row of `kind` (a drop or a refusal) in a file of `form`; `choice` picks a variant."""
    p = f"w1 n{i}"
    if kind == "null":
        r = make_row(form, p)
        key = ["chosen", "rejected", "prompt"][choice % (2 if form == "sharegpt" else 3)]
        if choice % 2:
            r[key] = None
        else:
            del r[key]
    elif kind == "empty":
        r = make_row(form, p, chosen=["", "  ", "\n"][choice % 3]) if choice % 2 else make_row(form, p, rejected=" ")
        if form == "text" and choice % 4 == 3:
            r = make_row(form, "   ")
    elif kind == "equal":
        r = make_row(form, p, chosen="w6 w7", rejected="w6 w7" if choice % 2 else " w6 w7 ")
    elif kind == "long":
        r = make_row(form, " ".join(["w1"] * (MAX_PROMPT + 2 + choice)) + f" n{i}")
    elif kind == "float":
        r = dict(make_row(form, p), chosen=0.5 + choice)
    elif kind == "bool":
        r = dict(make_row(form, p), rejected=True)
    elif kind == "role":
        r = make_row("messages", p)
        r["prompt"] = [m(["narrator", "tool", "critic"][choice % 3], p)]
    elif kind == "asst_prompt":
        r = make_row("messages", p)
        r["prompt"] = [m("assistant", p)]
    elif kind == "user_answer":
        r = make_row("messages", p)
        r["chosen"] = [m("user", "w2")]
    elif kind == "mixed":  # a row in the other form than the file's
        r = make_row("messages" if form == "text" else "text", p)
    elif kind == "bytes":
        return json.dumps(make_row(form, "w1 XX")).replace("XX", "\udcff").encode("utf-8", "surrogateescape")
    elif kind == "notjson":
        return b'{"prompt": "%s", "chosen": }' % p.encode()
    elif kind == "notobject":
        return json.dumps([p, "w2", "w3"]).encode()
    else:
        raise AssertionError(kind)
    return json.dumps(r).encode()


def build(kinds, form, fmt, blanks, choices):
    """(file bytes, the 1-based line of each row). A `dup` row repeats an earlier good row's prompt (a good row
    when there is none yet)."""
    lines, good_prompts, out = [], [], []
    for i, kind in enumerate(kinds):
        choice = choices[i % len(choices)]
        if kind == "dup" and not good_prompts:
            kind = kinds[i] = "good"
        if kind == "good":
            good_prompts.append(f"w1 n{i}")
            text = json.dumps(make_row(form, f"w1 n{i}")).encode()
        elif kind == "dup":
            text = json.dumps(make_row(form, good_prompts[choice % len(good_prompts)], chosen="w8")).encode()
        else:
            text = bad_row(kind, form, i, choice)
        out.append(text)
    head, sep, tail = (b"", b"\n", b"\n") if fmt == "jsonl" else (b"[\n", b",\n", b"\n]\n")
    body, line = head, head.count(b"\n") + 1
    for i, text in enumerate(out):
        if blanks[i % len(blanks)]:
            body, line = body + b"\n", line + 1
        lines.append(line)
        body += text + (sep if i < len(out) - 1 or fmt == "jsonl" else b"")
        line += 1
    return body + (tail if fmt == "json" else b""), lines


def form_of(kind, form):
    if kind == "mixed":
        return "messages" if form == "text" else "text"
    return "text" if form == "text" else "messages"


def expected(kinds, form, lines):
    """("refuse", line) or ("drops", {rule: [lines]}, kept) as ssapo.inputs' one pass decides."""
    for k in ("bytes", "notjson", "notobject"):  # reading comes first, then every row must be an object
        if k in kinds:
            return "refuse", lines[kinds.index(k)]
    ref = None
    dropped = {rule: [] for rule in RULE_OF.values()}
    kept = 0
    for kind, line in zip(kinds, lines):
        if kind in ("float", "bool", "role", "asst_prompt", "user_answer"):
            return "refuse", line
        if kind in ("null", "empty", "equal"):
            dropped[RULE_OF[kind]].append(line)
            continue
        f = form_of(kind, form)  # good, dup, long and mixed rows are read, then their forms compared
        if ref is None:
            ref = f
        elif f != ref:
            return "refuse", line
        if kind in ("dup", "long"):
            dropped[RULE_OF[kind]].append(line)
        else:
            kept += 1
    return "drops", dropped, kept


def cfg_for(path, **kw):
    from ssapo.config import load_config

    over = {"preference_data": path, "seed_size": "2", "round_sizes": "2", "num_rounds": "1"}
    return load_config("tiny", overrides={**over, "max_prompt_length": str(MAX_PROMPT), **kw})


@pytest.fixture(scope="module")
def tok():
    from ssapo.tiny import build_tokenizer

    return build_tokenizer([f"w{i}" for i in range(16)] + [f"n{i}" for i in range(64)])


def valid_pair(r):
    p, c, rj = r["prompt"], r["chosen"], r["rejected"]
    if isinstance(p, str):
        return p.strip() and c.strip() and rj.strip() and c.strip() != rj.strip()
    return (
        p[-1]["role"] == "user"
        and [x["role"] for x in c] == ["assistant"] == [x["role"] for x in rj]
        and c[0]["content"].strip()
        and rj[0]["content"].strip()
        and c[0]["content"].strip() != rj[0]["content"].strip()
    )


CLEAN = st.sampled_from(["good"] * 8 + DROPS)
ANY = st.sampled_from(["good"] * 6 + DROPS + REFUSALS)


@st.composite
def files(draw):
    clean = draw(st.booleans())  # half the files break drop rules only
    kinds = draw(st.lists(CLEAN, min_size=10, max_size=30) if clean else st.lists(ANY, min_size=1, max_size=24))
    return (
        kinds,
        draw(st.sampled_from(["text", "messages", "sharegpt"])),
        draw(st.sampled_from(["jsonl", "json"])),
        draw(st.lists(st.booleans(), min_size=1, max_size=5)),
        draw(st.lists(st.integers(0, 5), min_size=1, max_size=5)),
    )


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=files())
def test_a_malformed_file_is_refused_in_one_line_or_split_with_its_drops_counted(tmp_path_factory, tok, case):
    from ssapo.data import write_run_data
    from ssapo.inputs import RULES

    kinds, form, fmt, blanks, choices = case
    kinds = list(kinds)
    body, lines = build(kinds, form, fmt, blanks, choices)
    d = tmp_path_factory.mktemp("prop")
    path = str(d / f"p.{fmt}")
    with open(path, "wb") as f:
        f.write(body)
    want = expected(kinds, form, lines)
    out = d / "data"
    try:
        write_run_data(cfg_for(path), str(out), tok)
    except (InputError, ValueError) as e:
        msg = str(e)
        assert "\n" not in msg and not (out / "split.json").exists()
        event(f"refused: {msg.split(': ')[0]} ({'a file problem' if want[0] == 'refuse' else 'too few rows left'})")
        if want[0] == "refuse":
            assert msg.startswith(f"preference_data: {path} line {want[1]}: "), (msg, want, kinds)
            return
        _, dropped, kept = want
        if kept == 0:  # (or no row has the column: every row is a null one that leaves it out)
            assert (
                msg.startswith("preference_data: ")
                and path in msg
                and any(
                    why in msg
                    for why in (
                        "every row is dropped",
                        "chosen equals rejected in every row",
                        "missing column",
                        "no 'prompt'",
                    )
                )
            ), msg
        else:
            assert kept < 4 and msg.startswith(("seed_size: ", "round_sizes: ")), (msg, kept)
        return
    assert want[0] == "drops", (want, kinds)
    _, dropped, kept = want
    event(f"split, {'some' if sum(map(len, dropped.values())) else 'no'} rows dropped")
    split = json.loads((out / "split.json").read_text())
    assert split["dropped"] == {rule: len(dropped[rule]) for rule in RULES}, (split, kinds)
    entry = split["inputs"]["preference_data"]
    assert entry["rows"] == len(kinds) and entry["kept"] == kept
    assert entry["first_dropped"] == {rule: v[:5] for rule, v in dropped.items() if v}
    seed, held = read_jsonl(out / "seed.jsonl"), read_jsonl(out / "heldout.jsonl")
    rounds = read_jsonl(out / "round_1.jsonl")
    assert len(seed) == 2 and len(rounds) == 2 and len(held) == kept - 4 == split["test"]
    assert all(valid_pair(r) for r in seed + held)
    prompts = [json.dumps(r["prompt"]) for r in seed + held + rounds]
    assert len(set(prompts)) == len(prompts) and all("null" not in p for p in prompts)


# -- the real command, end to end: one mixed file trains with its drops counted, one is refused --


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tok):
    from ssapo.tiny import save_pretrained, tiny_llama

    return save_pretrained(tiny_llama(tok), tok, tmp_path_factory.mktemp("sft") / "m")


def train(tmp_path, sft, kinds, capsys):
    from ssapo.cli import main
    from ssapo.config import recipe_path

    body, lines = build(kinds, "messages", "jsonl", [False], [0, 1, 2])
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(body)
    out = tmp_path / "run"
    argv = ["train", "--config", recipe_path("tiny"), "--model", str(sft), "--preference-data", str(path)]
    argv += ["--output-dir", str(out), "--seed-size", "4", "--round-sizes", "4", "--num-rounds", "0"]
    argv += ["--seed-epochs", "1", "--max-prompt-length", str(MAX_PROMPT), "--batch-size", "4"]
    rc = main(argv)
    return rc, capsys.readouterr().err, str(path), out, lines


def test_ssapo_train_runs_a_mixed_bad_file_with_its_drops_counted(tmp_path, sft, capsys):
    kinds = ["good"] * 4 + ["null", "empty", "equal", "dup", "long"] * 2 + ["good"] * 8
    rc, err, path, out, lines = train(tmp_path, sft, kinds, capsys)
    assert rc == 0, err[-2000:]
    metrics = json.loads((out / "seed" / "metrics.json").read_text())
    assert metrics["split"]["dropped"] == {
        "null": 2,
        "empty": 2,
        "chosen_equals_rejected": 2,
        "duplicate_prompt": 2,
        "too_long": 2,
    }
    assert metrics["split"]["inputs"]["preference_data"]["kept"] == 12 and metrics["split"]["test"] == 8
    assert metrics["eval"]["heldout_pairs"] == 8
    warning = [e for e in err.splitlines() if e.startswith("warning: preference_data:")]
    assert warning == [
        f"warning: preference_data: dropped 10 of 22 rows of {path}: null 2 (lines 5, 10); empty 2 (lines 6, 11); "
        "chosen_equals_rejected 2 (lines 7, 12); duplicate_prompt 2 (lines 8, 13); too_long 2 (lines 9, 14) "
        f"(counted in {out / 'data' / 'split.json'})"
    ]


def test_ssapo_train_refuses_a_mixed_bad_file_in_one_line_before_training(tmp_path, sft, capsys):
    kinds = ["good"] * 4 + ["null", "dup", "long", "role", "float", "mixed", "asst_prompt"] + ["good"] * 8
    rc, err, path, out, lines = train(tmp_path, sft, kinds, capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"ssapo train: error: preference_data: {path} line 8: unknown conversation role 'tool' in 'prompt' "
        "(known: user, assistant, system, and the aliases human, gpt, bot, model, chatbot)"
    ]
    assert not os.path.exists(out / "seed") and not os.path.exists(out / "data" / "split.json")
