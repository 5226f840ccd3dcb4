"""dro_core: the exact worst-case Wasserstein follower of SSAPO.

    >>> import numpy as np, dro_core
    >>> res = dro_core.solve(np.array([0.6, 0.7, 0.9]), 0.01)
    >>> abs(res.value - res.dual_value) < 1e-12
    True

`solve` normalises its arguments (arrays, lists, float32, group layouts) and
hands them to the Rust core, which validates the data, releases the GIL, and
solves every group exactly. See the README for the maths.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Tuple

import numpy as np

from ._dro_core import CHUNK, Certificate, Loss, Solution, __version__, _solve

__all__ = ["solve", "Loss", "Solution", "Certificate", "CHUNK", "__version__"]


def _as_1d_float(name: str, a: Any) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name}: cannot be read as an array ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D, got an array of shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: must hold real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _as_labels(groups: Any, n: int) -> np.ndarray:
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise ValueError(f"groups: labels must be 1-D, got an array of shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"groups: labels must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def solve(
    xi: Any,
    eps: float,
    groups: Any = None,
    *,
    loss: Optional[Loss] = None,
    support: Optional[Tuple[float, float]] = None,
    threads: Optional[int] = None,
) -> Solution:
    """Solve the follower exactly: for each group, the worst-case distribution
    of `loss` within a 1-Wasserstein ball of radius `eps` around the group's
    samples, on the support [lo, hi].

    Args:
        xi: 1-D array of real samples (float64; float32, ints and lists are converted once; a complex
            array is refused, never cut to its real part).
        eps: radius of each group's ball, >= 0.
        groups: None for one global ball; an int G for consecutive chunks of G
            samples (the last one smaller, the paper's layout with G = 100); or an
            int array of N non-negative labels, one ball per distinct label
            (ordered by label).
        loss: a `Loss`; default `Loss.neg_log(6)`, the paper's: xi is a preference
            probability and -log is replaced by its 6 tangents at k/6.
        support: (lo, hi), finite, lo <= hi. Default: the loss's natural support
            ([0, 1] for neg_log, [lo, hi] for softplus), else [-max|xi|, max|xi|].
        threads: rayon threads for this call (default: all cores). Results are
            bit-identical whatever the count.

    Returns:
        A `Solution`; `solution.certificate().ok` proves it optimal (primal and
        dual feasibility and equal objectives, recomputed from the atoms).
        Raises ValueError, naming the argument and the first bad index, before
        any work is done; data so large that float64 sums would overflow
        (|xi| near 1e308) is refused, not scaled.
    """
    x = _as_1d_float("xi", xi)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise ValueError(f"eps: must be a real number, got {type(eps).__name__}")
    group_size: Optional[int] = None
    labels: Optional[np.ndarray] = None
    if groups is None:
        pass
    elif isinstance(groups, (bool, np.bool_)) or (
        isinstance(groups, numbers.Number) and not isinstance(groups, (numbers.Integral, np.integer))
    ):
        raise ValueError(
            "groups: must be None (one ball), an int G (chunks of G samples) or a 1-D integer array of "
            f"labels, got {type(groups).__name__} {groups!r}"
        )
    elif isinstance(groups, (numbers.Integral, np.integer)):
        group_size = int(groups)
    else:
        labels = _as_labels(groups, x.shape[0])
    if support is not None:
        try:
            lo, hi = support
            support = (float(lo), float(hi))
        except (TypeError, ValueError):
            raise ValueError(f"support: must be a pair (lo, hi) of numbers, got {support!r}") from None
    if loss is not None and not isinstance(loss, Loss):
        raise ValueError(f"loss: must be a dro_core.Loss, got {type(loss).__name__}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (numbers.Integral, np.integer))):
        raise ValueError(f"threads: must be an int or None, got {type(threads).__name__}")
    return _solve(x, float(eps), group_size, labels, loss, support, None if threads is None else int(threads))
