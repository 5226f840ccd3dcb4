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


SMALL_DESIGN = {"sft_examples": 256, "sft_epochs": 2, "labelled": 128, "prompts": 64, "val": 32, "test": 32}
SMALL_RUN = {
    "seed_size": 16,
    "round_sizes": [32],
    "num_rounds": 1,
    "batch_size": 8,
    "per_device_train_batch_size": 8,
    "max_new_tokens": 4,
    "seed_epochs": 1,
    "learning_rate": 5e-4,
}


def _small(**kw):
    import dataclasses

    from ssapo.bench.suite import PRESETS

    return dataclasses.replace(PRESETS["quick"], design=SMALL_DESIGN, run=SMALL_RUN, n_eval=2, **kw)


def test_noise_reaches_the_runs(tmp_path):
    from ssapo.bench.suite import Job, config_of, task_for

    p = _small()
    task = task_for(p, str(tmp_path), 0, 0.25)
    c = config_of(p, Job(0, 0.25, 0.4, "iterative-dpo"), str(tmp_path), task)
    with open(c.preference_data) as f:
        flips = [json.loads(line)["flipped"] for line in f]
    assert 0.15 < np.mean(flips) < 0.35
    assert c.annotation_flip_rate == 0.4 and c.model == task["sft_model"]
    oracle = config_of(p, Job(0, 0.0, 0.0, "oracle-iterative"), str(tmp_path), task_for(p, str(tmp_path), 0, 0.0))
    assert oracle.annotator == "ssapo.bench.oracle:gold_annotator" and oracle.annotator_args.endswith("task.json")
    gold = config_of(p, Job(0, 0.0, 0.0, "oracle-dpo"), str(tmp_path), task)
    assert gold.preference_data.endswith("gold_preferences.jsonl") and gold.seed_size == 16 + 32


def test_gold_annotator_scores_by_the_gold_reward(tmp_path):
    from ssapo.bench.oracle import gold_annotator

    p = prepare_task(tmp_path / "t", seed=1, size="test", design={"sft_examples": 64, "sft_epochs": 1})
    spec = TaskSpec(seed=1, size="test")
    m = spec.mapping()
    good = " ".join(f"w{m[i]}" for i in (1, 2, 3))
    score = gold_annotator(p["task"])
    out = score([[{"role": "user", "content": "w1 w2 w3"}], "w1 w2 w3"], [[good, "w0"], ["", good]])
    assert out == [[gold_reward(spec, "w1 w2 w3", good), gold_reward(spec, "w1 w2 w3", "w0")], [0.0, out[0][0]]]
    with pytest.raises(ValueError, match="annotator_args"):
        gold_annotator(str(tmp_path / "missing.json"))


def test_small_bench_end_to_end(tmp_path):
    """Every row the report compares against, the ε = 0 control, a self-annotation noise
    condition, resumption without retraining (a very small setting)."""
    from ssapo.bench.run import bench

    out = str(tmp_path / "bench")
    methods = ["dpo", "oracle-dpo", "oracle-iterative", "iterative-dpo", "ssapo-eps0"]
    kw = dict(methods=methods, seeds=[0], conditions=[(0.0, 0.0), (0.0, 0.4)], progress=False)
    p = _small()
    md = bench(out, "quick", design=p.design, run=p.run, n_eval=2, **kw)
    assert "| iterative-dpo |" in md and "| oracle-iterative |" in md and "Headroom" in md
    assert "Design criteria:" in md and "SSAPO at ε = 0 equals iterative DPO in 1 of 1 seeds" in md
    assert "40% of each round's self-annotations flipped" in md
    for png in ("headroom.png", "annotation_accuracy.png", "win_rate_per_round.png"):
        assert os.path.exists(os.path.join(out, png))
    t = time.time()
    again = bench(out, "quick", design=p.design, run=p.run, n_eval=2, **kw)
    # the same report, and the same run time (each run's own seconds, recorded when it ran), though nothing ran
    assert again.split(" min wall")[1] == md.split(" min wall")[1]
    assert again.split(" min of run time")[0] == md.split(" min of run time")[0]
    assert time.time() - t < 30  # resumed: nothing retrained
    ev = json.load(open(os.path.join(out, "seed0", "seedflip0_annflip0", "iterative-dpo", "eval.json")))
    assert len(ev["rounds"]) == 2 and 0 <= ev["rounds"][-1]["win_rate"] <= 1 and "val" in ev
    assert ev["seconds"] > 0
    noisy = json.load(open(os.path.join(out, "seed0", "seedflip0_annflip0.4", "iterative-dpo", "eval.json")))
    assert noisy["per_round"][0]["annotation"]["flipped_fraction"] == pytest.approx(0.4, abs=0.03)
    oracle = json.load(open(os.path.join(out, "seed0", "seedflip0_annflip0", "oracle-iterative", "eval.json")))
    assert oracle["per_round"][0]["annotation"]["accuracy"] == 1.0  # labelled by the gold reward itself
    # seed-only rows do not self-annotate: one run serves both conditions
    assert not os.path.exists(os.path.join(out, "seed0", "seedflip0_annflip0.4", "dpo"))
    # the benchmark's runs write each round's summary.md, not its plots (report_plots: false)
    rd = os.path.join(out, "seed0", "seedflip0_annflip0", "iterative-dpo", "round_1")
    assert os.path.exists(os.path.join(rd, "summary.md")) and not [f for f in os.listdir(rd) if f.endswith(".png")]


def test_suppress_markup_keeps_the_chat_markup_out_of_answers(tmp_path):
    """With suppress_markup (the benchmark's design) the SFT model, and every model saved from it,
    never samples <user>, <assistant>, <s>, <pad> or <unk> inside an answer; without it a briefly
    trained model does (so the check can fail)."""
    from ssapo.bench import metrics
    from ssapo.bench.task import TaskSpec, messages, sft
    from ssapo.loading import load_checkpoint as load
    from ssapo.tiny import SPECIAL

    markup = [t for t in SPECIAL if t != "</s>"]
    prompts = [messages(f"w{i} w{(i * 7) % 16} w{(i * 3) % 16}") for i in range(16)]
    counts = {}
    for flag in (False, True):
        path = sft(TaskSpec(suppress_markup=flag), str(tmp_path / str(flag)), {"sft_examples": 64, "sft_epochs": 1})
        model, tok = load(path)
        if flag:
            assert sorted(model.generation_config.suppress_tokens) == sorted(tok.convert_tokens_to_ids(markup))
        ans = metrics.sample_answers(model, tok, prompts, 8, 6, seed=0, temperature=1.5)
        counts[flag] = sum(w in markup for rs in ans for a in rs for w in a.split())
    assert counts[False] > 0 and counts[True] == 0, counts
