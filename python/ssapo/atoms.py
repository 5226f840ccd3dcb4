"""The follower's atoms: what the follower returns per pair and the leader trains on (docs/METHOD.md §2.8).

    atoms, diag = ssapo.follower.follow(margins, cfg)     # -> Atoms
    rows = atoms.attach(rows)                              # each row gets its own shift, mass, weight
    batch.update(tensors(examples, (SHIFT, MASS)))         # the collator: float32 tensors of the columns a loss needs

Pair i's worst case puts mass[i, j] on the location loc[i, j] (j < K, K = 2
for dro_core's solutions); shift[i, j] = xi[i] − loc[i, j] is how far the
follower moved the self-label's confidence. `weight[i]` is the scalar
gradient-matching weight of the `weights` leader. With ε = 0 every shift is 0
and every mass (1, 0, ...): every leader loss is then exactly DPO.

The names here are the only spelling of the atoms: the dataset columns the
trainer reads (`COLUMNS`), follower.npz's arrays and the rows' keys. What a
row must hold in them is checked here too (`table_problem` over every row of a
table, `row_problem` on one row): shift and mass lists of K finite numbers, K
the same in both and in every row, weight one finite number.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

SHIFT, MASS, WEIGHT = "shift", "mass", "weight"
COLUMNS = (SHIFT, MASS, WEIGHT)  # per-pair training columns: shift (K floats), mass (K floats), weight (float)
LISTS = (SHIFT, MASS)  # the columns of K numbers per row; WEIGHT is one number per row
HOLDS = {SHIFT: "a list of K numbers", MASS: "a list of K numbers", WEIGHT: "one number"}  # per row


@dataclass
class Atoms:
    """Per-pair atoms of N pairs: shift, mass (N, K), weight (N,); the follower
    also fills xi (N,), loc (N, K) and group (N,), which no leader reads."""

    shift: np.ndarray
    mass: np.ndarray
    weight: np.ndarray
    xi: Optional[np.ndarray] = None
    loc: Optional[np.ndarray] = None
    group: Optional[np.ndarray] = None

    def __post_init__(self):
        self.shift = np.asarray(self.shift, dtype=np.float64)
        self.mass = np.asarray(self.mass, dtype=np.float64)
        self.weight = np.asarray(self.weight, dtype=np.float64)
        if self.shift.shape != self.mass.shape or self.shift.ndim != 2 or self.weight.shape != self.shift.shape[:1]:
            raise ValueError(
                f"atoms: shift {self.shift.shape} and mass {self.mass.shape} must be (N, K) and weight "
                f"{self.weight.shape} (N,)"
            )

    def __len__(self) -> int:
        return len(self.weight)

    @classmethod
    def identity(cls, n: int, k: int = 2) -> "Atoms":
        """The ε = 0 atoms: shift 0, mass (1, 0, ...), weight 1 (every leader loss is DPO)."""
        mass = np.zeros((n, k))
        mass[:, 0] = 1.0
        return cls(np.zeros((n, k)), mass, np.ones(n))

    @classmethod
    def of(cls, arrays: Mapping[str, Any]) -> "Atoms":
        """From a mapping of arrays (follower.npz as `follower.load` reads it, or a dict)."""
        extra = {f.name: arrays[f.name] for f in fields(cls) if f.name not in COLUMNS and f.name in arrays}
        return cls(arrays[SHIFT], arrays[MASS], arrays[WEIGHT], **extra)

    @classmethod
    def of_rows(cls, rows: Sequence[Mapping[str, Any]]) -> "Atoms":
        """From rows that carry the atom columns (what `attach` wrote)."""
        return cls([r[SHIFT] for r in rows], [r[MASS] for r in rows], [r[WEIGHT] for r in rows])

    def arrays(self) -> Dict[str, np.ndarray]:
        """Every array that is set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def row(self, i: int) -> Dict[str, Any]:
        """Pair i's training columns: shift and mass as lists of K floats, weight a float."""
        return {
            SHIFT: [float(v) for v in self.shift[i]],
            MASS: [float(v) for v in self.mass[i]],
            WEIGHT: float(self.weight[i]),
        }

    def attach(self, rows: Sequence[dict]) -> List[dict]:
        """Copies of `rows` (in the follower's order), each with its own pair's atoms."""
        if len(rows) != len(self):
            raise ValueError(f"rows: {len(rows)} rows for {len(self)} follower atoms")
        return [{**r, **self.row(i)} for i, r in enumerate(rows)]

    def moved_mass(self) -> np.ndarray:
        """Each pair's moved mass (`moved_mass`), shape (N,)."""
        return moved_mass(self.shift, self.mass)

    def update(self, other: "Atoms") -> None:
        """Takes `other`'s atoms in place (the re-solve hook: the collator holds this object)."""
        if len(other) != len(self):
            raise ValueError(f"atoms: {len(other)} new atoms for {len(self)} pairs")
        self.shift, self.mass, self.weight = other.shift, other.mass, other.weight
        self.xi, self.loc, self.group = other.xi, other.loc, other.group


def moved_mass(shift, mass) -> np.ndarray:
    """The mass the follower moved off each pair's self-label confidence, m_i = Σ_j mass_ij·[shift_ij ≠ 0]
    (shift = ξ − loc, so an atom moved exactly when its location is not ξ), shape (N,), unclamped. The one
    definition every reader of a solution uses: the follower's diagnostics, the benchmark's movement
    columns and `ssapo.bench.detect`; `ssapo.losses.moved_mass` is the same sum on the trainer's tensors
    (clamped to [0, 1] for the leader losses). A pair is moved when m_i > 0."""
    shift, mass = np.asarray(shift, dtype=np.float64), np.asarray(mass, dtype=np.float64)
    return np.where(shift != 0, mass, 0.0).sum(axis=1)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _shown(v) -> str:
    text = repr(v)
    return f"{text[:60]}..." if len(text) > 63 else text


def row_problem(row: Mapping[str, Any], columns: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(column, what the row holds there) for the first of `columns` that
    `row` lacks ("nothing") or whose value `tensors` would not take as
    `HOLDS[column]` (strings, None, nested lists, non-finite numbers, shift and
    mass of different K); None when all are fine."""
    k = {}
    for name in columns:
        if name not in row:
            return name, "nothing (no such key)"
        v = row[name]
        if name in LISTS:
            items = v.tolist() if isinstance(v, np.ndarray) else v
            if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
                return name, f"{_shown(v)} ({type(v).__name__})"
            bad = [x for x in items if not _number(x)]
            if bad:
                return name, f"{_shown(v)} ({_shown(bad[0])} is not a finite number)"
            k[name] = len(items)
        elif not _number(v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v):
            return name, f"{_shown(v)} ({type(v).__name__}{', not finite' if isinstance(v, float) else ''})"
    if len(k) == 2 and k[SHIFT] != k[MASS]:
        return MASS, f"{k[MASS]} numbers beside {k[SHIFT]} in {SHIFT!r} (shift and mass need one K)"
    return None


def table_problem(table, columns: Sequence[str]) -> Optional[Tuple[str, str]]:
    """`row_problem` over every row of a pyarrow Table holding `columns`: the
    column's type (numbers, lists of numbers for shift/mass), no nulls, finite
    values, and one K for shift and mass in every row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def numeric(t) -> bool:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)

    lengths = {}
    for name in columns:
        col = table.column(name)
        t = col.type
        is_list = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        if name in LISTS and not (is_list and numeric(t.value_type)):
            return name, f"values of type {t}"
        if name not in LISTS and not numeric(t):
            return name, f"values of type {t}"
        if col.null_count:
            return name, f"no value (null) in {col.null_count} row(s)"
        values = pc.list_flatten(col) if is_list else col
        if values.null_count:
            return name, f"{values.null_count} null(s) inside its lists"
        if pa.types.is_floating(values.type) and len(values) and not pc.all(pc.is_finite(values)).as_py():
            return name, "non-finite numbers (nan or inf)"
        if is_list:
            n = pc.list_value_length(col)
            if len(n) and pc.min(n).as_py() == 0:
                return name, "an empty list in some row"
            lengths[name] = n
    if len(lengths) == 2 and len(table) and not pc.all(pc.equal(lengths[SHIFT], lengths[MASS])).as_py():
        return MASS, f"in some row a list not as long as its {SHIFT!r} list (shift and mass need one K)"
    for name, n in lengths.items():
        if len(n) and pc.min(n).as_py() != pc.max(n).as_py():
            return name, f"lists of {pc.min(n).as_py()} to {pc.max(n).as_py()} numbers (one K for every row)"
    return None


def tensors(examples: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> Dict[str, Any]:
    """`columns` of the examples as float32 tensors in the examples' order:
    shift/mass (B, K), weight (B,); only these (a row's other columns, even one
    named like an atom, are not read). ValueError naming the column if a row
    lacks one or holds something else (`row_problem`)."""
    import torch

    out = {}
    for key in columns:
        try:
            out[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            problem = next((p for p in (row_problem(ex, (key,)) for ex in examples) if p is not None), None)
            raise ValueError(
                f"{key}: every row must hold {HOLDS[key]}; a batch's row holds {problem[1] if problem else e}"
            ) from e
    return out
