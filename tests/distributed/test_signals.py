"""SIGTERM and SIGINT to `ssapo train` (issue 17, item 6): the driver stops the processes of the launch under
way within seconds (its workers too, which torchrun starts in sessions of their own, and one that ignores
SIGTERM, as a process stuck in a model load may), says how to continue, and exits 143 / 130; nothing already
written is lost, so --resume continues the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ssapo.launch import Stopped, stop_on_signals, stop_tree


def _gone(procs) -> bool:
    """Whether none of `procs` (psutil.Process objects, so a reused pid is not mistaken for them) runs."""
    for q in procs:
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.Error:
            pass
    return True


def _wait_gone(procs, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if _gone(procs):
            return True
        time.sleep(0.1)
    return _gone(procs)


# -- the pieces ----------------------------------------------------------------------------------------------


def test_sigterm_raises_stopped_inside_and_the_handler_is_restored_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as e:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted at once
    assert (e.value.name, e.value.exit_code) == ("SIGTERM", 143)
    assert not isinstance(e.value, Exception)  # no `except Exception` of a step keeps it
    assert signal.getsignal(signal.SIGTERM) is before


TREE = """
import subprocess, sys, time
# a worker in a session of its own (as torchrun starts them) that ignores SIGTERM (stuck in a model load)
w = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('up', flush=True); time.sleep(600)"], start_new_session=True, stdout=subprocess.PIPE,
                     text=True)
assert w.stdout.readline().strip() == "up"
print(w.pid, flush=True)
time.sleep(600)
"""


def test_stop_tree_ends_workers_in_their_own_session_even_when_they_ignore_sigterm():
    p = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True, bufsize=1
    )
    worker = psutil.Process(int(p.stdout.readline()))
    assert worker.ppid() == p.pid and os.getsid(worker.pid) != os.getsid(p.pid)
    t0 = time.time()
    n = stop_tree(p, grace_s=1.0)
    took = time.time() - t0
    assert n == 2 and p.returncode is not None
    assert _wait_gone([worker], 5), "the worker outlived the launch"
    assert took < 5, took  # SIGKILL after the grace, not the old 30 s wait


def test_a_second_signal_while_stopping_kills_at_once_and_does_not_cut_the_cleanup_short():
    import threading

    p = subprocess.Popen(
        [sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, start_new_session=True, bufsize=1
    )
    worker = psutil.Process(int(p.stdout.readline()))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the second SIGTERM, 1 s in
    t0 = time.time()
    with stop_on_signals():
        stop_tree(p, grace_s=60.0)  # no Stopped from inside: the signal hurries it instead
    assert time.time() - t0 < 10
    assert _wait_gone([worker], 5)


def test_the_command_exits_143_with_a_line_on_how_to_continue(tmp_path, monkeypatch, capsys):
    import ssapo.commands.train as train
    from ssapo.cli import build_parser

    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text('{"done": ["seed"], "last": "seed"}')

    def killed(args, extra=None):
        args.run_dir = str(out)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(train, "_run", killed)
    args, extra = build_parser().parse_known_args(["train", "--model", "tiny", "--output-dir", str(out)])
    before = signal.getsignal(signal.SIGTERM)
    assert train.run(args, extra) == 143
    assert capsys.readouterr().err == (
        f"ssapo train: stopped by SIGTERM; the steps finished so far are kept in {out}; continue with --resume\n"
    )
    assert signal.getsignal(signal.SIGTERM) is before
    (out / "state.json").unlink()  # stopped before the run started: nothing to resume
    assert train.run(args, extra) == 143
    assert "the run had not started" in capsys.readouterr().err


# -- a real driver: ssapo train --num-processes 2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from ssapo.bench.task import prepare_task

    d = str(tmp_path_factory.mktemp("task"))
    prepare_task(d, seed=42, size="test")
    return d


def _env() -> dict:
    e = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for k in ("SSAPO_ACCELERATE_LAUNCHED", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        e.pop(k, None)
    return e


def _driver(task_dir, out, err, *extra) -> subprocess.Popen:
    from ssapo.config import recipe_path

    args = [
        "--config",
        recipe_path("tiny"),
        f"--model={os.path.join(task_dir, 'sft')}",
        f"--preference-data={os.path.join(task_dir, 'preferences.jsonl')}",
        f"--prompt-data={os.path.join(task_dir, 'prompts.jsonl')}",
        "--num-rounds=1",
        "--num-processes=2",
        f"--output-dir={out}",
    ]
    cmd = [sys.executable, "-m", "ssapo.cli", "train", *args, *extra]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=open(err, "w"))


def _workers_up(driver: subprocess.Popen, seconds: float = 150):
    """Every process under the driver, once the first launch's two workers (`-m ssapo.launch` under torchrun,
    each in a session of its own) exist."""
    end = time.time() + seconds
    while time.time() < end:
        assert driver.poll() is None, f"the driver ended first (exit {driver.returncode})"
        try:
            tree = psutil.Process(driver.pid).children(recursive=True)
            workers = [
                q for q in tree if "ssapo.launch" in q.cmdline() and "accelerate.commands.launch" not in q.cmdline()
            ]
        except psutil.Error:
            workers = []
        if len(workers) >= 2:
            time.sleep(1.0)  # a moment into the workers' start (imports, model load)
            return psutil.Process(driver.pid).children(recursive=True)
        time.sleep(0.2)
    raise AssertionError("no launch within the time")


def _stop(driver: subprocess.Popen, tree, signum: int, err) -> tuple:
    t0 = time.time()
    driver.send_signal(signum)
    rc = driver.wait(60)
    took = time.time() - t0
    assert _wait_gone(tree, 3), [q.cmdline()[:4] for q in tree if not _gone([q])]
    return rc, took, open(err).read().strip().splitlines()


def test_sigterm_stops_the_launch_within_seconds_and_resume_continues(tmp_path, task_dir):
    out = tmp_path / "run"
    err = tmp_path / "first.err"
    driver = _driver(task_dir, out, err)
    try:
        tree = _workers_up(driver)
        assert len(tree) >= 3  # accelerate launch and its two workers
        rc, took, lines = _stop(driver, tree, signal.SIGTERM, err)
    finally:
        driver.kill()
    assert rc == 143, lines[-20:]
    assert took < 20, took  # the workers end on SIGTERM (SIGKILL after 10 s at most)
    assert (
        lines[-1]
        == f"ssapo train: stopped by SIGTERM; the steps finished so far are kept in {out}; continue with --resume"
    )
    assert "Traceback" not in "\n".join(lines)
    log = next(iter(sorted((out / "logs").glob("*.log"))))
    assert "stopped by the driver (SIGTERM)" in log.read_text()
    # no process of the run left anywhere (not even one that torchrun reparented)
    left = []
    for q in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(q.info["cmdline"] or []) and q.pid != os.getpid() and not _gone([q]):
            left.append(q.info["cmdline"][:6])
    assert not left, left
    # nothing lost: the run's files are whole; --resume starts the launch again, and SIGINT stops it (130)
    assert (out / "config.yaml").exists() and (out / "data" / "split.json").exists()
    if (out / "state.json").exists():
        json.loads((out / "state.json").read_text())["done"]
    err2 = tmp_path / "resumed.err"
    resumed = _driver(task_dir, out, err2, "--resume")
    try:
        tree = _workers_up(resumed)
        rc, took, lines = _stop(resumed, tree, signal.SIGINT, err2)
    finally:
        resumed.kill()
    assert rc == 130, lines[-20:]
    assert took < 20, took
    assert lines[-1] == "ssapo train: interrupted; continue with --resume", lines[-5:]
    assert not [p for p in os.listdir(out) if p.startswith(".") and p != ".ssapo.lock"]  # no temp file left
