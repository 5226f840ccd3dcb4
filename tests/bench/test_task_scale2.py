"""The benchmark task's second scale ("medium": 256 words, 8-word answers, a 4-layer hidden-128 model) and its
length term (TaskSpec.length_weight / length_cap / long_answer_rate)."""

from __future__ import annotations

import json
import os
import random

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from ssapo.bench.task import (  # noqa: E402
    SIZE_SPECS,
    SIZES,
    TaskSpec,
    _answer,
    gold_reward,
    length_bonus,
    load_spec,
    messages,
    prepare_task,
    prompt_partition,
    task_record,
)

P8 = "w0 w17 w255 w100 w3 w3 w64 w200"
# gold_reward before the length term existed (commit ed82229), on literal strings: (spec, prompt, response, value)
OLD_VALUES = [
    (TaskSpec(seed=0), "w1 w2 w3", "w5 w0 w15", 0.6611111111111111),
    (TaskSpec(seed=0), "w1 w2 w3", "w5", 0.2569444444444444),
    (TaskSpec(seed=0), "w7 w7 w7", "w3 w9 w12 w4 w4", 0.5847222222222223),
    (TaskSpec(seed=0), "w1 w2 w3", "", 0.0),
    (TaskSpec(seed=2, vocab=256, n_words=8), P8, "w1 w2 w3 w4 w5 w6 w7 w8", 0.5007352941176471),
    (TaskSpec(seed=2, vocab=256, n_words=8), P8, "w9 w250", 0.126480162377451),
    (TaskSpec(seed=2, vocab=256, n_words=8), P8, "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11", 0.5007352941176471),
]
# task.json of two version-3 designs as ed82229 wrote it (ssapo.io.write_json)
OLD_RECORDS = [
    (
        TaskSpec(seed=1, size="tiny", suppress_markup=True),
        "tiny",
        '{\n  "bt_temperature": 0.05,\n  "flip_rate": 0.0,\n  "hidden_size": 64,\n  "n_words": 3,\n  "num_layers": 2,\n'
        '  "quality_weight": 0.5,\n  "seed": 1,\n  "sft_correct": 0.3,\n  "short_answer_rate": 0.0,\n  "size": "tiny",\n'
        '  "sizes": {\n    "labelled": 2048,\n    "prompts": 1024,\n    "sft_epochs": 4,\n    "sft_examples": 4096,\n'
        '    "test": 256,\n    "val": 256\n  },\n  "suppress_markup": true,\n  "version": 3,\n  "vocab": 16\n}',
    ),
    (
        TaskSpec(seed=0, size="test", short_answer_rate=0.25),
        "test",
        '{\n  "bt_temperature": 0.05,\n  "flip_rate": 0.0,\n  "hidden_size": 64,\n  "n_words": 3,\n  "num_layers": 2,\n'
        '  "quality_weight": 0.5,\n  "seed": 0,\n  "sft_correct": 0.3,\n  "short_answer_rate": 0.25,\n  "size": "test",\n'
        '  "sizes": {\n    "labelled": 256,\n    "prompts": 256,\n    "sft_epochs": 4,\n    "sft_examples": 1024,\n'
        '    "test": 64,\n    "val": 64\n  },\n  "suppress_markup": false,\n  "version": 3,\n  "vocab": 16\n}',
    ),
]


def medium(seed: int = 0, **kw) -> TaskSpec:
    return TaskSpec(seed=seed, size="medium", **{**SIZE_SPECS["medium"], **kw})


@pytest.mark.parametrize("spec,prompt,response,value", OLD_VALUES)
def test_length_weight_zero_is_the_old_gold_reward(spec, prompt, response, value):
    assert spec.length_weight == 0.0
    assert gold_reward(spec, prompt, response) == value  # exactly, not approximately
    assert length_bonus(spec, response) == 0.0


@pytest.mark.parametrize("spec,size,text", OLD_RECORDS)
def test_old_designs_task_json_is_byte_identical(tmp_path, spec, size, text):
    from ssapo.io import write_json

    path = write_json(tmp_path / "task.json", task_record(spec, SIZES[size]))
    assert open(path).read() == text
    assert load_spec(path) == spec


def test_length_term_on_literal_strings():
    spec = TaskSpec(seed=0, length_weight=0.3, length_cap=6)  # L = 3: 0.1 per word, up to 6 words
    assert length_bonus(spec, "") == 0.0
    assert length_bonus(spec, "w1 w2") == pytest.approx(0.2)
    assert length_bonus(spec, "w1 w2 w3 w4 w5") == pytest.approx(0.5)
    assert length_bonus(spec, "w1 w2 w3 w4 w5 w6 w7 w8") == pytest.approx(0.6)  # capped at 6 words
    assert length_bonus(spec, "junk w99 w3 <user>") == pytest.approx(0.1)  # only words of the vocabulary count
    # the first term is the old one (OLD_VALUES); the bonus is added, wrong words and words past L included
    assert gold_reward(spec, "w1 w2 w3", "w5 w0 w15") == pytest.approx(0.6611111111111111 + 0.3)
    assert gold_reward(spec, "w1 w2 w3", "w5 w0 w15 w1 w1") == pytest.approx(0.6611111111111111 + 0.5)
    assert gold_reward(spec, "w1 w2 w3", "w5") == pytest.approx(0.2569444444444444 + 0.1)
    capless = TaskSpec(seed=0, length_weight=0.3)  # length_cap 0: C = L
    assert length_bonus(capless, "w1 w2 w3 w4 w5") == pytest.approx(0.3)
    assert gold_reward(capless, "w7 w7 w7", "w3 w9 w12 w4 w4") == pytest.approx(0.5847222222222223 + 0.3)
    # the medium scale: λ = 0.25 per 8 words, up to 16
    m = medium(seed=2)
    assert (m.length_weight, m.cap(), m.n_words) == (0.25, 16, 8)
    assert gold_reward(m, P8, "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11") == pytest.approx(0.5007352941176471 + 0.25 * 11 / 8)
    assert gold_reward(m, P8, "w9 w250") == pytest.approx(0.126480162377451 + 0.25 * 2 / 8)
    padded = "w1 w2 w3 w4 w5 w6 w7 w8 " + " ".join(["w0"] * 20)
    assert gold_reward(m, P8, padded) == pytest.approx(0.5007352941176471 + 0.5)


def test_medium_record_names_the_length_fields_and_round_trips(tmp_path):
    from ssapo.io import write_json

    spec = medium()
    rec = task_record(spec, SIZES["medium"])
    assert (rec["length_weight"], rec["length_cap"], rec["long_answer_rate"]) == (0.25, 16, 0.25)
    assert rec["version"] == 3
    assert load_spec(write_json(tmp_path / "task.json", rec)) == spec


def test_medium_answers_vary_in_length_both_ways():
    spec = medium()
    rng = random.Random(0)
    lens = [len(_answer(rng, spec, "w1 w2 w3 w4 w5 w6 w7 w8", spec.sft_correct).split()) for _ in range(2000)]
    assert min(lens) == 1 and max(lens) == 16 and lens.count(8) > 500
    assert sum(x < 8 for x in lens) > 300 and sum(x > 8 for x in lens) > 200


def test_medium_prompt_partition_is_disjoint_and_sized():
    spec = medium(seed=3)
    sizes = SIZES["medium"]
    assert spec.vocab >= 256 and spec.n_words >= 8 and spec.num_layers >= 4 and spec.hidden_size >= 128
    assert spec.vocab**spec.n_words == 2**64  # past range()'s length: distinct draws instead of random.sample
    part = prompt_partition(spec, sizes)
    sets = {k: set(v) for k, v in part.items()}
    for k, v in part.items():
        assert len(v) == sizes[k] and len(sets[k]) == len(v)
        assert all(len(p.split()) == 8 and all(int(w[1:]) < 256 for w in p.split()) for p in v)
    keys = list(sets)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not sets[a] & sets[b], (a, b)
    assert prompt_partition(spec, sizes) == part  # deterministic
    assert prompt_partition(medium(seed=4), sizes)["test"] != part["test"]


def test_tokenizer_covers_the_vocabulary_and_the_recipe_fits():
    from ssapo.config import load_config
    from ssapo.tiny import build_tokenizer

    spec = medium()
    tok = build_tokenizer(spec.words())
    assert len(tok) == spec.vocab + 6
    ids = tok.convert_tokens_to_ids(spec.words())
    assert len(set(ids)) == spec.vocab and tok.unk_token_id not in ids
    longest = " ".join(f"w{i}" for i in range(spec.vocab - 16, spec.vocab))  # C = 16 words
    full = tok.apply_chat_template(messages(P8) + [{"role": "assistant", "content": longest}], tokenize=True)
    prompt = tok.apply_chat_template(messages(P8), add_generation_prompt=True, tokenize=True)
    if hasattr(full, "keys"):
        full, prompt = full["input_ids"], prompt["input_ids"]
    assert tok.unk_token_id not in full
    cfg = load_config("tiny")
    assert len(prompt) == 10 and len(prompt) <= cfg.max_prompt_length and len(full) == 27 <= cfg.max_length


def test_medium_task_builds_with_tiny_counts(tmp_path):
    from ssapo.loading import load_checkpoint
    from ssapo.tiny import SPECIAL

    design = {"labelled": 16, "prompts": 16, "val": 8, "test": 8, "sft_examples": 64, "sft_epochs": 1}
    paths = prepare_task(tmp_path / "task", seed=0, size="medium", design={**design, "suppress_markup": True})
    spec = load_spec(paths["task"])
    assert (spec.vocab, spec.n_words, spec.hidden_size, spec.num_layers) == (256, 8, 128, 4)
    assert spec.length_weight == 0.25 and spec.suppress_markup
    with open(paths["task"]) as f:
        assert json.load(f)["sizes"] == {**SIZES["medium"], **design}
    model, tok = load_checkpoint(paths["sft_model"])
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 128
    assert model.config.vocab_size == len(tok) == 256 + len(SPECIAL)
    assert os.path.exists(paths["preferences"])
    # cached: a second call rebuilds nothing
    mtime = os.path.getmtime(paths["task"])
    assert prepare_task(tmp_path / "task", seed=0, size="medium", design={**design, "suppress_markup": True}) == paths
    assert os.path.getmtime(paths["task"]) == mtime


def test_near_misses_stay_within_sft_near_and_zero_draws_as_before():
    """sft_near > 0: every wrong SFT word is at circular distance 1..sft_near from the translation, both sides
    drawn; sft_near 0 draws exactly the words (and the random stream) of before."""
    import dataclasses

    spec = dataclasses.replace(medium(), sft_near=2, short_answer_rate=0.0, long_answer_rate=0.0)
    m = spec.mapping()
    prompt = "w1 w2 w3 w4 w5 w6 w7 w8"
    right = [m[int(w[1:])] for w in prompt.split()]
    rng = random.Random(0)
    dists = []
    for _ in range(500):
        for y, r in zip(_answer(rng, spec, prompt, 0.5).split(), right):
            d = (int(y[1:]) - r) % spec.vocab
            dists.append(d if d <= spec.vocab // 2 else d - spec.vocab)
    assert set(dists) == {-2, -1, 0, 1, 2} and 0.4 < dists.count(0) / len(dists) < 0.6
    base = dataclasses.replace(spec, sft_near=0)
    a, b = random.Random(7), random.Random(7)
    old = []  # the draw before sft_near existed: right with p, else any word
    for _ in range(200):
        old.append(
            " ".join(f"w{m[int(x[1:])]}" if b.random() < 0.5 else f"w{b.randrange(base.vocab)}" for x in prompt.split())
        )
    assert [_answer(a, base, prompt, 0.5) for _ in range(200)] == old
    assert "sft_near" not in task_record(base, SIZES["medium"]) and task_record(spec, SIZES["medium"])["sft_near"] == 2
