"""The robust-DPO baselines as methods of the loop (ssapo/methods/{rdpo,cdpo,drdpo,kldpo}.py):
declared as self-annotation + their leader loss, run end to end on the tiny task from one
shared π_0, their parameters reaching the leader; KLDPO's gathered mean over two processes."""

import json

import pytest
from test_loop import cfg, task_dir, two_process_run  # noqa: F401  (fixtures)

from ssapo.config import load_config
from ssapo.io import read_jsonl
from ssapo.loop import run
from ssapo.methods import method_of, steps_of

ROBUST = ["rdpo", "cdpo", "drdpo", "kldpo"]


@pytest.mark.parametrize("name", ROBUST)
def test_each_is_self_annotation_plus_its_leader_loss(name):
    m = method_of(name)
    c = load_config("tiny", overrides={"method": name, "num_rounds": "2"})
    assert m.rounds and not m.follower and not m.extra_steps and m.train_rows is None
    assert m.leader_loss_of(c) == name
    assert steps_of(c) == steps_of(load_config("tiny", overrides={"method": "iterative-dpo", "num_rounds": "2"}))


def test_the_smoothing_bound_is_checked_at_start_up():
    with pytest.raises(ValueError, match=r"^label_smoothing: must be in \[0, 0.5\)"):
        load_config("tiny", overrides={"method": "rdpo", "label_smoothing": "0.5"})


@pytest.fixture(scope="module")
def pi0(tmp_path_factory, task_dir):  # noqa: F811
    """One seed model, shared by every method's round (as the benchmark shares it)."""
    out = run(cfg(tmp_path_factory.mktemp("seed") / "run", task_dir, method="dpo"))
    return str(out / "seed" / "model")


@pytest.mark.parametrize(
    "name, kw",
    [
        ("rdpo", {"label_smoothing": "0.2"}),
        ("cdpo", {"label_smoothing": "0.2"}),
        ("drdpo", {"drdpo_beta": "0.5"}),
        ("kldpo", {"kldpo_tau": "0.05"}),
    ],
)
def test_each_runs_a_round_of_the_loop(tmp_path, task_dir, pi0, name, kw, monkeypatch):  # noqa: F811
    import ssapo.trainer

    given = []
    real = ssapo.trainer.leader_fields
    monkeypatch.setattr(ssapo.trainer, "leader_fields", lambda c, loss: given.append(real(c, loss)) or given[-1])
    out = run(cfg(tmp_path / name, task_dir, method=name, num_rounds="1", round_sizes="32", seed_model=pi0, **kw))
    assert json.load(open(out / "state.json"))["done"] == [
        "seed/eval",
        "round_1/annotate",
        "round_1/lead",
        "round_1/eval",
    ]
    m = json.load(open(out / "round_1" / "metrics.json"))
    assert "follower" not in m and m["leader"]["loss"] == name
    assert m["leader"]["param_displacement"] > 0 and m["leader"]["pairs"] == len(
        read_jsonl(out / "round_1" / "annotations.jsonl")
    )
    assert (out / "round_1" / "model" / "model.safetensors").exists()
    # the seed stage was given, so the one leader stage is round 1's, with the method's parameter
    assert len(given) == 1 and given[0]["leader_loss"] == name
    assert all(given[0][k] == float(v) for k, v in kw.items())


@pytest.mark.multiprocess
def test_kldpo_on_two_processes(two_process_run):  # noqa: F811
    """KLDPO gathers every process's losses for its mean at every step: two ranks through the driver
    finish the whole loop (a collective that one rank skipped would hang until ddp_timeout)."""
    out, r = two_process_run("kldpo")
    assert r.returncode == 0, r.stderr[-4000:]
    for t in (1, 2):
        ld = json.loads((out / f"round_{t}" / "metrics.json").read_text())["leader"]
        assert ld["loss"] == "kldpo" and ld["processes"] == 2 and ld["param_displacement"] > 0
        assert len(set(ld["data_hashes"])) == 1
