"""`python -m ssapo.bench.detect`: the precision/recall helpers on literal arrays, and the whole
analysis on a tiny bench directory (the quick preset, one seed, SSAPO, 40% of each round's
self-annotations flipped)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from ssapo.bench import detect


def test_point_precision_recall_f1():
    flagged = [True, True, False, True, False, False]
    target = [True, False, True, True, False, False]
    p = detect.point(flagged, target)
    # 3 flagged, 2 of them in the target of 3: precision 2/3, recall 2/3, F1 2/3
    assert (p["n"], p["flagged"], p["true_positives"]) == (6, 3, 2)
    assert p["precision"] == pytest.approx(2 / 3) and p["recall"] == pytest.approx(2 / 3)
    assert p["f1"] == pytest.approx(2 / 3)
    q = detect.point([True, False, False, False], [True, True, False, False])  # precision 1, recall 1/2
    assert (q["precision"], q["recall"]) == (1.0, 0.5) and q["f1"] == pytest.approx(2 / 3)
    none = detect.point([False, False], [True, False])  # nothing flagged: precision undefined, recall 0
    assert math.isnan(none["precision"]) and none["recall"] == 0.0 and math.isnan(none["f1"])
    assert math.isnan(detect.point([True, False], [False, False])["recall"])  # no target
    with pytest.raises(ValueError, match="shapes"):
        detect.point([True], [True, False])


def test_ranking_curve_with_ties():
    # suspicion (higher first): 0.9 | 0.5 0.5 | 0.1 ; target:  1 | 0 1 | 0
    c = detect.ranking_curve([0.5, 0.9, 0.1, 0.5], [False, True, False, True])
    assert c["threshold"] == [0.9, 0.5, 0.1]
    assert c["flagged"] == [1, 3, 4]  # the tied pair enters together
    assert c["precision"] == pytest.approx([1.0, 2 / 3, 0.5])
    assert c["recall"] == pytest.approx([0.5, 1.0, 1.0])
    # the margin detector ranks by ascending margin: suspicion = −margin
    m = np.array([2.0, -1.0, 0.5, 3.0])
    c = detect.ranking_curve(-m, [False, True, True, False])
    assert c["flagged"] == [1, 2, 3, 4] and c["precision"] == pytest.approx([1, 1, 2 / 3, 0.5])
    assert detect.ranking_curve([], [])["flagged"] == []


def test_lowest_k_and_moved_mass():
    assert detect.lowest_k_agree([True, False, True, False], [0.1, 0.5, 0.2, 0.3])
    assert not detect.lowest_k_agree([True, False, False], [0.1, 0.05, 0.3])
    assert detect.lowest_k_agree([True, False], [0.2, 0.2])  # a tie at the boundary counts either way
    from ssapo.atoms import Atoms

    xi, loc = np.array([0.6, 0.7, 0.8]), np.array([[0.6, 0.6], [0.7, 0.1], [0.2, 0.8]])
    a = Atoms(xi[:, None] - loc, np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]]), np.ones(3), xi=xi, loc=loc)
    assert a.moved_mass() == pytest.approx([0.0, 0.75, 0.5])


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """The quick preset's SSAPO run of seed 0 under a 40% self-annotation flip rate (with the seed-only
    DPO run that trains its π_0), as `ssapo bench --quick --methods ssapo --seeds 0, --annotation-flip-rates
    0.4` lays it out, without the gold evaluation (26 to 71 s measured on this shared 2-core machine)."""
    from ssapo.bench.suite import PRESETS, Job, run_job

    out = str(tmp_path_factory.mktemp("bench"))
    run_job(PRESETS["quick"], Job(0, 0.0, 0.4, "ssapo"), out)
    return out


def _env():
    import ssapo

    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(ssapo.__file__)))
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_detect_end_to_end(bench_dir, tmp_path):
    out = str(tmp_path / "det")
    r = subprocess.run(
        [sys.executable, "-m", "ssapo.bench.detect", bench_dir, "--out", out, "--eps", "0,0.01,0.1,0.5"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert r.returncode == 0, r.stderr
    assert "| follower | 0.01 |" in r.stdout
    for f in ("detection.png", "detection.md", "detection.json"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    res = json.load(open(os.path.join(out, "detection.json")))
    assert [x["method"] for x in res["runs"]] == ["ssapo"] and res["pairs"] > 100  # the dpo run has no rounds
    fl = res["targets"]["flipped"]
    assert fl["base_rate"] == pytest.approx(0.4, abs=0.01)
    assert fl["margin_curve"]["flagged"][-1] == res["pairs"] and fl["margin_curve"]["recall"][-1] == 1.0
    zero = next(p for p in fl["follower"] if p["eps"] == 0.0)
    assert zero["flagged"] == 0 and zero["recall"] == 0.0
    big = next(p for p in fl["follower"] if p["eps"] == 0.5)
    assert big["flagged"] > next(p for p in fl["follower"] if p["eps"] == 0.01)["flagged"] > 0
    mis = res["targets"]["mislabelled"]
    assert mis["available"] and 0 < mis["base_rate"] < 1
    assert all(x is True for x in res["runs"][0]["resolve_matches_saved"])  # the re-solve is the run's follower
    assert [a["eps"] for a in res["agreement"]] == [0.01, 0.1, 0.5]
    # the same analysis in-process
    again = detect.analyse(bench_dir, [0.0, 0.01, 0.1, 0.5], ["ssapo"])
    assert again["targets"]["flipped"]["positives"] == fl["positives"]
    # a condition filter: the run's own condition keeps it, another leaves nothing
    kept = detect.analyse(bench_dir, [0.0, 0.1], ["ssapo"], ["seedflip0_annflip0.4"])
    assert kept["targets"]["flipped"]["positives"] == fl["positives"]
    with pytest.raises(ValueError, match="--conditions: no run of ssapo in seedflip0_annflip0.2"):
        detect.analyse(bench_dir, [0.0, 0.1], ["ssapo"], ["seedflip0_annflip0.2"])


def test_detect_errors_are_one_line(bench_dir, tmp_path):
    def run(*args):
        r = subprocess.run(
            [sys.executable, "-m", "ssapo.bench.detect", *args], capture_output=True, text=True, env=_env()
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        return r.stderr.strip().splitlines()[-1]

    assert "RUNS_DIR" in run(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "RUNS_DIR: no run directory" in run(str(tmp_path / "empty"))
    assert "--eps" in run(bench_dir, "--eps", "0,x")
    assert "--eps" in run(bench_dir, "--eps", "-1")
    assert "--methods: no run of sera" in run(bench_dir, "--methods", "sera")


def test_sera_kept_reads_the_first_kept_rows(tmp_path):
    """SeRA's kept pool pairs are sera.jsonl's first `kept` rows (metrics.json); a bootstrapped pair equal
    to a round pair does not count as kept, and duplicated round pairs are matched one for one."""
    from ssapo.io import write_json, write_jsonl

    def pair(p, c, r):
        return {"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r, "margin": 1.0}

    rows = [pair("a", "x", "y"), pair("b", "x", "y"), pair("c", "x", "y"), pair("a", "x", "y")]
    write_jsonl(tmp_path / "sera.jsonl", [rows[1], rows[0], rows[2]])  # two kept, then a bootstrapped copy of c
    assert detect.sera_kept(str(tmp_path), rows) is None  # no metrics.json: the kept count is unknown
    write_json(tmp_path / "metrics.json", {"sera": {"kept": 2, "bootstrapped": 1}})
    assert detect.sera_kept(str(tmp_path), rows).tolist() == [True, True, False, False]
    assert detect.sera_kept(str(tmp_path / "nowhere"), rows) is None


def test_rank_correlations_match_scipy():
    """detect's numpy Spearman and Kendall τ-b (the package does not depend on scipy) equal scipy's,
    ties included; nan for a constant side."""
    import numpy as np
    from scipy.stats import kendalltau, spearmanr

    rng = np.random.default_rng(0)
    for n in (3, 7, 40):
        for _ in range(20):
            x = rng.integers(0, 4, n).astype(float)  # ties on both sides
            y = rng.normal(size=n).round(1)
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                continue
            assert detect.spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
            assert detect.kendall(x, y) == pytest.approx(kendalltau(x, y)[0], abs=1e-12)
    assert math.isnan(detect.spearman([1, 1, 1], [1, 2, 3])) and math.isnan(detect.kendall([1, 2, 3], [5, 5, 5]))
