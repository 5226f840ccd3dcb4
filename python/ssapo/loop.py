"""The SSAPO loop (docs/METHOD.md §4): seed DPO, then rounds of annotate → follow → lead.

    from ssapo.config import load_config
    from ssapo.loop import run
    cfg = load_config("tiny", overrides={"model": "task/sft", "preference_data": "task/preferences.jsonl",
                                         "prompt_data": "task/prompts.jsonl", "output_dir": "runs/tiny"})
    out = run(cfg)                  # -> Path
    run(cfg, resume=True)           # continues after the last completed step

The steps of a run (`steps_of(cfg)`), each recorded in DIR/state.json once
its outputs are written; what a method adds or leaves out is its
declaration in `ssapo.methods` (the loop names no method):
- `seed`: DPO from π_init on the labelled seed → π_0 in seed/model (skipped
  when `seed_model` gives π_0);
- `seed/eval`: π_0's held-out reward accuracy (seed/metrics.json);
- for t = 1..T (methods with rounds): `round_t/annotate` (π_{t−1} samples
  `num_samples` responses per prompt of round t, ranked by the annotator:
  by default log π_{t−1} − log π_ref with π_ref = π_init, or π_0 with
  annotation_reference = 'seed' from round 2 on; then annotation_flip_rate),
  `round_t/follow` (methods with a follower), the method's own steps (e.g.
  `round_t/sera`), `round_t/lead` (the leader trains from π_{t−1} on the
  method's rows for the round, reference π_{t−1}, or π_init with
  round_reference = 'init'; the checkpoint in round_t/model) and
  `round_t/eval` (held-out reward accuracy, the round's report).

Steps talk to each other through files only: DIR/config.yaml (the run's
RunConfig), DIR/data/ (written once by `prepare`), annotations.jsonl,
follower.npz, sera.jsonl, the model directories and metrics.json (each step
returns its sections of it; `run_step` records them). So each step can run
in its own processes:

- `run(cfg)` (one process) runs every step here, one after the other;
- `run(cfg, launcher=...)` (`ssapo train --num-processes N`, see
  `ssapo.launch`) is a driver: it prepares the run, then starts each step as
  its own `accelerate launch ... -m ssapo.launch --run-dir DIR --step S`, by
  the step's kind: 'train' steps (seed, lead) under the recipe's engine
  (ddp / zero3 / fsdp), 'data' steps (annotation, SeRA's passes, evaluation)
  as plain data-parallel processes with whole models, 'driver' steps (the
  follower: milliseconds of numpy) in the driver itself;
- inside an existing launch (every rank runs `run`), the ranks run every
  step together (`State` on accelerate's PartialState).

Every file is written to a temp name and renamed; a checkpoint directory is
written to a temp directory and renamed. state.json is written by one
process at a time. `resume=True` skips the recorded steps, so a killed run
continues where it stopped; its outputs equal an uninterrupted run's (every
step is seeded from (seed, round), never from what ran before it in the
process). Rounds chain from the checkpoint actually written (round_<t−1>/model).

Where the work is: `ssapo.annotators` (annotation shared out by prompt
chunks, the pluggable annotator, flips), `ssapo.follower`, `ssapo.leader`
(a training stage), `ssapo.evaluate` (held-out accuracy), `ssapo.models`
(loading, margins), `ssapo.data` (the split), `ssapo.methods` (what each
method runs).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ssapo import models
from ssapo.config import RunConfig
from ssapo.errors import ConfigError, InputError
from ssapo.io import LOCK_NAME, RunLock, atomic_write, read_jsonl, write_json, write_jsonl
from ssapo.leader import train_stage
from ssapo.methods import LOOP_STEPS, Step, method_of, parse_step, steps_of
from ssapo.processes import gather_strings, peak_memory, reset_peak_memory
from ssapo.state import State

# fields that may change between a run and its resumption (they do not change results)
RESUME_MAY_DIFFER = {
    "output_dir",
    "report_to",
    "logging_steps",
    "accelerate_config",
    "save_total_limit",
    "save_steps",
    "ddp_timeout",
}
HELDOUT_PAIRS = 256  # held-out labelled pairs for the reward accuracy of each stage


def read_metrics(path: str) -> Dict[str, Any]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


class Run:
    """What every step of a run reads: its config and method, π_init and the
    data sources (`resolve_model`), and the split written by `prepare`."""

    def __init__(self, cfg: RunConfig, out: str):
        self.cfg, self.out = cfg, out
        self.method = method_of(cfg)
        self.src = resolve_model(cfg, out)
        self.init = cfg.ref_model or self.src["init"]
        d = os.path.join(out, "data")
        self.seed_rows = read_jsonl(os.path.join(d, "seed.jsonl"))
        self.heldout = read_jsonl(os.path.join(d, "heldout.jsonl"))
        with open(os.path.join(d, "split.json")) as f:
            self.split_report = json.load(f)

    def prompts(self, t: int) -> List:
        return [r["prompt"] for r in read_jsonl(os.path.join(self.out, "data", f"round_{t}.jsonl"))]

    def dir(self, t: int) -> str:
        return os.path.join(self.out, "seed" if t == 0 else f"round_{t}")

    def model(self, t: int) -> str:
        """π_t's checkpoint: seed/model (or the given seed_model) for t = 0, else round_<t>/model."""
        if t == 0 and self.cfg.seed_model:
            return self.cfg.seed_model
        return os.path.join(self.dir(t), "model")

    def metrics_path(self, t: int) -> str:
        return os.path.join(self.dir(t), "metrics.json")

    def annotations(self, t: int) -> List[dict]:
        return read_jsonl(os.path.join(self.dir(t), "annotations.jsonl"))

    def annotation_reference(self, t: int) -> Tuple[str, str]:
        """(kind, path) of round t's implicit-reward reference."""
        # π_init, or π_0 from round 2 on: in round 1 the policy is π_0 itself and log π_0 − log π_0 is 0
        if self.cfg.annotation_reference == "seed" and t > 1:
            return "seed", self.model(0)
        return "init", self.init

    def round_rows(self, t: int) -> List[dict]:
        """Round t's training pairs: the method's own (`train_rows`), else the annotations with their atoms."""
        if self.method.train_rows is not None:
            return self.method.train_rows(self, t)
        rows = self.annotations(t)
        if self.method.follower:
            from ssapo import follower
            from ssapo.atoms import Atoms

            rows = Atoms.of(follower.load(os.path.join(self.dir(t), "follower.npz"))).attach(rows)
        return rows


# -- the loop's own steps: fn(run, state, t) -> the sections of round t's metrics.json (main process) --


def step_seed(run: Run, state: State, t: int) -> Optional[dict]:
    """DPO from π_init on the labelled seed → seed/model."""
    cfg = run.cfg
    work = os.path.join(run.dir(0), "trainer")
    stats = train_stage(
        cfg,
        run.src["init"],
        run.init,
        run.seed_rows,
        cfg.seed_learning_rate,
        cfg.seed_epochs,
        "dpo",
        run.model(0),
        work,
    )
    return {"leader": stats, "split": run.split_report} if state.main else None


def empty_chosen_line(t: int, stats: Dict[str, Any]) -> Optional[str]:
    """One line when round t's annotator chose an empty answer (nothing before the stop token) in some pair:
    the first sign of answers emptying (the benchmark saw a round of DPO on 3 such pairs of 267 make the stop
    token the first token on every prompt); None when it chose none."""
    k = int(stats.get("empty_chosen", 0) or 0)
    if k <= 0:
        return None
    return (
        f"ssapo train: round {t}: in {k} of {stats.get('pairs', 0)} pairs the chosen answer is empty (nothing "
        "before the stop token); DPO on such pairs raises the stop token as the first token, and answers can "
        "empty within a round (metrics.json: annotation.empty_chosen, mean_chosen_tokens)"
    )


def step_annotate(run: Run, state: State, t: int) -> Optional[dict]:
    """π_{t−1} annotates round t's prompts (shared out by chunks); annotation_flip_rate turns pairs around."""
    from ssapo import annotate
    from ssapo.annotators import annotate_round, flip_pairs

    cfg, rd = run.cfg, run.dir(t)
    os.makedirs(rd, exist_ok=True)
    kind, ref = run.annotation_reference(t)
    got = annotate_round(cfg, state.procs, rd, run.model(t - 1), ref, run.prompts(t), cfg.seed + t)
    if not state.main:
        return None
    rows, stats = got
    stats = annotate.finish_stats(stats, rows)
    if not rows:  # an outcome, not a crash: the policy stopped exploring, and the rounds end with π_{t−1}
        result = os.path.relpath(run.model(t - 1), run.out)
        why = (
            f"round {t}: the policy stopped exploring: every response tied for all {stats.get('prompts', 0)} "
            f"prompts (no pairs to train on); the rounds end here and {result} is the run's result"
        )
        return {
            "annotation": {**stats, "pairs": 0, "reference": kind, "annotator": cfg.annotator},
            "stopped": {"round": t, "result": result, "why": why},
        }
    line = empty_chosen_line(t, stats)
    if line:
        print(line, file=sys.stderr, flush=True)
    rows = flip_pairs(
        [{k: v for k, v in r.items() if k != "index"} for r in rows], cfg.annotation_flip_rate, (cfg.seed, t)
    )
    write_jsonl(os.path.join(rd, "annotations.jsonl"), rows)
    return {
        "annotation": {
            **stats,
            "flipped": sum(r["flipped"] for r in rows),
            "reference": kind,
            "annotator": cfg.annotator,
        }
    }


def step_follow(run: Run, state: State, t: int) -> Optional[dict]:
    """The worst case around the self-labels (one process, every pair) → follower.npz."""
    from ssapo import follower

    if not state.main:
        return None
    margins = [r["margin"] for r in run.annotations(t)]
    atoms, diag = follower.follow(margins, run.cfg)
    follower.save(os.path.join(run.dir(t), "follower.npz"), atoms, diag, margins)
    return {"follower": diag}


def step_lead(run: Run, state: State, t: int) -> Optional[dict]:
    """π_θ starts at π_{t−1}; reference π_{t−1} (or π_init); the method's loss, parameters and rows."""
    cfg, m = run.cfg, run.method
    previous = run.model(t - 1)
    reference = previous if cfg.round_reference == "previous" else run.init
    loss, params = m.leader_loss_of(cfg), m.leader_params(cfg, t)
    stats = train_stage(
        cfg,
        previous,
        reference,
        run.round_rows(t),
        cfg.learning_rate,
        cfg.num_train_epochs_per_round,
        loss,
        run.model(t),
        os.path.join(run.dir(t), "trainer"),
        leader_params=params,
        resolve_reference=run.annotation_reference(t)[1] if m.follower else None,
    )
    return {"leader": {**stats, "loss": loss, "reference": cfg.round_reference, **params}} if state.main else None


def step_eval(run: Run, state: State, t: int) -> Optional[dict]:
    """Held-out reward accuracy of π_t."""
    from ssapo.evaluate import heldout_accuracy

    ev = heldout_accuracy(run.cfg, run.model(t), run.init, run.heldout, state.procs, run.dir(t))
    return {"eval": ev} if state.main else None


def report_stage(run: Run, t: int) -> None:
    """After eval (main process): the stage's total time; for a round, its report."""
    metrics = read_metrics(run.metrics_path(t))
    metrics["seconds"] = sum(v.get("seconds", 0.0) for v in metrics.values() if isinstance(v, dict))
    write_json(run.metrics_path(t), metrics)
    if t > 0:
        from ssapo import report

        acc = [read_metrics(run.metrics_path(s)).get("eval", {}).get("heldout_reward_accuracy") for s in range(t + 1)]
        report.round_report(run.dir(t), t, metrics, run.round_rows(t), acc, plots=run.cfg.report_plots)


STEPS = {  # the loop's own steps: where each runs is declared in ssapo.methods.LOOP_STEPS
    name: Step(name, fn, kind=LOOP_STEPS[name][0], generates=LOOP_STEPS[name][1], after=after)
    for name, fn, after in (
        ("seed", step_seed, None),
        ("annotate", step_annotate, None),
        ("follow", step_follow, None),
        ("lead", step_lead, None),
        ("eval", step_eval, report_stage),
    )
}


def step_spec(cfg: RunConfig, step: str) -> Tuple[Step, int]:
    """(the Step, its round t; 0 for the seed stage) of a step name such as 'round_2/lead'
    (`ssapo.methods.parse_step`)."""
    name, t = parse_step(cfg, step)
    return {**STEPS, **{s.name: s for s in method_of(cfg).extra_steps}}[name], t


def run_step(run: Run, state: State, step: str) -> None:
    """The one way a step runs: skipped if state.json has it; else run on every
    process of `state`, its metrics sections recorded (main process; the first
    one gets the step's `seconds` unless it has its own) and its `after` run,
    then marked done."""
    if step in state:
        return
    spec, t = step_spec(run.cfg, step)
    reset_peak_memory()
    t0 = time.time()
    sections = spec.fn(run, state, t)
    seconds = time.time() - t0
    peaks = [json.loads(p) for p in gather_strings(state.procs, json.dumps(peak_memory()))]  # every process
    if state.main and sections is not None:
        first = next(iter(sections))
        sections[first] = {**sections[first], "seconds": sections[first].get("seconds", seconds)}
        old = read_metrics(run.metrics_path(t))
        cost = {**old.get("steps", {}), step.partition("/")[2] or step: step_cost(sections, seconds, peaks)}
        write_json(run.metrics_path(t), {**old, **sections, "steps": cost})
        if spec.after is not None:
            spec.after(run, t)
    stopped = (sections or {}).get("stopped") if state.main else None
    if stopped is not None:  # every later step is recorded as skipped
        known = steps_of(run.cfg)
        state.mark(step, stopped={"at": step, **stopped}, skipped=known[known.index(step) + 1 :])
    else:
        state.mark(step)


def step_cost(sections: Dict[str, Any], seconds: float, peaks: List[Dict[str, Any]]) -> Dict[str, Any]:
    """What a step cost, for metrics.json's "steps" section: its wall `seconds`, its `processes`, each
    process's peak memory (`peak_device_bytes`: the GPU allocator's; `peak_resident_bytes`: host memory; in
    rank order) and, where the step generated or trained, tokens per second over all its processes
    (generation: response tokens / generation seconds per generating process; training: the non-padding
    tokens the trainer saw / its training seconds)."""
    out: Dict[str, Any] = {"seconds": round(seconds, 3), "processes": len(peaks)}
    out["peak_device_bytes"] = [p.get("device_bytes") for p in peaks]
    out["peak_resident_bytes"] = [p.get("resident_bytes") for p in peaks]
    ann = sections.get("annotation") or {}
    if ann.get("generate_seconds"):
        generating = 1 if ann.get("backend") == "vllm" else len(peaks)  # each process's seconds are summed
        out["generated_tokens"] = int(ann.get("response_tokens", 0))
        out["generation_tokens_per_second"] = ann.get("response_tokens", 0) / (ann["generate_seconds"] / generating)
    lead = sections.get("leader") or {}
    if lead.get("train_seconds"):
        out["trained_tokens"] = int(lead.get("train_tokens", 0))
        out["training_tokens_per_second"] = lead.get("train_tokens", 0) / lead["train_seconds"]
    return out


# RunConfig fields that may hold a local path: config.yaml writes those inside the run directory relative to it
PATH_FIELDS = ("model", "ref_model", "tokenizer", "seed_model", "preference_data", "prompt_data", "accelerate_config")
DATA_FIELDS = ("preference_data", "prompt_data")  # on resume, checked by their contents (data/inputs.json)


def _in_run(d: Dict[str, Any], out: str) -> Dict[str, Any]:
    """`d` (a config's fields) with every local path absolute, and those inside run directory `out`
    relative to it: config.yaml's form, the same wherever the directory is moved."""
    d = dict(d)
    for k in PATH_FIELDS:
        v = d.get(k)
        if not isinstance(v, str) or not v:
            continue
        if os.path.isabs(v) or os.path.exists(v):
            a = os.path.abspath(v)
            rel = os.path.relpath(a, out)
            d[k] = a if rel == os.curdir or rel.split(os.sep)[0] == os.pardir else rel
    return d


def config_text(cfg: RunConfig, out: str) -> str:
    """DIR/config.yaml's text: the run's RunConfig, paths inside the run relative to it (`_in_run`)."""
    import yaml

    d = _in_run(cfg.to_dict(), out)
    d["output_dir"] = os.path.abspath(out)
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


def _without_output_dir(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("output_dir:"))


def read_run_config(out: str) -> RunConfig:
    """The RunConfig in DIR/config.yaml, its relative paths that name something inside the run
    rebased on the directory where the run is now (so a moved run directory resumes), output_dir = `out`."""
    from ssapo.config import merge, read_yaml

    path = os.path.join(out, "config.yaml")
    raw = read_yaml(path)
    for k in PATH_FIELDS:
        v = raw.get(k)
        if isinstance(v, str) and v and not os.path.isabs(v) and os.path.exists(os.path.join(out, v)):
            raw[k] = os.path.join(out, v)
    raw["output_dir"] = os.path.abspath(out)
    return RunConfig(**merge({}, raw, path))


def check_output_dir(out: str, resume: bool) -> None:
    """Start-up checks of the run directory, one line each (ConfigError): not a file; with `resume`, it
    holds a run (config.yaml or state.json); without, it can be created and written."""
    import tempfile

    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir: {out} is a file, not a directory")
    if resume:
        if not any(os.path.exists(os.path.join(out, f)) for f in ("config.yaml", "state.json")):
            if os.path.exists(os.path.join(out, LOCK_NAME)):
                with RunLock(out):  # a run just starting holds it: that is the error to give
                    pass
            raise ConfigError(
                f"output_dir: {out} holds no run to resume (no config.yaml or state.json); check the path, or "
                "drop --resume to start a run there"
            )
        return  # a finished run in a read-only directory resumes (nothing to write); `run` checks the rest
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ssapo-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write in {e.filename or out} ({e.strerror or e})") from None


def check_resumable(cfg: RunConfig, out: str) -> None:
    """On resume, the run's config.yaml must match `cfg` (but for the fields in RESUME_MAY_DIFFER), paths
    inside the run compared relative to it (a moved run matches). preference_data and prompt_data may name
    other paths when data/inputs.json holds their fingerprint: `prepare` compares their contents."""
    if not os.path.exists(os.path.join(out, "config.yaml")):
        return
    old = _in_run(read_run_config(out).to_dict(), out)
    new = _in_run(cfg.to_dict(), out)
    skip = set(RESUME_MAY_DIFFER)
    if os.path.exists(os.path.join(out, "data", INPUTS)):
        skip |= set(DATA_FIELDS)
    diff = [f"{k} ({old.get(k)!r} → {new[k]!r})" for k in new if k not in skip and old.get(k) != new[k]]
    if diff:
        raise ConfigError(
            f"config: resuming {out} with another configuration: {', '.join(diff)}; resume with the "
            "run's config.yaml or start a new output_dir"
        )


def resolve_model(cfg: RunConfig, out: str) -> Dict[str, Any]:
    """π_init and the data sources: paths (the tiny preset's task is built by its command, not here)."""
    if cfg.model == "tiny":
        raise ConfigError(
            "model: 'tiny' is a preset whose task `ssapo train --model tiny` builds "
            "(ssapo.commands.train.with_tiny_task); the loop takes the SFT model's path"
        )
    if not cfg.preference_data:
        raise ConfigError("preference_data: needed (labelled pairs for the seed stage and the held-out evaluation)")
    if cfg.seed_model and not os.path.isdir(cfg.seed_model):
        raise ConfigError(f"seed_model: no checkpoint directory at {cfg.seed_model}")
    return {"init": cfg.model, "preference_data": cfg.preference_data, "prompt_data": cfg.prompt_data}


INPUTS = "inputs.json"  # in DIR/data/: the fingerprint of what chose the split's rows


def split_fingerprint(cfg: RunConfig, out: str) -> Dict[str, Any]:
    """What chose DIR/data/'s rows: the fields the split reads (config.yaml's form) and the contents of the
    input files (`ssapo.data.source_digest`)."""
    from ssapo.data import SPLIT_FIELDS, source_digest

    d = _in_run(cfg.to_dict(), out)
    fields = {k: d[k] for k in SPLIT_FIELDS if k in d}
    fields["round_sizes"] = list(d["round_sizes"])[: cfg.num_rounds]
    files = {k: source_digest(getattr(cfg, k)) for k in DATA_FIELDS if getattr(cfg, k)}
    return {"fields": fields, "files": files}


def _changed_fields(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """The split's fields whose values differ between two fingerprints' "fields", as 'name (old → new)'."""
    return [f"{k} ({old.get(k)!r} → {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _changed_files(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """The input files whose contents differ between two fingerprints' "files", as 'name (what changed)'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a is None or b is None:
            out.append(f"{k} ({'none' if a is None else a.get('source')} → {'none' if b is None else b.get('source')})")
        elif {x: a.get(x) for x in ("sha256", "hub")} != {x: b.get(x) for x in ("sha256", "hub")}:
            out.append(f"{k} ({b.get('source')}: its contents changed)")
    return out


def prepare(cfg: RunConfig, out: str, state: State) -> None:
    """The run's inputs, once, by the main process: config.yaml (written only when it changes) and DIR/data/
    (`ssapo.data.write_run_data`), which every step reads instead of splitting the data again. data/inputs.json
    ties the split to what made it (`split_fingerprint`): a run that recorded no step yet rebuilds data/
    when that changed (and drops the unrecorded steps' partial outputs); a resumed run whose input files
    changed is refused, naming the file."""
    if state.main:
        path, text = os.path.join(out, "config.yaml"), config_text(cfg, out)
        if not os.path.exists(path) or _without_output_dir(Path(path).read_text()) != _without_output_dir(text):
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # not when only the directory moved
        d = os.path.join(out, "data")
        fp = split_fingerprint(cfg, out)
        build = not os.path.exists(os.path.join(d, "split.json"))
        if not build:
            old = read_metrics(os.path.join(d, INPUTS)) or None
            if old is None:
                changed = ["data/inputs.json (none)"]
            else:
                changed = _changed_fields(old.get("fields", {}), fp["fields"])
                changed += _changed_files(old.get("files", {}), fp["files"])
            if changed and not state.done:
                import shutil

                print(
                    f"ssapo train: {out}: no step recorded and the split's inputs changed "
                    f"({'; '.join(changed)}); splitting again",
                    file=sys.stderr,
                )
                os.unlink(os.path.join(d, "split.json"))  # first: data/ is incomplete from here on
                for name in os.listdir(out):  # partial outputs of steps that never finished
                    if name == "seed" or (name.startswith("round_") and name[6:].isdigit()):
                        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
                shutil.rmtree(d, ignore_errors=True)
                build = True
            elif old is not None:
                files = _changed_files(old.get("files", {}), fp["files"])
                if files:
                    raise InputError(
                        f"{files[0].split(' ')[0]}: resuming {out}, whose split was made from other data: "
                        f"{'; '.join(files)}; resume with the data the run started from, or start a new output_dir"
                    )
        if build:
            from ssapo.data import write_run_data
            from ssapo.models import tokenizer

            write_json(os.path.join(d, INPUTS), fp)
            write_run_data(cfg, d, tokenizer(cfg, resolve_model(cfg, out)["init"]), HELDOUT_PAIRS)
    state.wait()


def pregenerate(cfg: RunConfig, out: str, step: str) -> None:
    """The generation half of a vLLM annotation step (`python -m ssapo.launch --generate-only`, one process
    with the run's GPUs): π_{t−1} samples round t's prompts into DIR/round_<t>/responses.json; the step
    itself, launched next on every process, scores them (`ssapo.annotators.annotate_round`)."""
    from ssapo.annotators import pregenerate_round

    spec, t = step_spec(cfg, step)
    if spec.name != "annotate":
        raise ValueError(f"step: only an annotation step generates on its own, got {step!r}")
    run = Run(cfg, out)
    pregenerate_round(cfg, run.dir(t), run.model(t - 1), run.prompts(t), cfg.seed + t)


def run_steps(cfg: RunConfig, out: str, steps: List[str], procs=None) -> None:
    """Runs `steps` of the prepared run in `out` (those not yet in state.json) on
    the processes of `procs` (accelerate's PartialState inside a launch): what
    `python -m ssapo.launch` does."""
    state = State(out, resume=True, procs=procs)
    known = steps_of(cfg)
    for s in steps:
        if s not in known:
            raise ValueError(f"step: {s!r} is not a step of this run ({', '.join(known)})")
    ctx = Run(cfg, out)
    models.settle_heap()
    for s in steps:
        run_step(ctx, state, s)


def run(cfg: RunConfig, resume: bool = False, launcher=None, procs=None) -> Path:
    """Runs (or, with `resume`, continues) the whole loop; returns the output directory.

    `launcher` (an `ssapo.launch.Launcher`): the driver, each step in its own
    launch. Without it every step runs here, on the processes of `procs`
    (default: this process alone; accelerate's PartialState when every rank
    of an existing launch calls `run`)."""
    import torch

    from ssapo.accelerate_configs import check_bf16

    # bf16 without a GPU only under a DeepSpeed engine: refused here, before any step, not in the seed step
    check_bf16(cfg, launcher.engine_type if launcher is not None else "NO", torch.cuda.device_count())
    import contextlib

    out = os.path.abspath(cfg.output_dir)
    check_output_dir(out, resume)
    # one writer per run directory: the driver (machine 0's), or the main rank of an existing launch
    writer = (launcher is None or launcher.machine_rank == 0) and (procs is None or procs.is_main_process)
    with RunLock(out) if writer else contextlib.nullcontext() as lock:
        if launcher is not None and lock is not None:
            launcher.lock_fd = lock.fd  # each launch holds it too
        state = State(out, resume, procs)
        if resume:
            check_resumable(cfg, out)
            left = [s for s in steps_of(cfg) if s not in state]
            if left and not os.access(out, os.W_OK):
                raise ConfigError(
                    f"output_dir: {out} cannot be written (read-only or no permission) and the run has "
                    f"{len(left)} step(s) left ({left[0]} next); make it writable, then resume"
                )
        prepare(cfg, out, state)
        todo = [s for s in steps_of(cfg) if s not in state]
        if todo and launcher is None:
            ctx = Run(cfg, out)
            models.settle_heap()
            for s in todo:
                run_step(ctx, state, s)
        elif todo:
            launcher.drive(cfg, state, todo, lambda s: run_step(Run(cfg, out), state, s))
        state.reload()
        if state.stopped and (procs is None or procs.is_main_process):
            print(f"ssapo train: {state.stopped['why']}", file=sys.stderr)
    return Path(out)
