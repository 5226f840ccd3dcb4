"""Loading preference data in every format and schema, the paper's split
(sizes, determinism, disjointness), errors that name the source or column,
and skips that are counted. Every file is written by the test; nothing is
downloaded (the hub path is exercised through a stand-in load_dataset)."""

import json

import pytest

from ssapo.data import Split, split_seed_and_rounds
from ssapo.inputs import RULES, load_preferences, load_prompts, prompt_key, read_preferences


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


# argilla/ultrafeedback-binarized-preferences-cleaned: a string prompt and whole conversations
ARGILLA = [
    {"prompt": f"q{i}", "chosen": conv(f"q{i}", "good"), "rejected": conv(f"q{i}", "bad"), "score": i}
    for i in range(40)
]
NO_PROMPT = [{k: v for k, v in r.items() if k != "prompt"} for r in ARGILLA]
STRINGS = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "gold": float(i)} for i in range(40)]
MSG = [
    {
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    for i in range(40)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write(tmp_path, rows, fmt):
    from datasets import Dataset

    if fmt == "jsonl":
        return write_jsonl(tmp_path / "p.jsonl", rows)
    if fmt == "json":  # one JSON array
        (tmp_path / "p.json").write_text(json.dumps(rows))
        return str(tmp_path / "p.json")
    ds = Dataset.from_list(rows)
    if fmt == "parquet":
        ds.to_parquet(str(tmp_path / "p.parquet"))
        return str(tmp_path / "p.parquet")
    if fmt == "arrow-dir":
        ds.save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    if fmt == "datasetdict-dir":
        from datasets import DatasetDict

        DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd")
    if fmt == "files-dir":
        (tmp_path / "files").mkdir()
        write_jsonl(tmp_path / "files" / "train.jsonl", rows)
        return str(tmp_path / "files")
    raise AssertionError(fmt)


FORMATS = ["jsonl", "json", "parquet", "arrow-dir", "datasetdict-dir", "files-dir"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("schema", ["argilla", "no-prompt", "messages"])
def test_chat_schemas_in_every_format(tmp_path, fmt, schema):
    rows = {"argilla": ARGILLA, "no-prompt": NO_PROMPT, "messages": MSG}[schema]
    ds = load_preferences(write(tmp_path, rows, fmt))
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"] and len(ds) == 40
    row = ds[3]
    assert row["prompt"] == [{"role": "user", "content": "q3"}]
    assert row["chosen"] == [{"role": "assistant", "content": "good"}]
    assert row["rejected"] == [{"role": "assistant", "content": "bad"}]
    if schema != "messages":
        assert row["score"] == 3  # extra columns kept


@pytest.mark.parametrize("fmt", FORMATS)
def test_string_schema_in_every_format(tmp_path, fmt):
    ds = load_preferences(write(tmp_path, STRINGS, fmt))
    assert ds.column_names == ["prompt", "chosen", "rejected", "gold"]
    assert ds[5] == {"prompt": "q5", "chosen": "good", "rejected": "bad", "gold": 5.0}


def test_string_prompt_with_one_message_answers(tmp_path):
    rows = [
        {
            "prompt": "hi",
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    ]
    assert load_preferences(write_jsonl(tmp_path / "p.jsonl", rows))[0]["prompt"] == [{"role": "user", "content": "hi"}]


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(path, split=None, **kw):
        calls.append((path, split))
        return datasets.Dataset.from_list(STRINGS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert len(load_preferences("someone/uf-binarized")) == 40
    assert len(load_prompts("someone/uf-binarized:train_prefs")) == 40
    assert calls == [("someone/uf-binarized", "train"), ("someone/uf-binarized", "train_prefs")]


def test_a_hub_id_that_cannot_be_loaded_is_a_value_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="^preference_data: 'nobody/nothing' is not a local file .*ConnectionError"):
        load_preferences("nobody/nothing")


def test_prompt_pools(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": f"x{i}", "id": i} for i in range(5)])
    assert load_prompts(pool).column_names == ["prompt"] and load_prompts(pool)["prompt"][0] == "x0"
    # pairs are a pool too: their prompts, labels dropped
    pairs = load_prompts(write_jsonl(tmp_path / "pairs.jsonl", NO_PROMPT))
    assert pairs.column_names == ["prompt"] and pairs[0]["prompt"] == [{"role": "user", "content": "q0"}]


def test_prompt_key_treats_a_string_as_one_user_message():
    assert prompt_key("q1") == prompt_key([{"role": "user", "content": "q1"}]) != prompt_key("q2")


# -- the split --


def test_split_is_the_papers_row_blocks(tmp_path):
    """No skips: seed = rows [0, s) of shuffle(seed), then consecutive blocks, the rest is test."""
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", STRINGS))
    split = split_seed_and_rounds(ds, 5, [8, 12], seed=42)
    assert isinstance(split, Split)
    order = list(ds.shuffle(seed=42)["gold"])
    assert list(split.seed["gold"]) == order[:5]
    assert [list(r["prompt"]) for r in split.rounds] == [
        [f"q{int(g)}" for g in order[5:13]],
        [f"q{int(g)}" for g in order[13:25]],
    ]
    assert list(split.test["gold"]) == order[25:]
    assert split.seed.column_names == ["prompt", "chosen", "rejected", "gold"]
    assert all(r.column_names == ["prompt"] for r in split.rounds)  # prompts only: labels dropped
    assert split.report == {
        "seed": 5,
        "rounds": [8, 12],
        "test": 15,
        "test_overlap_dropped": 0,
        "pool_overlap_skipped": 0,
        "dropped": {rule: 0 for rule in RULES},
        "inputs": {},
    }


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", ARGILLA))
    seed, rounds, report = split_seed_and_rounds(ds, 5, [8, 12], seed=42)
    again, rounds2, _ = split_seed_and_rounds(ds, 5, [8, 12], seed=42)
    other, _, _ = split_seed_and_rounds(ds, 5, [8, 12], seed=0)
    assert list(seed["score"]) == list(again["score"]) != list(other["score"])
    assert [list(r["prompt"]) for r in rounds] == [list(r["prompt"]) for r in rounds2]
    assert [len(r) for r in rounds] == [8, 12] and len(seed) == 5
    keys = [prompt_key(p) for p in seed["prompt"]] + [prompt_key(p) for r in rounds for p in r["prompt"]]
    assert len(set(keys)) == len(keys)


def test_separate_prompt_pool(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", STRINGS))
    pool = load_prompts(
        write_jsonl(
            tmp_path / "pool.jsonl", [{"prompt": f"x{i}"} for i in range(30)] + [{"prompt": "q0"}, {"prompt": "q1"}]
        )
    )  # two may repeat seed prompts
    split = split_seed_and_rounds(ds, 38, [10, 15], seed=1, prompts=pool)
    assert [len(r) for r in split.rounds] == [10, 15]
    seed_keys = {prompt_key(p) for p in split.seed["prompt"]}
    assert not seed_keys & {prompt_key(p) for r in split.rounds for p in r["prompt"]}
    assert len(split.test) == 2  # the labelled pairs after the seed


def test_duplicates_and_empties_are_dropped_at_load_and_counted(tmp_path, capsys):
    rows = STRINGS + STRINGS[:10] + [{"prompt": "", "chosen": "a", "rejected": "b", "gold": -1.0}]
    ds, checked = read_preferences(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(ds) == 40 and checked.rows == 51 and checked.kept == 40
    assert checked.dropped["duplicate_prompt"] == list(range(41, 51)) and checked.dropped["empty"] == [51]
    seed, rounds, report = split_seed_and_rounds(ds, 5, [20], seed=0, checked=[checked])
    used = [p for p in seed["prompt"]] + list(rounds[0]["prompt"])
    assert len(set(used)) == 25 and "" not in used
    assert report["dropped"] == {**{rule: 0 for rule in RULES}, "duplicate_prompt": 10, "empty": 1}
    assert report["inputs"]["preference_data"]["first_dropped"] == {
        "duplicate_prompt": [41, 42, 43, 44, 45],
        "empty": [51],
    }
    # every row is accounted for: used, dropped at load, or test
    assert 25 + sum(report["dropped"].values()) + report["test"] + report["test_overlap_dropped"] == len(rows)
    # load_preferences says it in one warning line, with the first line numbers
    load_preferences(str(tmp_path / "p.jsonl"))
    err = capsys.readouterr().err.strip().splitlines()
    assert [e for e in err if e.startswith("warning:")] == [
        f"warning: preference_data: dropped 11 of 51 rows of {tmp_path / 'p.jsonl'}: "
        "empty 1 (line 51); duplicate_prompt 10 (lines 41, 42, 43, 44, 45, ...)"
    ]


def test_over_long_prompts_are_dropped_at_load_and_counted(tmp_path):
    from ssapo.inputs import prompt_length
    from ssapo.tiny import build_tokenizer

    rows = [{"prompt": " ".join(["w"] * (1 + (i % 4) * 5)), "chosen": "w", "rejected": "x", "i": i} for i in range(40)]
    rows = [dict(r, prompt=r["prompt"] + f" n{r['i']}") for r in rows]  # distinct prompts
    tok = build_tokenizer(["w", "x"] + [f"n{i}" for i in range(40)])
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds, checked = read_preferences(path, tokenizer=tok, max_prompt_length=12)
    assert all(prompt_length(tok, p) <= 12 for p in ds["prompt"])
    long = [i + 1 for i, r in enumerate(rows) if prompt_length(tok, r["prompt"]) > 12]
    assert long and checked.dropped["too_long"] == long and len(ds) == 40 - len(long)
    seed, rounds, report = split_seed_and_rounds(ds, 4, [4, 4], seed=0, checked=[checked])
    assert report["dropped"]["too_long"] == len(long)
    # no tokenizer: nothing is measured
    assert read_preferences(path)[1].counts()["too_long"] == 0


def test_batched_prompt_lengths_are_prompt_length(tmp_path):
    from ssapo.inputs import _prompt_lengths, prompt_length
    from ssapo.tiny import build_tokenizer

    tok = build_tokenizer(["w", "x"])
    prompts = [
        "w x w",
        [{"role": "user", "content": "w"}],
        conv("x", "w")[:1] + [{"role": "assistant", "content": "w"}],
    ]
    prompts.append(prompts[2] + [{"role": "user", "content": "x x x"}])
    assert _prompt_lengths(tok, prompts, str) == [prompt_length(tok, p) for p in prompts]
    tok.chat_template = None
    assert _prompt_lengths(tok, prompts[:2], str) == [prompt_length(tok, p) for p in prompts[:2]]


# -- errors --


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda p: write_jsonl(p / "x.jsonl", [{"prompt": "a", "chosen": "b"}]),
            r"^preference_data: missing column\(s\) \['rejected'\] in .*x.jsonl",
        ),
        (lambda p: str(p / "missing.jsonl"), "^preference_data: no such file or directory: .*missing.jsonl"),
        (lambda p: (p / "x.txt").write_text("hi") and str(p / "x.txt"), "^preference_data: unknown file type '.txt'"),
        (
            lambda p: write_jsonl(p / "s.jsonl", [{"chosen": "a", "rejected": "b"}]),
            "^preference_data: .*s.jsonl line 1: no 'prompt' column, and 'chosen' is a string",
        ),
        (
            lambda p: write_jsonl(
                p / "one.jsonl",
                [
                    {
                        "chosen": [{"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}],
                    }
                ],
            ),
            "^preference_data: .*one.jsonl line 1: no 'prompt' column, and 'chosen' holds only the answer",
        ),
        (
            lambda p: write_jsonl(
                p / "mix.jsonl", [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]
            ),
            "^preference_data: .*mix.jsonl line 1: 'chosen' is a string while 'prompt' is a chat-message list",
        ),
        (
            lambda p: (p / "e.jsonl").write_text("") and str(p / "e.jsonl") or str(p / "e.jsonl"),
            "^preference_data: .*e.jsonl holds no rows",
        ),
        (
            lambda p: (p / "bad.jsonl").write_text("{not json\n") and str(p / "bad.jsonl"),
            "^preference_data: .*bad.jsonl line 1: not JSON",
        ),
        (lambda p: (p / "empty_dir").mkdir() or str(p / "empty_dir"), "^preference_data: .*empty_dir holds no"),
        (lambda p: "", "^preference_data: empty source"),
    ],
)
def test_bad_sources_name_the_source_or_column(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        load_preferences(make(tmp_path))


def test_empty_sets(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(ValueError, match="^preference_data: .*e.parquet holds no rows"):
        load_preferences(str(tmp_path / "e.parquet"))
    with pytest.raises(ValueError, match="^prompt_data: .*e.parquet holds no rows"):
        load_prompts(str(tmp_path / "e.parquet"))
    Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(ValueError, match="^preference_data: .*e holds no rows"):
        load_preferences(str(tmp_path / "e"))
    with pytest.raises(ValueError, match="^prompt_data: missing column 'prompt'"):
        load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"question": "x"}]))


def test_too_small_for_the_split_says_the_numbers(tmp_path):
    ds, checked = read_preferences(write_jsonl(tmp_path / "p.jsonl", STRINGS + STRINGS[:3]))
    with pytest.raises(
        ValueError,
        match=r"^round_sizes: 100 prompts needed for rounds \[50, 50\], but preference_data "
        r"after the seed has only 35 usable; dropped at load: 3 duplicate_prompt; lower",
    ):
        split_seed_and_rounds(ds, 5, [50, 50], seed=0, checked=[checked])
    with pytest.raises(
        ValueError,
        match=r"^seed_size: 50 seed pairs requested but preference_data has only 40 usable "
        r"rows; dropped at load: 3 duplicate_prompt$",
    ):
        split_seed_and_rounds(ds, 50, [5], seed=0, checked=[checked])
    with pytest.raises(ValueError, match="^seed_size: must be >= 1"):
        split_seed_and_rounds(ds, 0, [5], seed=0)
    with pytest.raises(ValueError, match="^preference_data: missing column 'chosen'"):
        split_seed_and_rounds(ds.remove_columns("chosen"), 5, [5], seed=0)
