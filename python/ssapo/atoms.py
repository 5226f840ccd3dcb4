"""The follower's atoms: what the follower returns per pair and the leader trains on (docs/METHOD.md §2.8).

    atoms, diag = ssapo.follower.follow(margins, cfg)     # -> Atoms
    rows = atoms.attach(rows)                              # each row gets its own shift, mass, weight
    batch.update(tensors(examples))                        # the collator: float32 tensors of the atom columns

Pair i's worst case puts mass[i, j] on the location loc[i, j] (j < K, K = 2
for dro_core's solutions); shift[i, j] = xi[i] − loc[i, j] is how far the
follower moved the self-label's confidence. `weight[i]` is the scalar
gradient-matching weight of the `weights` leader. With ε = 0 every shift is 0
and every mass (1, 0, ...): every leader loss is then exactly DPO.

The names here are the only spelling of the atoms: the dataset columns the
trainer reads (`COLUMNS`), follower.npz's arrays and the rows' keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

SHIFT, MASS, WEIGHT = "shift", "mass", "weight"
COLUMNS = (SHIFT, MASS, WEIGHT)  # per-pair training columns: shift (K floats), mass (K floats), weight (float)


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

    def update(self, other: "Atoms") -> None:
        """Takes `other`'s atoms in place (the re-solve hook: the collator holds this object)."""
        if len(other) != len(self):
            raise ValueError(f"atoms: {len(other)} new atoms for {len(self)} pairs")
        self.shift, self.mass, self.weight = other.shift, other.mass, other.weight
        self.xi, self.loc, self.group = other.xi, other.loc, other.group


def tensors(examples: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The atom columns the examples carry, as float32 tensors in the examples' order: shift/mass (B, K), weight (B,)."""
    import torch

    return {
        key: torch.tensor([ex[key] for ex in examples], dtype=torch.float32) for key in COLUMNS if key in examples[0]
    }
