"""One step of a run, in its own processes, and the launcher that starts them.

    python -m ssapo.launch --run-dir DIR --step round_2/lead [--step ...]
    accelerate launch --config_file recipes/accelerate/zero3.yaml --num_processes 8 \\
        -m ssapo.launch --run-dir DIR --step round_2/lead

A launched step reads the run's DIR/config.yaml and what earlier steps wrote, runs
the steps not yet recorded in DIR/state.json on every process of the launch
(`ssapo.loop.run_steps`) and records each one there (its main process). It
creates accelerate's process state first, with the run's `ddp_timeout`, so
every collective of the step (and the trainer, which reuses that state)
waits at most that long.

`Launcher` is what `ssapo train --num-processes N` drives a run with
(`ssapo.loop.run(cfg, launcher=...)`): training steps (seed, lead) under the
recipe's accelerate config (ddp / zero3 / fsdp); the other steps (annotation,
SeRA's passes, evaluation) as plain data-parallel processes, each with whole
models on its own device (the engine's config with its DeepSpeed / FSDP part
removed, written to DIR/launch/data_parallel.yaml), or one process when vLLM
generates; the follower in the driver itself. Consecutive steps that need
the same launch run in one. Each launch's output goes to
DIR/logs/<steps>.log (and to the driver's stderr). Each launch runs in a
session of its own; SIGTERM to the driver (under `stop_on_signals`: `Stopped`)
or a Ctrl-C ends every process of the running launch (`stop_tree`: SIGTERM,
then SIGKILL after STOP_GRACE_S) before the driver exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

LAUNCHED_ENV = "SSAPO_ACCELERATE_LAUNCHED"  # set in every process a launcher starts
DRIVER_ENV = "SSAPO_DRIVER_PID"  # the driver that started this launch (and holds the run's lock)
VLLM_THEN_SCORE = "vllm+score"  # a vLLM annotation step on several GPUs: generate in one process, score on all
ENGINES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")  # distributed types whose state must not reach a data step


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssapo.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", required=True, help="the run directory (holds config.yaml, data/, state.json)")
    p.add_argument("--step", action="append", required=True, help="a step (repeatable), e.g. seed, round_1/lead")
    p.add_argument(
        "--generate-only",
        action="store_true",
        help="an annotation step's vLLM generation alone, in this one process (the driver's first launch of the "
        "step on several GPUs; the step's own launch then scores on every process)",
    )
    args = p.parse_args(argv)
    out = os.path.abspath(args.run_dir)
    path = os.path.join(out, "config.yaml")
    if not os.path.exists(path):
        print(
            f"ssapo.launch: error: --run-dir: no config.yaml in {out} (prepare the run with ssapo train)",
            file=sys.stderr,
        )
        return 2
    from ssapo.errors import ConfigError
    from ssapo.io import RunLock, machine_fault
    from ssapo.loop import read_run_config

    cfg = read_run_config(out)  # paths inside the run rebased on where it is now
    try:
        # one writer per run: a step started by hand (not by a driver, which holds the lock and hands it to
        # its launches) takes the run's lock in its first process; a second writer is refused in one line
        own = DRIVER_ENV not in os.environ and os.environ.get("RANK", "0") == "0"
        with RunLock(out) if own else contextlib.nullcontext():
            return _run(args, cfg, out)
    except ConfigError as e:
        print(f"ssapo.launch: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a fault of the machine (disk full, read-only, permissions): one line, no traceback
        msg = machine_fault(e, out)
        if msg is None:
            raise
        print(f"ssapo.launch: error: {msg}", file=sys.stderr)
        return 1


def _run(args, cfg, out: str) -> int:
    from datetime import timedelta

    if args.generate_only:
        from ssapo.loop import pregenerate

        for s in args.step:
            pregenerate(cfg, out, s)
        print(f"ssapo.launch: generated: {', '.join(args.step)}", file=sys.stderr)
        return 0
    import torch
    from accelerate import PartialState

    # first: the process group, with the run's timeout (the trainer reuses this state). Without a GPU:
    # CPU processes on gloo (else accelerate finds no backend and each process thinks it is alone); a
    # DeepSpeed launch (ZeRO-3 on CPU) must not be told `cpu` (accelerate would skip DeepSpeed), so it is
    # given the backend instead
    no_gpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kw = {"backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 and no_gpu and deepspeed else {}
    procs = PartialState(
        cpu=cfg.use_cpu or (no_gpu and not deepspeed), timeout=timedelta(seconds=cfg.ddp_timeout), **kw
    )
    from ssapo.loop import run_steps

    run_steps(cfg, out, list(args.step), procs)
    procs.wait_for_everyone()
    if procs.is_main_process:
        print(f"ssapo.launch: done: {', '.join(args.step)}", file=sys.stderr)
    if hasattr(procs, "destroy_process_group"):
        procs.destroy_process_group()
    return 0


STOP_GRACE_S = 10.0  # seconds a launch's processes get between SIGTERM and SIGKILL when the driver stops


class Stopped(BaseException):
    """A signal that stops the run (SIGTERM), raised in the driver's main thread by `stop_on_signals`' handler.
    A BaseException, as KeyboardInterrupt is: no `except Exception` of a step keeps it, and every `finally`
    and the launch's cleanup (`stop_tree`) run on its way out. `exit_code`: 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.exit_code = 128 + self.signum


@contextlib.contextmanager
def stop_on_signals(signums: Sequence[int] = (signal.SIGTERM,)):
    """Within: each of `signums` raises `Stopped` in the main thread (SIGINT keeps Python's KeyboardInterrupt);
    the handlers before are restored after. Outside the main thread it changes nothing (only the main thread
    may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Stopped(signum)

    before = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def stop_tree(p: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> int:
    """Ends `p` and every process under it: SIGTERM to each, then SIGKILL to those still alive after `grace_s`
    seconds (at once on a second SIGINT or SIGTERM meanwhile); reaps `p`. The tree is read from the process
    table before anything is signalled (torchrun starts each worker in a session of its own, so a signal to
    the launch's process group would miss them, and an orphan's parent is no longer the launch) and again while
    waiting (processes started meanwhile). Returns the number of processes signalled."""
    try:
        import psutil  # accelerate's own dependency
    except ImportError:  # pragma: no cover - accelerate needs psutil; the launch's process group then
        psutil = None
    hurry = []
    here = threading.current_thread() is threading.main_thread()
    before = {}
    if here:  # a second Ctrl-C or SIGTERM during the wait: SIGKILL at once, and no traceback from inside
        for s in (signal.SIGINT, signal.SIGTERM):
            before[s] = signal.signal(s, lambda signum, frame: hurry.append(signum))
    try:
        if psutil is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except OSError:
                    pass
                try:
                    p.wait(grace_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return 1
        known: dict = {}

        def scan() -> None:  # the processes under those known (and `p`), each signalled once with SIGTERM
            roots = list(known.values()) or [psutil.Process(p.pid)]
            for r in roots:
                try:
                    found = [r, *r.children(recursive=True)]
                except psutil.Error:
                    continue
                for q in found:
                    if q.pid not in known:
                        known[q.pid] = q
                        try:
                            q.send_signal(signal.SIGTERM)
                        except psutil.Error:
                            pass

        def alive() -> list:
            out = []
            for q in known.values():
                try:
                    if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                        out.append(q)
                except psutil.Error:
                    pass
            return out

        try:
            scan()
        except psutil.Error:  # `p` already gone
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and not hurry:
            p.poll()  # reaps `p` (a zombie until then)
            try:
                scan()
            except psutil.Error:
                pass
            if not alive():
                break
            time.sleep(0.1)
        for q in alive():
            try:
                q.kill()
            except psutil.Error:
                pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed: only a process stuck in the kernel
            pass
        return len(known)
    finally:
        if p.stdout is not None:
            p.stdout.close()
        for s, h in before.items():
            signal.signal(s, h)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


class Launcher:
    """Starts the steps of a run as `accelerate launch` processes (see the module docstring).

    `num_processes` per machine... as accelerate counts it: the total over
    machines; `engine_config`: the training steps' accelerate config file;
    `accelerate_args`: more `accelerate launch` flags, passed as they are
    (--num_machines, --machine_rank, --main_process_ip, --main_process_port,
    ...). `machine_rank` > 0 (multi-node): this driver joins the launches of
    the driver on machine 0 and waits for the steps only machine 0 runs
    (follower, one-process launches), reading the shared run directory."""

    def __init__(
        self,
        out: str,
        num_processes: int,
        engine_config: str,
        accelerate_args: Sequence[str] = (),
        machine_rank: int = 0,
        num_machines: int = 1,
        echo: bool = True,
        poll_s: float = 2.0,
        timeout_s: float = 10800.0,
        visible_gpus: int = 0,
    ):
        self.out = out
        self.num_processes = int(num_processes)
        self.engine_config = os.path.abspath(engine_config)
        self.accelerate_args = list(accelerate_args)
        self.machine_rank, self.num_machines = int(machine_rank), int(num_machines)
        self.echo, self.poll_s, self.timeout_s = echo, poll_s, timeout_s
        self.visible_gpus = int(visible_gpus)
        # the driver's run lock (ssapo.io.RunLock.fd): every launch inherits it, so a launch left running by a
        # driver killed with SIGKILL still holds the run directory until it ends
        self.lock_fd: Optional[int] = None
        self.last_log: Optional[str] = None
        engine = _read_yaml(self.engine_config)
        self.engine_type = str(engine.get("distributed_type", "MULTI_GPU"))
        self.data_config = self.engine_config
        self._data_text: Optional[str] = None
        # a DeepSpeed JSON named relative to the accelerate config (a shipped recipe's, or the user's beside
        # their YAML): accelerate would read it relative to the working directory, so the launch gets a copy
        # of the config naming it by its absolute path (DIR/launch/engine.yaml)
        self._engine_launch, self._engine_text = self.engine_config, None
        ds = engine.get("deepspeed_config") if isinstance(engine.get("deepspeed_config"), dict) else {}
        ds_file = ds.get("deepspeed_config_file")
        beside = os.path.join(os.path.dirname(self.engine_config), str(ds_file)) if ds_file else None
        if ds_file and not os.path.isabs(ds_file) and os.path.exists(beside):
            import yaml

            resolved = {**engine, "deepspeed_config": {**ds, "deepspeed_config_file": os.path.abspath(beside)}}
            self._engine_launch = os.path.join(self.out, "launch", "engine.yaml")
            self._engine_text = (
                f"# written by ssapo train: {self.engine_config} with its deepspeed_config_file's absolute path\n"
                + yaml.safe_dump(resolved, sort_keys=False)
            )
        if self.engine_type in ENGINES:
            import yaml

            # the engine's accelerate config without its DeepSpeed / FSDP part: plain data-parallel processes
            conf = {k: v for k, v in engine.items() if not k.startswith(("deepspeed", "fsdp", "megatron"))}
            conf["distributed_type"] = "MULTI_CPU" if conf.get("use_cpu") else "MULTI_GPU"
            self.data_config = os.path.join(self.out, "launch", "data_parallel.yaml")
            self._data_text = (
                "# written by ssapo train: the data-parallel steps' accelerate config (from "
                f"{self.engine_config}, without its engine)\n" + yaml.safe_dump(conf, sort_keys=False)
            )

    def write_configs(self) -> None:
        """Writes DIR/launch/data_parallel.yaml (when the engine is not plain ddp) and DIR/launch/engine.yaml
        (when its DeepSpeed JSON is named relative to it), atomically."""
        from ssapo.io import atomic_write

        for path, text in ((self.data_config, self._data_text), (self._engine_launch, self._engine_text)):
            if text is not None:
                atomic_write(path, lambda tmp, text=text: open(tmp, "w").write(text))

    # -- planning ---------------------------------------------------------------------------------
    def how(self, cfg, step: str) -> Optional[Tuple[str, int]]:
        """(accelerate config, processes) of a step, by its declared kind
        (`ssapo.methods.Step`); None: the driver runs it (the follower)."""
        from ssapo.methods import parse_step, step_kind

        kind, generates = step_kind(cfg, step)
        if kind == "driver":
            return None
        if kind == "train":
            return self.engine_config, self.num_processes
        if generates:
            from ssapo.generation import use_vllm

            if use_vllm(cfg.generation_backend):
                if parse_step(cfg, step)[0] == "annotate" and self.num_processes > 1 and self.num_machines == 1:
                    # one vLLM engine over the GPUs (its own tensor parallelism) in one process, then the
                    # scoring shared out over every GPU: two launches of the step (see drive)
                    return VLLM_THEN_SCORE, self.num_processes
                return "", 1  # one vLLM engine (its own tensor parallelism), no accelerate
        return self.data_config, self.num_processes

    def plan(self, cfg, steps: List[str]) -> List[Tuple[List[str], Optional[Tuple[str, int]]]]:
        """`steps` in groups of consecutive steps with the same launch."""
        groups: List[Tuple[List[str], Optional[Tuple[str, int]]]] = []
        for s in steps:
            how = self.how(cfg, s)
            if groups and how is not None and groups[-1][1] == how:
                groups[-1][0].append(s)
            else:
                groups.append(([s], how))
        return groups

    # -- running ----------------------------------------------------------------------------------
    def drive(self, cfg, state, steps: List[str], run_here: Callable[[str], None]) -> None:
        """Runs `steps` of the prepared run: each group of consecutive steps
        with the same launch (`plan`) as one launch, the driver's steps here
        (`run_here(step)`); StepFailed when a launch ends without recording
        every step of its group in state.json."""
        from ssapo.errors import StepFailed

        for group, how in self.plan(cfg, steps):
            if all(s in state for s in group):  # recorded meanwhile (the steps a stopped run skips): no launch
                continue
            if how is None:  # the follower: here, in the driver
                for s in group:
                    self.in_driver(lambda s=s: run_here(s), s, state)
                continue
            if how[0] == VLLM_THEN_SCORE:  # generation alone (the GPUs to vLLM), then scoring on every process
                self.launch(group, ("", 1), generate_only=True)
                how = (self.data_config, how[1])
            self.launch(group, how)
            state.reload()
            missing = [s for s in group if s not in state]
            if missing:
                raise StepFailed(
                    f"step {missing[0]}: its launch ended without recording it in {state.path}; see {self.last_log}"
                )

    def command(
        self,
        steps: List[str],
        how: Tuple[str, int],
        cfg_mixed_precision: Optional[str] = None,
        generate_only: bool = False,
    ) -> List[str]:
        conf, n = how
        step_args = ["-m", "ssapo.launch", "--run-dir", self.out] + [a for s in steps for a in ("--step", s)]
        step_args += ["--generate-only"] if generate_only else []
        if not conf:  # one plain process
            return [sys.executable] + step_args
        conf = self._engine_launch if conf == self.engine_config else conf
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", conf, "--num_processes", str(n)]
        if cfg_mixed_precision:
            cmd += ["--mixed_precision", cfg_mixed_precision]
        extra = list(self.accelerate_args)
        if self.num_machines == 1 and not any(a.startswith("--main_process_port") for a in extra):
            extra += ["--main_process_port", str(free_port())]  # concurrent runs on one machine do not collide
        return cmd + extra + step_args

    def env(self) -> dict:
        """The environment of every launch: this one, marked as launched, and on one machine with more GPUs
        visible than the run's processes, CUDA_VISIBLE_DEVICES cut to the first `num_processes` of them (so
        a one-process launch on an 8-GPU node sees one GPU, and vLLM's tensor parallelism the run's GPUs)."""
        env = {**os.environ, LAUNCHED_ENV: "1", DRIVER_ENV: str(os.getpid())}
        if self.num_machines == 1 and self.num_processes < self.visible_gpus:
            shown = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            ids = shown if shown else [str(i) for i in range(self.visible_gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[: self.num_processes])
        return env

    def log_path(self, steps: List[str], suffix: str = "") -> str:
        name = "+".join(s.replace("/", "_") for s in steps)
        if len(name) > 120:
            name = f"{steps[0].replace('/', '_')}+{len(steps) - 1}_more"
        return os.path.join(self.out, "logs", f"{name}{suffix}.log")

    def launch(self, steps: List[str], how: Tuple[str, int], generate_only: bool = False) -> None:
        """Runs one launch of `steps` to its end; raises StepFailed when it fails. `generate_only`: the
        vLLM generation of annotation steps alone (`python -m ssapo.launch --generate-only`)."""
        from ssapo.config import RunConfig
        from ssapo.errors import StepFailed

        log = self.log_path(steps, "_generate" if generate_only else "")
        self.last_log = log
        if self.machine_rank > 0 and not how[0]:  # one-process launches run on machine 0 only
            return self._wait_for(steps)
        cfg = RunConfig.from_yaml(os.path.join(self.out, "config.yaml"))
        self.write_configs()
        cmd = self.command(steps, how, "bf16" if cfg.bf16 else "no", generate_only=generate_only)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        self._say(f"ssapo train: {', '.join(steps)}: {how[1]} process(es): {' '.join(cmd)}")
        t0 = time.time()
        env = self.env()
        with open(log, "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            f.flush()
            # its own session: a Ctrl-C at the terminal reaches the driver alone, which ends the launch (stop_tree)
            p = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                start_new_session=True,
                pass_fds=() if self.lock_fd is None else (self.lock_fd,),
            )
            try:
                assert p.stdout is not None
                for line in p.stdout:
                    f.write(line)
                    f.flush()
                    if self.echo:
                        sys.stderr.write(line)
                rc = p.wait()
            except BaseException as e:  # SIGTERM (Stopped), Ctrl-C, or an error in the driver: end the launch
                why = e.name if isinstance(e, Stopped) else "SIGINT" if isinstance(e, KeyboardInterrupt) else "error"
                self._say(
                    f"ssapo train: {', '.join(steps)}: stopping the launch ({why}): SIGTERM to its processes, "
                    f"SIGKILL to those left after {STOP_GRACE_S:g} s"
                )
                n = stop_tree(p, STOP_GRACE_S)
                f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} stopped by the driver ({why}): {n} process(es)\n")
                raise
        if rc != 0:
            pending = self._pending_steps(steps)
            if generate_only:
                raise StepFailed(
                    f"step {pending[0] if pending else steps[0]}: its vLLM generation failed (exit {rc}"
                    f"{_cause(log, rc)}); log: {log}"
                )
            if not pending:  # every step was recorded as done: the launch failed on its way out
                self._say(
                    f"ssapo train: {', '.join(steps)}: recorded as done, but the launch exited {rc}{_cause(log, rc)}; "
                    f"going on (log: {log})"
                )
                return
            raise StepFailed(f"step {pending[0]} failed (exit {rc}{_cause(log, rc)}); log: {log}")
        self._say(f"ssapo train: {', '.join(steps)}: done in {time.time() - t0:.0f} s")

    def in_driver(self, fn: Callable[[], None], step: str, state) -> None:
        """A step the driver runs itself (the follower); on machines > 0 wait for machine 0's."""
        if self.machine_rank > 0:
            return self._wait_for([step])
        t0 = time.time()
        fn()
        self._say(f"ssapo train: {step}: done in {time.time() - t0:.2f} s (in the driver)")

    def _pending_steps(self, steps: List[str]) -> List[str]:
        """`steps` not recorded as done in state.json (all of them when it cannot be read)."""
        from ssapo.state import recorded_steps

        done = set(recorded_steps(self.out))
        return [s for s in steps if s not in done]

    def _first_pending(self, steps: List[str]) -> str:
        return next(iter(self._pending_steps(steps)), steps[-1])

    def _wait_for(self, steps: List[str]) -> None:
        from ssapo.errors import StepFailed

        deadline = time.time() + self.timeout_s
        while self._pending(steps):
            if time.time() > deadline:
                raise StepFailed(
                    f"step {self._first_pending(steps)}: machine 0 did not record it within "
                    f"{self.timeout_s:.0f} s (ddp_timeout)"
                )
            time.sleep(self.poll_s)

    def _pending(self, steps: List[str]) -> bool:
        return bool(self._pending_steps(steps))

    def _say(self, msg: str) -> None:
        if self.echo:
            print(msg, file=sys.stderr, flush=True)


_ERROR_LINE = re.compile(
    r"^\s*(?:([A-Za-z_][\w.]*(Error|Exception|Interrupt)|torch\.\w+\.\w+Error)\b|ssapo\.launch: error: ).*"
)
_RANK_PREFIX = re.compile(r"^\[(?:default)?(?:rank)?(\d+)\]:\s?")  # torchrun's --tee/--role prefixes: "[rank0]: "
# wrappers that only say a child failed: the cause is elsewhere in the log
_WRAPPERS = ("ChildFailedError", "CalledProcessError", "SystemExit")
# torchrun's report of a child ended by a signal: "exitcode  : -9 (pid: 123)", "Signal 9 (SIGKILL) received by PID"
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_SIGNAL = re.compile(r"Signal (\d+) \((SIG[A-Z]+)\) received by PID")
_RANK_LINE = re.compile(r"^\s*rank\s*:\s*(\d+)")


def signal_text(signum: int) -> str:
    """'SIGKILL (signal 9; ...)': a signal number as a user reads it, with what usually sends it."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    why = {
        "SIGKILL": "sent by the kernel's out-of-memory killer when memory runs out, or by a kill -9",
        "SIGTERM": "a kill, a scheduler's time limit or a shutdown",
        "SIGSEGV": "a crash in native code",
        "SIGABRT": "an abort in native code (e.g. a CUDA or NCCL error)",
        "SIGBUS": "a bus error (often /dev/shm full)",
    }.get(name)
    return f"{name} (signal {signum}{'; ' + why if why else ''})"


def _cause(log: str, rc: Optional[int] = None) -> str:
    """'; <why the launch failed>' from its log: the final exception line of the first rank whose error
    appears in the log (torchrun's "[rankN]: " prefix or none), else the signal that ended a process
    (torchrun's report of a child's negative exit code, or the launch's own `rc` < 0), else ''."""
    try:
        with open(log, errors="replace") as f:
            lines = f.readlines()[-4000:]
    except OSError:
        lines = []
    start = 0
    for i, line in enumerate(lines):  # only the last launch of this log (a resumed step appends)
        if line.startswith("# ") and " -m ssapo.launch " in line:
            start = i
    first: dict = {}  # rank ('' = unprefixed) -> (index of its first error line, its last error line)
    killed: Optional[Tuple[str, int]] = None
    rank_of_report = None
    for i, raw in enumerate(lines[start:]):
        m = _RANK_PREFIX.match(raw)
        rank, text = (m.group(1), raw[m.end() :]) if m else ("", raw)
        r = _RANK_LINE.match(text)
        if r:
            rank_of_report = r.group(1)
        e = _EXITCODE.search(text)
        if e and int(e.group(1)) < 0 and killed is None:
            local = re.search(r"local_rank:\s*(\d+)", text)  # torchrun's "failed (exitcode: -9) local_rank: 1"
            killed = (local.group(1) if local else rank_of_report or "?", -int(e.group(1)))
        sg = _SIGNAL.search(text)
        if sg and killed is None:
            killed = (rank_of_report or "?", int(sg.group(1)))
        em = _ERROR_LINE.match(text)
        if em and not any(w in text for w in _WRAPPERS):
            line = text.strip()
            first[rank] = (first[rank][0] if rank in first else i, line)
    if first:
        rank, (_, line) = min(first.items(), key=lambda kv: kv[1][0])
        who = f"rank {rank}: " if rank else ""
        return f"; {who}{line[:300]}"
    if killed is not None:
        return f"; rank {killed[0]} was killed by {signal_text(killed[1])}"
    if rc is not None and rc < 0:
        return f"; killed by {signal_text(-rc)}"
    return ""


if __name__ == "__main__":
    sys.exit(main())
