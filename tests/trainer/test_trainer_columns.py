"""SSAPOTrainer's dataset columns (issue 17, item 8): only the atom columns the
leader loss needs are read and converted (a user's `weight` of strings under
`dpo` is trl's extra column, as in trl); the needed ones are checked before
anything runs, in train and eval datasets, those given to `evaluate` and
iterable ones (on their first row), as one ValueError naming the dataset and
the column; no atom column reaches `model.forward`, in the reference passes
or in any step."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import IterableDataset  # noqa: E402
from test_trainer import BASE, WORDS, config, logged, rows  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from ssapo.atoms import COLUMNS, Atoms  # noqa: E402
from ssapo.leader_columns import PAIR_INDEX  # noqa: E402
from ssapo.resolving import ResolvingTrainer  # noqa: E402
from ssapo.tiny import build_tokenizer, tiny_llama  # noqa: E402
from ssapo.trainer import SSAPOConfig, SSAPOTrainer  # noqa: E402

torch.set_num_threads(1)
ATOMS = lambda i: {"shift": [0.0, 0.1], "mass": [0.7, 0.3]}  # noqa: E731
NOT_FORWARD = {*COLUMNS, PAIR_INDEX}


def trainer(cls, out, train_dataset, eval_dataset=None, ref_model=None, model=None, **kw):
    tok = build_tokenizer(WORDS)
    model = model if model is not None else tiny_llama(tok, hidden_size=32, num_layers=1, seed=0)
    cfg_cls = SSAPOConfig if cls is SSAPOTrainer else DPOConfig
    kw.setdefault("max_steps", 2)
    return cls(
        model,
        ref_model=ref_model,
        args=config(cfg_cls, out, **kw),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tok,
    )


# -- only the columns the loss needs are converted ----------------------------------


@pytest.mark.parametrize("remove_unused_columns", [True, False])
@pytest.mark.parametrize(
    "loss, extra",
    [
        ("dpo", lambda i: {"weight": ["high", "low"][i % 2], "shift": "left", "mass": "kg"}),
        ("weights", lambda i: {"weight": 1.0, "shift": "left", "mass": ["a", "b"]}),  # weight 1: DPO to the bit
        ("shift_prob", lambda i: {"shift": [0.0, 0.0], "mass": [1.0, 0.0], "weight": "heavy"}),  # ε = 0: DPO
    ],
)
def test_a_users_column_named_like_an_atom_is_trls_under_a_loss_that_does_not_need_it(
    tmp_path, loss, extra, remove_unused_columns
):
    ds = rows(extra)
    ours = trainer(SSAPOTrainer, tmp_path / "ours", ds, leader_loss=loss, remove_unused_columns=remove_unused_columns)
    ours.train()
    theirs = trainer(DPOTrainer, tmp_path / "trl", ds, remove_unused_columns=remove_unused_columns)
    theirs.train()
    assert len(logged(ours)) == 2 and logged(ours) == logged(theirs)


# -- the needed columns are checked, once, before anything runs ------------------------


BAD = [
    ("shift_prob", lambda i: {"shift": [0.0, 0.1], "mass": "heavy"}, "mass", "it holds values of type string"),
    ("shift_margin", lambda i: {"shift": ["a", "b"], "mass": [1.0, 0.0]}, "shift", "list<item: string>"),
    ("kept_mass", lambda i: {"shift": [0.0, 0.1], "mass": [1.0, 0.0, 0.0]}, "mass", "not as long as its 'shift'"),
    ("shift_prob", lambda i: {"shift": [0.0] * (1 + i % 2), "mass": [1.0] * (1 + i % 2)}, "shift", "lists of 1 to 2"),
    ("weights", lambda i: {"weight": "high"}, "weight", "it holds values of type string"),
    ("weights", lambda i: {"weight": None if i == 3 else 1.0}, "weight", r"no value \(null\) in 1 row"),
    ("weights", lambda i: {"weight": float("nan") if i == 5 else 1.0}, "weight", "non-finite"),
    ("shift_prob", lambda i: {"shift": [0.0, None], "mass": [1.0, 0.0]}, "shift", "null"),
]


@pytest.mark.parametrize("loss, atoms, column, holds", BAD)
@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
def test_a_needed_column_that_is_not_numbers_is_one_error_naming_it_and_the_dataset(
    tmp_path, loss, atoms, column, holds, which
):
    good = rows(ATOMS if loss != "weights" else lambda i: {"weight": 1.0})
    data = {"train_dataset": good, "eval_dataset": good, which: rows(atoms)}
    with pytest.raises(ValueError, match=f"^{which}: column '{column}' must hold .*leader_loss='{loss}'.*{holds}") as e:
        trainer(SSAPOTrainer, tmp_path, leader_loss=loss, **data)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "ref_logps")  # before trl's reference pass


def test_the_rows_checked_are_the_datasets_own_after_filter_select_or_shuffle(tmp_path):
    ds = rows(lambda i: {"weight": None if i == 3 else 1.0})
    kept = ds.filter(lambda r: r["weight"] is not None).shuffle(seed=0)  # the table underneath still holds the null
    trainer(SSAPOTrainer, tmp_path / "kept", kept, leader_loss="weights")
    with pytest.raises(ValueError, match=r"^train_dataset: column 'weight' .*no value \(null\) in 1 row"):
        trainer(SSAPOTrainer, tmp_path / "bad", ds.select([5, 3]), leader_loss="weights")


def test_evaluate_checks_the_dataset_it_is_given(tmp_path):
    tr = trainer(SSAPOTrainer, tmp_path, rows(ATOMS), leader_loss="shift_prob")
    only_shift = rows(lambda i: {"shift": [0.0, 0.1]})
    with pytest.raises(ValueError, match=r"^eval_dataset: leader_loss='shift_prob' needs the column\(s\) \['mass'\]"):
        tr.evaluate(eval_dataset=only_shift)
    with pytest.raises(ValueError, match=r"^eval_dataset\['held'\]: column 'mass' must hold a list of K numbers"):
        tr.evaluate(eval_dataset={"ok": rows(ATOMS), "held": rows(lambda i: {**ATOMS(i), "mass": "heavy"})})
    metrics = tr.evaluate(eval_dataset=rows(ATOMS))  # a good one evaluates (precomputing its reference first)
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0


def _generator(atoms):
    def gen():
        for i, r in enumerate(BASE * 2):
            yield {**r, **atoms(i)}

    return gen


@pytest.mark.parametrize(
    "atoms, error",
    [
        (lambda i: {"shift": [0.0, 0.1]}, r"^train_dataset: leader_loss='shift_prob' needs the column\(s\) \['mass'\]"),
        (
            lambda i: {**ATOMS(i), "mass": "heavy"},
            r"^train_dataset: column 'mass' must hold a list of K numbers .*its first row holds 'heavy' \(str\)",
        ),
        (lambda i: {**ATOMS(i), "mass": [1.0]}, r"^train_dataset: column 'mass' .*1 numbers beside 2 in 'shift'"),
        (ATOMS, None),
    ],
)
def test_an_iterable_dataset_of_unknown_columns_is_checked_on_its_first_row(tmp_path, atoms, error):
    ds = IterableDataset.from_generator(_generator(atoms))
    assert ds.column_names is None  # nothing to check by name
    ref = tiny_llama(build_tokenizer(WORDS), hidden_size=32, num_layers=1, seed=0)  # trl: no precompute, no path
    kw = dict(leader_loss="shift_prob", precompute_ref_log_probs=False, ref_model=ref)
    if error is not None:
        with pytest.raises(ValueError, match=error):
            trainer(SSAPOTrainer, tmp_path, ds, **kw)
    else:
        tr = trainer(SSAPOTrainer, tmp_path, ds, **kw)
        tr.train()
        assert len(tr.leader_stats["loss_history"]) == 2


def test_a_batch_that_escaped_the_checks_names_the_column(tmp_path):
    tr = trainer(SSAPOTrainer, tmp_path, rows(ATOMS), leader_loss="shift_prob")
    example = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
    with pytest.raises(ValueError, match=r"^mass: every row must hold a list of K numbers; .* holds 'heavy' \(str\)"):
        tr.data_collator([{**example, "shift": [0.0], "mass": "heavy"}])
    batch = tr.data_collator([{**example, **ATOMS(0), "weight": "heavy"}])  # weight: not this loss's
    assert "weight" not in batch and batch["mass"].dtype == torch.float32


# -- no atom column reaches model.forward ---------------------------------------------


def strict(model, seen):
    """`model`'s forward refuses the atom columns (and pair_index), as a model with a strict signature would;
    the kwarg names of every call go to `seen`."""

    def hook(module, args, kwargs):
        seen.append(set(kwargs))
        unknown = NOT_FORWARD & set(kwargs)
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(unknown)}")

    model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("precompute", [True, False])
def test_no_atom_column_reaches_model_forward(tmp_path, precompute):
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=32, num_layers=1, seed=0)
    ref = None if precompute else tiny_llama(tok, hidden_size=32, num_layers=1, seed=0).eval()
    seen = []
    for m in (model, ref):
        if m is not None:
            strict(m, seen)
    tr = trainer(
        SSAPOTrainer,
        tmp_path,
        rows(ATOMS),
        eval_dataset=rows(ATOMS, base=BASE),
        model=model,
        ref_model=ref,
        leader_loss="shift_prob",
        precompute_ref_log_probs=precompute,
        remove_unused_columns=False,
    )
    calls = len(seen)
    tr.evaluate(eval_dataset=rows(ATOMS, base=BASE[:2]))  # evaluate's own reference pass (precompute) and loss
    tr.train()
    tr.evaluate()
    assert len(seen) > calls and (calls > 0) == precompute  # the init's reference pass: train and eval rows


class _Resolver:
    """What ResolvingTrainer needs of ssapo.follower.Resolver: the atoms, `every`, `resolve`, its state."""

    def __init__(self, n):
        self.atoms, self.every, self.steps = Atoms.of_rows([ATOMS(i) | {"weight": 1.0} for i in range(n)]), 1, []

    def resolve(self, step, model=None):
        self.steps.append(step)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("precompute", [True, False])
def test_no_atom_column_nor_pair_index_reaches_forward_while_resolving(tmp_path, precompute):
    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=32, num_layers=1, seed=0)
    ref = None if precompute else tiny_llama(tok, hidden_size=32, num_layers=1, seed=0).eval()
    seen = []
    for m in (model, ref):
        if m is not None:
            strict(m, seen)
    ds = rows(lambda i: {**ATOMS(i), PAIR_INDEX: i})
    args = config(SSAPOConfig, tmp_path, max_steps=2, leader_loss="shift_prob", precompute_ref_log_probs=precompute)
    tr = ResolvingTrainer(
        model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok, resolver=_Resolver(len(ds))
    )
    tr.evaluate(eval_dataset=ds.select(range(4)))  # with precompute: evaluate's own reference pass
    tr.train()
    assert tr.resolver.steps == [1] and len(seen) >= 4
