"""The driver's side of the GPU paths (issue 16), tested without a GPU: the batch's arithmetic checked
before any launch, a failed launch's cause in its one line, the user's own accelerate config, one GPU
out of many, vLLM's tensor-parallel size, models loaded straight onto their device, FSDP's sharded
checkpoints with a full final save, and the reference pass's batch size."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from ssapo.accelerate_configs import ACCELERATE_CONFIGS
from ssapo.config import PRESETS, load_config
from ssapo.errors import ConfigError

# -- the batch: per device × accumulation × processes = batch_size, checked before the first launch -----------


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_preset_splits_its_batch_over_1_2_and_4_processes(preset, n):
    c = load_config(preset)
    micro, accumulation = c.batch_split(n)
    assert micro * accumulation * n == c.batch_size


def test_the_tiny_preset_derives_its_micro_batch_from_the_processes():
    c = load_config("tiny")
    assert c.per_device_train_batch_size is None  # the preset leaves it to the driver
    assert [c.batch_split(n) for n in (1, 2, 4, 8, 16)] == [(16, 1), (8, 1), (4, 1), (2, 1), (1, 1)]
    c8 = load_config("llama3-8b")
    assert [c8.batch_split(n) for n in (1, 4, 8)] == [(1, 32), (1, 8), (1, 4)]  # per device 1: accumulation


@pytest.mark.parametrize(
    "overrides, n, expected",
    [
        (
            {},
            3,
            r"^batch_size: 16 cannot be split as per_device_train_batch_size null × gradient_accumulation_steps "
            r"null × 3 processes .*values that work: --batch-size 15 or 18; --num-processes 1 or 2 or 4 or 8$",
        ),
        (
            {"per_device_train_batch_size": "16"},
            2,
            r"^batch_size: 16 cannot be split as per_device_train_batch_size "
            r"16 × gradient_accumulation_steps null × 2 processes.*--batch-size 32; --per-device-train-batch-size "
            r"8 or 4 or 2 or 1 \(or null: derived\); --num-processes 1$",
        ),
        (
            {"per_device_train_batch_size": "4", "gradient_accumulation_steps": "2"},
            4,
            r"^batch_size: 16 cannot be split as .* 4 × gradient_accumulation_steps 2 × 4 processes = 32 .*"
            r"--num-processes 2$",
        ),
    ],
)
def test_a_batch_no_split_fits_is_one_line_naming_the_fields_and_what_works(overrides, n, expected):
    c = load_config("tiny", overrides=overrides)
    with pytest.raises(ConfigError, match=expected):
        c.batch_split(n)


def _train(*argv, env=None, timeout=120):
    e = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "SSAPO_ACCELERATE_LAUNCHED")
    }
    return subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "train", *argv],
        env={**e, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_train_refuses_a_batch_the_processes_cannot_split_before_any_launch(tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    r = _train("--model", "tiny", "--num-processes", "3", "--output-dir", str(out))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssapo train: error: batch_size: 16 cannot be split"), lines
    assert "--num-processes 1 or 2 or 4 or 8" in lines[0]
    assert not out.exists()  # no task built, no launch, no model loaded
    assert time.time() - t0 < 60


def test_bf16_without_a_gpu_is_refused_before_the_tiny_task_is_built(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    out = tmp_path / "run"
    r = _train("--model", "tiny", "--bf16", "--no-use-cpu", "--output-dir", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and r.stderr.startswith("ssapo train: error: bf16: needs a GPU"), r.stderr[-2000:]
    assert not out.exists()  # no task built (it takes tens of seconds), nothing launched


# -- a failed launch says why ----------------------------------------------------------------------------------

TORCHRUN_KILLED = """\
# 2026-12-07 10:00:00 python -m accelerate.commands.launch --num_processes 2 -m ssapo.launch --run-dir /r --step seed
[rank1]:[W1207 10:00:03 ProcessGroupGloo.cpp:1] Warning: something harmless
W1207 10:00:09.123000 99 torch/distributed/elastic/multiprocessing/api.py:900] Sending process 12 closing signal SIGTERM
E1207 10:00:09.456000 99 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: -9) local_rank: 1
Traceback (most recent call last):
  File "/usr/lib/python3.11/site-packages/torch/distributed/run.py", line 1, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
ssapo.launch FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_10:00:09
  host      : node
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 13)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 13
============================================================
Traceback (most recent call last):
subprocess.CalledProcessError: Command '['torchrun', '...']' returned non-zero exit status 1.
"""

TORCHRUN_ERRORS = """\
# 2026-12-07 09:00:00 python -m accelerate.commands.launch -m ssapo.launch --run-dir /r --step seed
[rank0]: Traceback (most recent call last):
[rank0]:   File "x.py", line 3, in <module>
[rank0]: FileNotFoundError: an older launch's error
# 2026-12-07 10:00:00 python -m accelerate.commands.launch -m ssapo.launch --run-dir /r --step seed
[rank1]: Traceback (most recent call last):
[rank1]:   File "leader.py", line 1, in train_stage
[rank1]: KeyError: 'mass'
[rank1]:
[rank1]: During handling of the above exception, another exception occurred:
[rank1]:
[rank1]: ssapo.config.ConfigError: batch_size: 16 cannot be split
[rank0]: Traceback (most recent call last):
[rank0]: torch.distributed.DistBackendError: [Rank 0]: the other rank went away
E1207 10:00:09.456000 99 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 1) local_rank: 0
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


def test_a_failed_launchs_cause_is_the_first_ranks_error_or_the_signal(tmp_path):
    from ssapo.launch import _cause

    log = tmp_path / "x.log"
    log.write_text(TORCHRUN_ERRORS)  # rank 1 failed first; its final exception; the older launch's is ignored
    assert _cause(str(log)) == "; rank 1: ssapo.config.ConfigError: batch_size: 16 cannot be split"
    log.write_text(TORCHRUN_KILLED)  # no rank's exception: the signal torchrun reports
    assert _cause(str(log)).startswith("; rank 1 was killed by SIGKILL (signal 9; sent by the kernel's out-of-memory")
    log.write_text("# x -m ssapo.launch \nloading...\n")  # one plain process killed: the launch's own exit code
    assert _cause(str(log), rc=-15).startswith("; killed by SIGTERM (signal 15")
    log.write_text("Traceback (most recent call last):\nOSError: [Errno 28] No space left on device\n")
    assert _cause(str(log), rc=1) == "; OSError: [Errno 28] No space left on device"


def test_a_launch_that_recorded_its_steps_but_failed_on_its_way_out_goes_on(tmp_path, monkeypatch, capsys):
    import json

    from ssapo.errors import StepFailed
    from ssapo.launch import Launcher

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(load_config("tiny", overrides={"output_dir": str(out)}).to_yaml())
    lz = Launcher(str(out), 2, ACCELERATE_CONFIGS["ddp"], echo=True)
    state = out / "state.json"
    script = f"import json; json.dump({{'done': ['seed']}}, open({str(state)!r}, 'w')); raise SystemExit(1)"
    monkeypatch.setattr(
        Launcher, "command", lambda self, steps, how, mp=None, generate_only=False: [sys.executable, "-c", script]
    )
    lz.launch(["seed"], (ACCELERATE_CONFIGS["ddp"], 2))  # recorded: no StepFailed
    assert "recorded as done, but the launch exited 1" in capsys.readouterr().err
    state.write_text(json.dumps({"done": []}))
    script2 = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(
        Launcher, "command", lambda self, steps, how, mp=None, generate_only=False: [sys.executable, "-c", script2]
    )
    with pytest.raises(StepFailed, match=r"^step seed failed \(exit -9; killed by SIGKILL \(signal 9"):
        lz.launch(["seed"], (ACCELERATE_CONFIGS["ddp"], 2))


# -- the user's own accelerate config ---------------------------------------------------------------------------


def _own_config(tmp_path, text: str, name="mine.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


ZERO3_OFFLOAD = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: ds.json
  zero3_init_flag: true
mixed_precision: bf16
num_machines: 1
num_processes: 4
"""
DS_JSON = '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": "auto"}}'


def test_accelerate_config_takes_the_path_of_the_users_own_file(tmp_path, monkeypatch):
    import ssapo.commands.train as train
    from ssapo.accelerate_configs import engine_of
    from ssapo.cli import build_parser

    (tmp_path / "ds.json").write_text(DS_JSON)
    mine = _own_config(tmp_path, ZERO3_OFFLOAD)
    monkeypatch.chdir(tmp_path)
    c = load_config("llama3-8b", overrides={"accelerate_config": "mine.yaml"})
    assert c.accelerate_config == mine and engine_of(c.accelerate_config) == "DEEPSPEED"
    assert engine_of("fsdp") == "FSDP" and engine_of(None) == "NO"
    monkeypatch.setattr(train, "_visible_gpus", lambda: 4)
    args, extra = build_parser().parse_known_args(
        ["train", "--model", "llama3-8b", "--accelerate-config", mine, "--output-dir", str(tmp_path / "r")]
    )
    lz = train.launcher_of(args, train.build_config(args, extra))
    assert lz.engine_config == mine and lz.num_processes == 4 and lz.engine_type == "DEEPSPEED"
    # its DeepSpeed JSON named beside it: the launch reads a copy naming it by its absolute path (accelerate would
    # look for ds.json in the working directory of the launch)
    lz.write_configs()
    launched = lz.command(["seed"], lz.how(c, "seed"))[4]
    assert launched == str(tmp_path / "r" / "launch" / "engine.yaml")
    import yaml

    conf = yaml.safe_load(open(launched))
    assert conf["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "ds.json")
    assert {k: v for k, v in conf.items() if k != "deepspeed_config"} == {
        k: v for k, v in yaml.safe_load(open(mine)).items() if k != "deepspeed_config"
    }


@pytest.mark.parametrize(
    "text, ds, message",
    [
        (None, None, r"mine.yaml: no such file"),
        ("distributed_type: [DEEPSPEED\n", None, r"mine.yaml: is not valid YAML"),
        ("- a list\n", None, r"mine.yaml: must hold a mapping"),
        ("distributed_type: TPU\n", None, r"distributed_type must be one of NO, MULTI_GPU, MULTI_CPU, DEEPSPEED, FSDP"),
        ("distributed_type: DEEPSPEED\ndeepspeed_config: {}\n", None, r"deepspeed_config needs zero_stage"),
        (ZERO3_OFFLOAD, None, r"deepspeed_config_file ds.json: cannot be read"),
        (ZERO3_OFFLOAD, "{not json", r"deepspeed_config_file ds.json: not valid JSON"),
        ("distributed_type: DEEPSPEED\nuse_cpu: true\ndeepspeed_config: {zero_stage: 3}\n", None, r"use_cpu: true"),
    ],
)
def test_a_bad_accelerate_config_file_is_one_line_at_start_up(tmp_path, text, ds, message):
    if text is not None:
        _own_config(tmp_path, text)
    if ds is not None:
        (tmp_path / "ds.json").write_text(ds)
    r = _train(
        "--model", "tiny", "--accelerate-config", str(tmp_path / "mine.yaml"), "--output-dir", str(tmp_path / "r")
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssapo train: error: accelerate_config: "), lines
    assert __import__("re").search(message, lines[0]), lines[0]


def test_an_unknown_engine_name_gets_the_close_names():
    with pytest.raises(
        ConfigError,
        match=r"^accelerate_config: must be one of null, ddp, zero3, fsdp, zero3_cpu or the "
        r"path of an accelerate config file, got 'zero'; did you mean zero3",
    ):
        load_config("tiny", overrides={"accelerate_config": "zero"})


# -- one GPU out of many; an engine named for one process ------------------------------------------------------


def test_a_launch_sees_only_the_runs_gpus(tmp_path, monkeypatch):
    from ssapo.launch import Launcher

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert Launcher(str(tmp_path), 1, ACCELERATE_CONFIGS["ddp"], visible_gpus=8).env()["CUDA_VISIBLE_DEVICES"] == "0"
    assert (
        Launcher(str(tmp_path), 3, ACCELERATE_CONFIGS["ddp"], visible_gpus=8).env()["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    )
    assert "CUDA_VISIBLE_DEVICES" not in Launcher(str(tmp_path), 8, ACCELERATE_CONFIGS["ddp"], visible_gpus=8).env()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,7")  # the user's own choice is cut, never widened
    assert Launcher(str(tmp_path), 2, ACCELERATE_CONFIGS["ddp"], visible_gpus=3).env()["CUDA_VISIBLE_DEVICES"] == "3,5"
    multi = Launcher(str(tmp_path), 2, ACCELERATE_CONFIGS["ddp"], machine_rank=0, num_machines=2, visible_gpus=8)
    assert multi.env()["CUDA_VISIBLE_DEVICES"] == "3,5,7"  # several machines: --num-processes counts all of them


def test_an_engine_named_by_the_user_is_launched_even_for_one_process(tmp_path, monkeypatch):
    import ssapo.commands.train as train
    from ssapo.cli import build_parser

    def launcher(argv):
        args, extra = build_parser().parse_known_args(["train", "--output-dir", str(tmp_path / "r"), *argv])
        return train.launcher_of(args, train.build_config(args, extra))

    monkeypatch.setattr(train, "_visible_gpus", lambda: 0)
    one = launcher(["--model", "tiny", "--accelerate-config", "zero3_cpu", "--use-cpu", "false"])
    assert one is not None and one.num_processes == 1 and one.engine_type == "DEEPSPEED"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("accelerate_config: ddp\n")  # named in --config counts as named
    assert launcher(["--model", "tiny", "--config", str(cfg)]).num_processes == 1
    assert launcher(["--model", "llama3-8b"]) is None  # the recipe's engine on a machine without GPU: in-process
    monkeypatch.setattr(train, "_visible_gpus", lambda: 2)
    with pytest.raises(ConfigError, match=r"^--num-processes: 4 processes need one GPU each; 2 GPU\(s\) are visible"):
        launcher(["--model", "llama3-8b", "--num-processes", "4"])


# -- vLLM's tensor-parallel size ----------------------------------------------------------------------------


def test_the_tensor_parallel_size_divides_the_attention_and_kv_heads():
    from transformers import LlamaConfig

    from ssapo.generation import tensor_parallel_for

    llama3 = LlamaConfig(num_attention_heads=32, num_key_value_heads=8, hidden_size=64)
    assert [tensor_parallel_for(llama3, g) for g in range(1, 9)] == [1, 2, 2, 4, 4, 4, 4, 8]
    odd = LlamaConfig(num_attention_heads=12, num_key_value_heads=12, hidden_size=48)
    assert [tensor_parallel_for(odd, g) for g in (5, 6, 7, 8)] == [4, 6, 6, 6]
    with pytest.raises(ValueError, match="^gpus: must be >= 1"):
        tensor_parallel_for(llama3, 0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # a checkpoint directory: its config.json
        llama3.save_pretrained(d)
        assert tensor_parallel_for(d, 6) == 4


# -- data steps load onto their device; the reference pass's batch; FSDP's checkpoints ---------------------


def test_data_steps_load_straight_onto_their_device(monkeypatch, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssapo import models

    seen = []

    class Fake(torch.nn.Module):
        def to(self, *a, **k):
            seen.append(("to", a))
            return self

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.append(kw) or Fake())
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: SimpleNamespace(pad_token="x"))
    cfg = load_config("tiny", overrides={"model": str(tmp_path)})
    models.load(str(tmp_path), cfg, "cuda:3")
    assert seen[-1]["device_map"] == {"": "cuda:3"} and seen[-1]["use_safetensors"] is True
    seen.clear()
    models.load(str(tmp_path), cfg, "cpu")
    assert "device_map" not in seen[0]


def test_the_reference_pass_batch_reaches_the_trainer(monkeypatch, tmp_path):
    from ssapo import leader, trainer

    got = {}

    class Stop(Exception):
        pass

    def capture(model, **kw):
        got["args"] = kw["args"]
        raise Stop

    monkeypatch.setattr(trainer, "SSAPOTrainer", capture)
    monkeypatch.setattr(leader.models, "load", lambda *a, **k: (None, None))
    cfg = load_config("tiny", overrides={"precompute_ref_batch_size": "5", "model": str(tmp_path)})
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4
    with pytest.raises(Stop):
        leader.train_stage(cfg, "p", None, rows, 1e-4, 1, "dpo", str(tmp_path / "m"), str(tmp_path / "w"))
    assert got["args"].precompute_ref_batch_size == 5
    assert (got["args"].per_device_train_batch_size, got["args"].gradient_accumulation_steps) == (16, 1)
    assert load_config("llama3-8b").precompute_ref_batch_size == 4


def test_fsdp_checkpoints_are_sharded_and_the_final_save_full():
    import yaml

    from ssapo.engines import full_state_dict

    fsdp = yaml.safe_load(open(ACCELERATE_CONFIGS["fsdp"]))
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert yaml.safe_load(open(ACCELERATE_CONFIGS["zero3"]))["deepspeed_config"]["zero3_save_16bit_model"] is False

    class Plugin:
        state_dict_type = "StateDictType.SHARDED_STATE_DICT"

        def set_state_dict_type(self, t):
            self.state_dict_type = t

    plugin = Plugin()
    tr = SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    with full_state_dict(tr):
        assert plugin.state_dict_type == "FULL_STATE_DICT"
    assert plugin.state_dict_type == "StateDictType.SHARDED_STATE_DICT"  # back to sharded for the checkpoints
    with pytest.raises(RuntimeError), full_state_dict(tr):
        raise RuntimeError
    assert plugin.state_dict_type == "StateDictType.SHARDED_STATE_DICT"
    tr.is_fsdp_enabled = False
    with full_state_dict(tr):
        assert plugin.state_dict_type == "StateDictType.SHARDED_STATE_DICT"


# -- vLLM: generation alone in one process, then the scoring shared out over every GPU ----------------------


def test_a_vllm_annotation_on_several_gpus_is_generation_then_scoring_on_every_process(tmp_path, monkeypatch):
    import json

    from ssapo import generation
    from ssapo.launch import VLLM_THEN_SCORE, Launcher
    from ssapo.state import State

    monkeypatch.setattr(generation, "use_vllm", lambda backend: True)
    c = load_config("llama3-8b", overrides={"output_dir": str(tmp_path)})
    lz = Launcher(str(tmp_path), 4, ACCELERATE_CONFIGS["zero3"], echo=False)
    assert lz.how(c, "round_1/annotate") == (VLLM_THEN_SCORE, 4)
    assert Launcher(str(tmp_path), 1, ACCELERATE_CONFIGS["zero3"]).how(c, "round_1/annotate") == ("", 1)
    cmd = lz.command(["round_1/annotate"], ("", 1), generate_only=True)
    assert cmd[1:] == [
        "-m",
        "ssapo.launch",
        "--run-dir",
        str(tmp_path),
        "--step",
        "round_1/annotate",
        "--generate-only",
    ]
    calls = []

    def fake_launch(self, steps, how, generate_only=False):
        calls.append((list(steps), how, generate_only))
        if not generate_only:
            (tmp_path / "state.json").write_text(json.dumps({"done": list(steps)}))

    monkeypatch.setattr(Launcher, "launch", fake_launch)
    lz.drive(c, State(str(tmp_path), resume=True), ["round_1/annotate"], lambda s: None)
    assert calls == [
        (["round_1/annotate"], ("", 1), True),  # vLLM alone, the GPUs to itself
        (["round_1/annotate"], (lz.data_config, 4), False),  # then every process scores its chunks
    ]


class _Ranks:
    """Stands in for accelerate's PartialState of rank `r` of `n` (annotate_round's file exchange)."""

    def __init__(self, r, n):
        self.process_index, self.num_processes, self.is_main_process = r, n, r == 0

    def wait_for_everyone(self):
        pass


def test_pregenerated_responses_score_to_the_rows_of_the_one_process_vllm_path(tmp_path, monkeypatch):
    from ssapo import generation
    from ssapo.annotators import RESPONSES, annotate_round, pregenerate_round
    from ssapo.processes import Solo
    from ssapo.tiny import build_tokenizer, save_pretrained, tiny_llama

    tok = build_tokenizer("a b c d e f g h".split())
    model_dir = save_pretrained(tiny_llama(tok, hidden_size=32), tok, tmp_path / "m")
    ref_dir = save_pretrained(tiny_llama(tok, hidden_size=32, seed=1), tok, tmp_path / "ref")  # rewards not all 0
    eos = tok.eos_token_id
    words = [tok.convert_tokens_to_ids(w) for w in "a b c d e f".split()]

    def fake_vllm(path, tok_, prompts, n, temperature, top_p, max_new_tokens, seed, **kw):
        assert kw["stop_ids"] == [eos]
        return [
            [[words[(i + j * k) % 6] for k in range(1 + (i + j) % 3)] + [eos] for j in range(n)]
            for i in range(len(prompts))
        ]

    monkeypatch.setattr(generation, "use_vllm", lambda backend: True)
    monkeypatch.setattr(generation, "generate_vllm", fake_vllm)
    cfg = load_config("tiny", overrides={"model": model_dir, "num_samples": "3", "generation_batch_size": "4"})
    prompts = [f"{a} {b} " for a in "abcd" for b in "efgh"][:10]
    rows_a, stats_a = annotate_round(cfg, Solo(), str(tmp_path / "one"), model_dir, ref_dir, prompts, seed=7)

    split = tmp_path / "split"
    pregenerate_round(cfg, str(split), model_dir, prompts, seed=7)
    assert (split / RESPONSES).exists()

    def no_engine(*a, **k):
        raise AssertionError("the scoring launch must not start vLLM again")

    monkeypatch.setattr(generation, "generate_vllm", no_engine)
    pregenerate_round(cfg, str(split), model_dir, prompts, seed=7)  # already there: not generated again
    assert annotate_round(cfg, _Ranks(1, 2), str(split), model_dir, ref_dir, prompts, seed=7) is None
    rows_b, stats_b = annotate_round(cfg, _Ranks(0, 2), str(split), model_dir, ref_dir, prompts, seed=7)
    assert rows_b == rows_a and len(rows_a) > 0
    assert stats_a["backend"] == stats_b["backend"] == "vllm"
    assert stats_b["response_tokens"] == stats_a["response_tokens"] and stats_b["pairs"] == stats_a["pairs"]
    # another seed or policy is not this round's: generated anew, never scored from the stale file
    monkeypatch.setattr(generation, "generate_vllm", fake_vllm)
    rows_c, _ = annotate_round(cfg, Solo(), str(split), model_dir, ref_dir, prompts, seed=8)
    assert len(rows_c) == len(rows_a)
