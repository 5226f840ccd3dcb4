"""`ssapo export`: a trained model's answers in the formats of AlpacaEval 2
and MT-Bench, for users who have those judges.

    ssapo export --model runs/tiny/round_3/model --prompts questions.jsonl --format alpaca_eval --output answers.json
    ssapo export --model runs/llama3/round_2/model --prompts mt_bench_question.jsonl --format mt_bench --output answers.jsonl

Input prompts (.jsonl): AlpacaEval rows ({"instruction": ...}, optional "dataset"),
MT-Bench questions ({"question_id": ..., "turns": [...]}, every turn answered in
order with the previous answers in context) or {"prompt": str or chat messages}.
Output: alpaca_eval — a JSON list of {instruction, output, generator, dataset};
mt_bench — JSON lines of {question_id, answer_id, model_id, choices: [{index: 0,
turns: [...]}], tstamp}. Greedy decoding by default; written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

DOC = __doc__


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a model's answers for AlpacaEval 2 / MT-Bench",
        description=DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--prompts", required=True, help=".jsonl of instructions / questions / prompts")
    p.add_argument("--format", required=True, choices=["alpaca_eval", "mt_bench"])
    p.add_argument("--output", required=True, help="output file")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--name", default=None, help="generator / model_id (default: the model directory's name)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=run)


def _turns(row) -> list:
    if "turns" in row:
        return list(row["turns"])
    if "instruction" in row:
        return [row["instruction"]]
    if "prompt" in row:
        p = row["prompt"]
        return [p] if isinstance(p, str) else [m["content"] for m in p if m["role"] == "user"]
    raise ValueError("--prompts: a row has none of 'instruction', 'turns', 'prompt'")


def answer(model, tok, turns, max_new_tokens: int, temperature: float) -> list:
    """Answers the user turns in order, each with the conversation so far."""
    import torch

    msgs, out = [], []
    for turn in turns:
        msgs.append({"role": "user", "content": turn})
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        if temperature > 0:
            kw["temperature"] = temperature
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        text = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        out.append(text)
        msgs.append({"role": "assistant", "content": text})
    return out


def run(args) -> int:
    from ssapo.io import atomic_write, read_jsonl
    from ssapo.loading import load_checkpoint

    try:
        if not os.path.exists(args.prompts):
            raise ValueError(f"--prompts: no such file: {args.prompts}")
        rows = read_jsonl(args.prompts)
        if not rows:
            raise ValueError(f"--prompts: {args.prompts} holds no rows")
        turns = [_turns(r) for r in rows]
    except (ValueError, json.JSONDecodeError) as e:
        print(f"ssapo export: error: {e}", file=sys.stderr)
        return 2
    model, tok = load_checkpoint(args.model, trust_remote_code=args.trust_remote_code)
    model.eval()
    name = args.name or os.path.basename(os.path.normpath(args.model))
    answers = [answer(model, tok, t, args.max_new_tokens, args.temperature) for t in turns]
    if args.format == "alpaca_eval":
        doc = [
            {"instruction": t[0], "output": a[0], "generator": name, "dataset": r.get("dataset", "ssapo")}
            for r, t, a in zip(rows, turns, answers)
        ]
        atomic_write(args.output, lambda tmp: json.dump(doc, open(tmp, "w"), indent=2))
    else:
        lines = [
            json.dumps(
                {
                    "question_id": r.get("question_id", i),
                    "answer_id": uuid.uuid4().hex,
                    "model_id": name,
                    "choices": [{"index": 0, "turns": a}],
                    "tstamp": time.time(),
                }
            )
            for i, (r, a) in enumerate(zip(rows, answers))
        ]
        atomic_write(args.output, lambda tmp: open(tmp, "w").write("\n".join(lines) + "\n"))
    print(f"ssapo export: {len(rows)} answers -> {args.output}")
    return 0
