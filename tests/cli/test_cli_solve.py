"""`ssapo solve` end to end: formats in and out, the summary, the errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import dro_core
from ssapo.cli import main

XI = 1 / (1 + np.exp(-0.1 * np.abs(np.random.default_rng(0).normal(0, 10, 250))))


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "xi.npy", XI)
    (tmp_path / "xi.csv").write_text("id,p\n" + "".join(f"{i},{float(x)!r}\n" for i, x in enumerate(XI)))
    (tmp_path / "xi.jsonl").write_text(
        "".join(json.dumps({"p": float(x), "g": i % 3}) + "\n" for i, x in enumerate(XI))
    )
    return tmp_path


def test_npy_to_npz(files, capsys):
    out = files / "atoms.npz"
    assert main(["solve", str(files / "xi.npy"), "--eps", "0.05", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    ref = dro_core.solve(XI, 0.05, 100)
    assert f"{ref.value:.10g}" in text and "groups             3" in text and "gap" in text
    assert "samples            250" in text and f"{ref.empirical_value:.10g}" in text
    assert f"min {ref.lam.min():.6g}  median {np.median(ref.lam):.6g}  max {ref.lam.max():.6g}" in text
    assert f"mean {ref.budget_used.mean():.6g}  max {ref.budget_used.max():.6g}" in text and " ms" in text
    z = np.load(out)
    np.testing.assert_array_equal(z["loc"], ref.loc)
    np.testing.assert_array_equal(z["mass"], ref.mass)
    np.testing.assert_array_equal(z["lam"], ref.lam)
    np.testing.assert_array_equal(z["weight"], ref.weights)  # the atoms' names (ssapo.atoms), not dro_core's
    np.testing.assert_array_equal(z["group"], ref.group_index)
    assert "weights" not in z and "group_index" not in z
    assert float(z["value"]) == ref.value and float(z["dual_gap"]) == ref.dual_gap
    assert not [p for p in files.iterdir() if p.name.startswith(".")]  # no temp files left


def test_csv_and_jsonl_to_parquet(files):
    import pyarrow.parquet as pq

    for src, extra in [("xi.csv", ["--column", "p"]), ("xi.jsonl", ["--column", "p", "--labels-column", "g"])]:
        out = files / (src + ".parquet")
        assert main(["solve", str(files / src), *extra, "--output", str(out)]) == 0
        t = pq.read_table(out)
        meta = json.loads(t.schema.metadata[b"ssapo.follower"])
        groups = np.arange(250) % 3 if "--labels-column" in extra else 100
        ref = dro_core.solve(XI, 0.01, groups)
        np.testing.assert_array_equal(t.column("loc1").to_numpy(), ref.loc[:, 1])
        assert meta["value"] == ref.value and meta["lam"] == ref.lam.tolist()


def test_global_and_margin_space(files, capsys):
    margins = np.random.default_rng(1).normal(0, 3, 100)
    np.save(files / "m.npy", margins)
    assert main(["solve", str(files / "m.npy"), "--space", "margin", "--global", "--eps", "0.1"]) == 0
    m = float(np.max(np.abs(margins)))
    ref = dro_core.solve(margins, 0.1, loss=dro_core.Loss.softplus(6, -m, m))
    assert f"{ref.value:.10g}" in capsys.readouterr().out


def test_spaces_are_the_followers(files, capsys):
    """`--space` takes the follower's names and its loss (ssapo.follower.loss_of): all-zero margins are
    the follower's flat log 2, not an error; the defaults are RunConfig's; the old names are gone."""
    from ssapo.config import RunConfig
    from ssapo.follower import follow

    np.save(files / "zero.npy", np.zeros(10))
    out = files / "zero.npz"
    assert main(["solve", str(files / "zero.npy"), "--space", "margin", "--output", str(out)]) == 0
    z = np.load(out)
    _, diag = follow(np.zeros(10), eps=RunConfig().eps, space="margin", beta_follower=1.0)
    assert float(z["value"]) == diag["value"] == pytest.approx(np.log(2.0))
    assert str(z["loss"]) == "Loss.max_affine(k=1)"
    capsys.readouterr()
    assert main(["solve", str(files / "xi.npy")]) == 0  # eps, group_size, k: RunConfig's defaults
    d = RunConfig()
    ref = dro_core.solve(XI, d.eps, d.group_size, loss=dro_core.Loss.neg_log(d.k))
    assert f"value              {ref.value:.10g}" in capsys.readouterr().out
    for old in (["--loss", "softplus"], ["--space", "neg_log"], ["--space", "softplus"]):
        with pytest.raises(SystemExit) as e:
            main(["solve", str(files / "xi.npy"), *old])
        assert e.value.code == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.npy"], "input: no such file"),
        (["xi.txt"], "input: unknown file type '.txt'"),
        (["xi.csv", "--column", "nope"], "--column: "),
        (["xi.npy", "--output", "out.txt"], "--output: unknown file type"),
        (["nan.npy"], "xi: must be finite, but xi[1] = NaN"),
        (["xi.npy", "--eps", "-1"], "eps: must be finite and >= 0"),
        (["xi.jsonl"], "--column: line 1 of xi.jsonl has no key 'xi'"),
        (["xi.jsonl", "--column", "p", "--labels-column", "nope"], "--labels-column: line 1"),
        (["xi.npy", "--labels-column", "g"], "--labels-column: needs a .csv or .jsonl input"),
        (["bad.jsonl", "--column", "p"], "input: line 2 of bad.jsonl is not JSON"),
        (["text.csv", "--column", "p"], "--column: 'p' of text.csv holds a value that is not a number"),
        (["xi.npy", "--output", "xi.npy/x.npz"], "--output: cannot write"),
    ],
)
def test_errors_name_the_argument(files, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(files)
    (files / "xi.txt").write_text("1\n")
    (files / "bad.jsonl").write_text('{"p": 0.6}\n{"p": 0.7\n')
    (files / "text.csv").write_text("p\n0.6\nhigh\n")
    np.save(files / "nan.npy", np.array([0.5, np.nan]))
    assert main(["solve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_runs_as_a_program(files):
    r = subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "solve", str(files / "xi.npy")], capture_output=True, text=True
    )
    assert r.returncode == 0 and "dual value" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "solve", str(files / "nope.npy")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "input: no such file" in r.stderr and "Traceback" not in r.stderr
