"""The benchmark's statistics on literal numbers, the disjointness of the task's prompt
sets, --seeds parsing and the command line's errors."""

import argparse
import math

import pytest

from ssapo.bench import stats
from ssapo.bench.task import SIZES, TaskSpec, prompt_partition


def test_paired_ci_on_literal_numbers():
    # d = a - b = [0.02, 0.04, 0.06]: mean 0.04, sd 0.02, t(0.975, 2) = 4.303
    r = stats.paired_ci([0.52, 0.54, 0.56], [0.50, 0.50, 0.50])
    half = 4.303 * 0.02 / math.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(0.04)
    assert r["lo"] == pytest.approx(0.04 - half) and r["hi"] == pytest.approx(0.04 + half)
    # half = 0.0497 > 0.04: the interval [-0.0097, 0.0897] covers 0, so no significant difference
    assert r["lo"] == pytest.approx(-0.00969, abs=1e-4) and not r["significant"]


def test_paired_ci_significance_both_ways():
    # d = [0.10, 0.12, 0.11, 0.09, 0.13]: mean 0.11, sd 0.0158, t(0.975, 4) = 2.776
    a = [0.60, 0.62, 0.61, 0.59, 0.63]
    b = [0.50] * 5
    r = stats.paired_ci(a, b)
    sd = math.sqrt(sum((x - 0.11) ** 2 for x in (0.10, 0.12, 0.11, 0.09, 0.13)) / 4)
    assert r["mean"] == pytest.approx(0.11)
    assert r["hi"] - r["mean"] == pytest.approx(2.776 * sd / math.sqrt(5))
    assert r["significant"] and r["lo"] > 0
    neg = stats.paired_ci(b, a)
    assert neg["significant"] and neg["hi"] < 0 and neg["mean"] == pytest.approx(-0.11)
    # pairing matters: the same values unpaired would not separate, paired by seed they do
    r2 = stats.paired_ci([0.5, 0.7, 0.6], [0.49, 0.69, 0.59])
    assert r2["significant"] and r2["mean"] == pytest.approx(0.01)
    none = stats.paired_ci([0.5, 0.7, 0.6], [0.6, 0.5, 0.7])
    assert not none["significant"] and none["lo"] < 0 < none["hi"]
    two = stats.paired_ci([0.742, 0.742], [0.734, 0.734])  # equal differences: a zero-width interval
    assert two["lo"] == pytest.approx(0.008) and two["hi"] == pytest.approx(0.008) and not two["significant"]
    one = stats.paired_ci([0.6], [0.5])
    assert one["n"] == 1 and not one["significant"] and math.isnan(one["lo"])
    with pytest.raises(ValueError, match="pair them by seed"):
        stats.paired_ci([0.5, 0.6], [0.5])


def test_t_quantiles():
    assert stats.t975(1) == 12.706 and stats.t975(4) == 2.776 and stats.t975(1000) == 1.96
    with pytest.raises(ValueError, match="df"):
        stats.t975(0)


def test_headroom_share_on_literal_numbers():
    assert stats.headroom_share(0.60, 0.50, 0.80) == pytest.approx(1 / 3)
    assert stats.headroom_share(0.80, 0.50, 0.80) == pytest.approx(1.0)
    assert stats.headroom_share(0.45, 0.50, 0.80) == pytest.approx(-1 / 6)  # below seed-only DPO
    assert math.isnan(stats.headroom_share(0.6, 0.5, 0.5))  # no headroom
    assert math.isnan(stats.headroom_share(0.6, 0.5, 0.4))


def test_mean_std_and_pick_by_validation():
    m, s = stats.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert stats.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in stats.mean_std([]))
    assert stats.mean_std([1.0, float("nan"), 3.0])[0] == 2.0
    assert stats.pick_by_validation({"lr=1e-4": [0.5, 0.6], "lr=5e-4": [0.7, 0.4], "lr=2e-4": [0.56, 0.56]}) == (
        "lr=2e-4"
    )
    assert stats.pick_by_validation({"a": [0.5], "b": [0.5]}) == "a"  # ties: the first


def test_length_collapse_flag():
    assert stats.length_collapsed([3.0, 2.0, 1.2], 3.0)
    assert not stats.length_collapsed([3.0, 2.9, 2.8], 3.0)
    assert not stats.length_collapsed([], 3.0)


def test_parse_seeds():
    assert stats.parse_seeds("5") == [0, 1, 2, 3, 4]
    assert stats.parse_seeds(2) == [0, 1]
    assert stats.parse_seeds("0,3,7") == [0, 3, 7]
    assert stats.parse_seeds(" 4, 2 ") == [4, 2]
    for bad in ("0", "-1", "a", "1,x", "1,1", "-2,3", ","):
        with pytest.raises(ValueError, match="--seeds"):
            stats.parse_seeds(bad)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_prompt_sets_are_disjoint(size):
    spec = TaskSpec(seed=3, size=size)
    part = prompt_partition(spec, SIZES[size])
    sets = {k: set(v) for k, v in part.items()}
    for k, v in part.items():
        assert len(v) == SIZES[size][k] and len(sets[k]) == len(v)  # the sizes asked for, no repeats
    keys = list(sets)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    assert prompt_partition(spec, SIZES[size]) == part  # deterministic
    assert prompt_partition(TaskSpec(seed=4, size=size), SIZES[size])["test"] != part["test"]
    with pytest.raises(ValueError, match="design: .* distinct prompts"):
        prompt_partition(TaskSpec(vocab=4, n_words=2), SIZES[size])


def test_prepared_files_keep_the_sets_apart(tmp_path):
    """The files a run reads: seed pool (preferences), round pool, validation and test prompts."""
    from ssapo.bench.task import prepare_task
    from ssapo.io import read_jsonl

    paths = prepare_task(tmp_path / "t", seed=0, size="test", design={"sft_examples": 64, "sft_epochs": 1})
    text = lambda rows: {r["prompt"][0]["content"] for r in rows}  # noqa: E731
    pref = text(read_jsonl(paths["preferences"]))
    rounds = text(read_jsonl(paths["prompts"]))
    val, test = text(read_jsonl(paths["val_prompts"])), text(read_jsonl(paths["test_prompts"]))
    gold = text(read_jsonl(paths["gold_preferences"]))
    for a, b in ((pref, rounds), (pref, val), (pref, test), (rounds, val), (rounds, test), (val, test)):
        assert not a & b
    assert not gold & (val | test) and gold <= pref | rounds
    noisy = prepare_task(
        tmp_path / "t", seed=0, size="test", flip_rate=0.25, design={"sft_examples": 64, "sft_epochs": 1}
    )
    assert noisy["sft_model"] == paths["sft_model"] and noisy["preferences"] != paths["preferences"]
    rows, nrows = read_jsonl(paths["preferences"]), read_jsonl(noisy["preferences"])
    flipped = [n["flipped"] for n in nrows]
    assert 0.15 < sum(flipped) / len(flipped) < 0.35
    # the same pairs, turned around exactly where flipped
    for r, n in zip(rows, nrows):
        assert (n["chosen"], n["rejected"]) == (
            (r["rejected"], r["chosen"]) if n["flipped"] else (r["chosen"], r["rejected"])
        )


def _args(**kw):
    base = dict(
        quick=False, full=False, methods=None, seeds=None, flip_rates=None, annotation_flip_rates=None, workers=None
    )
    return argparse.Namespace(**{**base, **kw})


def test_command_line_options_and_errors(capsys):
    from ssapo.commands.bench import options, run

    preset, seeds, methods = options(_args(quick=True, seeds="0,3"))
    assert preset.name == "quick" and seeds == [0, 3] and "oracle-iterative" in methods
    p, s, m = options(_args(methods="dpo,ssapo", flip_rates="0,0.25", annotation_flip_rates="0.2"))
    assert m == ["dpo", "ssapo"] and s == list(range(p.seeds))
    assert [(c[0], c[1]) for c in p.conditions] == [(0.0, 0.0), (0.25, 0.0), (0.0, 0.2)]
    for kw, flag in (
        ({"methods": "dpo,nope"}, "--methods"),
        ({"seeds": "x"}, "--seeds"),
        ({"flip_rates": "2"}, "--flip-rates"),
        ({"annotation_flip_rates": "a"}, "--annotation-flip-rates"),
        ({"workers": 0}, "--workers"),
    ):
        assert run(_args(**kw)) == 2
        assert flag in capsys.readouterr().err
