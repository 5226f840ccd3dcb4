"""Helper of benches/gpu_check.sh (the device check of issue 9). No hub, no network.

    python benches/gpu_check.py build   --out DIR [--tiny]    # model + tokenizer + pairs.jsonl, locally
    python benches/gpu_check.py monitor --run-dir RUN --out CSV --stop FILE
    python benches/gpu_check.py report  --work DIR --run-dir RUN --label NAME --samples CSV [--json OUT]
    python benches/gpu_check.py summary --work DIR            # the table of every report, Markdown

build: a Llama-architecture model from a config (default ~1.0B parameters: hidden 2048,
16 layers, 32 heads / 8 KV heads, MLP 8192, vocabulary 32,768, tied embeddings, the
shape of Llama-3.2-1B with a smaller vocabulary; --tiny: hidden 64, 2 layers, for a CPU
dry run), random weights in float32 (most not representable in bf16: the precision probe's
start), saved with safetensors, with a word-level tokenizer
built locally (ssapo.tiny.build_tokenizer: chat template, left padding) and a JSONL of
preference pairs over its words (prompt / chosen / rejected strings).

monitor: samples the GPU's used memory (nvidia-smi, else pynvml, else torch in this
process) and the run's state.json every 0.25 s, until FILE exists.

report: per completed step of the run (state.json order): wall time, peak GPU memory
while it ran; generation tokens/s of each annotation step (response tokens of
annotations.jsonl, counted with the run's tokenizer, over the step's wall time, which
also holds the scoring: a lower bound of the generation rate); and whether the weights
moved: each checkpoint (seed/model, round_<t>/model) against the start model, the
fraction of elements that changed and the relative L2 change ||W - W0|| / ||W0||.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

CONFIGS = {
    # ~1.04B parameters: 32768·2048 (tied) + 16 · (2·2048² + 2·2048·512 + 3·2048·8192)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab=32768,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab=512,
    ),
}


# ---------------------------------------------------------------- build
def build(out: str, tiny: bool, pairs: int, prompt_words: int, answer_words: int, seed: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ssapo.tiny import SPECIAL, build_tokenizer

    shape = CONFIGS["tiny" if tiny else "1b"]
    words = [f"w{i}" for i in range(shape["vocab"] - len(SPECIAL))]
    tok = build_tokenizer(words, model_max_length=4096)
    assert len(tok) == shape["vocab"], (len(tok), shape["vocab"])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=4096,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    t0 = time.time()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float32)  # fp32 weights bf16 cannot hold (the precision probe)
        with torch.no_grad():  # no exact zeros (the padding row): lr 1e-30 moves a 0 to ~1e-30, a true fp32 update
            for p in model.parameters():
                zero = p == 0
                p[zero] = torch.randn(int(zero.sum()), dtype=p.dtype, device=p.device) * 0.02
    model.generation_config.pad_token_id = tok.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = os.path.join(out, "model")
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    model.to("cpu").save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    del model
    built_s = time.time() - t0

    rng = random.Random(seed)
    content = words[:4000]  # a working vocabulary for the texts

    def text(n):
        return " ".join(rng.choice(content) for _ in range(n))

    path = os.path.join(out, "pairs.jsonl")
    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(
                json.dumps(
                    {
                        "prompt": text(rng.randint(prompt_words // 2, prompt_words)),
                        "chosen": text(rng.randint(answer_words // 2, answer_words)),
                        "rejected": text(rng.randint(answer_words // 2, answer_words)),
                    }
                )
                + "\n"
            )
    info = {
        "model_dir": model_dir,
        "pairs": path,
        "n_pairs": pairs,
        "parameters": n_params,
        "config": {k: v for k, v in shape.items()},
        "dtype": "float32",
        "build_seconds": round(built_s, 1),
        "built_on": device,
    }
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def by_length(args=None):
    """The precision probe's annotator (`--annotator gpu_check:by_length`, benches/ on PYTHONPATH): a response's
    reward is its length. At lr 1e-30 the policy never moves, so the implicit reward is 0 for every response and
    every prompt ties; any fixed ranking lets the round's leader stage run."""

    def score(prompts, responses):
        return [[float(len(r)) for r in rs] for rs in responses]

    return score


# ---------------------------------------------------------------- monitor
def _memory_reader():
    """A function returning the GPU's used memory in MiB (device 0), or None where there is no GPU."""
    if shutil.which("nvidia-smi"):

        def smi():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                return float(out.splitlines()[0])
            except Exception:
                return None

        if smi() is not None:
            return smi, "nvidia-smi"
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return (lambda: pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20), "pynvml"
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():

            def by_torch():
                free, total = torch.cuda.mem_get_info(0)
                return (total - free) / 2**20

            return by_torch, "torch.cuda.mem_get_info (this monitor's own context included)"
    except Exception:
        pass
    return (lambda: None), "none (no GPU)"


def _done(run_dir: str) -> list:
    try:
        with open(os.path.join(run_dir, "state.json")) as f:
            return list(json.load(f).get("done", []))
    except Exception:
        return []


_PERIOD = 0.25


def monitor(run_dir: str, out: str, stop: str, period: float = _PERIOD) -> None:
    read, how = _memory_reader()
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "mem_mib", "n_done", "last"])
        f.write(f"# memory: {how}\n")
        while not os.path.exists(stop):
            done = _done(run_dir)
            mem = read()
            w.writerow([f"{time.time():.3f}", "" if mem is None else f"{mem:.0f}", len(done), done[-1] if done else ""])
            f.flush()
            time.sleep(period)


# ---------------------------------------------------------------- report
def _samples(path: str):
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or line.startswith("t,"):
                continue
            t, mem, n, last = next(csv.reader([line]))
            rows.append((float(t), float(mem) if mem else None, int(n)))
    return rows


def _tensors(model_dir: str):
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                yield k, f, fn


def weights_moved(start_dir: str, model_dir: str) -> dict:
    """Changed elements and relative L2 change of every tensor the two checkpoints share."""
    from safetensors import safe_open

    start = {}
    for k, _, fn in _tensors(start_dir):
        start[k] = fn
    changed = total = 0
    d2 = w2 = 0.0
    dtypes, missing, shared = set(), [], 0
    for k, f, _ in _tensors(model_dir):
        if k not in start:
            continue
        shared += 1
        new = f.get_tensor(k)
        with safe_open(start[k], framework="pt") as g:
            old = g.get_tensor(k)
        dtypes.add(str(new.dtype).replace("torch.", ""))
        if new.shape != old.shape:
            missing.append(f"{k}: shape {tuple(new.shape)} != {tuple(old.shape)}")
            continue
        a, b = new.float(), old.float()
        changed += int((a != b).sum())
        total += a.numel()
        d2 += float(((a - b) ** 2).sum())
        w2 += float((b**2).sum())
    return {
        "tensors": shared,
        "elements": total,
        "changed_fraction": changed / total if total else float("nan"),
        "relative_l2": math.sqrt(d2 / w2) if w2 else float("nan"),
        "saved_dtypes": sorted(dtypes),
        "problems": missing,
        "moved": bool(total and changed and not missing),
    }


def _response_tokens(run_dir: str, step: str, tokenizer) -> int:
    """Response tokens of a round's annotations (chosen + rejected; all samples when num_samples = 2)."""
    rnd = step.split("/")[0]
    path = os.path.join(run_dir, rnd, "annotations.jsonl")
    if not os.path.isfile(path):
        return 0
    n = 0
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                v = row.get(key)
                if isinstance(v, list):  # chat messages: the assistant's turn
                    v = " ".join(m.get("content", "") for m in v if m.get("role") == "assistant")
                if isinstance(v, str):
                    n += len(tokenizer(v, add_special_tokens=False)["input_ids"])
    return n


def _metrics(run_dir: str, step: str) -> dict:
    stage = step.split("/")[0]
    try:
        with open(os.path.join(run_dir, stage, "metrics.json")) as f:
            return json.load(f)
    except Exception:
        return {}


def bf16_exact_fraction(model_dir: str) -> float:
    """Fraction of the floating-point elements of a checkpoint that bf16 holds exactly."""
    import torch

    same = total = 0
    for k, f, _ in _tensors(model_dir):
        t = f.get_tensor(k)
        if t.is_floating_point():
            same += int((t.to(torch.bfloat16).to(t.dtype) == t).sum())
            total += t.numel()
    return same / total if total else float("nan")


def step_costs(run_dir: str) -> dict:
    """{step: metrics.json's "steps" entry} of every stage of the run (what each step measured itself)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "metrics.json"))):
        stage = os.path.basename(os.path.dirname(path))
        try:
            steps = json.load(open(path)).get("steps", {})
        except Exception:
            continue
        for name, cost in steps.items():
            out[stage if name == stage else f"{stage}/{name}"] = cost
    return out


def engines(run_dir: str) -> dict:
    """{stage: the engine its leader reports (metrics.json leader.engine)} for the seed and every round."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "metrics.json"))):
        try:
            lead = json.load(open(path)).get("leader") or {}
        except Exception:
            continue
        if "engine" in lead:
            out[os.path.basename(os.path.dirname(path))] = lead["engine"]
    return out


def checks(res: dict, run_dir: str, start_dir: str, expect_engine: str | None, check: str) -> list:
    """What makes a run fail: a non-zero exit, a stage under another engine than claimed, the precision
    probe's weights not equal to the start, vLLM's memory not given back, a resume that did not resume."""
    problems = []
    if res["rc"] != 0:
        problems.append(f"exit {res['rc']}")
    got = res["engines"]
    if expect_engine:
        if not got:
            problems.append(f"no stage reports its engine (expected {expect_engine})")
        wrong = {k: v for k, v in got.items() if v != expect_engine}
        if wrong:
            problems.append(f"expected {expect_engine}, got {wrong}")
    if check == "precision":
        exact = bf16_exact_fraction(start_dir)
        res["start_bf16_exact_fraction"] = exact
        if not exact < 0.5:
            problems.append(f"the start is bf16-representable ({exact:.2%}): the probe cannot see a rounding")
        for stage, m in res["weights"].items():
            if m["changed_fraction"] != 0 or m["problems"]:
                problems.append(f"{stage}/model differs from the start in {m['changed_fraction']:.2%} of elements")
        if not res["weights"]:
            problems.append("no stage saved a model")
    if check == "vllm":
        ann = [a for a in res.get("annotation", {}).values() if a.get("backend") == "vllm"]
        if not ann:
            problems.append("no annotation step ran vLLM")
        for a in ann:
            before, after = a.get("gpu_free_before_engine_bytes"), a.get("gpu_free_after_release_bytes")
            if not before or after is None or after < 0.95 * before:
                problems.append(f"vLLM gave back {after} of {before} free bytes (< 95 %)")
    if check == "resume":
        if not res.get("resumed_from_checkpoint"):
            problems.append("the killed stage did not resume from a checkpoint")
    return problems


def report(
    work: str,
    run_dir: str,
    label: str,
    samples: str,
    out_json: str | None,
    wall: float | None,
    rc: int | None,
    expect_engine: str | None = None,
    check: str = "none",
) -> dict:
    from transformers import AutoTokenizer

    build_info = json.load(open(os.path.join(work, "build.json")))
    rows = _samples(samples) if os.path.isfile(samples) else []
    done = _done(run_dir)
    t_start = rows[0][0] if rows else None
    steps = []
    for i, name in enumerate(done):
        during = [r for r in rows if r[2] == i]
        after = [r for r in rows if r[2] > i]
        t0 = during[0][0] if during else None
        t1 = after[0][0] if after else (rows[-1][0] if rows else None)
        mem = [r[1] for r in during if r[1] is not None]
        if t0 is None:  # over between two samples
            secs = f"< {_PERIOD}" if rows else None
        else:
            secs = round(t1 - t0, 1) if t1 else None
        steps.append({"step": name, "seconds": secs, "peak_gpu_mib": max(mem) if mem else None})
    tok = AutoTokenizer.from_pretrained(build_info["model_dir"])
    for s in steps:
        if s["step"].endswith("/annotate"):
            n = _response_tokens(run_dir, s["step"], tok)
            ann = _metrics(run_dir, s["step"]).get("annotation", {})
            secs = s["seconds"] if isinstance(s["seconds"], float) else ann.get("seconds")
            s["response_tokens"] = n
            s["tokens_per_s"] = round(n / secs, 1) if n and secs else None
            gen_s, gen_n = ann.get("generate_seconds"), ann.get("response_tokens")
            if gen_s and gen_n:  # the loop's own split of the step: generation alone
                s["generation_tokens_per_s"] = round(gen_n / gen_s, 1)
            # whatever the loop itself reports about generation (names vary by version)
            s["loop_reports"] = {
                k: v for k, v in ann.items() if any(w in k for w in ("token", "second", "backend", "generat"))
            }
    moved = {}
    for stage in ["seed"] + sorted({d.split("/")[0] for d in done if d.startswith("round_")}):
        mdir = os.path.join(run_dir, stage, "model")
        if os.path.isdir(mdir):
            moved[stage] = weights_moved(build_info["model_dir"], mdir)
    logs = sorted(glob.glob(os.path.join(run_dir, "logs", "*")))
    engine = "unknown"
    text = ""
    for lf in logs:
        try:
            text += open(lf, errors="replace").read()[-200000:]
        except Exception:
            pass
    if "DeepSpeed" in text or "deepspeed" in text:
        engine = "deepspeed (seen in DIR/logs)"
    elif logs:
        engine = "launched steps, no DeepSpeed in their logs"
    else:
        engine = "one process, no launch (no DIR/logs)"
    costs = step_costs(run_dir)
    for s in steps:
        s["measured"] = costs.get(s["step"], {})
    annotation = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "round_*", "metrics.json"))):
        ann = json.load(open(path)).get("annotation")
        if ann:
            annotation[os.path.basename(os.path.dirname(path))] = ann
    resumed = []
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "metrics.json"))):
        lead = json.load(open(path)).get("leader") or {}
        if lead.get("resumed_from"):
            resumed.append(f"{os.path.basename(os.path.dirname(path))} from {lead['resumed_from']}")
    res = {
        "label": label,
        "rc": rc,
        "wall_seconds": wall,
        "steps": steps,
        "weights": moved,
        "engine": engine,
        "engines": engines(run_dir),
        "annotation": annotation,
        "resumed_from_checkpoint": resumed,
        "start_to_first_sample": t_start,
        "parameters": build_info["parameters"],
    }
    res["problems"] = checks(res, run_dir, build_info["model_dir"], expect_engine, check)
    res["ok"] = not res["problems"]
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
    print(render([res]))
    return res


def _mib(values) -> str:
    vals = [v for v in (values or []) if v is not None]
    return f"{max(vals) / 2**20:,.0f}" if vals else ""


def _rate(v) -> str:
    return f"{v:,.0f}" if isinstance(v, (int, float)) else ""


def render(results: list) -> str:
    lines = []
    for r in results:
        verdict = "ok" if r.get("ok") else f"FAILED: {'; '.join(r.get('problems', []))}"
        lines.append(
            f"### {r['label']}  ({verdict}; exit {r['rc']}, {r['wall_seconds']} s wall, "
            f"engine per stage: {r.get('engines') or r['engine']})"
        )
        lines.append("")
        lines.append(
            "| step | seconds | processes | peak GPU MiB (allocator, max over processes) | peak GPU MiB used "
            "(nvidia-smi, device 0) | peak host MiB | generation tokens/s | training tokens/s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for s in r["steps"]:
            m = s.get("measured", {})
            lines.append(
                f"| {s['step']} | {m.get('seconds', s['seconds'])} | {m.get('processes', '')} | "
                f"{_mib(m.get('peak_device_bytes'))} | {s['peak_gpu_mib'] or ''} | {_mib(m.get('peak_resident_bytes'))} | "
                f"{_rate(m.get('generation_tokens_per_second'))} | {_rate(m.get('training_tokens_per_second'))} |"
            )
        for rd, a in r.get("annotation", {}).items():
            if a.get("backend") == "vllm":
                lines.append(
                    f"- {rd} vLLM: generation {a.get('generate_seconds', 0):.1f} s, scoring {a.get('score_seconds', 0):.1f}"
                    f" s; free GPU memory {a.get('gpu_free_before_engine_bytes', 0) / 2**30:.2f} GiB before the engine,"
                    f" {a.get('gpu_free_after_release_bytes', 0) / 2**30:.2f} GiB after its release"
                )
        for stage, m in r["weights"].items():
            lines.append(
                f"- weights of {stage}/model vs the start: moved={m['moved']}, "
                f"{100 * m['changed_fraction']:.2f} % of {m['elements']:,} elements changed, "
                f"relative L2 {m['relative_l2']:.3e}, saved as {','.join(m['saved_dtypes'])}"
                + (f", problems: {m['problems'][:3]}" if m["problems"] else "")
            )
        for s in r["steps"]:
            if s.get("loop_reports"):
                lines.append(f"- {s['step']} as the loop reports it: {json.dumps(s['loop_reports'])}")
        lines.append("")
    return "\n".join(lines)


def summary(work: str) -> list:
    """Writes WORK/gpu_check.md: one verdict line per run, then each run's table. Returns the reports."""
    results = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(work, "report_*.json")))]
    head = ["| run | verdict | wall s |", "|---|---|---|"]
    for r in results:
        verdict = "ok" if r.get("ok") else "FAILED: " + "; ".join(r.get("problems", []))
        head.append(f"| {r['label']} | {verdict} | {r['wall_seconds']} |")
    skipped = sorted(glob.glob(os.path.join(work, "skipped_*.txt")))
    for p in skipped:
        head.append(f"| {os.path.basename(p)[8:-4]} | skipped: {open(p).read().strip()} | |")
    text = "\n".join(head) + "\n\n" + render(results)
    with open(os.path.join(work, "gpu_check.md"), "w") as f:
        f.write(text)
    print(text)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--tiny", action="store_true")
    b.add_argument("--pairs", type=int, default=192)
    b.add_argument("--prompt-words", type=int, default=64)
    b.add_argument("--answer-words", type=int, default=96)
    b.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("monitor")
    m.add_argument("--run-dir", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--stop", required=True)
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--run-dir", required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--samples", required=True)
    r.add_argument("--json", default=None)
    r.add_argument("--wall", type=float, default=None)
    r.add_argument("--rc", type=int, default=None)
    r.add_argument("--expect-engine", default=None, help="the engine every stage must report, e.g. 'DEEPSPEED zero-3'")
    r.add_argument("--check", default="none", choices=["none", "precision", "vllm", "resume"])
    s = sub.add_parser("summary")
    s.add_argument("--work", required=True)
    a = p.parse_args(argv)
    if a.cmd == "build":
        os.makedirs(a.out, exist_ok=True)
        print(json.dumps(build(a.out, a.tiny, a.pairs, a.prompt_words, a.answer_words, a.seed), indent=1))
    elif a.cmd == "monitor":
        monitor(a.run_dir, a.out, a.stop)
    elif a.cmd == "report":
        report(a.work, a.run_dir, a.label, a.samples, a.json, a.wall, a.rc, a.expect_engine, a.check)
    else:
        results = summary(a.work)
        return 0 if results and all(r.get("ok") for r in results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
