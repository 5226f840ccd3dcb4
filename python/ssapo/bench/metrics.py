"""Metrics of the offline benchmark, all against the task's gold reward."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def sample_answers(
    model, tok, prompts: Sequence, n: int, max_new_tokens: int, seed: int, temperature: float = 0.7
) -> List[List[str]]:
    """n sampled answers per prompt (text, end-of-sequence stripped)."""
    from ssapo.annotate import generate

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


def mislabelled_movement(spec, rows: List[dict], mass: np.ndarray, loc: np.ndarray, xi: np.ndarray) -> Dict[str, float]:
    """How often the follower moved pairs the gold reward calls mislabelled
    (gold(chosen) < gold(rejected)) against the rest."""
    from ssapo.bench.task import gold_reward

    text = lambda m: m if isinstance(m, str) else m[-1]["content"]  # noqa: E731
    wrong = np.array(
        [
            gold_reward(spec, text(r["prompt"]), text(r["chosen"]))
            < gold_reward(spec, text(r["prompt"]), text(r["rejected"]))
            for r in rows
        ]
    )
    moved = (mass[:, 0] < 1) | (loc[:, 0] != xi)
    out = {"mislabelled_fraction": float(wrong.mean())}
    out["moved_mislabelled"] = float(moved[wrong].mean()) if wrong.any() else float("nan")
    out["moved_correct"] = float(moved[~wrong].mean()) if (~wrong).any() else float("nan")
    return out
