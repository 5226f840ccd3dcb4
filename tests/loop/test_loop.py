"""The loop end to end on the tiny task: every file, parameters moving, the
ε = 0 control, resume after a kill, baselines, the re-solve hook; the driver
(each step its own launch: the plan, the command, a failed launch); and the
user's `ssapo train --num-processes 2` (accelerate, gloo, CPU) over the whole
loop for every method."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from ssapo.atoms import Atoms
from ssapo.config import RunConfig, load_config
from ssapo.io import LOCK_NAME, read_jsonl
from ssapo.loop import run

SMALL = {
    "seed_size": "32",
    "round_sizes": "32 32",
    "num_rounds": "2",
    "batch_size": "8",
    "per_device_train_batch_size": "8",
    "max_new_tokens": "6",
    "seed_epochs": "1",
}
STEPS = [
    "seed",
    "seed/eval",
    "round_1/annotate",
    "round_1/follow",
    "round_1/lead",
    "round_1/eval",
    "round_2/annotate",
    "round_2/follow",
    "round_2/lead",
    "round_2/eval",
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The gold-reward task (test size), built once; runs get its paths as a user's run would."""
    from ssapo.bench.task import prepare_task

    d = str(tmp_path_factory.mktemp("task"))
    prepare_task(d, seed=42, size="test")
    return d


def task_paths(task_dir):
    """The task's SFT model and data as RunConfig fields."""
    return {
        "model": os.path.join(task_dir, "sft"),
        "preference_data": os.path.join(task_dir, "preferences.jsonl"),
        "prompt_data": os.path.join(task_dir, "prompts.jsonl"),
    }


def task_args(task_dir):
    """`ssapo train` arguments of a tiny-recipe run on the task at task_dir."""
    from ssapo.config import recipe_path

    return ["--config", recipe_path("tiny"), *[f"--{k}={v}" for k, v in task_paths(task_dir).items()]]


def cfg(out, task_dir, **kw):
    return load_config("tiny", overrides={**SMALL, **task_paths(task_dir), "output_dir": str(out), **kw})


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
    assert state["done"] == STEPS and state["last"] == "round_2/eval"
    assert os.path.exists(os.path.join(out, "config.yaml"))
    assert os.path.exists(os.path.join(out, "seed", "model", "model.safetensors"))
    seed_m = json.load(open(os.path.join(out, "seed", "metrics.json")))
    assert 0 <= seed_m["eval"]["heldout_reward_accuracy"] <= 1 and seed_m["split"]["seed"] == 32
    for t in (1, 2):
        rd = os.path.join(out, f"round_{t}")
        for name in (
            "annotations.jsonl",
            "follower.npz",
            "metrics.json",
            "summary.md",
            "margins.png",
            "follower.png",
            "groups.png",
            "loss.png",
            "heldout.png",
            "model/model.safetensors",
            "model/tokenizer.json",
        ):
            assert os.path.exists(os.path.join(rd, name)), name
        rows = read_jsonl(os.path.join(rd, "annotations.jsonl"))
        assert len(rows) > 0 and all(r["margin"] > 0 for r in rows)
        assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"} <= set(rows[0])
        assert all(abs(r["chosen_reward"] - r["rejected_reward"] - r["margin"]) < 1e-9 for r in rows)
        m = json.load(open(os.path.join(rd, "metrics.json")))
        a, f, ld = m["annotation"], m["follower"], m["leader"]
        assert a["pairs"] == len(rows) == a["prompts"] - a["dropped_all_tied"] and not any("gold" in k for k in a)
        assert a["flipped"] == 0 and not any(r["flipped"] for r in rows) and a["annotator"] == "implicit"
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
    # no temp file of an atomic write left behind (the run's lock file, DIR/.ssapo.lock, stays by design)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith(".") and f != LOCK_NAME]
    assert not leftovers and not os.path.exists(os.path.join(out, "round_1", "trainer"))


def test_each_step_measures_itself_in_metrics(reference_run):
    """metrics.json's "steps": each step's wall seconds, processes, each process's peak memory (resident on
    CPU; the GPU allocator's peak where there is one), generation and training tokens per second."""
    out, _ = reference_run
    seed = json.load(open(os.path.join(out, "seed", "metrics.json")))["steps"]
    r1 = json.load(open(os.path.join(out, "round_1", "metrics.json")))["steps"]
    assert sorted(seed) == ["eval", "seed"] and sorted(r1) == ["annotate", "eval", "follow", "lead"]
    for step in (*seed.values(), *r1.values()):
        assert step["seconds"] > 0 and step["processes"] == 1
        assert step["peak_device_bytes"] == [None]  # no GPU here
        assert 50e6 < step["peak_resident_bytes"][0] < 8e9  # a Python process with torch: 50 MB .. 8 GB
    assert r1["annotate"]["generated_tokens"] > 0 and r1["annotate"]["generation_tokens_per_second"] > 0
    for step in (seed["seed"], r1["lead"]):
        assert step["trained_tokens"] > 0 and step["training_tokens_per_second"] > 0
    assert "training_tokens_per_second" not in r1["annotate"] and "generated_tokens" not in r1["lead"]


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
    out = run(
        cfg(
            tmp_path / "r",
            task_dir,
            eps="0.05",
            num_rounds="1",
            round_sizes="32",
            resolve_every="2",
            annotation_reference="seed",
            round_reference="init",
            gradient_accumulation_steps="1",
            per_device_train_batch_size="4",
            batch_size="4",  # 4 × 1 × 1 process (with batch_size 8 it trained batches of 4 silently; now refused)
        )
    )
    m = json.load(open(out / "round_1" / "metrics.json"))
    assert m["leader"]["steps"] == 8 and m["leader"]["reference"] == "init"
    assert m["annotation"]["reference"] == "init"  # round 1 under 'seed' (π_0 would score every response 0)
    res = m["leader"]["resolves"]
    assert [r["step"] for r in res] == [2, 4, 6] and all(abs(r["dual_gap"]) < 1e-9 for r in res)
    assert res[0]["xi_mean"] != m["follower"]["xi_mean"]  # the policy has moved since the annotation


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, task_dir, reference_run):
    ref, _ = reference_run
    out = tmp_path / "killed"
    args = [*task_args(task_dir), *[f"--{k}={v}" for k, v in SMALL.items()]]
    cmd = [sys.executable, "-m", "ssapo.cli", "train", "--output-dir", str(out), *args]
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
    from ssapo.leader import train_stage

    task = prepare_task(task_dir, seed=42, size="test")
    c = cfg(
        tmp_path / "peft", task_dir, use_peft="true", lora_r="4", lora_alpha="8", lora_target_modules="q_proj,v_proj"
    )
    rows = read_jsonl(task["preferences"])[:16]
    stats = train_stage(
        c, task["sft_model"], task["sft_model"], rows, 1e-2, 1, "dpo", str(tmp_path / "m"), str(tmp_path / "w")
    )
    assert stats["param_displacement"] > 0  # the adapter moved
    before, after = weights(task["sft_model"]), weights(str(tmp_path / "m"))
    assert set(before) == set(after)  # merged back into plain weights
    assert any(not np.array_equal(before[k], after[k]) for k in before if "q_proj" in k)
    assert all(np.array_equal(before[k], after[k]) for k in before if "mlp" in k)


class _Killed(RuntimeError):
    pass


def test_a_stage_killed_mid_round_resumes_from_its_last_checkpoint(tmp_path, task_dir, monkeypatch):
    """save_steps: the leader checkpoints into its work directory; a stage killed after a checkpoint and
    run again continues from it (weights, optimizer, data order) and ends where an uninterrupted stage ends."""
    import ssapo.trainer as tr
    from ssapo.bench.task import prepare_task
    from ssapo.checkpoints import last_checkpoint
    from ssapo.leader import train_stage

    task = prepare_task(task_dir, seed=42, size="test")
    rows = read_jsonl(task["preferences"])[:16]
    c = cfg(tmp_path / "x", task_dir, save_steps="1", batch_size="4", per_device_train_batch_size="4")

    def stage(name):
        return train_stage(
            c,
            task["sft_model"],
            task["sft_model"],
            rows,
            1e-3,
            1,
            "dpo",
            str(tmp_path / name),
            str(tmp_path / f"{name}_work"),
        )

    full = stage("full")
    orig = tr.SSAPOTrainer._save_checkpoint

    def dying(self, model, trial):
        orig(self, model, trial)
        if self.state.global_step == 2:
            raise _Killed("killed after the checkpoint of step 2")

    monkeypatch.setattr(tr.SSAPOTrainer, "_save_checkpoint", dying)
    with pytest.raises(_Killed):
        stage("resumed")
    monkeypatch.setattr(tr.SSAPOTrainer, "_save_checkpoint", orig)
    assert last_checkpoint(tmp_path / "resumed_work").endswith("checkpoint-2") and not (tmp_path / "resumed").exists()
    trained = []
    step = tr.SSAPOTrainer.training_step
    monkeypatch.setattr(
        tr.SSAPOTrainer, "training_step", lambda self, *a, **k: trained.append(1) or step(self, *a, **k)
    )
    res = stage("resumed")
    assert len(trained) == 2  # steps 3 and 4 only: it continued from checkpoint-2 (from scratch it would be 4)
    assert res["steps"] == full["steps"] == 4 and res["loss_history"] == full["loss_history"]
    assert same_weights(tmp_path / "full", tmp_path / "resumed")
    assert not (tmp_path / "resumed_work").exists()  # the stage's checkpoints go once its model is saved


def test_a_resolving_stage_killed_mid_round_resumes_with_its_atoms(tmp_path, task_dir, monkeypatch):
    """resolve_every with save_steps: each step trains on the atoms re-solved after the step before it (read
    when its loss is computed), and the checkpoint keeps them, so a stage killed after step 2 and run again
    ends with the uninterrupted stage's weights, losses and re-solves."""
    import ssapo.trainer as tr
    from ssapo.bench.task import prepare_task
    from ssapo.leader import train_stage
    from ssapo.resolving import ResolvingTrainer

    task = prepare_task(task_dir, seed=42, size="test")
    rows = Atoms.identity(16).attach(read_jsonl(task["preferences"])[:16])
    c = cfg(tmp_path / "x", task_dir, save_steps="1", batch_size="4", per_device_train_batch_size="4", eps="0.05")
    c.resolve_every = 1
    from ssapo import follower

    used, current = [], [Atoms.identity(16).mass]  # the atoms each step trained on; the resolver's after each re-solve
    compute, resolve = ResolvingTrainer._compute_loss, follower.Resolver.resolve

    def spy(self, model, inputs, return_outputs):
        used.append((inputs["pair_index"].tolist(), self._current_atoms(inputs)["mass"].double().numpy()))
        return compute(self, model, inputs, return_outputs)

    def resolved(self, step, model=None):
        diag = resolve(self, step, model)
        current.append(self.atoms.mass.copy())
        return diag

    monkeypatch.setattr(ResolvingTrainer, "_compute_loss", spy)
    monkeypatch.setattr(follower.Resolver, "resolve", resolved)

    def stage(name):
        return train_stage(
            c,
            task["sft_model"],
            task["sft_model"],
            rows,
            1e-3,
            1,
            "shift_prob",
            str(tmp_path / name),
            str(tmp_path / f"{name}_work"),
            resolve_reference=task["sft_model"],
        )

    full = stage("full")
    assert [r["step"] for r in full["resolves"]] == [1, 2, 3]
    # step k trained on the atoms as re-solved after step k − 1 (not one batch late), and they moved
    assert len(used) == 4 and any((m != current[0]).any() for m in current[1:])
    for (index, mass), atoms_then in zip(used, current):
        np.testing.assert_allclose(mass, atoms_then[index], rtol=1e-6)
    orig = tr.SSAPOTrainer._save_checkpoint

    def dying(self, model, trial):
        orig(self, model, trial)
        if self.state.global_step == 2:
            raise _Killed("killed after the checkpoint of step 2")

    monkeypatch.setattr(tr.SSAPOTrainer, "_save_checkpoint", dying)
    with pytest.raises(_Killed):
        stage("resumed")
    monkeypatch.setattr(tr.SSAPOTrainer, "_save_checkpoint", orig)
    res = stage("resumed")
    timeless = lambda hist: [{k: v for k, v in d.items() if k != "seconds"} for d in hist]  # noqa: E731
    assert res["loss_history"] == full["loss_history"] and timeless(res["resolves"]) == timeless(full["resolves"])
    assert same_weights(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.parametrize("method", ["spa", "sera", "dpo"])
def test_baselines_run_in_the_same_loop(tmp_path, task_dir, method):
    out = run(cfg(tmp_path / method, task_dir, method=method, num_rounds="1", round_sizes="32", spa_window="8"))
    if method == "dpo":
        assert json.load(open(out / "state.json"))["done"] == ["seed", "seed/eval"] and not (out / "round_1").exists()
        return
    m = json.load(open(out / "round_1" / "metrics.json"))
    assert "follower" not in m and m["leader"]["loss"] == ("spa" if method == "spa" else "dpo")
    if method == "sera":
        s = m["sera"]
        assert s["kept"] == round(0.7 * s["pairs_in"]) and s["bootstrapped"] > 0
        assert m["leader"]["pairs"] == s["kept"] + s["bootstrapped"] == len(read_jsonl(out / "round_1" / "sera.jsonl"))
    else:
        assert m["leader"]["spa_flagged_fraction"] > 0 and m["leader"]["spa_lambda"] == 0.5


def test_a_given_seed_model_skips_the_seed_stage(tmp_path, task_dir):
    """seed_model: π_0 given; round 1 starts from it, so it equals the round 1 of the run that trained it."""
    kw = dict(method="iterative-dpo", num_rounds="1", round_sizes="32")
    a = run(cfg(tmp_path / "a", task_dir, **kw))
    b = run(cfg(tmp_path / "b", task_dir, seed_model=str(a / "seed" / "model"), **kw))
    assert json.load(open(b / "state.json"))["done"] == [
        "seed/eval",
        "round_1/annotate",
        "round_1/lead",
        "round_1/eval",
    ]
    assert not (b / "seed" / "model").exists()
    assert (a / "round_1" / "annotations.jsonl").read_text() == (b / "round_1" / "annotations.jsonl").read_text()
    assert same_weights(a / "round_1" / "model", b / "round_1" / "model")
    ev = lambda d: json.load(open(d / "seed" / "metrics.json"))["eval"]["heldout_reward_accuracy"]  # noqa: E731
    assert ev(a) == ev(b)
    with pytest.raises(ValueError, match="^seed_model: no checkpoint directory"):
        run(cfg(tmp_path / "c", task_dir, seed_model=str(tmp_path / "missing"), **kw))


def test_an_annotator_hook_labels_the_round_and_flips_are_recorded(tmp_path, task_dir, monkeypatch):
    """annotator: module:factory ranks the samples (here: reward = scale × the response's length); then
    annotation_flip_rate turns round(r·n) of the pairs around, in the `flipped` column."""
    import types

    mod = types.ModuleType("length_judge")

    def make(args):
        scale = float(args)
        return lambda prompts, responses: [[scale * len(r) for r in rs] for rs in responses]

    mod.make = make
    monkeypatch.setitem(sys.modules, "length_judge", mod)
    text = lambda m: m if isinstance(m, str) else m[-1]["content"]  # noqa: E731
    over = dict(method="iterative-dpo", num_rounds="1", round_sizes="32", annotator="length_judge:make")
    out = run(cfg(tmp_path / "j", task_dir, annotator_args="2.5", annotation_flip_rate="0.25", **over))
    rows = read_jsonl(out / "round_1" / "annotations.jsonl")
    m = json.load(open(out / "round_1" / "metrics.json"))["annotation"]
    assert m["annotator"] == "length_judge:make" and m["pairs"] == len(rows) > 0
    flipped = [r for r in rows if r["flipped"]]
    assert len(flipped) == m["flipped"] == round(0.25 * len(rows))
    for r in rows:
        assert r["chosen_reward"] == 2.5 * len(text(r["chosen"])) and r["rejected_reward"] == 2.5 * len(
            text(r["rejected"])
        )
        assert (r["margin"] < 0) == r["flipped"] and r["margin"] == r["chosen_reward"] - r["rejected_reward"]


@pytest.mark.parametrize("role", ["ensemble", "mix", "threshold"])
def test_sera_keeps_the_largest_margins(tmp_path, task_dir, monkeypatch, role):
    import torch

    from ssapo import annotate, models
    from ssapo.bench.task import prepare_task
    from ssapo.methods.sera import sera_round

    task = prepare_task(task_dir, seed=42, size="test")
    margins = [3, -1, 7, 0, 5, 2, 1, 9, 4, 6]
    rows = [
        {
            "prompt": [{"role": "user", "content": "w1 w2 w3"}],
            "chosen": [{"role": "assistant", "content": "w1"}],
            "rejected": [{"role": "assistant", "content": "w2"}],
            "margin": 0.0,
        }
        for _ in margins
    ]
    monkeypatch.setattr(models, "pair_margins", lambda *a, **k: (torch.tensor(margins, dtype=torch.float64), None))
    boot = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": float(m)} for m in (1.0, 5.0, 2.0)]
    monkeypatch.setattr(
        annotate, "annotate_rows", lambda *a, **k: ([{**b, "index": i} for i, b in enumerate(boot)], {"pairs": 3})
    )
    c = cfg(tmp_path, task_dir, sera_gamma_role=role, sera_gamma="0.3")
    sel, st = sera_round(c, rows, task["sft_model"], task["sft_model"], task["sft_model"], seed=0)
    assert [r["margin"] for r in sel[:7]] == [0.0] * 7 and st["kept"] == 7
    kept_irm = st["kept_irm_min"]
    # the 7th largest margin; 'ensemble' mixes in the model before (here the same margins): (1−γ)·2 + γ·2
    assert kept_irm == pytest.approx(2.0)
    n_boot = {"ensemble": 3, "mix": 3, "threshold": 1}[role]  # mix: round(0.3/0.7·7) = 3; threshold: β·m > γ
    assert st["bootstrapped"] == n_boot and len(sel) == 7 + n_boot


# -- the driver: each step its own launch ------------------------------------------------------------


def _launcher(tmp_path, engine="ddp", n=4, extra=()):
    from ssapo.accelerate_configs import accelerate_config_path
    from ssapo.launch import Launcher

    return Launcher(str(tmp_path), n, accelerate_config_path(engine), list(extra), echo=False)


def test_launcher_runs_each_step_where_it_belongs(tmp_path):
    import yaml

    from ssapo.methods import steps_of

    c = load_config("llama3-8b", overrides={"generation_backend": "transformers", "num_rounds": "2"})
    steps = steps_of(c)
    assert steps == STEPS
    # zero3: the training steps alone under the engine; annotation and evaluation as plain data-parallel
    # processes (the engine's config without its DeepSpeed part); the follower in the driver
    z = _launcher(tmp_path, "zero3")
    plan = z.plan(c, steps)
    assert not os.path.exists(z.data_config)  # written when a launch needs it, not before the run is checked
    z.write_configs()
    data = yaml.safe_load(open(z.data_config))
    assert data["distributed_type"] == "MULTI_GPU" and not any(k.startswith("deepspeed") for k in data)
    assert data["mixed_precision"] == "bf16" and z.data_config.startswith(str(tmp_path))
    assert [(g, how and (os.path.basename(how[0]), how[1])) for g, how in plan] == [
        (["seed"], ("zero3.yaml", 4)),
        (["seed/eval", "round_1/annotate"], ("data_parallel.yaml", 4)),
        (["round_1/follow"], None),
        (["round_1/lead"], ("zero3.yaml", 4)),
        (["round_1/eval", "round_2/annotate"], ("data_parallel.yaml", 4)),
        (["round_2/follow"], None),
        (["round_2/lead"], ("zero3.yaml", 4)),
        (["round_2/eval"], ("data_parallel.yaml", 4)),
    ]
    # ddp: data-parallel is the engine itself, so a round's eval joins the next lead's launch
    d = _launcher(tmp_path, "ddp")
    assert d.data_config == d.engine_config
    assert [g for g, _ in d.plan(c, steps)] == [
        ["seed", "seed/eval", "round_1/annotate"],
        ["round_1/follow"],
        ["round_1/lead", "round_1/eval", "round_2/annotate"],
        ["round_2/follow"],
        ["round_2/lead", "round_2/eval"],
    ]
    assert [
        g
        for g, _ in d.plan(
            load_config("tiny", overrides={"method": "sera", "num_rounds": "1"}),
            steps_of(load_config("tiny", overrides={"method": "sera", "num_rounds": "1"})),
        )
    ] == [["seed", "seed/eval", "round_1/annotate", "round_1/sera", "round_1/lead", "round_1/eval"]]
    # the command: accelerate launch of ssapo.launch, the steps, a free port on one machine, mixed precision
    cmd = z.command(["round_1/lead"], (z.engine_config, 4), "bf16")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[cmd.index("--config_file") + 1] == z.engine_config
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert int(cmd[cmd.index("--main_process_port") + 1]) > 0
    assert cmd[cmd.index("-m", 3) :] == ["-m", "ssapo.launch", "--run-dir", str(tmp_path), "--step", "round_1/lead"]
    # several machines: accelerate's own flags passed through, no port of our own
    m = _launcher(
        tmp_path,
        "fsdp",
        16,
        ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"],
    )
    m.write_configs()
    cmd = m.command(["seed"], (m.engine_config, 16))
    assert cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1" and cmd.count("--main_process_port") == 1
    assert yaml.safe_load(open(m.data_config))["distributed_type"] == "MULTI_GPU"
    # vLLM annotates in one plain process (its own tensor parallelism), without accelerate
    v = load_config("llama3-8b", overrides={"generation_backend": "vllm"})
    import ssapo.generation as generation

    orig = generation.use_vllm
    try:
        generation.use_vllm = lambda backend: backend == "vllm"
        # vLLM generates in one process, then every process scores (two launches: test_gpu_paths)
        assert z.how(v, "round_1/annotate") == ("vllm+score", 4) and z.how(v, "round_1/lead") == (z.engine_config, 4)
    finally:
        generation.use_vllm = orig
    assert z.command(["round_1/annotate"], ("", 1))[1:3] == ["-m", "ssapo.launch"]


def test_train_uses_every_gpu_with_the_recipes_engine(tmp_path, monkeypatch):
    import ssapo.commands.train as train
    from ssapo.accelerate_configs import accelerate_config_path
    from ssapo.cli import build_parser

    def launcher(argv):
        args, extra = build_parser().parse_known_args(["train", "--output-dir", str(tmp_path / "r"), *argv])
        return train.launcher_of(args, train.build_config(args, extra))

    monkeypatch.setattr(train, "_visible_gpus", lambda: 8)
    z = launcher(["--model", "llama3-8b"])  # the recipe: accelerate_config zero3, every visible GPU
    assert z.num_processes == 8 and z.engine_config == accelerate_config_path("zero3")
    f = launcher(["--model", "llama3-8b", "--accelerate-config", "fsdp", "--num-processes", "4"])
    assert f.num_processes == 4 and f.engine_config == accelerate_config_path("fsdp")
    # one process of 8 GPUs: launched, seeing one GPU (in-process it would see 8, which the trainer refuses)
    one = launcher(["--model", "llama3-8b", "--num-processes", "1"])
    assert one.num_processes == 1 and one.env()["CUDA_VISIBLE_DEVICES"] == "0"
    assert launcher(["--model", "tiny"]) is None  # use_cpu: one process whatever the GPUs
    n = launcher(
        ["--model", "llama3-8b", "--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "10.0.0.1"]
    )
    assert n.num_processes == 16 and n.machine_rank == 1
    assert n.accelerate_args == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1"]
    monkeypatch.setattr(train, "_visible_gpus", lambda: 0)
    assert launcher(["--model", "llama3-8b"]) is None  # no GPU: one process
    # bad flags: exit 2 and a line naming the flag
    for argv, flag in (
        (["--num-processes", "0"], "--num-processes"),
        (["--num-machines", "2"], "--main-process-ip"),
        (["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "x"], "--machine-rank"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "ssapo.cli",
                "train",
                "--model",
                "tiny",
                "--output-dir",
                str(tmp_path / "bad"),
                *argv,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert r.returncode == 2 and r.stderr.startswith(f"ssapo train: error: {flag}:"), r.stderr
        assert "Traceback" not in r.stderr
    # inside a launch it never launches again: every step runs in the launched processes
    import ssapo.bench.task as bench_task
    import ssapo.loop as loop

    calls, built = [], []
    monkeypatch.setattr(
        loop,
        "run",
        lambda cfg, resume=False, launcher=None, procs=None: calls.append((launcher, procs, cfg)) or tmp_path,
    )
    fake = {"sft_model": str(tmp_path / "t" / "sft"), "preferences": "p.jsonl", "prompts": "q.jsonl"}
    monkeypatch.setattr(bench_task, "prepare_task", lambda d, seed, size: built.append((d, seed, size)) or fake)
    monkeypatch.setenv(train.LAUNCHED_ENV, "1")
    args, extra = build_parser().parse_known_args(
        ["train", "--model", "tiny", "--num-processes", "2", "--output-dir", str(tmp_path / "in")]
    )
    assert train.run(args, extra) == 0 and [c[:2] for c in calls] == [(None, None)]
    # the tiny preset's command builds the task in <output_dir>/task and hands the loop its paths
    assert built == [(str(tmp_path / "in" / "task"), 42, "tiny")]
    c = calls[0][2]
    assert (c.model, c.preference_data, c.prompt_data) == (fake["sft_model"], "p.jsonl", "q.jsonl")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # ... and refuses to run every step under ZeRO-3
    assert train.run(args, extra) == 2 and len(calls) == 1


def test_a_failed_launch_names_the_step_and_its_log(tmp_path, task_dir, monkeypatch, capsys):
    import ssapo.commands.train as train
    from ssapo.cli import build_parser
    from ssapo.launch import Launcher

    # a launch that dies as a rank would (an exception, exit 1): the driver ends with one line
    monkeypatch.setattr(
        Launcher,
        "command",
        lambda self, steps, how, mp=None, generate_only=False: [
            sys.executable,
            "-c",
            "raise FileNotFoundError('cache-0.arrow')",
        ],
    )
    monkeypatch.delenv(train.LAUNCHED_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    argv = [
        "train",
        "--num-processes",
        "2",
        "--output-dir",
        str(out),
        *task_args(task_dir),
        *[f"--{k}={v}" for k, v in SMALL.items()],
        "--per-device-train-batch-size=null",  # SMALL's 8 × 2 processes would be refused before the launch
    ]
    args, extra = build_parser().parse_known_args(argv)
    assert train.run(args, extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    log = out / "logs" / "seed+seed_eval+round_1_annotate.log"
    assert err[-1] == (f"ssapo train: error: step seed failed (exit 1; FileNotFoundError: cache-0.arrow); log: {log}")
    assert "FileNotFoundError" in log.read_text() and not any("loop.py" in e for e in err)
    assert not (out / "state.json").exists()  # nothing recorded; --resume starts at the seed
    assert (out / "data" / "split.json").exists() and (out / "config.yaml").exists()


MP = {
    "seed_size": "16",
    "round_sizes": "16 16",
    "num_rounds": "2",
    "batch_size": "8",
    "per_device_train_batch_size": "null",  # as the tiny preset: derived by the driver, 8 / 2 processes = 4
    "max_new_tokens": "4",
    "seed_epochs": "1",
    "generation_batch_size": "8",
    "spa_window": "8",
    "ddp_timeout": "1234",
}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, task_dir):
    """`ssapo train --model tiny --num-processes 2 --method M ...` (once per method): (run dir, result)."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp("mp") / method
            over = {**MP, "method": method}
            cmd = [
                sys.executable,
                "-m",
                "ssapo.cli",
                "train",
                "--num-processes",
                "2",
                "--output-dir",
                str(out),
                *task_args(task_dir),
                *[f"--{k}={v}" for k, v in over.items()],
            ]
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "SSAPO_ACCELERATE_LAUNCHED")
            }
            runs[method] = (
                out,
                subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900),
            )
        return runs[method]

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["ssapo", "iterative-dpo", "spa", "sera", "dpo"])
def test_two_processes_run_the_whole_loop_through_the_command(two_process_run, method):
    """`ssapo train --model tiny --num-processes 2` as a user types it (CPU, gloo): the driver launches
    each step under accelerate (the recipe's ddp engine), the follower runs in the driver; seed → 2 rounds.
    Every step is recorded, every model is saved, the metrics are complete, both leader ranks trained on
    the same bytes (their hashes equal the hash of the run's own files) and ddp_timeout reached the
    process group."""
    from ssapo import follower
    from ssapo.leader import rows_hash
    from ssapo.methods import steps_of

    out, r = two_process_run(method)
    assert r.returncode == 0, r.stderr[-4000:]
    c = RunConfig.from_yaml(str(out / "config.yaml"))
    assert c.method == method and c.ddp_timeout == 1234
    steps = steps_of(c)
    assert json.loads((out / "state.json").read_text())["done"] == steps
    assert r.stderr.count("accelerate.commands.launch") == (3 if method == "ssapo" else 1)  # ddp: follower splits
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert len(logs) == r.stderr.count("accelerate.commands.launch")

    def check_leader(ld, rows):
        assert ld["processes"] == 2 and ld["steps"] >= 1 and ld["param_displacement"] > 0
        assert len(ld["data_hashes"]) == 2 and set(ld["data_hashes"]) == {rows_hash(rows)}, "ranks saw other atoms"
        assert ld["process_group_timeout_s"] == 1234

    seed = json.loads((out / "seed" / "metrics.json").read_text())
    check_leader(seed["leader"], read_jsonl(out / "data" / "seed.jsonl"))
    assert 0 <= seed["eval"]["heldout_reward_accuracy"] <= 1 and seed["split"]["seed"] == 16
    models = [out / "seed" / "model"] + [out / f"round_{t}" / "model" for t in (1, 2) if method != "dpo"]
    for m in models:
        assert (m / "model.safetensors").exists() and (m / "tokenizer.json").exists()
        assert "SSAPO" in (m / "README.md").read_text()  # the model card, saved through the trainer
        assert weights(m)  # readable safetensors
    for a, b in zip(models, models[1:]):
        assert not same_weights(a, b)
    if method == "dpo":
        assert not (out / "round_1").exists()
        return
    for t in (1, 2):
        rd = out / f"round_{t}"
        m = json.loads((rd / "metrics.json").read_text())
        ann = read_jsonl(rd / "annotations.jsonl")
        assert m["annotation"]["pairs"] == len(ann) > 0 and m["annotation"]["prompts"] == 16
        rows = ann
        if method == "ssapo":
            z = follower.load(rd / "follower.npz")
            assert m["follower"]["n"] == len(ann) and abs(m["follower"]["dual_gap"]) < 1e-9
            rows = Atoms.of(z).attach(ann)
        if method == "sera":
            rows = read_jsonl(rd / "sera.jsonl")
            assert m["sera"]["kept"] == round(0.7 * m["sera"]["pairs_in"]) and len(rows) == m["leader"]["pairs"]
        check_leader(m["leader"], rows)
        assert m["leader"]["loss"] == {"ssapo": "shift_prob", "spa": "spa"}.get(method, "dpo")
        assert 0 <= m["eval"]["heldout_reward_accuracy"] <= 1 and (rd / "summary.md").exists()
    # no temp file of an atomic write left behind (the run's lock file, DIR/.ssapo.lock, stays by design)
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith(".") and f != LOCK_NAME]
    assert not leftovers and not (out / "round_1" / "trainer").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_annotate_and_follow_as_one(two_process_run, tmp_path, task_dir):
    """The 2-process run's first round (annotation shared out by chunks, the follower in the driver) equals
    a one-process run's: the same pairs, rewards and atoms (the seed model is the same to the bit: two
    micro-batches of 4 on two ranks average as two accumulated micro-batches on one)."""
    out, r = two_process_run("ssapo")
    assert r.returncode == 0, r.stderr[-4000:]
    one = run(
        load_config(
            "tiny",
            overrides={
                **MP,
                **task_paths(task_dir),
                "num_rounds": "1",
                "round_sizes": "16",
                # the micro-batch the 2-process run derived (8 / 2): here 2 accumulated micro-batches of 4
                "per_device_train_batch_size": "4",
                "output_dir": str(tmp_path / "one"),
            },
        )
    )
    assert (out / "round_1" / "annotations.jsonl").read_text() == (one / "round_1" / "annotations.jsonl").read_text()
    za, zb = np.load(out / "round_1" / "follower.npz"), np.load(one / "round_1" / "follower.npz")
    for key in ("margins", "xi", "loc", "shift", "mass", "weight", "lam", "budget_used"):
        np.testing.assert_array_equal(za[key], zb[key])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_driver_runs_the_leader_under_zero3_and_the_rest_data_parallel(tmp_path, task_dir, monkeypatch):
    """DeepSpeed ZeRO-3 on 2 CPU processes (recipes/accelerate/zero3_cpu.yaml) as the training engine of a
    driver run, seed → 1 round: seed and lead launch under ZeRO-3, annotation and evaluation as plain
    data-parallel processes (whole models), the follower in the driver. Both ranks see the real world (two
    hashes of the same rows), and the saved models are whole (gathered), moved, and loadable."""
    import importlib.util

    missing = [m for m in ("deepspeed", "ninja") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (pip install deepspeed ninja)")
    from ssapo.config import RECIPES_DIR
    from ssapo.launch import Launcher
    from ssapo.leader import rows_hash

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    for k in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "SSAPO_ACCELERATE_LAUNCHED"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "z3"
    c = load_config(
        "tiny",
        overrides={
            **MP,
            "num_rounds": "1",
            "round_sizes": "16",
            "use_cpu": "false",
            **task_paths(task_dir),
            "output_dir": str(out),
        },
    )
    launcher = Launcher(str(out), 2, os.path.join(RECIPES_DIR, "accelerate", "zero3_cpu.yaml"), echo=False)
    run(c, launcher=launcher)
    assert json.loads((out / "state.json").read_text())["done"] == [
        "seed",
        "seed/eval",
        "round_1/annotate",
        "round_1/follow",
        "round_1/lead",
        "round_1/eval",
    ]
    logs = {p.name for p in (out / "logs").iterdir()}
    assert logs == {"seed.log", "seed_eval+round_1_annotate.log", "round_1_lead.log", "round_1_eval.log"}
    assert "DeepSpeed" in (out / "logs" / "round_1_lead.log").read_text()
    m = json.loads((out / "round_1" / "metrics.json").read_text())
    from ssapo import follower

    rows = Atoms.of(follower.load(out / "round_1" / "follower.npz")).attach(
        read_jsonl(out / "round_1" / "annotations.jsonl")
    )
    assert m["leader"]["processes"] == 2 and set(m["leader"]["data_hashes"]) == {rows_hash(rows)}
    assert len(m["leader"]["data_hashes"]) == 2 and m["leader"]["process_group_timeout_s"] == 1234
    init = weights(os.path.join(task_dir, "sft"))
    for a, b in (
        (init, weights(out / "seed" / "model")),
        (weights(out / "seed" / "model"), weights(out / "round_1" / "model")),
    ):
        assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # whole, not ZeRO-3's empty partitions
        assert any(not np.array_equal(a[k], b[k]) for k in a)
