"""Loading preference data in every format, the paper's split, and errors."""

import json

import pytest

from ssapo.data import load_preferences, load_prompts, split_seed_and_rounds

CHAT = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}],
         "score": i} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_chat_lists_without_prompt_column(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", CHAT))
    assert ds[3]["prompt"] == [{"role": "user", "content": "q3"}]
    assert ds[3]["chosen"] == [{"role": "assistant", "content": "good"}] and ds[3]["score"] == 3


def test_parquet_and_saved_dataset_and_strings(tmp_path):
    from datasets import Dataset

    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for src in (tmp_path / "p.parquet", tmp_path / "saved"):
        ds = load_preferences(str(src))
        assert ds.column_names[:3] == ["prompt", "chosen", "rejected"] and len(ds) == 10
    assert load_prompts(str(tmp_path / "p.parquet")).column_names == ["prompt"]


def test_split_is_deterministic_and_disjoint(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", CHAT))
    seed, rounds, stats = split_seed_and_rounds(ds, [8, 12], seed_size=5, seed=42)
    again = split_seed_and_rounds(ds, [8, 12], seed_size=5, seed=42)
    assert [len(r) for r in rounds] == [8, 12] and len(seed) == 5
    assert list(seed["score"]) == list(again[0]["score"])
    keys = [json.dumps(p) for p in seed["prompt"]] + [json.dumps(p) for r in rounds for p in r["prompt"]]
    assert len(set(keys)) == len(keys)
    assert rounds[0].column_names == ["prompt"] and stats["duplicates_skipped"] == 0


def test_duplicates_are_skipped_and_counted(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", CHAT + CHAT[:10]))
    _, rounds, stats = split_seed_and_rounds(ds, [20], seed_size=5, seed=0)
    assert stats["duplicates_skipped"] > 0 and len(rounds[0]) == 20


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: write_jsonl(p / "x.jsonl", [{"prompt": "a", "chosen": "b"}]), r"preference_data: missing column\(s\) \['rejected'\]"),
        (lambda p: str(p / "missing.jsonl"), "preference_data: no such file"),
        (lambda p: (p / "x.txt").write_text("hi") and str(p / "x.txt"), "preference_data: unknown file type"),
        (lambda p: write_jsonl(p / "s.jsonl", [{"chosen": "a", "rejected": "b"}]), "preference_data: has no 'prompt' column"),
    ],
)
def test_bad_sources(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        load_preferences(make(tmp_path))


def test_too_small_for_the_split(tmp_path):
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", CHAT))
    with pytest.raises(ValueError, match="round_sizes: 100 fresh prompts needed"):
        split_seed_and_rounds(ds, [50, 50], seed_size=5, seed=0)
    with pytest.raises(ValueError, match="seed_size: 50 seed pairs requested"):
        split_seed_and_rounds(ds, [5], seed_size=50, seed=0)
