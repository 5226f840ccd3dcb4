"""Self-annotation: best/worst picking, tie counting, scoring once, seeded
generation that does not depend on how prompts are shared between processes."""

import pytest
import torch

from ssapo.annotate import annotate, annotate_rows, generate, pick_pairs, sequence_logps, use_vllm
from ssapo.tiny import build_tokenizer, tiny_llama

WORDS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer(WORDS)
    return tiny_llama(tok, hidden_size=32, num_layers=1, seed=0).eval(), tok


def test_pick_pairs_ranks_and_counts_ties():
    pairs, st = pick_pairs([[0.1, 0.5, 0.5, -1.0], [2.0, 2.0], [0.0, 1.0, -3.0, -3.0], [3.0, 1.0]])
    # best: lowest index among the maxima; worst: highest index among the minima
    assert pairs == [(1, 3), None, (1, 3), (0, 1)]
    assert st == {"tied_best": 1, "tied_worst": 1, "dropped_all_tied": 1}


def test_annotate_with_a_hand_made_scorer(tiny):
    _, tok = tiny
    a, b, c, d = (tok.convert_tokens_to_ids(w) for w in "abcd")
    eos = tok.eos_token_id
    reward = {(a, eos): 1.0, (b, eos): 3.0, (c, eos): 3.0, (d, eos): -2.0, (a, b, eos): -2.0}
    calls = []

    def scorer(prompts, responses):
        calls.append(len(responses))
        return [reward[tuple(r)] for r in responses]

    prompts = [[{"role": "user", "content": "a b"}], [{"role": "user", "content": "c"}], "d e"]
    responses = [
        [[a, eos], [b, eos], [c, eos], [d, eos], [a, b, eos]],  # best tied (b, c) -> b; worst tied (d, ab) -> ab
        [[a, eos], [a, eos]],  # identical samples: scored once, all tied -> dropped
        [[d, eos], [b, eos]],  # a plain-string prompt
    ]
    ds, st = annotate_rows(None, None, tok, prompts, n=5, responses=responses, scorer=scorer, batch_size=2,
                           progress=False)  # rows: string and chat prompts do not mix in one arrow column
    assert calls == [6, 2]  # per chunk of 2 prompts, every distinct (prompt, response) once
    assert len(ds) == 2 and st["pairs"] == 2 and st["prompts"] == 3
    assert st["dropped_all_tied"] == 1 and st["tied_best"] == 1 and st["tied_worst"] == 1
    assert st["distinct_responses"] == 8 and st["responses"] == 9
    r0, r1 = ds[0], ds[1]
    assert r0["chosen"] == [{"role": "assistant", "content": "b"}]
    assert r0["rejected"] == [{"role": "assistant", "content": "a b"}]
    assert (r0["chosen_reward"], r0["rejected_reward"], r0["margin"]) == (3.0, -2.0, 5.0)
    assert (r0["chosen_index"], r0["rejected_index"]) == (1, 4)
    assert r1["prompt"] == "d e" and r1["chosen"] == "b" and r1["rejected"] == "d" and r1["margin"] == 5.0
    assert [r["index"] for r in ds] == [0, 2]
    dset, st2 = annotate(None, None, tok, prompts[:2], n=5, responses=responses[:2], scorer=scorer, progress=False)
    assert set(dset.column_names) >= {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"}
    assert dset[0]["chosen_reward"] == 3.0 and st2["dropped_fraction"] == 0.5 and st2["margin_mean"] == 5.0


def test_policy_equal_to_reference_ties_everything(tiny):
    model, tok = tiny
    prompts = [[{"role": "user", "content": "a b c"}]] * 3
    ds, st = annotate(model, model, tok, prompts, n=3, max_new_tokens=4, batch_size=2, seed=1, progress=False,
                      backend="transformers")
    assert len(ds) == 0 and st["dropped_all_tied"] == 3  # r ≡ 0: no pair, counted


def test_sequence_logps_do_not_depend_on_padding(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "a b c d e"}]]
    responses = [[5, 6, eos], [7, eos]]
    together = sequence_logps(model, tok, prompts, responses, batch_size=2)
    alone = torch.cat([sequence_logps(model, tok, [p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    with torch.no_grad():  # literal check of one sum
        ids = tok.apply_chat_template(prompts[1], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        full = torch.tensor([ids + responses[1]])
        lp = torch.log_softmax(model(full).logits[0, :-1].double(), -1)
        want = sum(lp[len(ids) - 1 + j, t] for j, t in enumerate(responses[1]))
    assert abs(float(alone[1]) - float(want)) < 1e-4


def test_generation_is_seeded_and_independent_of_the_process_split(tiny):
    model, tok = tiny
    other = tiny_llama(tok, hidden_size=32, num_layers=1, seed=1).eval()
    prompts = [[{"role": "user", "content": w}] for w in ["a", "b c", "d", "e a", "b"]]
    kw = dict(n=3, max_new_tokens=5, batch_size=2, seed=7, progress=False, backend="transformers")
    one, st1 = annotate_rows(model, other, tok, prompts, **kw)
    again, _ = annotate_rows(model, other, tok, prompts, **kw)
    assert one == again
    parts = [annotate_rows(model, other, tok, prompts, rank=r, world=2, **kw) for r in (0, 1)]
    merged = sorted(parts[0][0] + parts[1][0], key=lambda r: r["index"])
    assert merged == one
    assert parts[0][1]["prompts"] + parts[1][1]["prompts"] == st1["prompts"] == 5
    assert generate(model, tok, prompts, 3, 0.7, 1.0, 5, batch_size=2, seed=7, progress=False) != \
        generate(model, tok, prompts, 3, 0.7, 1.0, 5, batch_size=2, seed=8, progress=False)


def test_settings_come_from_the_config(tiny):
    from ssapo.config import load_config

    model, tok = tiny
    cfg = load_config("tiny", overrides={"num_samples": 3, "max_new_tokens": 2, "generation_batch_size": 4})
    rows, st = annotate_rows(model, tiny_llama(tok, hidden_size=32, num_layers=1, seed=2), tok,
                             [[{"role": "user", "content": "a"}]] * 2, cfg, progress=False)
    assert st["responses"] == 6 and st["response_tokens"] <= 12
    with pytest.raises(ValueError, match="^num_samples: "):
        annotate_rows(model, model, tok, ["a"], n=1)


def test_vllm_backend_needs_vllm():
    assert use_vllm("transformers") is False
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert use_vllm("auto") is False
        with pytest.raises(ValueError, match="generation_backend: 'vllm' needs"):
            use_vllm("vllm")
