"""The pluggable annotator (`annotator: module:factory`) and the annotation flip knob."""

import json
import sys
import types

import pytest

from ssapo.annotate import annotate_rows
from ssapo.annotators import flip_pairs, load_annotator, text_scorer
from ssapo.config import load_config
from ssapo.tiny import build_tokenizer


def _rows(n):
    return [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "chosen_reward": 2.0 * i, "rejected_reward": -1.0}
        | {"margin": 2.0 * i + 1, "chosen_index": 0, "rejected_index": 1}
        for i in range(n)
    ]


@pytest.mark.parametrize("n,rate", [(10, 0.3), (7, 0.5), (64, 0.25), (5, 0.0), (5, 1.0), (0, 0.5)])
def test_flip_turns_exactly_round_rn_pairs_around(n, rate):
    rows = _rows(n)
    out = flip_pairs(rows, rate, (42, 1))
    flipped = [r for r in out if r["flipped"]]
    assert len(out) == n and len(flipped) == round(rate * n)
    for a, b in zip(rows, out):
        if b["flipped"]:
            assert (b["chosen"], b["rejected"]) == (a["rejected"], a["chosen"])
            assert (b["chosen_reward"], b["rejected_reward"]) == (a["rejected_reward"], a["chosen_reward"])
            assert (b["chosen_index"], b["rejected_index"]) == (1, 0) and b["margin"] == -a["margin"]
        else:
            assert {k: v for k, v in b.items() if k != "flipped"} == a
    assert rows == _rows(n)  # the input is not changed


def test_flip_is_seeded_by_seed_and_round():
    rows = _rows(200)

    def picks(seed):
        return [i for i, r in enumerate(flip_pairs(rows, 0.2, seed)) if r["flipped"]]

    assert picks((42, 1)) == picks((42, 1))
    assert picks((42, 1)) != picks((42, 2)) and picks((42, 1)) != picks((43, 1))
    with pytest.raises(ValueError, match="^annotation_flip_rate:"):
        flip_pairs(rows, 1.5, (0, 1))


def test_the_flip_rate_and_the_annotator_are_checked_by_the_config():
    with pytest.raises(ValueError, match="^annotation_flip_rate:"):
        load_config("tiny", overrides={"annotation_flip_rate": "-0.1"})
    with pytest.raises(ValueError, match="^annotator:"):
        load_config("tiny", overrides={"annotator": "not a spec"})
    c = load_config("tiny", overrides={"annotator": "my_pkg.judges:make", "annotator_args": "/x.json"})
    assert (c.annotator, c.annotator_args) == ("my_pkg.judges:make", "/x.json")


@pytest.fixture
def literal_judge(monkeypatch):
    """An importable module `literal_judge` whose factory reads {response text: reward} from its argument."""
    mod = types.ModuleType("literal_judge")
    mod.calls = []

    def make(args):
        table = json.loads(args)

        def score(prompts, responses):
            mod.calls.append((list(prompts), [list(r) for r in responses]))
            return [[table[r] for r in rs] for rs in responses]

        return score

    mod.make = make
    monkeypatch.setitem(sys.modules, "literal_judge", mod)
    return mod


def test_an_annotator_with_literal_rewards_picks_its_pairs(literal_judge):
    tok = build_tokenizer(["a", "b", "c", "d"])
    a, b, c, d = (tok.convert_tokens_to_ids(w) for w in "abcd")
    eos = tok.eos_token_id
    cfg = load_config(
        "tiny",
        overrides={"annotator": "literal_judge:make", "annotator_args": json.dumps({"a": 1, "b": 4, "c": 4, "d": -2})},
    )
    fn = load_annotator(cfg)
    prompts = ["x y", [{"role": "user", "content": "x"}], "x y"]  # two equal prompts stay two prompts
    responses = [
        [[a, eos], [b, eos], [c, eos], [d, eos], [a, eos]],  # best tied (b, c) -> b; worst d
        [[c, eos], [c, eos]],  # all tied: dropped
        [[d, eos], [a, eos]],
    ]
    rows, st = annotate_rows(
        None, None, tok, prompts, n=5, responses=responses, scorer=text_scorer(fn, tok, [eos]), progress=False
    )
    # one call per batch, every prompt's distinct responses as decoded text
    assert literal_judge.calls == [(prompts, [["a", "b", "c", "d"], ["c"], ["d", "a"]])]
    assert [(r["index"], r["chosen"], r["rejected"], r["margin"]) for r in rows] == [
        (0, "b", "d", 6.0),
        (2, "a", "d", 3.0),
    ]
    assert (rows[0]["chosen_index"], rows[0]["rejected_index"]) == (1, 3) and st["dropped_all_tied"] == 1
    assert load_annotator(load_config("tiny")) is None  # implicit: the implicit reward


def test_a_bad_annotator_is_named():
    for spec, msg in (("no_such_module_xyz:make", "cannot import"), ("json:no_such_factory", "no attribute")):
        with pytest.raises(ValueError, match=f"^annotator: .*{msg}"):
            load_annotator(load_config("tiny", overrides={"annotator": spec}))
    tok = build_tokenizer(["a"])
    score = text_scorer(lambda p, r: [[1.0]], tok)  # one reward for two responses
    with pytest.raises(ValueError, match="^annotator: returned"):
        score(["p", "p"], [[5], [6]])
