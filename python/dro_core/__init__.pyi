"""dro_core: the exact worst-case Wasserstein follower of SSAPO.

For each group of samples xi_i, `solve` finds the worst-case distribution of a
continuous piecewise-linear loss within a 1-Wasserstein ball of radius eps
around the group's empirical distribution, on a bounded support [lo, hi]. The
problem is a linear program with one coupling constraint per group; it is
solved exactly (per-sample concave hulls and a fractional knapsack per group)
and returns its own dual certificate (`Solution.dual_gap`).
"""

from typing import Any, Final, Optional, Sequence, Tuple, final

import numpy as np
import numpy.typing as npt

__all__ = ["solve", "Loss", "Solution", "Certificate", "CHUNK", "__version__"]

__version__: Final[str]
"""The version of the compiled core (the crate's version)."""
CHUNK: Final[int]
"""Samples per unit of parallel work. Every sum over samples runs within chunks
of this size and then over chunks in order, so results are bit-identical at
any thread count."""

@final
class Loss:
    """A continuous piecewise-linear loss l(z), with an optional natural support.

    Build one with a static method: `neg_log` (the paper's default), `softplus`
    (margin space), `max_affine` (any convex one) or `interpolate` (any
    continuous one, convex or not). Invalid arguments raise ValueError whose
    message starts with the argument's name (`k`, `lo`, `hi`, `slopes`,
    `intercepts`, `x`, `y`) and names the first bad index.
    """

    @staticmethod
    def neg_log(k: Optional[int] = None) -> "Loss":
        """The paper's default: -log xi replaced by its k tangents at j/k,
        j = 1..k (k = 6 when None); xi is a preference probability; natural support [0, 1]."""
    @staticmethod
    def softplus(k: int, lo: float, hi: float) -> "Loss":
        """softplus(-z), the DPO loss of a margin z, replaced by k tangents spread
        evenly over [lo, hi] (ends included for k >= 2); natural support [lo, hi]."""
    @staticmethod
    def max_affine(slopes: Sequence[float], intercepts: Sequence[float]) -> "Loss":
        """The convex loss max_k slopes[k] * z + intercepts[k]; no natural support."""
    @staticmethod
    def interpolate(x: Sequence[float], y: Sequence[float]) -> "Loss":
        """Linear interpolation through (x[j], y[j]), x strictly increasing,
        extended linearly beyond the end knots; convex or not; no natural support."""
    @property
    def natural_support(self) -> Optional[Tuple[float, float]]:
        """The support the loss was built for, or None."""
    @property
    def is_convex(self) -> bool:
        """Whether the loss is convex."""
    def __call__(self, z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The loss at each point of a 1-D float64 array."""
    def slope(self, z: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The right derivative of the loss at each point of a 1-D float64 array."""
    def candidates(self, lo: float, hi: float) -> list[Tuple[float, float]]:
        """(location, loss) of the points where a worst case may put mass on
        [lo, hi]: the ends and the concave kinks inside."""

@final
class Solution:
    """The exact worst case of every group and its dual certificate.

    Per-group arrays have one entry per group (ordered by label); per-sample
    arrays have N rows in the order of the input. Each sample's mass sits on at
    most two atoms (an optimal vertex splits at most one sample per group); a
    one-atom row repeats its location with mass 0 in the second column.
    """

    @property
    def value(self) -> float:
        """Worst-case expected loss averaged over all N samples: sum_g n_g/N * V_g."""
    @property
    def empirical_value(self) -> float:
        """Mean loss at the data."""
    @property
    def dual_value(self) -> float:
        """The dual objective; equals `value` up to rounding."""
    @property
    def dual_gap(self) -> float:
        """|value - dual_value|."""
    @property
    def group_values(self) -> npt.NDArray[np.float64]:
        """Worst-case value of each group."""
    @property
    def group_empirical_values(self) -> npt.NDArray[np.float64]:
        """Empirical value of each group."""
    @property
    def group_dual_values(self) -> npt.NDArray[np.float64]:
        """Dual value of each group."""
    @property
    def lam(self) -> npt.NDArray[np.float64]:
        """Optimal multiplier of each group's budget (0 if the budget is not used up)."""
    @property
    def budget_used(self) -> npt.NDArray[np.float64]:
        """Mean transport of each group (<= eps)."""
    @property
    def group_sizes(self) -> npt.NDArray[np.int64]:
        """Number of samples in each group."""
    @property
    def group_labels(self) -> npt.NDArray[np.int64]:
        """The label of each group (0, 1, ... for one ball or chunks)."""
    @property
    def group_index(self) -> npt.NDArray[np.int64]:
        """Group index (into the per-group arrays) of each sample."""
    @property
    def loc(self) -> npt.NDArray[np.float64]:
        """Atom locations, (N, 2); a one-atom row repeats its location."""
    @property
    def mass(self) -> npt.NDArray[np.float64]:
        """Atom masses, (N, 2); rows sum to 1."""
    @property
    def shift(self) -> npt.NDArray[np.float64]:
        """xi[:, None] - loc, (N, 2): what the leader subtracts."""
    @property
    def weights(self) -> npt.NDArray[np.float64]:
        """Gradient-matching weights sum_j mass_ij l'(loc_ij) / l'(xi_i) (1 where l'(xi_i) = 0)."""
    @property
    def support(self) -> Tuple[float, float]:
        """The support used."""
    @property
    def eps(self) -> float:
        """The radius used."""
    def certificate(self, rel: float = 1e-9) -> "Certificate":
        """The optimality proof, recomputed from the atoms, the data and the
        loss: primal feasibility (transport <= eps in every group, atoms inside
        the support, masses >= 0 summing to 1), dual feasibility (lam >= 0) and
        equal primal and dual values, at relative tolerance `rel`.
        `assert sol.certificate().ok` checks it in one line."""

@final
class Certificate:
    """The proof that a Solution is optimal; each measure is 0 for a perfect
    answer and `ok` holds them to their tolerances. A zero dual gap alone is
    no proof: the dual value at some lam can equal the value of an infeasible
    primal; feasibility is what makes the equality a proof (weak duality)."""

    @property
    def ok(self) -> bool:
        """Whether primal feasibility, dual feasibility and equal objectives all hold."""
    @property
    def failures(self) -> list[str]:
        """The names of the failing checks (empty when ok)."""
    @property
    def budget_excess(self) -> float:
        """max over groups of (mean transport - eps)+, recomputed from the atoms."""
    @property
    def support_violation(self) -> float:
        """Largest distance of an atom outside the support."""
    @property
    def negative_mass(self) -> float:
        """The most negative mass, as a positive number."""
    @property
    def mass_sum_error(self) -> float:
        """max_i |sum_j mass_ij - 1|."""
    @property
    def negative_lam(self) -> float:
        """max over groups of (-lam)+."""
    @property
    def gap(self) -> float:
        """max over groups of |primal - dual|, both recomputed."""
    @property
    def slackness(self) -> float:
        """max over groups of lam * (eps - transport)+ (complementary slackness)."""
    @property
    def value_mismatch(self) -> float:
        """max over groups of |reported value - recomputed primal value|."""
    @property
    def budget_mismatch(self) -> float:
        """max over groups of |reported budget_used - recomputed transport|."""
    @property
    def tol_value(self) -> float:
        """Tolerance of the value checks (rel * the largest |loss| met)."""
    @property
    def tol_transport(self) -> float:
        """Tolerance of the transport and support checks (rel * max(1, |lo|, |hi|))."""
    @property
    def tol_mass(self) -> float:
        """Tolerance of the mass checks (rel)."""

def solve(
    xi: Any,
    eps: float,
    groups: Any = None,
    *,
    loss: Optional[Loss] = None,
    support: Optional[Tuple[float, float]] = None,
    threads: Optional[int] = None,
) -> Solution:
    """Solve the follower exactly for every group.

    xi: 1-D samples; eps: radius >= 0; groups: None (one ball), an int G
    (consecutive chunks of G, the last smaller) or an int array of N labels;
    loss: default Loss.neg_log(6); support: (lo, hi), default from the loss or
    [-max|xi|, max|xi|]; threads: rayon threads (default all cores).
    Raises ValueError naming the argument and the first bad index.
    """
