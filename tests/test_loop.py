"""The loop end to end on the tiny task: every file, parameters moving, the
ε = 0 control, resume after a kill, baselines, the re-solve hook, and (slow) a
2-process run whose follower input and output equal one process's."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from ssapo.config import load_config
from ssapo.io import read_jsonl
from ssapo.loop import run

SMALL = {"task_size": "test", "seed_size": "32", "round_sizes": "32 32", "num_rounds": "2", "batch_size": "8",
         "per_device_train_batch_size": "8", "max_new_tokens": "6", "seed_epochs": "1"}
STEPS = ["seed", "round_1/annotate", "round_1/follow", "round_1/lead", "round_2/annotate", "round_2/follow",
         "round_2/lead"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("task"))


def cfg(out, task_dir, **kw):
    return load_config("tiny", overrides={**SMALL, "output_dir": str(out), "task_dir": task_dir, **kw})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, task_dir):
    """One uninterrupted 2-round SSAPO run, shared by the tests that compare with it."""
    t = time.time()
    out = run(cfg(tmp_path_factory.mktemp("ref") / "run", task_dir))
    return str(out), time.time() - t


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return set(wa) == set(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_two_rounds_write_everything(reference_run):
    out, _ = reference_run
    state = json.load(open(os.path.join(out, "state.json")))
    assert state["done"] == STEPS and state["last"] == "round_2/lead"
    assert os.path.exists(os.path.join(out, "config.yaml"))
    assert os.path.exists(os.path.join(out, "seed", "model", "model.safetensors"))
    seed_m = json.load(open(os.path.join(out, "seed", "metrics.json")))
    assert 0 <= seed_m["eval"]["heldout_reward_accuracy"] <= 1 and seed_m["split"]["seed"] == 32
    for t in (1, 2):
        rd = os.path.join(out, f"round_{t}")
        for name in ("annotations.jsonl", "follower.npz", "metrics.json", "summary.md", "margins.png", "follower.png",
                     "groups.png", "loss.png", "heldout.png", "model/model.safetensors", "model/tokenizer.json"):
            assert os.path.exists(os.path.join(rd, name)), name
        rows = read_jsonl(os.path.join(rd, "annotations.jsonl"))
        assert len(rows) > 0 and all(r["margin"] > 0 for r in rows)
        assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"} <= set(rows[0])
        assert all(abs(r["chosen_reward"] - r["rejected_reward"] - r["margin"]) < 1e-9 for r in rows)
        m = json.load(open(os.path.join(rd, "metrics.json")))
        a, f, ld = m["annotation"], m["follower"], m["leader"]
        assert a["pairs"] == len(rows) == a["prompts"] - a["dropped_all_tied"] and 0 <= a["gold_accuracy"] <= 1
        assert f["n"] == len(rows) and abs(f["dual_gap"]) < 1e-9 and len(f["lam"]) == f["groups"]
        assert ld["param_displacement"] > 0 and ld["max_grad_norm"] > 0 and 0 <= ld["clamped_fraction"] <= 1
        assert ld["steps"] == len(ld["loss_history"]) == 4 and ld["loss"] == "shift_prob"
        assert 0 <= m["eval"]["heldout_reward_accuracy"] <= 1
        assert all(m[k]["seconds"] >= 0 for k in ("annotation", "follower", "leader", "eval"))
        z = np.load(os.path.join(rd, "follower.npz"))
        np.testing.assert_allclose(z["xi"], 1 / (1 + np.exp(-0.1 * np.array([r["margin"] for r in rows]))))
        assert "# Round" in open(os.path.join(rd, "summary.md")).read()
    assert not same_weights(os.path.join(out, "seed", "model"), os.path.join(out, "round_1", "model"))
    assert not same_weights(os.path.join(out, "round_1", "model"), os.path.join(out, "round_2", "model"))
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith(".")]
    assert not leftovers and not os.path.exists(os.path.join(out, "round_1", "trainer"))


def test_an_existing_run_needs_resume_and_the_same_config(reference_run, task_dir):
    out, _ = reference_run
    with pytest.raises(ValueError, match="^output_dir: .* already holds a run"):
        run(cfg(out, task_dir))
    with pytest.raises(ValueError, match=r"^config: resuming .* eps \(0.01 → 0.05\)"):
        run(cfg(out, task_dir, eps="0.05"), resume=True)
    t = time.time()
    assert str(run(cfg(out, task_dir), resume=True)) == out  # everything done: nothing to do
    assert time.time() - t < 10


def test_ssapo_at_eps_zero_is_iterative_dpo(tmp_path, task_dir):
    a = run(cfg(tmp_path / "ssapo", task_dir, eps="0", num_rounds="1", round_sizes="32"))
    b = run(cfg(tmp_path / "idpo", task_dir, method="iterative-dpo", num_rounds="1", round_sizes="32"))
    assert (a / "round_1" / "annotations.jsonl").read_text() == (b / "round_1" / "annotations.jsonl").read_text()
    assert same_weights(a / "round_1" / "model", b / "round_1" / "model")
    assert not (b / "round_1" / "follower.npz").exists()
    # the re-solve hook at ε = 0 keeps every atom at (shift 0, mass 1): still DPO to the bit
    c = run(cfg(tmp_path / "resolve", task_dir, eps="0", num_rounds="1", round_sizes="32", resolve_every="1"))
    m = json.load(open(c / "round_1" / "metrics.json"))
    assert len(m["leader"]["resolves"]) == m["leader"]["steps"] - 1
    assert same_weights(a / "round_1" / "model", c / "round_1" / "model")


def test_resolve_every_moves_the_atoms(tmp_path, task_dir):
    out = run(cfg(tmp_path / "r", task_dir, eps="0.05", num_rounds="1", round_sizes="32", resolve_every="2",
                  annotation_reference="seed", round_reference="init", gradient_accumulation_steps="1",
                  per_device_train_batch_size="4"))
    m = json.load(open(out / "round_1" / "metrics.json"))
    assert m["leader"]["steps"] == 8 and m["leader"]["reference"] == "init"
    assert m["annotation"]["reference"] == "init"  # round 1 under 'seed' (π_0 would score every response 0)
    res = m["leader"]["resolves"]
    assert [r["step"] for r in res] == [2, 4, 6] and all(abs(r["dual_gap"]) < 1e-9 for r in res)
    assert res[0]["xi_mean"] != m["follower"]["xi_mean"]  # the policy has moved since the annotation


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, task_dir, reference_run):
    ref, _ = reference_run
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
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # mid-round 1: after its annotation, in or before the follower/leader
    p.wait()
    done = json.loads(state.read_text())["done"]
    assert "round_1/annotate" in done and "round_2/annotate" not in done
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(state.read_text())["done"] == STEPS
    for t in (1, 2):
        rel = f"round_{t}/annotations.jsonl"
        assert (out / rel).read_text() == open(os.path.join(ref, rel)).read()
        za, zb = np.load(out / f"round_{t}" / "follower.npz"), np.load(os.path.join(ref, f"round_{t}", "follower.npz"))
        for key in za.files:
            np.testing.assert_array_equal(za[key], zb[key])
        assert same_weights(out / f"round_{t}" / "model", os.path.join(ref, f"round_{t}", "model"))


def test_lora_stage_trains_and_saves_a_merged_model(tmp_path, task_dir):
    from ssapo.bench.task import prepare_task
    from ssapo.loop import train_stage

    task = prepare_task(task_dir, seed=42, size="test")
    c = cfg(tmp_path / "peft", task_dir, use_peft="true", lora_r="4", lora_alpha="8", lora_target_modules="q_proj,v_proj")
    rows = read_jsonl(task["preferences"])[:16]
    stats = train_stage(c, task["sft_model"], task["sft_model"], rows, 1e-2, 1, "dpo", str(tmp_path / "m"),
                        str(tmp_path / "w"))
    assert stats["param_displacement"] > 0  # the adapter moved
    before, after = weights(task["sft_model"]), weights(str(tmp_path / "m"))
    assert set(before) == set(after)  # merged back into plain weights
    assert any(not np.array_equal(before[k], after[k]) for k in before if "q_proj" in k)
    assert all(np.array_equal(before[k], after[k]) for k in before if "mlp" in k)


@pytest.mark.parametrize("method", ["spa", "sera", "dpo"])
def test_baselines_run_in_the_same_loop(tmp_path, task_dir, method):
    out = run(cfg(tmp_path / method, task_dir, method=method, num_rounds="1", round_sizes="32", spa_window="8"))
    if method == "dpo":
        assert json.load(open(out / "state.json"))["done"] == ["seed"] and not (out / "round_1").exists()
        return
    m = json.load(open(out / "round_1" / "metrics.json"))
    assert "follower" not in m and m["leader"]["loss"] == ("spa" if method == "spa" else "dpo")
    if method == "sera":
        s = m["sera"]
        assert s["kept"] == round(0.7 * s["pairs_in"]) and s["bootstrapped"] > 0
        assert m["leader"]["pairs"] == s["kept"] + s["bootstrapped"] == len(read_jsonl(out / "round_1" / "sera.jsonl"))
    else:
        assert m["leader"]["spa_flagged_fraction"] > 0 and m["leader"]["spa_lambda"] == 0.5


@pytest.mark.parametrize("role", ["ensemble", "mix", "threshold"])
def test_sera_keeps_the_largest_margins(tmp_path, task_dir, monkeypatch, role):
    import torch

    from ssapo import annotate, loop
    from ssapo.bench.task import prepare_task

    task = prepare_task(task_dir, seed=42, size="test")
    margins = [3, -1, 7, 0, 5, 2, 1, 9, 4, 6]
    rows = [{"prompt": [{"role": "user", "content": "w1 w2 w3"}], "chosen": [{"role": "assistant", "content": "w1"}],
             "rejected": [{"role": "assistant", "content": "w2"}], "margin": 0.0} for _ in margins]
    monkeypatch.setattr(loop, "pair_margins", lambda *a, **k: (torch.tensor(margins, dtype=torch.float64), None))
    boot = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": float(m)} for m in (1.0, 5.0, 2.0)]
    monkeypatch.setattr(annotate, "annotate", lambda *a, **k: (annotate.to_dataset(boot), {"pairs": 3}))
    c = cfg(tmp_path, task_dir, sera_gamma_role=role, sera_gamma="0.3")
    sel, st = loop.sera_round(c, rows, task["sft_model"], task["sft_model"], task["sft_model"], seed=0)
    assert [r["margin"] for r in sel[:7]] == [0.0] * 7 and st["kept"] == 7
    kept_irm = st["kept_irm_min"]
    # the 7th largest margin; 'ensemble' mixes in the model before (here the same margins): (1−γ)·2 + γ·2
    assert kept_irm == pytest.approx(2.0)
    n_boot = {"ensemble": 3, "mix": 3, "threshold": 1}[role]  # mix: round(0.3/0.7·7) = 3; threshold: β·m > γ
    assert st["bootstrapped"] == n_boot and len(sel) == 7 + n_boot


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_share_one_follower(tmp_path, task_dir):
    """`accelerate launch --num_processes 2` on CPU (gloo): annotation is shared
    out by prompt chunks and gathered, the follower runs once on the main
    process over all pairs; the annotations and the follower's input and
    output equal a one-process run's."""
    over = {"num_rounds": "1", "round_sizes": "32", "per_device_train_batch_size": "4", "generation_batch_size": "8"}
    one = run(cfg(tmp_path / "one", task_dir, **over))
    out = tmp_path / "two"
    args = [f"--{k}={v}" for k, v in {**SMALL, "task_dir": task_dir, **over}.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ssapo.cli", "train", "--model", "tiny", "--output-dir", str(out), *args]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "state.json").read_text())["done"][-1] == "round_1/lead"
    assert (out / "round_1" / "annotations.jsonl").read_text() == (one / "round_1" / "annotations.jsonl").read_text()
    za, zb = np.load(out / "round_1" / "follower.npz"), np.load(one / "round_1" / "follower.npz")
    for key in ("margins", "xi", "loc", "shift", "mass", "weights", "lam", "budget_used"):
        np.testing.assert_array_equal(za[key], zb[key])
    m2 = json.load(open(out / "round_1" / "metrics.json"))
    assert m2["leader"]["steps"] == json.load(open(one / "round_1" / "metrics.json"))["leader"]["steps"]
    assert m2["leader"]["param_displacement"] > 0
