"""Metrics of the offline benchmark, all against the task's gold reward."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ssapo.atoms import moved_mass


def sample_answers(
    model, tok, prompts: Sequence, n: int, max_new_tokens: int, seed: int, temperature: float = 0.7
) -> List[List[str]]:
    """n sampled answers per prompt (text, end-of-sequence stripped)."""
    from ssapo.generation import generate

    ids = generate(
        model, tok, list(prompts), n, temperature, 1.0, max_new_tokens, batch_size=64, seed=seed, progress=False
    )
    return [
        [tok.decode([t for t in r if t != tok.eos_token_id], skip_special_tokens=True).strip() for r in rs]
        for rs in ids
    ]


def win_rates(gold_a: np.ndarray, gold_b: np.ndarray, len_a: np.ndarray, len_b: np.ndarray) -> Dict[str, float]:
    """Win rate of a over b (ties count half), and a length-controlled win rate
    in the spirit of AlpacaEval 2 LC: a logistic model P(a wins) = σ(w0 + w1·Δlen)
    fitted to the outcomes (ties as half a win), reported at Δlen = 0."""
    y = np.where(gold_a > gold_b, 1.0, np.where(gold_a < gold_b, 0.0, 0.5))
    wr = float(y.mean())
    d = (len_a - len_b).astype(float)
    s = d.std()
    x = d / s if s > 0 else np.zeros_like(d)
    w = np.zeros(2)
    X = np.stack([np.ones_like(x), x], 1)
    for _ in range(50):  # Newton steps on the (ridge-regularised) log-likelihood
        p = 1 / (1 + np.exp(-X @ w))
        g = X.T @ (y - p) - 1e-3 * w
        H = (X * (p * (1 - p))[:, None]).T @ X + 1e-3 * np.eye(2)
        w += np.linalg.solve(H, g)
    return {"win_rate": wr, "lc_win_rate": float(1 / (1 + np.exp(-w[0])))}


def evaluate(
    model, sft_answers: List[List[str]], tok, spec, prompts: List[str], n: int, max_new_tokens: int, seed: int
) -> Dict[str, float]:
    """Gold win rate of `model` against the SFT policy's answers on held-out prompts."""
    from ssapo.bench.task import gold_reward, messages

    ans = sample_answers(model, tok, [messages(p) for p in prompts], n, max_new_tokens, seed)
    ga = np.array([gold_reward(spec, p, a) for p, rs in zip(prompts, ans) for a in rs])
    gb = np.array([gold_reward(spec, p, b) for p, rs in zip(prompts, sft_answers) for b in rs])
    la = np.array([len(a.split()) for rs in ans for a in rs])
    lb = np.array([len(b.split()) for rs in sft_answers for b in rs])
    return {
        **win_rates(ga, gb, la, lb),
        "gold_reward": float(ga.mean()),
        "sft_gold_reward": float(gb.mean()),
        "mean_length": float(la.mean()),
    }


def mislabelled_movement(spec, rows: List[dict], shift: np.ndarray, mass: np.ndarray) -> Dict[str, float]:
    """How often the follower moved pairs (`ssapo.atoms.moved_mass` > 0) the gold reward calls
    mislabelled (gold(chosen) < gold(rejected)) against the rest."""
    from ssapo.bench.task import gold_reward

    text = lambda m: m if isinstance(m, str) else m[-1]["content"]  # noqa: E731
    wrong = np.array(
        [
            gold_reward(spec, text(r["prompt"]), text(r["chosen"]))
            < gold_reward(spec, text(r["prompt"]), text(r["rejected"]))
            for r in rows
        ]
    )
    moved = moved_mass(shift, mass) > 0
    out = {"mislabelled_fraction": float(wrong.mean())}
    out["moved_mislabelled"] = float(moved[wrong].mean()) if wrong.any() else float("nan")
    out["moved_correct"] = float(moved[~wrong].mean()) if (~wrong).any() else float("nan")
    return out


def _text(m) -> str:
    return m if isinstance(m, str) else m[-1]["content"]


def annotation_gold_stats(spec, rows: List[dict]) -> Dict[str, float]:
    """A round's pairs (annotations.jsonl or sera.jsonl rows) against the gold reward, computed
    after the run: accuracy (gold(chosen) > gold(rejected)), gold-tie fraction, accuracy on the
    untied pairs, the flipped fraction and the accuracy of the unflipped pairs (rows with
    `flipped`), the mean word count of chosen and rejected answers."""
    from ssapo.bench.task import gold_reward

    if not rows:
        return {}
    gc = np.array([gold_reward(spec, _text(r["prompt"]), _text(r["chosen"])) for r in rows])
    gr = np.array([gold_reward(spec, _text(r["prompt"]), _text(r["rejected"])) for r in rows])
    right, tie = gc > gr, gc == gr
    out = {
        "pairs": len(rows),
        "accuracy": float(right.mean()),
        "tie_fraction": float(tie.mean()),
        "accuracy_untied": float(right[~tie].mean()) if (~tie).any() else float("nan"),
        "chosen_words": float(np.mean([len(_text(r["chosen"]).split()) for r in rows])),
        "rejected_words": float(np.mean([len(_text(r["rejected"]).split()) for r in rows])),
    }
    if "margin" in rows[0]:
        out["margin_mean"] = float(np.mean([r["margin"] for r in rows]))
    if "flipped" in rows[0]:
        fl = np.array([bool(r["flipped"]) for r in rows])
        out["flipped_fraction"] = float(fl.mean())
        out["accuracy_unflipped"] = float(right[~fl].mean()) if (~fl).any() else float("nan")
    return out


def follower_movement(spec, rows: List[dict], shift: np.ndarray, mass: np.ndarray) -> Dict[str, float]:
    """`mislabelled_movement`, and with a `flipped` column the same for the pairs the
    annotation_flip_rate knob turned around against the rest."""
    out = mislabelled_movement(spec, rows, shift, mass)
    moved = moved_mass(shift, mass) > 0
    if rows and "flipped" in rows[0]:
        fl = np.array([bool(r["flipped"]) for r in rows])
        out["moved_flipped"] = float(moved[fl].mean()) if fl.any() else float("nan")
        out["moved_unflipped"] = float(moved[~fl].mean()) if (~fl).any() else float("nan")
    out["moved"] = float(moved.mean()) if len(rows) else float("nan")
    return out


def param_displacement(path: str, start: str) -> float:
    """‖θ − θ_start‖ / ‖θ_start‖ over every weight of two checkpoints (safetensors)."""
    import os

    from safetensors.numpy import load_file

    a = load_file(os.path.join(path, "model.safetensors"))
    b = load_file(os.path.join(start, "model.safetensors"))
    num = sum(float(np.sum((a[k].astype(np.float64) - b[k].astype(np.float64)) ** 2)) for k in b)
    den = sum(float(np.sum(b[k].astype(np.float64) ** 2)) for k in b)
    return float(np.sqrt(num / den)) if den > 0 else float("nan")
