"""A round left without pairs is an outcome, not a crash (issue 19, item 2, the loop's part): when every
prompt's responses tie, the annotation step records the round's statistics, the rounds end with the last
policy as the run's result (state.json "stopped", the round's metrics.json), the later steps are recorded
as skipped, `ssapo train` says so in one line and exits 0; --resume has nothing left to do. Here an
annotator that scores every response alike makes the round tie."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ssapo.config import load_config, recipe_path
from ssapo.loop import run
from ssapo.methods import steps_of

JUDGE = "def make(args):\n    return lambda prompts, responses: [[0.0] * len(r) for r in responses]\n"
SMALL = {"seed_size": "16", "round_sizes": "16 16", "num_rounds": "2", "seed_epochs": "1", "max_new_tokens": "4"}


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("judge"))
    with open(os.path.join(d, "tie_judge.py"), "w") as f:
        f.write(JUDGE)
    return d


@pytest.fixture
def paths(task_paths):
    return {**task_paths, "annotator": "tie_judge:make"}


def check_stopped(out):
    state = json.load(open(os.path.join(out, "state.json")))
    cfg = load_config("tiny", overrides={**SMALL, "output_dir": out})
    assert state["done"] == steps_of(cfg)  # every step recorded: nothing left for --resume
    stopped = state["stopped"]
    assert stopped["at"] == "round_1/annotate" and stopped["round"] == 1 and stopped["result"] == "seed/model"
    assert stopped["skipped"] == steps_of(cfg)[3:]
    m = json.load(open(os.path.join(out, "round_1", "metrics.json")))
    assert m["annotation"]["pairs"] == 0 and m["annotation"]["dropped_all_tied"] == m["annotation"]["prompts"] == 16
    assert m["stopped"]["result"] == "seed/model"
    assert os.path.isdir(os.path.join(out, "seed", "model"))
    assert not os.path.exists(os.path.join(out, "round_1", "model"))
    assert not os.path.exists(os.path.join(out, "round_2"))
    return stopped


def test_a_round_without_pairs_ends_the_rounds_with_the_last_policy(tmp_path, paths, judge_dir, monkeypatch, capsys):
    monkeypatch.syspath_prepend(judge_dir)
    out = str(tmp_path / "run")
    cfg = load_config("tiny", overrides={**SMALL, **paths, "output_dir": out})
    assert str(run(cfg)) == out  # no RuntimeError: the run ends normally
    stopped = check_stopped(out)
    err = capsys.readouterr().err
    assert f"ssapo train: {stopped['why']}" in err
    assert "round 1: the policy stopped exploring: every response tied for all 16 prompts" in stopped["why"]
    assert str(run(cfg, resume=True)) == out  # --resume: nothing left to do
    check_stopped(out)


def test_the_driver_and_every_rank_skip_the_rest_after_a_stop(tmp_path, paths, judge_dir):
    """Two processes: the annotation step's launch stops the rounds on rank 0; rank 1 and the driver read it
    (no launch for the skipped steps, no 'ended without recording it')."""
    out = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "SSAPO_ACCELERATE_LAUNCHED")}
    env.update(PYTHONPATH=os.pathsep.join([judge_dir, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    args = ["--config", recipe_path("tiny"), *[f"--{k.replace('_', '-')}={v}" for k, v in paths.items()]]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    r = subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "train", *args, "--output-dir", out, "--num-processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    stopped = check_stopped(out)
    assert f"ssapo train: {stopped['why']}" in r.stderr
    launched = [x for x in r.stderr.splitlines() if "process(es):" in x]
    assert not any("round_1/lead" in x or "round_2" in x for x in launched), launched
