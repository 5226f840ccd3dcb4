"""`ssapo train` on bad inputs a user actually gives (a missing data file, a missing model, a
directory that holds a tokenizer but no model): one line naming the argument, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from ssapo.tiny import build_tokenizer


def _train(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ssapo.cli", "train", "--output-dir", str(tmp_path / "run"), "--use-cpu", "--no-bf16"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def prefs(tmp_path):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    return str(p)


@pytest.mark.parametrize("case", ["no data file", "no model", "tokenizer only"])
def test_bad_inputs_are_one_line_naming_the_argument(tmp_path, prefs, case):
    tok_dir = tmp_path / "tokonly"
    build_tokenizer("a b c".split()).save_pretrained(str(tok_dir))
    args, field = {
        "no data file": (
            ["--model", str(tok_dir), "--preference-data", str(tmp_path / "nope.jsonl")],
            "preference_data",
        ),
        "no model": (["--model", str(tmp_path / "missing"), "--preference-data", prefs], "model"),
        "tokenizer only": (["--model", str(tok_dir), "--preference-data", prefs, "--seed-size", "1"], "model"),
    }[case]
    r = _train(tmp_path, *args, "--num-rounds", "0")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ssapo train: error: {field}: "), r.stderr[-3000:]
