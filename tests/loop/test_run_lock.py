"""One writer per run directory (issue 17, item 1): `ssapo train` holds an exclusive lock on DIR/.ssapo.lock
while it drives a run; a second `ssapo train` on the same directory, with or without --resume, exits 2 at
once with one line naming the directory and the holder; a lock left by a killed run never blocks --resume
(the kernel drops a flock with its holder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ssapo.errors import ConfigError
from ssapo.io import LOCK_NAME, RunLock

HOLD = """
import sys, time
from ssapo.io import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(out) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_at_once_naming_the_directory_and_the_holder(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "sft").mkdir()  # a model directory (one that is not is refused first, before the lock)
    holder = _hold(out)
    try:
        with pytest.raises(
            ConfigError, match=rf"^output_dir: {out} is in use by another ssapo run \(pid {holder.pid} "
        ):
            with RunLock(str(out)):
                pass
        env = {
            k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "SSAPO_ACCELERATE_LAUNCHED")
        }
        for extra in ([], ["--resume"]):
            t0 = time.time()
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "ssapo.cli",
                    "train",
                    "--model",
                    str(tmp_path / "sft"),
                    "--preference-data",
                    str(tmp_path / "p.jsonl"),
                    "--output-dir",
                    str(out),
                    "--use-cpu",
                    "--no-bf16",
                    *extra,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert r.returncode == 2, r.stderr[-2000:]
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and f"is in use by another ssapo run (pid {holder.pid} " in lines[0], lines
            assert time.time() - t0 < 60  # at once: no wait for the holder
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # the refused runs wrote nothing
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_never_blocks_the_next(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).exists()  # the file stays; the lock went with its holder
    with RunLock(str(out)) as lock:
        assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()
        assert lock.path == str(out / LOCK_NAME)
    with RunLock(str(out)):  # released on exit: taken again
        pass


def test_a_launch_holds_the_lock_with_its_driver_and_after_it(tmp_path, monkeypatch):
    """The driver hands its lock to every launch (pass_fds): a launch left running by a driver killed with
    SIGKILL (here: the driver's descriptor closed) keeps the directory until it ends; a step started by hand
    (no driver) takes the lock itself."""
    import threading

    from ssapo.launch import Launcher

    out = str(tmp_path / "run")
    from ssapo.accelerate_configs import accelerate_config_path

    launcher = Launcher(out, 2, accelerate_config_path("ddp"), [], visible_gpus=0)
    monkeypatch.setattr(
        Launcher, "command", lambda self, *a, **k: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    monkeypatch.setattr("ssapo.config.RunConfig.from_yaml", classmethod(lambda cls, path: cls()))
    monkeypatch.setattr(Launcher, "write_configs", lambda self: None)
    lock = RunLock(out).__enter__()
    launcher.lock_fd, launcher.echo = lock.fd, False

    def launch():
        from ssapo.errors import StepFailed

        with pytest.raises(StepFailed, match="killed by SIGKILL"):  # the test ends it below
            launcher.launch(["seed"], ("conf", 2))

    t = threading.Thread(target=launch, daemon=True)
    t.start()
    log = launcher.log_path(["seed"])
    for _ in range(100):
        if os.path.exists(log) and [p for p in _children()]:
            break
        time.sleep(0.1)
    lock.__exit__(None, None, None)  # the driver is gone; its launch is not
    with pytest.raises(ConfigError, match="is in use by another ssapo run"):
        with RunLock(out):
            pass
    for pid in _children():
        os.kill(pid, signal.SIGKILL)
    t.join(30)
    with RunLock(out):  # the launch ended: free again
        pass

    # by hand: `python -m ssapo.launch` with no driver takes the lock, so it is refused while another run holds it
    holder = _hold(out)
    try:
        open(os.path.join(out, "config.yaml"), "w").write("model: x\n")
        env = {k: v for k, v in os.environ.items() if k not in ("SSAPO_DRIVER_PID", "RANK")}
        r = subprocess.run(
            [sys.executable, "-m", "ssapo.launch", "--run-dir", out, "--step", "seed"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and "is in use by another ssapo run" in r.stderr, r.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()


def _children():
    import psutil

    return [c.pid for c in psutil.Process().children(recursive=True) if "time.sleep(60)" in " ".join(c.cmdline())]
