"""`python -m ssapo.bench.compare`: paired intervals against any row, from summary.json."""

import json

import pytest

from ssapo.bench import compare
from ssapo.bench.stats import t975


def _summary():
    rows = {
        "rdpo": {"per_seed": {"0": 0.50, "1": 0.60, "2": 0.70}},
        "up": {"per_seed": {"0": 0.60, "1": 0.72, "2": 0.79}},  # +0.10, +0.12, +0.09
        "same": {"per_seed": {"0": 0.55, "1": 0.55, "2": 0.75}},  # +0.05, −0.05, +0.05
        "short": {"per_seed": {"0": 0.40, "2": 0.55}},  # seed 1 failed: two pairs
    }
    return {"conditions": [{"seed_flip": 0.0, "annotation_flip": 0.4, "rows": rows}]}


def test_pairs_by_seed_against_the_named_row():
    lines = compare.compare(_summary(), "rdpo")
    assert lines[0] == "## 40% of each round's self-annotations flipped (against rdpo, mean 0.600)"
    d = [0.10, 0.12, 0.09]
    m = sum(d) / 3
    sd = (sum((x - m) ** 2 for x in d) / 2) ** 0.5
    half = t975(2) * sd / 3**0.5
    up = next(line for line in lines if line.startswith("up:"))
    assert up == f"up: 0.703; Δ {m:+.3f} [{m - half:+.3f}, {m + half:+.3f}] above (3 seeds)"
    assert next(line for line in lines if line.startswith("same:")).endswith("n.s. (3 seeds)")
    # the seeds both rows finished: 2 pairs, never significant
    assert next(line for line in lines if line.startswith("short:")).endswith("n.s. (2 seeds)")
    assert compare.compare(_summary(), "rdpo", ["up"])[1:] == [up]


def test_cli_errors_name_the_argument(tmp_path, capsys):
    p = tmp_path / "summary.json"
    p.write_text(json.dumps(_summary()))
    assert compare.main([str(p), "--against", "nope"]) == 2
    assert "--against: no condition" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing.json"), "--against", "rdpo"]) == 2
    assert "summary: cannot read" in capsys.readouterr().err
    assert compare.main([str(p), "--against", "rdpo"]) == 0
    assert "up: 0.703" in capsys.readouterr().out


@pytest.mark.parametrize("sf,af,name", [(0.0, 0.0, "clean labels"), (0.25, 0.0, "25% of the seed labels flipped")])
def test_condition_names(sf, af, name):
    assert compare.condition_name(sf, af) == name  # the report's own names
