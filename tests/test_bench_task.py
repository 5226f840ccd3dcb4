"""The gold-reward task behaves as specified, and `ssapo bench --quick` runs
end to end (on a smaller setting)."""

import json
import os
import random
import time

import numpy as np
import pytest

from ssapo.bench.metrics import win_rates
from ssapo.bench.task import TaskSpec, gold_reward, label_pairs, prepare_task


def test_gold_reward_depends_on_prompt_and_response():
    spec = TaskSpec(seed=0, quality_weight=0.0)  # the prompt-dependent part alone
    m = spec.mapping()
    perfect = " ".join(f"w{m[i]}" for i in (1, 2, 3))
    assert gold_reward(spec, "w1 w2 w3", perfect) == 1.0
    assert gold_reward(spec, "w4 w2 w3", perfect) < 1.0  # same answer, other prompt
    both = TaskSpec(seed=0)  # half translation, half hidden word quality
    q = both.quality()
    expect = 0.5 * 1.0 + 0.5 * sum(q[m[i]] for i in (1, 2, 3)) / 3
    assert gold_reward(both, "w1 w2 w3", perfect) == pytest.approx(expect)
    assert sorted(q) == [i / 15 for i in range(16)]
    assert gold_reward(spec, "w1 w2 w3", "w1 w2 w3") != gold_reward(spec, "w1 w2 w3", perfect)
    assert gold_reward(spec, "w1 w2 w3", "") == 0.0 and gold_reward(spec, "w1 w2 w3", "junk w99") == 0.0
    assert TaskSpec(seed=1).mapping() != m  # the hidden rule depends on the seed


def _pairs(spec, n=4000, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = " ".join(f"w{rng.randrange(spec.vocab)}" for _ in range(3))
        a = " ".join(f"w{rng.randrange(spec.vocab)}" for _ in range(3))
        b = " ".join(f"w{rng.randrange(spec.vocab)}" for _ in range(3))
        if gold_reward(spec, p, a) != gold_reward(spec, p, b):
            out.append(label_pairs(spec, rng, p, a, b))
    return out


def test_flip_rate_and_bradley_terry_temperature():
    noisy = _pairs(TaskSpec(seed=0, flip_rate=0.25))
    assert abs(np.mean([r["flipped"] for r in noisy]) - 0.25) < 0.03
    agree = lambda rows: np.mean([r["chosen_gold"] > r["rejected_gold"] for r in rows])  # noqa: E731
    cold, warm = (
        agree(_pairs(TaskSpec(seed=0, bt_temperature=0.01))),
        agree(_pairs(TaskSpec(seed=0, bt_temperature=0.5))),
    )
    assert cold > 0.95 and 0.5 < warm < cold
    assert agree(noisy) < agree(_pairs(TaskSpec(seed=0)))


def test_prepare_task_is_deterministic_and_cached(tmp_path):
    a = prepare_task(tmp_path / "a", seed=3, size="test")
    t = time.time()
    again = prepare_task(tmp_path / "a", seed=3, size="test")
    assert time.time() - t < 1.0 and again == a
    with open(a["preferences"]) as f:
        first = f.readline()
    b = prepare_task(tmp_path / "b", seed=3, size="test")
    with open(b["preferences"]) as f:
        assert f.readline() == first
    assert os.path.exists(os.path.join(a["sft_model"], "model.safetensors"))
    with pytest.raises(ValueError, match="size: must be one of"):
        prepare_task(tmp_path / "c", size="huge")


def test_length_controlled_win_rate_removes_a_length_effect():
    # a's answers are longer and win only through length: P(a wins) = σ(Δlen)
    rng = np.random.default_rng(0)
    lb = rng.integers(1, 10, 20000)
    la = lb + rng.integers(-1, 5, 20000)
    wins = rng.random(20000) < 1 / (1 + np.exp(-(la - lb)))
    r = win_rates(wins.astype(float), np.full(20000, 0.5), la, lb)
    assert r["win_rate"] > 0.7
    assert abs(r["lc_win_rate"] - 0.5) < 0.05


def test_noise_reaches_the_runs(tmp_path):
    from ssapo.bench.run import _config
    from ssapo.loop import resolve_model

    c = _config("iterative-dpo", {"task_size": "test"}, str(tmp_path / "r"), str(tmp_path / "t"), 0, 0.25)
    task = resolve_model(c, str(tmp_path / "r"))["task"]
    with open(task["preferences"]) as f:
        flips = [json.loads(line)["flipped"] for line in f]
    assert 0.15 < np.mean(flips) < 0.35


def test_quick_bench_end_to_end(tmp_path):
    from ssapo.bench.run import bench

    out = str(tmp_path / "bench")
    md = bench(out, ["dpo", "iterative-dpo", "ssapo-eps0"], seeds=[0], flips=[0.0], quick=True, n_eval=2)
    assert "| iterative-dpo |" in md and "Task validity:" in md
    assert "SSAPO at ε = 0 equals iterative DPO in 1 of 1 seeds" in md
    assert os.path.exists(os.path.join(out, "win_rate_per_round.png"))
    t = time.time()
    assert (
        bench(out, ["dpo", "iterative-dpo", "ssapo-eps0"], seeds=[0], flips=[0.0], quick=True, n_eval=2).split(
            "min on"
        )[1]
        == md.split("min on")[1]
    )
    assert time.time() - t < 60  # resumed: nothing retrained
    ev = json.load(open(os.path.join(out, "flip0", "seed0", "iterative-dpo", "eval.json")))
    assert len(ev["rounds"]) == 3 and 0 <= ev["rounds"][-1]["win_rate"] <= 1
