"""A run directory's integrity (issue 17, items 2, 4 and 5): the split belongs to what made it
(DIR/data/inputs.json), a moved run directory resumes, --resume needs a run, and faults of the machine
(disk full, a read-only directory, a file for output_dir) are one line that names the path, in the
driver and in a launched step, after which --resume finishes the run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from ssapo.config import load_config, recipe_path
from ssapo.errors import ConfigError, InputError
from ssapo.io import machine_fault, read_jsonl
from ssapo.loop import check_output_dir, check_resumable, prepare, read_run_config
from ssapo.state import State

SMALL = {"seed_size": "32", "round_sizes": "32 32", "num_rounds": "2"}


def paths(task_dir):
    """The task's files under `task_dir` (the shared task, or a copy of it) as RunConfig fields."""
    return {
        "model": os.path.join(task_dir, "sft"),
        "preference_data": os.path.join(task_dir, "preferences.jsonl"),
        "prompt_data": os.path.join(task_dir, "prompts.jsonl"),
    }


def cfg(out, task_dir, **kw):
    return load_config("tiny", overrides={**SMALL, **paths(task_dir), "output_dir": str(out), **kw})


def env():
    drop = ("LOCAL_RANK", "WORLD_SIZE", "SSAPO_ACCELERATE_LAUNCHED")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "train", *map(str, args)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(stderr: str) -> str:
    """The error line of `ssapo train` (warnings and progress bars aside); asserts there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("ssapo train: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def task_args(task_dir):
    return ["--config", recipe_path("tiny"), *[f"--{k.replace('_', '-')}={v}" for k, v in paths(task_dir).items()]]


# -- the split belongs to what made it --


def test_a_run_that_recorded_no_step_splits_again_when_its_inputs_change(tmp_path, task_dir, capsys):
    out = str(tmp_path / "run")
    check_output_dir(out, resume=False)
    prepare(cfg(out, task_dir), out, State(out, resume=False))
    assert len(read_jsonl(os.path.join(out, "data", "seed.jsonl"))) == 32
    assert os.path.exists(os.path.join(out, "data", "round_2.jsonl"))
    os.makedirs(os.path.join(out, "seed", "trainer", "checkpoint-2"))  # a seed step killed before it recorded
    stamp = os.stat(os.path.join(out, "data", "split.json")).st_mtime_ns

    prepare(cfg(out, task_dir), out, State(out, resume=False))  # the same inputs: the split is kept
    assert os.stat(os.path.join(out, "data", "split.json")).st_mtime_ns == stamp
    assert os.path.isdir(os.path.join(out, "seed", "trainer"))

    # other settings, as in the issue: the split is made again and the dead step's partial outputs go
    prepare(cfg(out, task_dir, seed_size="16", round_sizes="16", num_rounds="1"), out, State(out, resume=False))
    assert "splitting again" in capsys.readouterr().err
    assert len(read_jsonl(os.path.join(out, "data", "seed.jsonl"))) == 16
    assert len(read_jsonl(os.path.join(out, "data", "round_1.jsonl"))) == 16
    assert not os.path.exists(os.path.join(out, "data", "round_2.jsonl"))
    assert not os.path.exists(os.path.join(out, "seed"))

    # a corrected preference file at the same path: its contents are the fingerprint, not its name
    prefs = os.path.join(tmp_path, "prefs.jsonl")
    rows = read_jsonl(paths(task_dir)["preference_data"])
    with open(prefs, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    c = cfg(out, task_dir, preference_data=prefs, seed_size="16", round_sizes="16", num_rounds="1")
    prepare(c, out, State(out, resume=False))  # another path, the same contents: a new fingerprint source only
    before = read_jsonl(os.path.join(out, "data", "seed.jsonl"))
    with open(prefs, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reversed(rows))
    prepare(c, out, State(out, resume=False))
    after = read_jsonl(os.path.join(out, "data", "seed.jsonl"))
    assert after != before  # the reversed file shuffles to other seed pairs
    fp = json.load(open(os.path.join(out, "data", "inputs.json")))
    assert fp["fields"]["seed_size"] == 16 and fp["files"]["preference_data"]["source"] == prefs


def test_a_resumed_run_whose_data_changed_is_refused_naming_the_file(tmp_path, task_dir):
    prefs = os.path.join(tmp_path, "prefs.jsonl")
    shutil.copy(paths(task_dir)["preference_data"], prefs)
    out = str(tmp_path / "run")
    c = cfg(out, task_dir, preference_data=prefs)
    prepare(c, out, State(out, resume=False))
    State(out, resume=False).mark("seed")  # a step recorded: the split is the run's now

    # the same contents under another path resume (the data moved with the run)
    moved = os.path.join(tmp_path, "moved.jsonl")
    shutil.copy(prefs, moved)
    c2 = cfg(out, task_dir, preference_data=moved)
    check_resumable(c2, out)
    prepare(c2, out, State(out, resume=True))

    with open(prefs, "a") as f:  # the file the run started from, changed
        f.write(open(prefs).readline())
    check_resumable(c, out)  # the configuration is the run's own ...
    with pytest.raises(InputError, match=rf"^preference_data: resuming {out}, .*{prefs}: its contents changed"):
        prepare(c, out, State(out, resume=True))  # ... but its data is not


def test_a_moved_run_directory_resumes(tmp_path, task_dir):
    a = str(tmp_path / "a")
    os.makedirs(a)
    shutil.copytree(task_dir, os.path.join(a, "task"))
    c = cfg(a, os.path.join(a, "task"))
    prepare(c, a, State(a, resume=False))
    State(a, resume=False).mark("seed")
    text = open(os.path.join(a, "config.yaml")).read()
    assert "model: task/sft\n" in text and "preference_data: task/preferences.jsonl\n" in text

    b = str(tmp_path / "b")
    os.rename(a, b)
    stamp = os.stat(os.path.join(b, "config.yaml")).st_mtime_ns
    c_b = cfg(b, os.path.join(b, "task"))  # what `ssapo train --model tiny --output-dir b --resume` builds
    check_resumable(c_b, b)
    prepare(c_b, b, State(b, resume=True))
    assert os.stat(os.path.join(b, "config.yaml")).st_mtime_ns == stamp  # only the directory moved: not rewritten
    seen = read_run_config(b)  # what a launched step reads
    assert seen.model == os.path.join(b, "task", "sft") and seen.output_dir == b
    assert seen.preference_data == os.path.join(b, "task", "preferences.jsonl")
    with pytest.raises(ConfigError, match=r"resuming .* with another configuration: seed_size"):
        check_resumable(cfg(b, os.path.join(b, "task"), seed_size="16"), b)


# -- the run directory at start-up --


def test_resume_needs_a_run_and_output_dir_must_be_a_directory(tmp_path):
    for args, expect in (
        (["--output-dir", tmp_path / "mistyped", "--resume"], "holds no run to resume"),
        (["--output-dir", tmp_path / "empty", "--resume"], "holds no run to resume"),
        (["--output-dir", tmp_path / "afile"], "is a file, not a directory"),
        (["--output-dir", tmp_path / "afile" / "run"], "cannot write in"),
    ):
        (tmp_path / "empty").mkdir(exist_ok=True)
        (tmp_path / "afile").write_text("x")
        r = train("--model", "tiny", *args, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert expect in one_line(r.stderr)
        assert not (tmp_path / "mistyped").exists()  # refused before the tiny task is built there


@contextlib.contextmanager
def mounted(path, *options):
    """A tmpfs (or a read-only bind mount: options ('bind', source)) at `path`, unmounted after; skips the
    test where this process may not mount (it needs root: CI's machine runs as root)."""
    os.makedirs(path, exist_ok=True)
    if options and options[0] == "bind":
        cmd = [["mount", "--bind", options[1], path], ["mount", "-o", "remount,ro,bind", path]]
    else:
        cmd = [["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", path]]
    for c in cmd:
        r = subprocess.run(c, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", path], capture_output=True)
            pytest.skip(f"cannot mount here ({' '.join(c)}: {r.stderr.strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def test_a_read_only_directory_is_one_line_and_a_finished_run_in_one_resumes(tmp_path, task_dir):
    out = str(tmp_path / "run")
    c = cfg(out, task_dir)
    prepare(c, out, State(out, resume=False))
    st = State(out, resume=False)
    for s in ("seed", "seed/eval", *[f"round_{t}/{n}" for t in (1, 2) for n in ("annotate", "follow", "lead", "eval")]):
        st.mark(s)  # every step recorded: a finished run
    with mounted(str(tmp_path / "ro"), "bind", out) as ro:
        r = train(*task_args(task_dir), *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()], "--output-dir", ro)
        assert r.returncode == 2 and "cannot write in" in one_line(r.stderr)
        r = train(
            *task_args(task_dir),
            *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()],
            "--output-dir",
            ro,
            "--resume",
        )
        assert r.returncode == 0, r.stderr[-3000:]  # nothing to write: config.yaml is not rewritten
        assert "done" in r.stdout
        json.loads(open(os.path.join(ro, "state.json")).read())
        os.unlink(os.path.join(out, "state.json"))  # through the writable path: steps left now
        r = train(
            *task_args(task_dir),
            *[f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()],
            "--output-dir",
            ro,
            "--resume",
        )
        assert r.returncode == 2 and "cannot be written" in one_line(r.stderr)


def test_disk_full_is_one_line_naming_the_path_and_resume_finishes(tmp_path, task_dir):
    small = [f"--{k.replace('_', '-')}={v}" for k, v in {**SMALL, "round_sizes": "16", "num_rounds": "1"}.items()]
    with mounted(str(tmp_path / "disk"), "size=400k") as disk:
        out = os.path.join(disk, "run")
        r = train(*task_args(task_dir), *small, "--output-dir", out)
        assert r.returncode == 1, r.stderr[-3000:]
        line = one_line(r.stderr)
        assert "no space left on the device (ENOSPC); nothing already written was lost" in line, line
        assert f"{disk}/" in line and line.endswith("then continue with --resume")
        state = os.path.join(out, "state.json")
        done = json.load(open(state))["done"] if os.path.exists(state) else []
        leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".") and f != ".ssapo.lock"]
        assert not leftovers  # no temp file left behind
        subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
        r = train(*task_args(task_dir), *small, "--output-dir", out, "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.load(open(state))["done"][: len(done)] == done
        assert json.load(open(state))["last"] == "round_1/eval"


def test_machine_fault_reads_wrapped_errors_and_leaves_others():
    import errno

    assert machine_fault(ValueError("bad value")) is None
    assert machine_fault(OSError(errno.ENOENT, "No such file or directory", "/x")) is None
    e = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert machine_fault(e, "/run").startswith("/run: no space left on the device (ENOSPC)")
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/run/seed/model")
        except OSError as inner:
            raise RuntimeError("saving failed") from inner
    except RuntimeError as outer:
        assert machine_fault(outer).startswith("/run/seed/model: the filesystem is read-only (EROFS)")


def test_files_written_whole_get_the_mode_open_would_give(tmp_path):
    """atomic_write's temp file (mkstemp: 0600) is given the target's mode, or the umask's: a run directory
    shared on a cluster stays readable by the group as other files there are."""
    from ssapo.io import _UMASK, write_json

    path = str(tmp_path / "state.json")
    open(str(tmp_path / "plain"), "w").close()
    write_json(path, {"done": []})
    assert os.stat(path).st_mode & 0o777 == os.stat(str(tmp_path / "plain")).st_mode & 0o777 == 0o666 & ~_UMASK
    os.chmod(path, 0o640)
    write_json(path, {"done": ["seed"]})
    assert os.stat(path).st_mode & 0o777 == 0o640
