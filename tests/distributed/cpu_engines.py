"""What the multi-process engine tests share (not a test module): the environment of a launch on CPU
processes, a free port, the shipped ZeRO-3-on-CPU recipe (recipes/accelerate/zero3_cpu.yaml and the
DeepSpeed JSON it names, by absolute path: accelerate reads it relative to the working directory), and
`launch`, which runs a test file as its own worker under `accelerate launch`.

    from cpu_engines import MISSING, launch
    proc = launch(__file__, [work, mode], mixed_precision="bf16")      # ZeRO-3, 2 CPU processes
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from typing import List, Optional, Sequence

# DeepSpeed on CPU needs both (ninja: DeepSpeed JIT-builds its CPU comm op); tests skip with the reason otherwise
MISSING = [m for m in ("deepspeed", "ninja") if importlib.util.find_spec(m) is None]


def env() -> dict:
    """This environment for CPU processes: DeepSpeed's CPU accelerator, no GPU, one thread, offline, and
    PATH starting with this interpreter's bin (torch's JIT build runs the `ninja` installed beside it);
    never marked as launched by ssapo."""
    e = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PATH": os.pathsep.join(filter(None, [os.path.dirname(sys.executable), os.environ.get("PATH")])),
    }
    e.pop("SSAPO_ACCELERATE_LAUNCHED", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_cpu_recipe() -> str:
    from ssapo.config import RECIPES_DIR

    return os.path.join(RECIPES_DIR, "accelerate", "zero3_cpu.yaml")


def zero3_cpu_json() -> str:
    """The DeepSpeed JSON the recipe names, by absolute path."""
    import yaml

    name = yaml.safe_load(open(zero3_cpu_recipe()))["deepspeed_config"]["deepspeed_config_file"]
    return os.path.join(os.path.dirname(zero3_cpu_recipe()), name)


def finish() -> None:
    """The end of a launched worker: a barrier, then the process group destroyed (as `python -m ssapo.launch`
    does), so no communication thread is torn down by the interpreter's exit: without it a rank may abort
    there ("terminate called without an active exception", SIGABRT) after its work is written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(
    script: str,
    argv: Sequence[str],
    *,
    config: Optional[List[str]] = None,
    processes: int = 2,
    mixed_precision: str = "no",
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    """`accelerate launch` of `script argv...` on `processes` CPU processes under `config` (accelerate
    flags; default the shipped ZeRO-3-on-CPU recipe and its DeepSpeed JSON), output captured."""
    if config is None:
        config = ["--config_file", zero3_cpu_recipe(), "--deepspeed_config_file", zero3_cpu_json()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", str(processes)]
    cmd += ["--mixed_precision", mixed_precision, "--main_process_port", str(free_port())]
    cmd += [os.path.abspath(script), *map(str, argv)]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


def engine_args(work: str, **overrides):
    """The SSAPOConfig of a worker under an engine on CPU processes (ssapo.tiny.tiny_args, then: one
    accumulation step, a constant learning rate without warm-up, no use_cpu (the launch decides the
    device), shift_prob, max_length 32, a 300 s collective timeout); `overrides` win. Its output_dir is
    WORK/train."""
    from ssapo.tiny import tiny_args
    from ssapo.trainer import SSAPOConfig

    base = dict(
        gradient_accumulation_steps=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=False,
        leader_loss="shift_prob",
        max_length=32,
        ddp_timeout=300,
    )
    return tiny_args(SSAPOConfig, os.path.join(work, "train"), **{**base, **overrides})
