"""A round's report (ssapo.report.round_report): summary.md and its plots, or summary.md alone
(RunConfig.report_plots false, the offline benchmark's runs), with the same tables either way;
and settle_heap, which the loop calls before a run's steps."""

import gc
import os

import numpy as np

from ssapo import report
from ssapo.config import load_config
from ssapo.models import settle_heap

METRICS = {
    "annotate": {"pairs": 3, "seconds": 1.5},
    "follower": {"space": "prob", "moved_fraction": 0.25},
    "leader": {"loss": "shift_prob", "loss_history": [0.7, 0.6], "grad_norms": [1.0, 0.5]},
    "seconds": 3.0,
}
ROWS = [{"margin": m} for m in (-1.0, 0.5, 2.0)]


def _write_follower(rd):
    np.savez(
        os.path.join(rd, "follower.npz"),
        xi=np.array([0.4, 0.6, 0.8]),
        loc=np.array([[0.4, 0.1], [0.6, 0.6], [0.8, 0.8]]),
        mass=np.array([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]),
        lam=np.array([0.3]),
        budget_used=np.array([0.05]),
        eps=np.array(0.05),
    )


def test_plots_off_writes_the_same_summary_without_pictures(tmp_path):
    drawn, bare = tmp_path / "drawn", tmp_path / "bare"
    for d in (drawn, bare):
        d.mkdir()
        _write_follower(d)
    heldout = [0.6, 0.7]
    names = report.round_report(str(drawn), 1, METRICS, ROWS, heldout)
    assert set(names) == {"summary.md", "margins.png", "follower.png", "groups.png", "loss.png", "heldout.png"}
    assert report.round_report(str(bare), 1, METRICS, ROWS, heldout, plots=False) == ["summary.md"]
    assert sorted(os.listdir(bare)) == ["follower.npz", "summary.md"]
    with_pictures = (drawn / "summary.md").read_text().splitlines()
    text = (bare / "summary.md").read_text()
    assert text.splitlines() == [line for line in with_pictures if not line.startswith("![")]
    assert "| π_1 | 0.7 |" in text.replace("0.700", "0.7")  # the held-out table is kept without its plot


def test_report_plots_is_a_config_field():
    assert load_config("tiny").report_plots is True
    assert load_config("tiny", overrides={"report_plots": "false"}).report_plots is False


def test_settle_heap_takes_what_lives_out_of_the_collector_and_frees_nothing_alive():
    keep = [[i] for i in range(1000)]
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert keep[999] == [999]
        made = []
        made.append(made)  # a cycle made after the call is still collected
        del made
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
