"""`ssapo export` on a tiny saved model."""

import json

import pytest

from ssapo.cli import main
from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = build_tokenizer("a b c d".split())
    return save_pretrained(tiny_llama(tok), tok, str(tmp_path_factory.mktemp("m") / "tinymodel"))


def test_alpaca_eval_format(tmp_path, model_dir):
    src = tmp_path / "q.jsonl"
    src.write_text(
        json.dumps({"instruction": "a b", "dataset": "helpful_base"}) + "\n" + json.dumps({"prompt": "c d"}) + "\n"
    )
    out = tmp_path / "a.json"
    assert (
        main(
            [
                "export",
                "--model",
                model_dir,
                "--prompts",
                str(src),
                "--format",
                "alpaca_eval",
                "--output",
                str(out),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert [d["instruction"] for d in doc] == ["a b", "c d"] and doc[0]["dataset"] == "helpful_base"
    assert all(d["generator"] == "tinymodel" and isinstance(d["output"], str) for d in doc)


def test_mt_bench_answers_every_turn(tmp_path, model_dir):
    src = tmp_path / "q.jsonl"
    src.write_text(json.dumps({"question_id": 81, "turns": ["a b", "c"]}) + "\n")
    out = tmp_path / "a.jsonl"
    assert (
        main(
            [
                "export",
                "--model",
                model_dir,
                "--prompts",
                str(src),
                "--format",
                "mt_bench",
                "--output",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    row = json.loads(out.read_text())
    assert row["question_id"] == 81 and row["model_id"] == "tinymodel" and len(row["choices"][0]["turns"]) == 2


def test_bad_prompts_file(tmp_path, model_dir, capsys):
    assert (
        main(
            [
                "export",
                "--model",
                model_dir,
                "--prompts",
                str(tmp_path / "none.jsonl"),
                "--format",
                "mt_bench",
                "--output",
                "x",
            ]
        )
        == 2
    )
    assert "--prompts: no such file" in capsys.readouterr().err
