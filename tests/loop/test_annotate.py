"""Self-annotation: best/worst picking, tie counting, scoring once, seeded
generation that does not depend on how prompts are shared between processes."""

import pytest
import torch

from ssapo.annotate import annotate, annotate_rows, pick_pairs
from ssapo.generation import generate, use_vllm
from ssapo.scoring import sequence_logps
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
    ds, st = annotate_rows(
        None, None, tok, prompts, n=5, responses=responses, scorer=scorer, batch_size=2, progress=False
    )  # rows: string and chat prompts do not mix in one arrow column
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
    ds, st = annotate(
        model, model, tok, prompts, n=3, max_new_tokens=4, batch_size=2, seed=1, progress=False, backend="transformers"
    )
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
    assert generate(model, tok, prompts, 3, 0.7, 1.0, 5, batch_size=2, seed=7, progress=False) != generate(
        model, tok, prompts, 3, 0.7, 1.0, 5, batch_size=2, seed=8, progress=False
    )


def test_settings_come_from_the_config(tiny):
    from ssapo.config import load_config

    model, tok = tiny
    cfg = load_config("tiny", overrides={"num_samples": 3, "max_new_tokens": 2, "generation_batch_size": 4})
    rows, st = annotate_rows(
        model,
        tiny_llama(tok, hidden_size=32, num_layers=1, seed=2),
        tok,
        [[{"role": "user", "content": "a"}]] * 2,
        cfg,
        progress=False,
    )
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


# -- selective log-softmax, truncation, devices (issue 9) --


def test_selective_log_softmax_equals_the_full_log_softmax():
    from ssapo.scoring import selective_log_softmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    index = torch.randint(0, 50, (3, 7), generator=g)
    naive = torch.log_softmax(logits.double(), -1).gather(-1, index[..., None]).squeeze(-1)
    for chunk in (None, 1, 4, 21, 1000):
        got = selective_log_softmax(logits, index, chunk)
        assert got.dtype == torch.float32 and got.shape == index.shape
        torch.testing.assert_close(got.double(), naive, rtol=0, atol=1e-5)
    assert torch.equal(selective_log_softmax(logits, index, 1), selective_log_softmax(logits, index, None))
    half = selective_log_softmax(logits.bfloat16(), index, 5)  # bf16 logits: log-softmax still in float32
    naive16 = torch.log_softmax(logits.bfloat16().double(), -1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(half.double(), naive16, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="^index: "):
        selective_log_softmax(logits, index[:, :3])
    with pytest.raises(ValueError, match="^chunk_size: "):
        selective_log_softmax(logits, index, 0)


def test_scoring_chunks_do_not_change_the_sums(tiny):
    from ssapo import scoring

    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [[{"role": "user", "content": "a b"}], "c d e ", [{"role": "user", "content": "e"}]]
    responses = [[5, 6, 7, eos], "a b", [{"role": "assistant", "content": "d d c"}]]
    base = scoring.sequence_logps(model, tok, prompts, responses, chunk_tokens=None)
    for chunk in (1, 2, 5):
        torch.testing.assert_close(
            scoring.sequence_logps(model, tok, prompts, responses, chunk_tokens=chunk), base, rtol=0, atol=1e-5
        )
    one = torch.cat([scoring.sequence_logps(model, tok, [p], [r], batch_size=1) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(one, base, rtol=0, atol=1e-5)
    seqs = scoring.tokenize_for_scoring(tok, prompts, responses)
    width = max(len(q) for q, _ in seqs)
    ids = torch.tensor([q + [tok.pad_token_id] * (width - len(q)) for q, _ in seqs])
    mask = torch.tensor([[0] * (len(q) - c) + [1] * c + [-1] * (width - len(q)) for q, c in seqs])  # -1: padding
    with torch.no_grad():  # the reference: the full (batch, T, vocab) log-softmax in float64
        attn = (mask >= 0).long()
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.double(), -1)
        naive = (lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:].clamp(min=0)).sum(-1)
    torch.testing.assert_close(base, naive, rtol=0, atol=1e-4)
    assert scoring._head_split(model) is not None  # the head was applied at the response positions only
    scoring._HEAD_SPLIT[model] = False  # the full-forward path gives the same sums
    try:
        torch.testing.assert_close(
            scoring.sequence_logps(model, tok, prompts, responses, chunk_tokens=2), base, rtol=0, atol=1e-5
        )
    finally:
        del scoring._HEAD_SPLIT[model]


@pytest.mark.parametrize("chat_rows", [True, False])
def test_a_long_pair_is_truncated_as_the_trainer_truncates(tiny, tmp_path, chat_rows):
    """The scored tokens of an over-long pair are exactly the completion tokens
    trl's DPOTrainer trains on (its tokenisation + DataCollatorForPreference at
    the same max_length), and the sums equal the full log-softmax over them."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ssapo import scoring

    model, tok = tiny
    if chat_rows:
        row = {
            "prompt": [{"role": "user", "content": "a b c d e a b"}],
            "chosen": [{"role": "assistant", "content": "c d e a b c d e a"}],
            "rejected": [{"role": "assistant", "content": "e"}],
        }
    else:
        row = {"prompt": "a b c d e a b ", "chosen": "c d e a b c d e a", "rejected": "e"}
    max_length = 13
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        report_to="none",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=1,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model,
        ref_model=tiny_llama(tok, hidden_size=32, num_layers=1, seed=0),
        args=args,
        train_dataset=Dataset.from_list([row]),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert int(attn[0].sum()) == max_length  # the chosen sequence was cut by the trainer
    seqs = scoring.tokenize_for_scoring(tok, [row["prompt"]] * 2, [row["chosen"], row["rejected"]], max_length)
    for b, (q, c) in enumerate(seqs):
        n = int(attn[b].sum())
        assert q == ids[b, :n].tolist()
        assert c == int(comp[b].sum()) and comp[b, n - c : n].tolist() == [1] * c
    got = scoring.sequence_logps(
        model, tok, [row["prompt"]] * 2, [row["chosen"], row["rejected"]], max_length=max_length, chunk_tokens=3
    )
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.double(), -1)
    want = (lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * comp[:, 1:]).sum(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    untruncated = scoring.sequence_logps(model, tok, [row["prompt"]], [row["chosen"]])
    assert abs(float(untruncated[0]) - float(got[0])) > 1e-3  # the cut mattered
    cfg = type("Cfg", (), {"max_length": max_length})()
    torch.testing.assert_close(scoring.sequence_logps(model, tok, [row["prompt"]], [row["chosen"]], cfg=cfg), got[:1])


def test_annotation_truncates_to_max_length_and_counts_overlong_prompts(tiny):
    model, tok = tiny
    other = tiny_llama(tok, hidden_size=32, num_layers=1, seed=3).eval()
    long_prompt = [{"role": "user", "content": "a b c d e a b c"}]  # 10 tokens with the template
    short = [{"role": "user", "content": "a"}]
    eos = tok.eos_token_id
    resp = [[[5, 6, eos], [7, eos]], [[5, 6, eos], [7, eos]]]
    rows, st = annotate_rows(
        model, other, tok, [long_prompt, short], n=2, responses=resp, max_length=10, progress=False, batch_size=2
    )
    assert st["overlong_prompts"] == 1 and st["dropped_all_tied"] == 1  # nothing left to score: r ≡ 0, no pair
    assert [r["index"] for r in rows] == [1]
    rows12, st12 = annotate_rows(
        model, other, tok, [long_prompt, short], n=2, responses=resp, max_length=12, progress=False, batch_size=2
    )
    assert st12["overlong_prompts"] == 0 and len(rows12) == 2
    from ssapo.scoring import sequence_logps

    cut = sequence_logps(model, tok, [long_prompt], [[5, 6, eos]], max_length=11)  # one response token left
    one = sequence_logps(model, tok, [long_prompt], [[5]])
    torch.testing.assert_close(cut, one, rtol=0, atol=1e-6)


def test_scoring_device(monkeypatch):
    from ssapo.config import load_config
    from ssapo.scoring import scoring_device

    assert scoring_device(load_config("tiny", overrides={"use_cpu": True})) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert scoring_device() == torch.device("cuda", 2)
    assert scoring_device(load_config("tiny", overrides={"use_cpu": True})) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert scoring_device(load_config("mistral-7b")) == torch.device("cuda", 0)


# -- the vLLM path, against a stand-in engine (the real one needs a GPU) --


class _FakeVLLM:
    """vllm's LLM / SamplingParams / parallel_state as far as ssapo.generation uses them;
    records what it was asked."""

    def __init__(self, eot):
        import types

        self.events, self.llm_kwargs, self.params = [], None, None
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        class Core:
            def shutdown(self):
                fake.events.append("shutdown")

        class LLM:
            def __init__(self, **kw):
                fake.llm_kwargs = kw
                fake.events.append("engine")
                self.llm_engine = types.SimpleNamespace(engine_core=Core())

            def generate(self, prompts, params, use_tqdm=True):
                fake.params = params
                fake.events.append("generate")
                outs = []
                for _p, sp in zip(prompts, params):
                    cs = [
                        types.SimpleNamespace(
                            index=j,
                            token_ids=[6 + (sp.seed + j) % 3, eot],
                            finish_reason="stop",
                            stop_reason=None,
                            cumulative_logprob=-1.0,
                        )
                        for j in range(sp.n)
                    ]
                    outs.append(types.SimpleNamespace(outputs=cs[::-1]))  # out of order: sorted by index
                return outs

        ps = types.ModuleType("vllm.distributed.parallel_state")
        ps.destroy_model_parallel = lambda: fake.events.append("destroy_model_parallel")
        ps.destroy_distributed_environment = lambda: fake.events.append("destroy_distributed_environment")
        self.modules = {
            "vllm": types.ModuleType("vllm"),
            "vllm.distributed": types.ModuleType("vllm.distributed"),
            "vllm.distributed.parallel_state": ps,
        }
        self.modules["vllm"].LLM, self.modules["vllm"].SamplingParams = LLM, SamplingParams


def test_vllm_path_seeds_each_prompt_stops_on_the_model_tokens_and_frees_the_engine(tiny, monkeypatch, tmp_path):
    import sys

    from ssapo import annotate as A
    from ssapo import generation, scoring

    model, tok = tiny
    eot = tok.convert_tokens_to_ids("<assistant>")  # stands in for <|eot_id|>: a second stop id of the model
    policy = tiny_llama(tok, hidden_size=32, num_layers=1, seed=0).eval()
    policy.generation_config.eos_token_id = [tok.eos_token_id, eot]
    fake = _FakeVLLM(eot)
    for k, m in fake.modules.items():
        monkeypatch.setitem(sys.modules, k, m)
    assert generation.use_vllm("vllm") is True

    def scorer(prompts, responses):
        fake.events.append("score")
        return [float(r[0]) for r in responses]

    moved = []
    monkeypatch.setattr(A, "_place", lambda m, d: moved.append((len(fake.events), m, str(d))))

    prompts = [[{"role": "user", "content": w}] for w in ["a", "b c", "d", "e"]]
    rows, st = annotate_rows(
        policy,
        model,
        tok,
        prompts,
        n=3,
        backend="vllm",
        seed=5,
        policy_path=str(tmp_path),
        scorer=scorer,
        max_length=64,
        progress=False,
        batch_size=2,
    )
    assert st["backend"] == "vllm"
    seeds = [p.seed for p in fake.params]
    assert seeds == [generation.prompt_seed(5, i) for i in range(4)] and len(set(seeds)) == 4  # one seed per prompt
    assert all(p.stop_token_ids == [tok.eos_token_id, eot] for p in fake.params)  # the model's list, not tok's eos
    assert fake.llm_kwargs["max_model_len"] == 64 and fake.llm_kwargs["seed"] == 5
    # one engine, shut down (and its distributed state destroyed) before any scoring
    assert fake.events[:5] == [
        "engine",
        "generate",
        "shutdown",
        "destroy_model_parallel",
        "destroy_distributed_environment",
    ]
    assert fake.events.count("engine") == 1 and set(fake.events[5:]) == {"score"}
    # the scoring models leave the GPU before the engine starts and come to the scoring device after it stopped
    assert moved == [
        (0, policy, "cpu"),
        (0, model, "cpu"),
        (5, policy, str(scoring.scoring_device())),
        (5, model, str(scoring.scoring_device())),
    ]
    assert st["truncated_responses"] == 0  # every response ended on a stop id of the model
    assert len(rows) == sum(1 for i in range(4) if len({(generation.prompt_seed(5, i) + j) % 3 for j in range(3)}) > 1)
    with pytest.raises(ValueError, match="^generation_backend: vLLM annotates on one process"):
        annotate_rows(
            policy, model, tok, prompts, n=3, backend="vllm", policy_path=str(tmp_path), world=2, progress=False
        )
    with pytest.raises(ValueError, match="^policy_path: "):
        annotate_rows(policy, model, tok, prompts, n=3, backend="vllm", progress=False)


def test_vllm_scores_match_the_transformers_path(tmp_path):
    """The responses vLLM samples get, from vLLM's own log-probs, the Σ log π
    that the transformers scoring path computes for them (same prompt
    rendering, same stop tokens, same model)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.skip("vllm is not installed (pip install ssapo[vllm] on a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from ssapo.generation import generate_vllm
    from ssapo.scoring import sequence_logps
    from ssapo.tiny import save_pretrained

    tok = build_tokenizer(WORDS)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, seed=0)
    path = save_pretrained(model, tok, tmp_path / "m")
    prompts = [[{"role": "user", "content": w}] for w in ["a b", "c", "d e a", "b"]]
    res, lps = generate_vllm(
        str(path),
        tok,
        prompts,
        2,
        1.0,
        1.0,
        8,
        seed=1,
        dtype="float32",
        gpu_memory_utilization=0.3,
        tensor_parallel_size=1,
        return_logprobs=True,
        progress=False,
    )
    model = model.to("cuda").eval()
    flat_p = [p for p, rs in zip(prompts, res) for _ in rs]
    flat_r = [r for rs in res for r in rs]
    ours = sequence_logps(model, tok, flat_p, flat_r)
    theirs = torch.tensor([v for vs in lps for v in vs], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=2e-3)


# -- length-aware ranking (RunConfig annotation_reward, annotation_length_penalty) --


def test_length_aware_rewards_on_literal_values():
    from ssapo.errors import ConfigError
    from ssapo.scoring import length_aware

    rewards, lengths = [3.0, 1.0, 2.0, -1.0], [10, 1, 4, 0]
    assert length_aware(rewards, lengths) == rewards  # the default: the released code's Σ log π/π_ref
    assert length_aware(rewards, lengths, "mean") == [0.3, 1.0, 0.5, 0.0]  # no scored token: 0
    assert length_aware(rewards, lengths, "sum", 0.25) == [0.5, 0.75, 1.0, -1.0]  # r − α·|y|
    assert length_aware(rewards, lengths, "mean", 0.1) == pytest.approx([-0.7, 0.9, 0.1, 0.0])
    # the pair picked changes as it should: the long answer wins on the sum, loses once length counts
    r3, n3 = rewards[:3], lengths[:3]
    assert pick_pairs([length_aware(r3, n3)])[0] == [(0, 1)]
    assert pick_pairs([length_aware(r3, n3, "mean")])[0] == [(1, 0)]
    assert pick_pairs([length_aware(r3, n3, "sum", 0.25)])[0] == [(2, 0)]
    with pytest.raises(ConfigError, match="^annotation_reward: must be one of sum, mean, got 'median'"):
        length_aware(r3, n3, "median")
    with pytest.raises(ConfigError, match="^annotation_length_penalty: must be >= 0, got -1"):
        length_aware(r3, n3, "sum", -1)
    with pytest.raises(ValueError, match="^lengths: 2 lengths for 3 rewards"):
        length_aware(r3, [1, 2])


def test_annotation_ranks_by_the_length_aware_implicit_reward(tiny):
    """annotate_rows with the implicit reward: 'mean' divides each response's Σ log π/π_ref by its
    scored tokens and α subtracts α·|y|, from the cfg or the keywords; the rows carry those rewards."""
    from ssapo import scoring
    from ssapo.annotate import finish_stats
    from ssapo.config import load_config

    model, tok = tiny
    other = tiny_llama(tok, hidden_size=32, num_layers=1, seed=4).eval()
    a, b, c, d = (tok.convert_tokens_to_ids(w) for w in "abcd")
    eos = tok.eos_token_id
    prompts = ["a b", "c", "d e", "b"]
    resp = [[[d, eos], [c] * 8 + [eos], [b] * 6 + [eos]]] * 4  # short, long, middling
    kw = dict(n=3, responses=resp, progress=False, batch_size=2, max_length=64)
    flat_p = [p for p, rs in zip(prompts, resp) for _ in rs]
    flat_r = [r for rs in resp for r in rs]
    total = (
        scoring.sequence_logps(model, tok, flat_p, flat_r) - scoring.sequence_logps(other, tok, flat_p, flat_r)
    ).tolist()
    lengths = [n for _, n in scoring.tokenize_for_scoring(tok, flat_p, flat_r, 64)]
    assert lengths == [len(r) for r in flat_r]  # nothing cut: |y| is every generated token, the stop included

    def expect(values):
        pairs = pick_pairs([values[3 * i : 3 * i + 3] for i in range(len(prompts))])[0]
        return [
            (b, w, pytest.approx(values[3 * i + b]), pytest.approx(values[3 * i + w])) for i, (b, w) in enumerate(pairs)
        ]

    def got(rows):
        return [(r["chosen_index"], r["rejected_index"], r["chosen_reward"], r["rejected_reward"]) for r in rows]

    plain, _ = annotate_rows(model, other, tok, prompts, **kw)
    assert got(plain) == expect(total)  # the default ranks by the sum, as before
    mean, _ = annotate_rows(model, other, tok, prompts, reward="mean", **kw)
    assert got(mean) == expect([t / n for t, n in zip(total, lengths)])
    assert [g[:2] for g in got(mean)] != [g[:2] for g in got(plain)]  # normalising changed some pairs
    alpha = 0.5
    pen, _ = annotate_rows(model, other, tok, prompts, length_penalty=alpha, **kw)
    assert got(pen) == expect([t - alpha * n for t, n in zip(total, lengths)])
    cfg = load_config("tiny", overrides={"annotation_reward": "mean", "annotation_length_penalty": "0.5"})
    both, _ = annotate_rows(model, other, tok, prompts, cfg, **kw)
    assert got(both) == expect([t / n - alpha * n for t, n in zip(total, lengths)])
    assert all(r["margin"] == r["chosen_reward"] - r["rejected_reward"] > 0 for r in both)
    # a strong enough penalty makes the shortest response the chosen one in every prompt
    short, st = annotate_rows(model, other, tok, prompts, length_penalty=100.0, **kw)
    assert [len(resp[r["index"]][r["chosen_index"]]) for r in short] == [2, 2, 2, 2]
    st = finish_stats(st, short)  # the lengths the pairs teach, per round
    assert (st["mean_chosen_tokens"], st["mean_rejected_tokens"], st["mean_response_tokens"]) == (2.0, 9.0, 6.0)


def test_annotation_defaults_are_run_configs():
    from ssapo.annotate import _settings
    from ssapo.config import default_of
    from ssapo.errors import ConfigError

    s = _settings(None)
    assert s["n"] == default_of("num_samples") and s["max_new_tokens"] == default_of("max_new_tokens")
    assert (s["reward"], s["length_penalty"], s["backend"]) == ("sum", 0.0, default_of("generation_backend"))
    with pytest.raises(ConfigError, match="^num_samples: needs at least 2"):
        _settings(None, n=1)
    with pytest.raises(ConfigError, match="^generation_backend: must be one of"):
        _settings(None, backend="sglang")


def test_annotation_score_stop_false_leaves_the_stop_token_out_of_the_reward(tiny):
    """annotation_score_stop: false scores each response's own tokens: the rows' rewards are the
    implicit reward of the response without its stop token (and a response that is the stop token
    alone scores 0), while the pairs still hold the whole responses."""
    from ssapo import scoring
    from ssapo.config import load_config

    model, tok = tiny
    other = tiny_llama(tok, hidden_size=32, num_layers=1, seed=4).eval()
    a, b, c, d = (tok.convert_tokens_to_ids(w) for w in "abcd")
    eos = tok.eos_token_id
    prompts = ["a b", "c"]
    resp = [[[d, eos], [c, c, c, eos], [eos]], [[b, b, eos], [a, eos], [c]]]  # the last: cut, no stop token
    kw = dict(n=3, responses=resp, progress=False, batch_size=2, max_length=64)

    def implicit(flat_p, flat_r):
        return (
            scoring.sequence_logps(model, tok, flat_p, flat_r) - scoring.sequence_logps(other, tok, flat_p, flat_r)
        ).tolist()

    flat_p = [p for p, rs in zip(prompts, resp) for _ in rs]
    bare = [r[:-1] if r and r[-1] == eos else r for rs in resp for r in rs]
    want = implicit(flat_p, bare)
    assert want[2] == 0.0 and bare[5] == [c]
    with_stop = implicit(flat_p, [r for rs in resp for r in rs])
    assert all(x != y for i, (x, y) in enumerate(zip(want, with_stop)) if i != 5)  # the stop token counted there

    cfg = load_config("tiny", overrides={"annotation_score_stop": "false"})
    rows, _ = annotate_rows(model, other, tok, prompts, cfg, **kw)
    pairs = pick_pairs([want[0:3], want[3:6]])[0]
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == pairs
    for r, (best, worst) in zip(rows, pairs):
        i = 3 * r["index"]
        assert r["chosen_reward"] == pytest.approx(want[i + best]) and r["rejected_reward"] == pytest.approx(
            want[i + worst]
        )
    plain, _ = annotate_rows(model, other, tok, prompts, **kw)  # the default: the stop token is scored
    assert [r["chosen_reward"] for r in plain] == pytest.approx(
        [with_stop[3 * r["index"] + r["chosen_index"]] for r in plain]
    )


def test_an_empty_chosen_answer_is_counted_and_said(tiny):
    """An empty best answer (the stop token alone) is counted in empty_chosen, and the loop's line says so;
    an empty worst answer is not counted."""
    from ssapo.loop import empty_chosen_line

    _, tok = tiny
    a, b = (tok.convert_tokens_to_ids(w) for w in "ab")
    eos = tok.eos_token_id
    reward = {(eos,): 0.0, (a, b, eos): -0.3, (b, eos): 0.4}

    def scorer(prompts, responses):
        return [reward[tuple(r)] for r in responses]

    responses = [[[a, b, eos], [eos]], [[eos], [b, eos]], [[b, eos], [a, b, eos]]]
    rows, st = annotate_rows(None, None, tok, ["a", "b", "c"], n=2, responses=responses, scorer=scorer, progress=False)
    assert [r["chosen"] for r in rows] == ["", "b", "b"]
    assert st["empty_chosen"] == 1 and st["pairs"] == 3
    line = empty_chosen_line(2, st)
    assert line.startswith("ssapo train: round 2: in 1 of 3 pairs the chosen answer is empty")
    assert empty_chosen_line(2, {**st, "empty_chosen": 0}) is None
