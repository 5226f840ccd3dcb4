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

from ssapo.config import ConfigError
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
