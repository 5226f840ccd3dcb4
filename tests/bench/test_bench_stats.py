"""The benchmark's statistics on literal numbers, the disjointness of the task's prompt
sets, --seeds parsing and the command line's errors."""

import argparse
import dataclasses
import math
import os
import sys

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
        quick=False,
        full=False,
        preset=None,
        report_dir=None,
        methods=None,
        seeds=None,
        flip_rates=None,
        annotation_flip_rates=None,
        workers=None,
    )
    return argparse.Namespace(**{**base, **kw})


def test_command_line_options_and_errors(capsys):
    from ssapo.commands.bench import options, run

    preset, seeds, methods = options(_args(quick=True, seeds="0,3"))
    assert preset.name == "quick" and seeds == [0, 3] and "oracle-iterative" in methods
    p, s, m = options(_args(methods="dpo,ssapo", flip_rates="0,0.25", annotation_flip_rates="0.2"))
    assert m == ["dpo", "ssapo"] and s == list(range(p.seeds))
    assert [(c[0], c[1]) for c in p.conditions] == [(0.0, 0.0), (0.25, 0.0), (0.0, 0.2)]
    p, s, m = options(_args(preset="eps-sweep"))
    assert p.name == "eps-sweep" and "ssapo-margin" in m and s == [0, 1, 2, 3, 4]
    for kw, flag in (
        ({"methods": "dpo,nope"}, "--methods"),
        ({"seeds": "x"}, "--seeds"),
        ({"flip_rates": "2"}, "--flip-rates"),
        ({"annotation_flip_rates": "a"}, "--annotation-flip-rates"),
        ({"workers": 0}, "--workers"),
        ({"preset": "nope"}, "--preset"),
    ):
        assert run(_args(**kw)) == 2
        assert flag in capsys.readouterr().err


def test_an_unusable_report_dir_is_refused_before_any_run(tmp_path, capsys):
    from ssapo.commands.bench import run

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "runs"
    assert run(_args(quick=True, output_dir=str(out), report_dir=str(blocker / "report"))) == 2
    err = capsys.readouterr().err
    assert "--report-dir" in err and str(blocker / "report") in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing ran


def test_sweep_presets_share_the_default_runs():
    """A candidate equal to the preset's own setting is the run without it, so the sweeps, run into
    the default's output directory, reuse its runs instead of training them again."""
    from ssapo.bench.suite import PRESETS, Job, all_methods, canonical, jobs_of

    d = PRESETS["default"]
    assert canonical(Job(0, 0.0, 0.0, "ssapo", (("learning_rate", d.run["learning_rate"]),)), d).var == ()
    assert canonical(Job(0, 0.0, 0.0, "ssapo", (("learning_rate", 1e-3),)), d).var == (("learning_rate", 1e-3),)
    assert canonical(Job(0, 0.0, 0.0, "ssapo", (("learning_rate", 1e-3),))).var == (("learning_rate", 1e-3),)

    def dirs(name):
        p = PRESETS[name]
        return {j.dir("R") for j in jobs_of(p, [0], [m for m in p.methods if m in all_methods()], p.conditions[:1])}

    default = dirs("default")
    for part in ("eps-sweep", "lr-sweep"):
        shared = dirs(part) & default
        # seed-only DPO, both oracles, iterative DPO at the default's two lrs; SSAPO at the default's lr
        for m in ("dpo", "oracle-dpo", "oracle-iterative", "iterative-dpo", "iterative-dpo@learning_rate=0.0005"):
            assert f"R/seed0/seedflip0_annflip0/{m}" in shared, (part, m)
        assert "R/seed0/seedflip0_annflip0/ssapo" in shared
    # full holds both sweeps' runs
    assert dirs("eps-sweep") | dirs("lr-sweep") <= dirs("full")


def test_length_collapse_is_flagged_per_seed():
    """One seed of three collapsing is flagged, with the count, though the mean length over seeds stays
    above half the SFT policy's."""
    from ssapo.bench.report import Table, table_lines
    from ssapo.bench.suite import PRESETS, Job

    p = dataclasses.replace(PRESETS["default"], tune={})

    def ev(lengths, wr=0.6):
        rounds = [{"win_rate": wr, "lc_win_rate": wr, "mean_length": x} for x in lengths]
        return {
            "rounds": rounds,
            "per_round": [],
            "val": {"win_rate": wr},
            "sft_mean_length": 3.0,
            "displacement_from_sft": 0.1,
        }

    results = {}
    for s in (0, 1, 2):
        results[Job(s, 0.0, 0.0, "dpo")] = ev([3.0])
        results[Job(s, 0.0, 0.0, "iterative-dpo")] = ev([3.0, 3.0, 0.5 if s == 2 else 3.0])
    t = Table(p, results, [0, 1, 2], ["dpo", "iterative-dpo"], 0.0, 0.0)
    lines = "\n".join(table_lines(t, ["dpo", "iterative-dpo"]))
    row = next(x for x in lines.splitlines() if x.startswith("| iterative-dpo"))
    assert "lengths collapsed on 1 of 3 seeds" in row
    assert "collapsed" not in next(x for x in lines.splitlines() if x.startswith("| dpo"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_bench_workers_die_with_the_bench(tmp_path):
    """A worker of the bench's pool ends when the bench process is killed (SIGKILL: no handler runs)."""
    import signal
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from ssapo.bench.suite import worker_pool\n"
        "if __name__ == '__main__':\n"
        "    pool = worker_pool(1)\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    os.kill(worker, 0)  # alive
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    for _ in range(100):
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        try:
            if open(f"/proc/{worker}/stat").read().split()[2] == "Z":  # a zombie is dead
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived the bench")


def test_sweep_section_names_where_each_row_breaks_and_the_eps_winner():
    """On literal numbers: iterative DPO falls below seed-only DPO from lr 5e-4 on; the ε sweep's
    validation winner (ssapo-weights at 0.1, +0.05 on every seed) is reported against the recipes'
    shift_prob at ε 0.01 with its paired interval."""
    from ssapo.bench.report import Table, sweep_lines
    from ssapo.bench.suite import PRESETS, Job, canonical

    p = dataclasses.replace(
        PRESETS["default"],
        tune={
            "iterative-dpo": {"learning_rate": [1e-4, 2e-4, 5e-4]},
            "ssapo-eps": {"eps": [0.01, 0.1]},
            "ssapo-weights": {"eps": [0.01, 0.1]},
        },
    )

    def ev(wr, val=None, length=3.0):
        return {
            "rounds": [{"win_rate": wr, "lc_win_rate": wr, "mean_length": length}],
            "per_round": [],
            "val": {"win_rate": wr if val is None else val},
            "sft_mean_length": 3.0,
            "displacement_from_sft": 0.1,
        }

    res = {}
    for s in range(4):
        res[Job(s, 0.0, 0.0, "dpo")] = ev(0.60)
        for lr, wr, ln in ((1e-4, 0.62, 3.0), (2e-4, 0.66, 3.0), (5e-4, 0.30 + 0.01 * s, 1.0)):
            res[Job(s, 0.0, 0.0, "iterative-dpo", (("learning_rate", lr),))] = ev(wr, length=ln)
        for m in ("ssapo-eps", "ssapo-weights"):
            for eps in (0.01, 0.1):
                bump = 0.05 if (m, eps) == ("ssapo-weights", 0.1) else 0.0
                res[Job(s, 0.0, 0.0, m, (("eps", eps),))] = ev(0.65 + 0.01 * s + bump)
    # as execute() stores them: the default's own learning rate (2e-4) is the run without a candidate
    res = {canonical(k, p): v for k, v in res.items()}
    methods = ["dpo", "iterative-dpo", "ssapo-eps", "ssapo-weights"]
    t = Table(p, res, [0, 1, 2, 3], methods, 0.0, 0.0)
    text = "\n".join(sweep_lines(t))
    assert "Breaks at: 0.0005" in text
    assert "| 0.0005 | 0.315 ± 0.013 | 0.315 ± 0.013 | 1.00 | 4 of 4 |" in text
    assert "best mean validation win rate ssapo-weights at eps=0.1" in text
    assert "validation Δ 0.050 [0.050, 0.050]" in text and "it wins on validation" in text
