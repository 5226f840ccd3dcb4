"""The statistics of `ssapo bench`, on plain numbers (tested on literal values).

- `parse_seeds("5")` = [0, 1, 2, 3, 4]; `parse_seeds("0,3,7")` = [0, 3, 7];
- `paired_ci(a, b)`: mean of a − b over paired seeds with its 95 % t interval;
- `paired_by_seed(a, b)`: the same on {seed: value} maps, over the seeds both have (a seed where one
  side has no value, e.g. its run failed, drops from that comparison), the seeds used named;
- `headroom_share(x, base, oracle)` = (x − base) / (oracle − base);
- `length_collapsed(lengths, reference)`: answers shrank below half the reference length;
- `pick_by_validation(candidates)`: the candidate with the best mean validation score;
- `seeds_for(sd, half)`: how many paired seeds give a 95 % t interval of half-width ≤ `half` at a
  standard deviation `sd` of the paired differences (`seeds_for(0.05, 0.03)` = 14).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

# two-sided 97.5 % quantiles of Student's t (df 1..30); above 30 the normal's 1.96 is within 2 %
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (df ≥ 1)."""
    if df < 1:
        raise ValueError(f"df: must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def parse_seeds(text) -> List[int]:
    """`--seeds`: a count ("5" → 0..4) or a comma-separated list of seed values ("0,3,7").
    ValueError naming --seeds otherwise (a count ≥ 1; values ≥ 0, no repeats)."""
    s = str(text).strip()
    try:
        if "," not in s:
            n = int(s)
            if n < 1:
                raise ValueError
            return list(range(n))
        seeds = [int(v) for v in s.split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(f"--seeds: give a count (e.g. 5) or seed values (e.g. 0,3,7), got {text!r}") from None
    if not seeds or any(v < 0 for v in seeds):
        raise ValueError(f"--seeds: seed values must be >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: a seed is repeated in {text!r}")
    return seeds


def mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample standard deviation) of the finite values; std 0 for one value; (nan, nan) for none."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    if len(v) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def paired_ci(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Mean of the paired differences a_i − b_i with its 95 % confidence interval
    (paired t: mean ± t_{0.975, n−1}·sd/√n). `significant` is False when the interval
    covers 0, and with fewer than 3 pairs (one pair has no interval; two, with a coarse
    metric, can agree to the last digit and give a zero-width one)."""
    if len(a) != len(b):
        raise ValueError(f"paired_ci: {len(a)} values against {len(b)}; pair them by seed")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "significant": False}
    m, sd = mean_std(d)
    if n < 2:
        return {"n": 1, "mean": m, "lo": float("nan"), "hi": float("nan"), "significant": False}
    half = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = m - half, m + half
    return {"n": n, "mean": m, "lo": lo, "hi": hi, "significant": bool(n >= 3 and (lo > 0 or hi < 0))}


def paired_by_seed(a: Dict[int, float], b: Dict[int, float], seeds: Optional[Sequence[int]] = None) -> Dict:
    """`paired_ci` over the seeds (of `seeds`, default a's in order) that both a and b have a value for;
    the result also names them ("seeds") and the ones dropped ("dropped": in either map but not in both)."""
    order = list(seeds) if seeds is not None else list(a)
    common = [s for s in order if s in a and s in b]
    dropped = [s for s in order if (s in a) != (s in b)]
    r = paired_ci([a[s] for s in common], [b[s] for s in common])
    return {**r, "seeds": common, "dropped": dropped}


def seeds_for(sd: float, half: float, most: int = 10_000) -> Optional[int]:
    """The smallest n ≥ 2 with t_{0.975, n−1}·sd/√n ≤ `half`: the paired seeds a 95 % interval of that
    half-width needs when the paired differences have standard deviation `sd` (None: not finite, or more
    than `most`)."""
    if not (math.isfinite(sd) and math.isfinite(half)) or half <= 0 or sd < 0:
        return None
    for n in range(2, most + 1):
        if t975(n - 1) * sd / math.sqrt(n) <= half:
            return n
    return None


def headroom_share(x: float, base: float, oracle: float) -> float:
    """The share of the headroom oracle − base that x captures: (x − base) / (oracle − base);
    nan when there is no headroom (oracle ≤ base)."""
    h = oracle - base
    if not h > 0:
        return float("nan")
    return (x - base) / h


def length_collapsed(lengths: Sequence[float], reference: float, factor: float = 0.5) -> bool:
    """True when the last mean answer length fell below `factor` × the reference (the SFT
    policy's): a length-controlled win rate means little then."""
    return bool(lengths) and lengths[-1] < factor * reference


def pick_by_validation(candidates: Dict[str, Sequence[float]]) -> Optional[str]:
    """The key whose validation scores (over seeds) have the highest mean (the first such key on ties)."""
    best, best_v = None, -math.inf
    for k, v in candidates.items():
        m, _ = mean_std(v)
        if math.isfinite(m) and m > best_v:
            best, best_v = k, m
    return best
