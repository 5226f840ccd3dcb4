"""The atom columns of a leader's data: which columns each leader loss reads
(its declaration's `columns`, `ssapo.leader_losses.needed_columns`), their check in every train and eval dataset
(`check_atom_columns`), and the collator that adds them to each batch.

Only the columns `leader_loss` needs are read, checked and converted: a
column of another name, or an atom's name the loss does not need (a user's
`weight` of strings under `dpo`), is left to trl as any extra column (dropped
with `remove_unused_columns`, else carried and ignored). The needed ones are
checked before anything runs, in every train and eval dataset (also those
given to `evaluate`): a missing column, or one whose values are not numbers
(shift and mass lists of K finite numbers, K one in both and in every row;
weight one finite number), is a ValueError naming the column and the dataset.
A map-style dataset is checked in every row, an IterableDataset on its first.
"""

from __future__ import annotations

from typing import Any

import torch

from ssapo.atoms import COLUMNS as ATOM_COLUMNS
from ssapo.atoms import HOLDS, row_problem, table_problem
from ssapo.atoms import tensors as atom_tensors
from ssapo.leader_losses import needed_columns

PAIR_INDEX = "pair_index"  # ResolvingTrainer: a row's position in the re-solved atoms


class AtomCollator:
    """Wraps trl's preference collator and adds each row's atoms that the
    leader loss needs (`columns`, `needed_columns(loss)`; no other column is read) as
    float32 tensors, in the order of the rows: shift/mass (B, K), weight (B,)
    (`ssapo.atoms.tensors`), and each row's `pair_index` (ResolvingTrainer)
    as an int64 tensor."""

    def __init__(self, inner, columns=ATOM_COLUMNS):
        self.inner = inner
        self.columns = tuple(columns)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        index = [ex[PAIR_INDEX] for ex in examples] if PAIR_INDEX in examples[0] else None
        if index is not None:
            examples = [{k: v for k, v in ex.items() if k != PAIR_INDEX} for ex in examples]
        batch = self.inner(examples)
        batch.update(atom_tensors(examples, self.columns))
        if index is not None:
            batch[PAIR_INDEX] = torch.tensor(index, dtype=torch.int64)
        return batch


def _arrow_rows(ds, columns):
    """`columns` of a datasets.Dataset's rows (after select/filter/shuffle) as one pyarrow Table: a take
    through its indices mapping (datasets' own `with_format("arrow")[:]` is ~100x slower there)."""
    try:
        table = ds.data.table.select(list(columns))
        indices = ds._indices
        return table if indices is None else table.take(indices.column(0))
    except AttributeError:  # a datasets version without these
        return ds.select_columns(list(columns)).with_format("arrow")[:]


def check_atom_columns(what: str, ds, leader_loss: str) -> None:
    """ValueError (one line, naming the dataset and the column) unless every
    row of `ds` holds the atom columns `leader_loss` needs as numbers
    (`needed_columns(leader_loss)`, `ssapo.atoms.HOLDS`): a map-style dataset in every row
    (`ssapo.atoms.table_problem`), any other (an IterableDataset, whose columns
    may be unknown) on its first row (`row_problem`). A dict of datasets
    (DatasetDict, `eval_dataset={...}`) part by part; None and a str (the name
    of an eval dataset the trainer holds, checked already) pass."""
    needed = needed_columns(leader_loss)
    if not needed or ds is None or isinstance(ds, str):
        return
    parts = ds.items() if isinstance(ds, dict) else [(None, ds)]
    for part, d in parts:
        where = what if part is None else f"{what}[{part!r}]"
        names = getattr(d, "column_names", None)
        missing = [c for c in needed if names is not None and c not in names]
        problem, scope = None, "it"
        if not missing:
            from datasets import Dataset

            if isinstance(d, Dataset):
                problem = table_problem(_arrow_rows(d, needed), needed)
            else:
                row = next(iter(d), None)
                problem, scope = (row_problem(row, needed) if row is not None else None), "its first row"
                if problem is not None and problem[0] not in row:
                    missing, problem = [problem[0]], None
        if missing:
            raise ValueError(
                f"{where}: leader_loss={leader_loss!r} needs the column(s) {missing} "
                "(the follower's atoms, see ssapo.follower), or choose leader_loss='dpo'"
            )
        if problem is not None:
            name, holds = problem
            raise ValueError(
                f"{where}: column {name!r} must hold {HOLDS[name]} in each row for leader_loss={leader_loss!r} "
                f"(the follower's atoms, see ssapo.follower); {scope} holds {holds}"
            )
