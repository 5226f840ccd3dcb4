"""The loop end to end on the tiny task: files, parameters, ε = 0 control,
resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from ssapo.annotate import pick_pairs
from ssapo.config import load_config
from ssapo.follower import follow
from ssapo.loop import run

SMALL = {"task_size": "test", "seed_size": "32", "round_sizes": "32 32", "num_rounds": "2", "batch_size": "8",
         "per_device_train_batch_size": "8", "max_new_tokens": "6", "seed_epochs": "1"}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("task"))


def cfg(out, task_dir, **kw):
    return load_config("tiny", overrides={**SMALL, "output_dir": str(out), "task_dir": task_dir, **kw})


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_pick_pairs_ranks_and_counts_ties():
    pairs, st = pick_pairs([[0.1, 0.5, 0.5, -1.0], [2.0, 2.0], [0.0, 1.0, -3.0, -3.0]])
    assert pairs == [(1, 3), None, (1, 3)]
    assert st == {"tied_best": 1, "tied_worst": 1, "dropped_all_tied": 1}


def test_follower_columns():
    m = np.array([0.0, 1.0, 5.0, 30.0, 2.0])
    cols, diag, _ = follow(m, 0.0, group_size=2)
    assert np.all(cols["shift"] == 0) and np.all(cols["mass"][:, 0] == 1) and diag["moved_fraction"] == 0
    cols, diag, res = follow(m, 0.1, group_size=0)
    assert diag["moved_fraction"] > 0 and diag["dual_gap"] <= 1e-12 and len(diag["lam"]) == 1
    np.testing.assert_allclose(cols["xi"], 1 / (1 + np.exp(-0.1 * m)))
    cols, diag, _ = follow(m, 0.1, space="margin")
    assert diag["space"] == "margin" and cols["shift"].shape == (5, 2)


def test_two_rounds_write_everything(tmp_path, task_dir):
    out = run(cfg(tmp_path / "run", task_dir))
    with open(os.path.join(out, "state.json")) as f:
        assert json.load(f)["done"] == ["seed", "round_1/annotate", "round_1/follow", "round_1/lead",
                                        "round_2/annotate", "round_2/follow", "round_2/lead"]
    for t in (1, 2):
        rd = os.path.join(out, f"round_{t}")
        for name in ("annotations.jsonl", "follower.npz", "metrics.json", "summary.md", "follower.png", "model/model.safetensors"):
            assert os.path.exists(os.path.join(rd, name)), name
        m = json.load(open(os.path.join(rd, "metrics.json")))
        assert 0 <= m["annotation"]["gold_accuracy"] <= 1 and m["follower"]["dual_gap"] < 1e-9
        assert m["leader"]["param_displacement"] > 0 and m["leader"]["max_grad_norm"] > 0
    a, b = weights(os.path.join(out, "seed", "model")), weights(os.path.join(out, "round_2", "model"))
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp files left


def test_ssapo_at_eps_zero_is_iterative_dpo(tmp_path, task_dir):
    a = run(cfg(tmp_path / "ssapo", task_dir, eps="0", num_rounds="1", round_sizes="32"))
    b = run(cfg(tmp_path / "idpo", task_dir, method="iterative-dpo", num_rounds="1", round_sizes="32"))
    wa, wb = weights(os.path.join(a, "round_1", "model")), weights(os.path.join(b, "round_1", "model"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_resume_after_kill_loses_nothing(tmp_path, task_dir):
    ref = run(cfg(tmp_path / "ref", task_dir))
    out = tmp_path / "killed"
    args = [f"--{k}={v}" for k, v in {**SMALL, "task_dir": task_dir}.items()]
    cmd = [sys.executable, "-m", "ssapo.cli", "train", "--model", "tiny", "--output-dir", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and "round_1/annotate" in state.read_text():
            break
        if p.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # mid-round: after annotation, during or before the follower/leader
    p.wait()
    done = json.loads(state.read_text())["done"]
    assert "round_2/lead" not in done
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    for rel in ("round_1/annotations.jsonl", "round_2/annotations.jsonl"):
        assert (out / rel).read_text() == open(os.path.join(ref, rel)).read()
    wa, wb = weights(os.path.join(ref, "round_2", "model")), weights(str(out / "round_2" / "model"))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_lora_stage_trains_and_saves_a_merged_model(tmp_path, task_dir):
    from ssapo.bench.task import prepare_task
    from ssapo.io import read_jsonl
    from ssapo.loop import train_stage

    task = prepare_task(task_dir, seed=42, size="test")
    c = cfg(tmp_path / "peft", task_dir, use_peft="true", lora_r="4", lora_alpha="8", lora_target_modules="q_proj,v_proj")
    rows = read_jsonl(task["preferences"])[:16]
    stats = train_stage(c, task["sft_model"], task["sft_model"], rows, 1e-2, 1, "dpo", str(tmp_path / "m"), str(tmp_path / "w"))
    assert stats["param_displacement"] > 0  # the adapter moved
    before, after = weights(task["sft_model"]), weights(str(tmp_path / "m"))
    assert set(before) == set(after)  # merged back into plain weights
    assert any(not np.array_equal(before[k], after[k]) for k in before if "q_proj" in k)
    assert all(np.array_equal(before[k], after[k]) for k in before if "mlp" in k)


def test_vllm_backend_needs_vllm():
    from ssapo.annotate import use_vllm

    assert use_vllm("transformers") is False
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert use_vllm("auto") is False
        with pytest.raises(ValueError, match="generation_backend: 'vllm' needs"):
            use_vllm("vllm")


@pytest.mark.parametrize("method", ["spa", "sera"])
def test_baselines_run_in_the_same_loop(tmp_path, task_dir, method):
    out = run(cfg(tmp_path / method, task_dir, method=method, num_rounds="1", round_sizes="32", spa_window="8"))
    m = json.load(open(os.path.join(out, "round_1", "metrics.json")))
    assert "follower" not in m and m["leader"]["loss"] == ("spa" if method == "spa" else "dpo")
    if method == "sera":
        s = m["sera"]
        assert s["kept"] == round(0.7 * s["pairs_in"]) and s["bootstrapped"] > 0
        assert m["leader"]["pairs"] == s["kept"] + s["bootstrapped"]
    else:
        assert m["leader"]["spa_flagged_fraction"] > 0


def test_sera_keeps_the_largest_margins(tmp_path, task_dir, monkeypatch):
    from ssapo import annotate
    from ssapo.bench.task import prepare_task
    from ssapo.loop import sera_round

    task = prepare_task(task_dir, seed=42, size="test")
    rows = [{"prompt": [{"role": "user", "content": "w1 w2 w3"}], "chosen": [{"role": "assistant", "content": "w1"}],
             "rejected": [{"role": "assistant", "content": "w2"}], "margin": float(m)} for m in [3, -1, 7, 0, 5, 2, 1, 9, 4, 6]]
    monkeypatch.setattr(annotate, "annotate", lambda *a, **k: ([], {}))  # no bootstrap: selection only
    c = cfg(tmp_path, task_dir)
    sel, st = sera_round(c, rows, task["sft_model"], None, task["sft_model"], seed=0)
    assert [r["margin"] for r in sel] == [9, 7, 6, 5, 4, 3, 2] and st["kept"] == 7


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_share_one_follower(tmp_path, task_dir):
    """`accelerate launch --num_processes 2` on CPU (gloo): annotation and the
    follower run once on the main process over all pairs, so the follower's
    input and output are exactly what one process computes from them."""
    run(cfg(tmp_path / "warm", task_dir, num_rounds="1", round_sizes="32"))  # builds the task first
    out = tmp_path / "two"
    args = [f"--{k}={v}" for k, v in {**SMALL, "task_dir": task_dir, "num_rounds": 1, "round_sizes": 32}.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ssapo.cli", "train", "--model", "tiny", "--output-dir", str(out), *args]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "state.json").read_text())["done"][-1] == "round_1/lead"
    rows = [json.loads(line) for line in (out / "round_1" / "annotations.jsonl").read_text().splitlines()]
    c = cfg(out, task_dir)
    cols, _, _ = follow([r["margin"] for r in rows], c.eps, c.k, c.group_size, c.beta_follower, c.follower_space)
    z = np.load(out / "round_1" / "follower.npz")
    np.testing.assert_array_equal(z["xi"], cols["xi"])
    np.testing.assert_array_equal(z["shift"], cols["shift"])
    np.testing.assert_array_equal(z["mass"], cols["mass"])


@pytest.mark.parametrize("override, name", [({"resolve_every": "5"}, "resolve_every"), ({"load_in_4bit": "true"}, "load_in_4bit"),
                                            ({"sera_gamma_role": "threshold"}, "sera_gamma_role")])
def test_fields_the_loop_does_not_act_on_are_refused(tmp_path, task_dir, override, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        run(cfg(tmp_path / "x", task_dir, **override))
