"""Values that pass their field's type but cannot work are refused at start-up (issue 17, item 7): a non-finite
float field (`--eps inf` went on to a traceback in round_1/follow), bf16 without a GPU, a `--model` that is
neither a preset, nor a local directory, nor a hub model within reach (named first, with the close preset
names); `ssapo solve` and `dro_core.solve` refuse complex numbers instead of dropping their imaginary parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ssapo.config import FIELDS, load_config
from ssapo.errors import ConfigError


def _train(tmp_path, *argv, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("SSAPO_ACCELERATE_LAUNCHED", "LOCAL_RANK", "WORLD_SIZE"):
        e.pop(k, None)
    cmd = [sys.executable, "-m", "ssapo.cli", "train", "--output-dir", str(tmp_path / "run"), *argv]
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)


def _one_line(r, start: str) -> str:
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ssapo train: error: {start}"), lines[-5:]
    return lines[0]


# -- non-finite floats ---------------------------------------------------------------------------------------


def test_every_float_field_is_bounded_so_non_finite_values_are_checked():
    from ssapo.config import _HINTS

    floats = [n for n in FIELDS if "float" in str(_HINTS[n])]
    assert "eps" in floats and "spa_lambdas" in floats
    assert all("bounds" in FIELDS[n].metadata for n in floats), [
        n for n in floats if "bounds" not in FIELDS[n].metadata
    ]


@pytest.mark.parametrize("value", ["inf", "Infinity", "-inf", "nan", float("inf")])  # the last: YAML .inf
def test_eps_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"^eps: must be a finite number >= 0, got "):
        load_config("tiny", overrides={"eps": value})


@pytest.mark.parametrize(
    "name, value",
    [("temperature", "inf"), ("kldpo_max_weight", "inf"), ("learning_rate", "nan"), ("seed_epochs", "inf")],
)
def test_other_float_fields_must_be_finite(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}: must be a finite number "):
        load_config("tiny", overrides={name: value})
    with pytest.raises(ConfigError, match=r"^spa_lambdas: every value must be a finite number >= 0, got \[1.0, inf\]"):
        load_config("tiny", overrides={"spa_lambdas": "1,inf"})
    load_config("tiny", overrides={"eps": "0", "kldpo_max_weight": "1e30"})  # large but finite: fine


def test_eps_inf_on_the_command_line_is_one_line_before_anything_is_built(tmp_path):
    t0 = time.time()
    line = _one_line(_train(tmp_path, "--model", "tiny", "--eps", "inf"), "eps: ")
    assert "finite" in line
    assert not (tmp_path / "run").exists() and time.time() - t0 < 60


def test_bf16_on_cpu_is_one_line_before_anything_is_built(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    # the case: a GPU preset on a CPU machine (its recipe has bf16: true), and --bf16 with the tiny preset
    _one_line(_train(tmp_path, "--model", "llama3-8b", env={"CUDA_VISIBLE_DEVICES": ""}), "bf16: needs a GPU")
    _one_line(_train(tmp_path, "--model", "tiny", "--bf16", env={"CUDA_VISIBLE_DEVICES": ""}), "bf16: ")
    assert not (tmp_path / "run").exists()


# -- --model ---------------------------------------------------------------------------------------------------


def test_a_model_that_is_no_preset_no_directory_and_not_cached_offline_is_named_first(tmp_path):
    # no --preference-data and a CPU setting that passes: the model is what is said, naming the preset meant
    line = _one_line(_train(tmp_path, "--model", "llama3-8bb", "--use-cpu", "--no-bf16"), "model: --model llama3-8bb ")
    assert "did you mean llama3-8b?" in line and "HF_HUB_OFFLINE" in line
    # ... before bf16 too, and a path that does not exist is said as such
    line = _one_line(_train(tmp_path, "--model", str(tmp_path / "nope")), f"model: --model {tmp_path / 'nope'}: ")
    assert "no such directory" in line
    assert not (tmp_path / "run").exists()


def _cached(cache, repo: str) -> None:
    """`repo` in a hub cache as huggingface_hub lays it out (refs/main naming a snapshot with config.json)."""
    d = cache / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    (d / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (d / "snapshots" / ("0" * 40) / "config.json").write_text("{}")


def test_offline_a_hub_id_is_accepted_when_the_local_cache_holds_it(tmp_path, monkeypatch):
    from ssapo.commands.train import check_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cached(tmp_path / "hub", "meta-llama/Meta-Llama-3-8B")
    check_model("meta-llama/Meta-Llama-3-8B")
    check_model("llama3-8b")
    check_model(str(tmp_path))  # a local directory
    with pytest.raises(ConfigError, match=r"^model: --model mistralai/Mistral-7B-v0.1 is not a preset .*local cache"):
        check_model("mistralai/Mistral-7B-v0.1")


def _hub_error(cls):
    e = cls.__new__(cls)  # the hub's errors want an HTTP response to be built; the message is what matters
    Exception.__init__(e, "the hub said so")
    return e


@pytest.mark.parametrize("answer", ["found", "gated", "missing", "unreachable"])
def test_online_the_hub_is_asked(tmp_path, monkeypatch, answer):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from ssapo.commands.train import check_model

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    asked = []

    def model_info(self, repo_id, timeout=None, **kw):
        asked.append((repo_id, timeout))
        if answer == "gated":
            raise _hub_error(GatedRepoError)
        if answer == "missing":
            raise _hub_error(RepositoryNotFoundError)
        if answer == "unreachable":
            raise ConnectionError("Name or service not known")
        return object()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    if answer in ("found", "gated"):
        check_model("meta-llama/Meta-Llama-3-8B")
    else:
        why = "has no repository" if answer == "missing" else "the hub is out of reach"
        with pytest.raises(
            ConfigError, match=rf"^model: --model llama3-8bb is not a preset \(did you mean llama3-8b\?.*{why}"
        ):
            check_model("llama3-8bb")
    assert len(asked) == 1 and asked[0][1] is not None  # one request, with a timeout
    with pytest.raises(ConfigError, match=r"no such directory"):
        check_model("./not/here")  # a path is never asked of the hub
    assert len(asked) == 1


# -- complex numbers -------------------------------------------------------------------------------------------


def _solve(*argv):
    return subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "solve", *argv], capture_output=True, text=True, timeout=120
    )


def test_solve_refuses_complex_input_naming_the_argument(tmp_path):
    np.save(tmp_path / "c.npy", np.array([0.2 + 1j, 0.5, 0.9]))
    np.save(tmp_path / "s.npy", np.array(["0.2", "1+2j"]))
    (tmp_path / "c.jsonl").write_text(json.dumps({"xi": 0.5}) + "\n" + json.dumps({"xi": "1+2j"}) + "\n")
    (tmp_path / "c.csv").write_text("xi\n0.5\n3j\n")
    for name, start in [
        ("c.npy", "input: "),
        ("s.npy", "input: "),
        ("c.jsonl", "--column: 'xi' of "),
        ("c.csv", "--column: 'xi' of "),
    ]:
        r = _solve(str(tmp_path / name))
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ssapo solve: error: {start}"), (name, lines)
        assert "complex" in lines[0] and "need real numbers" in lines[0], lines
        assert r.stdout == ""
    np.save(tmp_path / "r.npy", np.array([0.2, 0.5, 0.9]))
    assert _solve(str(tmp_path / "r.npy")).returncode == 0


def test_dro_core_refuses_complex_arrays_naming_the_argument():
    import dro_core

    for xi in (np.array([0.2 + 1j, 0.5]), [0.2 + 0j, 0.5], np.array([0.2, 0.5], dtype=np.complex64)):
        with pytest.raises(ValueError, match=r"^xi: must hold real numbers, got dtype complex"):
            dro_core.solve(xi, 0.1)
    with pytest.raises(ValueError, match=r"^eps: must be a real number, got complex"):
        dro_core.solve(np.array([0.5]), 0.1 + 0j)
    with pytest.raises(ValueError, match=r"^support: "):
        dro_core.solve(np.array([0.5]), 0.1, support=(0, 1j))
