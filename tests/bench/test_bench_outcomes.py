"""No run's failure takes the others' report with it (issue 19, item 2, the benchmark's part).

A run whose rounds stopped early (every prompt's responses tied) is *collapsed*: evaluated on its result
policy, kept in the statistics and flagged; any other exception of one run is *failed*: recorded with its
one-line cause and its traceback in failed.txt, listed, left out of the comparisons that need its seed,
and every other run goes on, in process and in the worker pool; a rerun skips the finished runs.
The literal-number tests check the report and the tuning; the end-to-end one runs a tiny bench where an
annotator ties every response on seed 1's second round and raises on seed 2."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest

from ssapo.bench import stats
from ssapo.bench.suite import PRESETS, Job

SMALL_DESIGN = {"sft_examples": 256, "sft_epochs": 2, "labelled": 128, "prompts": 64, "val": 32, "test": 32}
SMALL_RUN = {
    "seed_size": 16,
    "round_sizes": [32, 32],
    "num_rounds": 2,
    "batch_size": 8,
    "per_device_train_batch_size": 8,
    "max_new_tokens": 4,
    "seed_epochs": 1,
    "learning_rate": 5e-4,
}


def ev(wr, rounds=2, stopped=None, val=None):
    out = {
        "rounds": [{"win_rate": wr, "lc_win_rate": wr, "mean_length": 3.0} for _ in range(rounds)],
        "per_round": [{"annotation": {"accuracy": 0.7, "tie_fraction": 0.1}} for _ in range(rounds - 1)],
        "val": {"win_rate": wr if val is None else val},
        "sft_mean_length": 3.0,
        "displacement_from_sft": 0.1,
        "seconds": 1.0,
    }
    if stopped:
        out["stopped"] = {"at": f"round_{stopped}/annotate", "round": stopped, "result": f"round_{stopped - 1}/model"}
        out["stopped"]["why"] = f"round {stopped}: the policy stopped exploring"
    return out


def failed(cause="ValueError: boom"):
    return {"job": {}, "failed": {"step": "run", "cause": cause, "traceback": "/x/failed.txt"}}


def test_paired_by_seed_drops_the_seeds_one_side_lacks():
    a = {0: 0.60, 1: 0.62, 2: 0.9, 3: 0.64}
    b = {0: 0.50, 1: 0.50, 3: 0.50}  # seed 2 failed on b's side
    r = stats.paired_by_seed(a, b, [0, 1, 2, 3])
    assert r["n"] == 3 and r["seeds"] == [0, 1, 3] and r["dropped"] == [2]
    assert r["mean"] == pytest.approx(0.12)  # seed 2's 0.9 is not in it
    assert r == {**stats.paired_ci([0.60, 0.62, 0.64], [0.5, 0.5, 0.5]), "seeds": [0, 1, 3], "dropped": [2]}


def test_report_keeps_collapsed_runs_flags_them_and_leaves_failed_seeds_out(tmp_path):
    """Seed 1's iterative DPO collapsed (kept: its 0.30 counts), seed 3's failed (its seed drops out of
    every comparison with iterative DPO), seed 2's oracle failed; every other run is reported."""
    from ssapo.bench.report import write

    p = dataclasses.replace(PRESETS["default"], tune={}, conditions=[(0.0, 0.0, None)])
    res = {}
    for s in range(4):
        res[Job(s, 0.0, 0.0, "dpo")] = ev(0.50 + 0.01 * s, rounds=1)
        res[Job(s, 0.0, 0.0, "oracle-iterative")] = failed("OSError: disk gone") if s == 2 else ev(0.80)
        if s == 3:
            res[Job(s, 0.0, 0.0, "iterative-dpo")] = failed("RuntimeError: a bug")
        else:
            res[Job(s, 0.0, 0.0, "iterative-dpo")] = ev(0.30 if s == 1 else 0.60, stopped=2 if s == 1 else None)
    methods = ["dpo", "oracle-iterative", "iterative-dpo"]
    md = write(p, res, [0, 1, 2, 3], methods, str(tmp_path), "test", 1.0)
    summary = json.load(open(tmp_path / "summary.json"))
    rows = summary["conditions"][0]["rows"]
    it = rows["iterative-dpo"]
    assert it["per_seed"] == {"0": 0.6, "1": 0.3, "2": 0.6}  # the collapsed run keeps its score; seed 3 is out
    assert it["win_rate"][0] == pytest.approx(0.5)
    assert it["collapsed_seeds"] == [1] and it["failed_seeds"] == [3]
    d = rows["dpo"]["vs_baseline"]  # dpo − iterative DPO over seeds 0, 1, 2
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2] and d["dropped"] == [3]
    assert d["mean"] == pytest.approx(((0.50 - 0.6) + (0.51 - 0.3) + (0.52 - 0.6)) / 3)
    assert rows["oracle-iterative"]["vs_baseline"]["seeds"] == [0, 1]  # seed 2: oracle failed; seed 3: baseline
    row = next(x for x in md.splitlines() if x.startswith("| iterative-dpo"))
    assert row.endswith("| collapsed: seed 1 (round 2); failed: seed 3 |")
    assert next(x for x in md.splitlines() if x.startswith("| oracle-iterative")).endswith("| failed: seed 2 |")
    assert "(3 seeds)" in next(x for x in md.splitlines() if x.startswith("| dpo"))
    assert "3 collapsed" not in md and "12 runs (1 collapsed, 2 failed" in md
    assert "keeps that score" in md and "left out of its row's mean and of every paired comparison" in md
    section = md.split("## Runs that stopped early or failed")[1]
    assert "| 1 | clean labels | iterative-dpo | collapsed | collapsed at round_2/annotate: result round_1/model" in (
        section
    )
    assert "| 2 | clean labels | oracle-iterative | failed | failed at run: OSError: disk gone" in section
    assert "| 3 | clean labels | iterative-dpo | failed | failed at run: RuntimeError: a bug" in section
    outs = summary["outcomes"]
    assert [(o["seed"], o["method"], o["outcome"]) for o in outs] == [
        (1, "iterative-dpo", "collapsed"),
        (2, "oracle-iterative", "failed"),
        (3, "iterative-dpo", "failed"),
    ]
    assert "Design criteria" in md and os.path.exists(tmp_path / "headroom.png")


def test_report_says_so_when_nothing_collapsed_or_failed(tmp_path):
    from ssapo.bench.report import write

    p = dataclasses.replace(PRESETS["default"], tune={}, conditions=[(0.0, 0.0, None)])
    res = {Job(s, 0.0, 0.0, m): ev(0.5 + 0.01 * s) for s in range(2) for m in ("dpo", "iterative-dpo")}
    md = write(p, res, [0, 1], ["dpo", "iterative-dpo"], str(tmp_path), "test", 1.0)
    assert "None: every run trained all its rounds." in md and "(0 collapsed, 0 failed" in md
    assert json.load(open(tmp_path / "summary.json"))["outcomes"] == []


def test_tuning_ignores_failed_candidates_and_says_when_all_failed(capsys):
    from ssapo.bench.report import Table
    from ssapo.bench.suite import canonical, choose, jobs_of

    p = dataclasses.replace(
        PRESETS["default"],
        tune={"iterative-dpo": {"learning_rate": [1e-4, 5e-4]}, "ssapo": {"learning_rate": [1e-4, 5e-4]}},
        run={**PRESETS["default"].run, "learning_rate": 2e-3},
    )
    res = {}
    for s in range(3):
        res[Job(s, 0.0, 0.0, "dpo")] = ev(0.5, rounds=1)
        # 5e-4 is best on the seeds where it finished (0.7) and failed on seed 2; 1e-4 scores 0.6 everywhere
        res[Job(s, 0.0, 0.0, "iterative-dpo", (("learning_rate", 1e-4),))] = ev(0.6)
        res[Job(s, 0.0, 0.0, "iterative-dpo", (("learning_rate", 5e-4),))] = failed() if s == 2 else ev(0.7)
        for lr in (1e-4, 5e-4):
            res[Job(s, 0.0, 0.0, "ssapo", (("learning_rate", lr),))] = failed(f"ValueError: lr {lr}")
    res = {canonical(k, p): v for k, v in res.items()}
    got = choose(p, res, [0, 1, 2], ["dpo", "iterative-dpo", "ssapo"])
    assert got["iterative-dpo"] == (("learning_rate", 5e-4),) and got["ssapo"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "bench: every candidate of ssapo failed in the first condition (6 runs; causes in the report): no choice "
        "to carry, so the other conditions run no candidate of it"
    ]
    # the other conditions: no ssapo job; iterative DPO at its choice
    noisy = jobs_of(p, [0], ["dpo", "iterative-dpo"], [(0.0, 0.2, None)], got)
    assert {j.method for j in noisy} == {"dpo", "iterative-dpo"}
    assert [j.var for j in noisy if j.method == "iterative-dpo"] == [(("learning_rate", 5e-4),)]
    t = Table(p, res, [0, 1, 2], ["dpo", "iterative-dpo", "ssapo"], 0.0, 0.0)
    assert t.chosen["iterative-dpo"] == "learning_rate=0.0005" and list(t.rows["iterative-dpo"]) == [0, 1]
    assert t.failed["iterative-dpo"].keys() == {2}
    assert "ssapo" not in t.rows and t.failed["ssapo"].keys() == {0, 1, 2}


def test_one_job_raising_is_recorded_and_the_interrupt_still_stops(tmp_path, monkeypatch):
    """run_one: an Exception becomes the job's failure record (cause, traceback file); a job whose π_0
    failed is recorded without running; KeyboardInterrupt and SystemExit go through."""
    from ssapo.bench import suite

    p = dataclasses.replace(PRESETS["quick"], design=SMALL_DESIGN, run=SMALL_RUN)
    out = str(tmp_path)
    ran = []

    def fake_run(preset, job, out):
        ran.append(job)
        if job.seed == 0:
            raise ValueError("bad candidate\nsecond line")
        if job.seed == 1:
            raise KeyboardInterrupt
        raise SystemExit(143)

    monkeypatch.setattr(suite, "run_job", fake_run)
    j0 = Job(0, 0.0, 0.0, "dpo")
    res = suite._run_jobs(p, out, [j0, Job(0, 0.0, 0.0, "iterative-dpo"), Job(0, 0.0, 0.0, "oracle-dpo")])
    rec = res[j0]["failed"]
    assert rec["cause"] == "ValueError: bad candidate second line" and rec["step"] == "run"
    tb = open(rec["traceback"]).read()
    assert rec["traceback"] == os.path.join(j0.dir(out), "failed.txt") and "Traceback" in tb and "fake_run" in tb
    blocked = res[Job(0, 0.0, 0.0, "iterative-dpo")]["failed"]
    assert blocked["cause"] == "its π_0 (the dpo run of seed 0) failed: ValueError: bad candidate second line"
    # oracle-dpo does not start from π_0: it ran (and failed on its own)
    assert ran == [j0, Job(0, 0.0, 0.0, "oracle-dpo")]
    with pytest.raises(KeyboardInterrupt):
        suite._run_jobs(p, out, [Job(1, 0.0, 0.0, "dpo")])
    with pytest.raises(SystemExit):
        suite._run_jobs(p, out, [Job(2, 0.0, 0.0, "dpo")])


JUDGE = """
import json, os

OUT = {out!r}
_SETS = {{}}


def _prompts(seed):
    path = os.path.join(OUT, f"seed{{seed}}", "task", "prompts.jsonl")
    if seed not in _SETS and os.path.exists(path):  # a seed's task is made when its first run starts
        _SETS[seed] = {{json.loads(x)["prompt"][-1]["content"] for x in open(path)}}
    return _SETS.get(seed, set())


def make(args):
    def score(prompts, responses):
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        if all(t in _prompts(1) for t in texts):
            run = os.path.join(OUT, "seed1", "seedflip0_annflip0", "iterative-dpo@annotator=judge:make")
            if os.path.exists(os.path.join(run, "round_1", "annotations.jsonl")):  # round 2: everything ties
                return [[0.0] * len(r) for r in responses]
        if all(t in _prompts(2) for t in texts):
            raise ValueError("judge: refuses seed 2")
        return [[len(x) + 0.001 * i for i, x in enumerate(r)] for r in responses]

    return score
"""


def test_a_collapsed_and_a_failed_run_leave_every_other_run_in_the_report(tmp_path, monkeypatch):
    """Seeds 0, 1, 2, iterative DPO with an annotator that ties every response in seed 1's round 2 and raises
    on seed 2: the bench ends with a report of every run; seed 1's run is collapsed at round 2 and evaluated
    on round_1/model, seed 2's is failed with its cause; the comparison with seed-only DPO uses seeds 0 and 1.
    Again with 2 worker processes: the finished runs are not run again (their eval.json untouched), the
    failed one is tried again in a worker and fails again, and the report says the same."""
    from ssapo.bench.run import bench

    out = str(tmp_path / "bench")
    jd = tmp_path / "judge"
    jd.mkdir()
    (jd / "judge.py").write_text(JUDGE.format(out=out))
    monkeypatch.syspath_prepend(str(jd))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(jd), os.environ.get("PYTHONPATH", "")]))
    kw = dict(
        methods=["dpo", "iterative-dpo"],
        conditions=[(0.0, 0.0)],
        progress=False,
        design=SMALL_DESIGN,
        run=SMALL_RUN,
        n_eval=2,
        tune={"iterative-dpo": {"annotator": ["judge:make"]}},
    )
    t0 = time.time()
    md = bench(out, "quick", seeds=[0, 1, 2], **kw)
    first = time.time() - t0
    cond = os.path.join(out, "seed{}", "seedflip0_annflip0", "{}")
    it = "iterative-dpo@annotator=judge:make"
    ev1 = json.load(open(os.path.join(cond.format(1, it), "eval.json")))
    assert ev1["stopped"]["at"] == "round_2/annotate" and ev1["stopped"]["result"] == "round_1/model"
    assert ev1["stopped"]["evaluated"] == os.path.join("round_1", "model")
    assert len(ev1["rounds"]) == 2 and len(ev1["per_round"]) == 1  # π_0 and round 1; round 2 trained nothing
    ev0 = json.load(open(os.path.join(cond.format(0, it), "eval.json")))
    assert ev0["stopped"] is None and len(ev0["rounds"]) == 3
    fail = os.path.join(cond.format(2, it), "failed.txt")
    assert "ValueError: judge: refuses seed 2" in open(fail).read()
    assert not os.path.exists(os.path.join(cond.format(2, it), "eval.json"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    rows = summary["conditions"][0]["rows"]
    assert rows["iterative-dpo"]["per_seed"] == {
        "0": ev0["rounds"][-1]["win_rate"],
        "1": ev1["rounds"][-1]["win_rate"],  # the collapsed run keeps its result policy's score
    }
    assert rows["iterative-dpo"]["collapsed_seeds"] == [1] and rows["iterative-dpo"]["failed_seeds"] == [2]
    dpo = {
        s: json.load(open(os.path.join(cond.format(s, "dpo"), "eval.json")))["rounds"][-1]["win_rate"]
        for s in (0, 1, 2)
    }
    assert sorted(rows["dpo"]["per_seed"]) == ["0", "1", "2"]
    d = rows["dpo"]["vs_baseline"]
    assert d["seeds"] == [0, 1] and d["n"] == 2
    assert d["mean"] == pytest.approx(
        (dpo[0] - ev0["rounds"][-1]["win_rate"] + dpo[1] - ev1["rounds"][-1]["win_rate"]) / 2
    )
    row = next(x for x in md.splitlines() if x.startswith("| iterative-dpo"))
    assert row.endswith("| collapsed: seed 1 (round 2); failed: seed 2 |")
    section = md.split("## Runs that stopped early or failed")[1]
    assert (
        f"| 2 | clean labels | iterative-dpo (annotator=judge:make) | failed | failed at run: ValueError: judge: refuses seed 2 (traceback: {fail})"
        in section
    )
    assert (
        "| 1 | clean labels | iterative-dpo (annotator=judge:make) | collapsed | collapsed at round_2/annotate: result round_1/model; round 2: the policy stopped exploring: every response tied"
        in section
    )
    assert "6 runs (1 collapsed, 1 failed" in md

    # again, with 2 worker processes: the finished runs are not run again, the failed one is tried again
    stamps = {
        (s, m): os.path.getmtime(os.path.join(cond.format(s, m), "eval.json")) for s in (0, 1) for m in ("dpo", it)
    }
    os.remove(fail)
    md2 = bench(out, "quick", seeds=[0, 1, 2], workers=2, **kw)
    assert stamps == {k: os.path.getmtime(os.path.join(cond.format(*k), "eval.json")) for k in stamps}
    assert "ValueError: judge: refuses seed 2" in open(fail).read()  # tried again (in a worker), failed again
    assert md2.split("## Runs that stopped early or failed")[1] == section
    assert next(x for x in md2.splitlines() if x.startswith("| iterative-dpo")) == row
    assert json.load(open(os.path.join(out, "summary.json")))["conditions"][0]["rows"] == rows
    print(f"first bench {first:.0f} s, second {time.time() - t0 - first:.0f} s")


FAKE_JOBS = """
import os
from ssapo.bench.suite import failure


def run(preset, out, jobs):
    (job,) = jobs
    if job.seed == 3:
        os._exit(9)  # its worker dies, as if killed by the OOM killer
    if job.seed == 2:
        return {job: failure(job, out, "run", ValueError("seed 2 raises"))}
    return {job: {"rounds": [{"win_rate": 0.5}], "seed": job.seed}}
"""


def test_a_worker_that_dies_fails_its_own_run_only(tmp_path, monkeypatch, capsys):
    """The pool: a job that kills its worker process breaks the pool for the jobs beside it; they are
    tried again (fresh pool, then each alone) and finish; only the job that kills its worker is failed."""
    from ssapo.bench import suite

    (tmp_path / "fake_jobs.py").write_text(FAKE_JOBS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    import fake_jobs

    jobs = [Job(s, 0.0, 0.0, "iterative-dpo") for s in range(6)]
    out = str(tmp_path / "out")
    res = suite._pool_run(PRESETS["quick"], out, jobs, 2, False, 0, fn=fake_jobs.run)
    assert set(res) == set(jobs)
    assert [res[j]["seed"] for j in jobs if j.seed not in (2, 3)] == [0, 1, 4, 5]
    assert res[jobs[2]]["failed"]["cause"] == "ValueError: seed 2 raises"
    dead = res[jobs[3]]["failed"]
    assert dead["step"] == "worker" and dead["cause"].startswith(
        "BrokenProcessPool: its worker process died while it ran alone in the pool, after two pools broke"
    )
    assert "BrokenProcessPool" in open(os.path.join(jobs[3].dir(out), "failed.txt")).read()
    err = capsys.readouterr().err
    assert "bench: a worker process died; the " in err and "tried again each alone in a pool" in err
