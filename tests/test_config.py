"""Recipes stay loadable and in step with RunConfig; values are the paper's."""

import dataclasses
import os

import pytest
import yaml

from ssapo.config import FIELDS, PRESETS, RECIPES_DIR, RunConfig, load_config, parse_overrides, recipe_path


@pytest.mark.parametrize("preset", PRESETS)
def test_every_recipe_key_is_a_field_and_loads(preset):
    with open(recipe_path(preset)) as f:
        keys = set(yaml.safe_load(f))
    assert keys <= set(FIELDS), keys - set(FIELDS)
    cfg = load_config(preset)
    again = RunConfig(**yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_paper_values():
    m = load_config("mistral-7b")
    assert (m.model, m.seed_learning_rate, m.learning_rate, m.beta, m.seed_epochs, m.num_rounds) == (
        "alignment-handbook/zephyr-7b-sft-full", 5e-7, 5e-7, 0.1, 3, 3)
    l = load_config("llama3-8b")  # noqa: E741
    assert (l.model, l.learning_rate, l.beta, l.seed_epochs, l.num_rounds) == (
        "meta-llama/Meta-Llama-3-8B-Instruct", 1e-6, 0.05, 1, 2)
    for c in (m, l):
        assert (c.batch_size, c.lr_scheduler_type, c.warmup_ratio, c.seed_size) == (32, "cosine", 0.1, 2000)
        assert (c.eps, c.k, c.group_size, c.num_samples, c.temperature, c.max_new_tokens) == (0.01, 6, 100, 2, 0.7, 300)
        assert c.beta_follower == 0.1 and not c.trust_remote_code
    assert m.round_sizes == [8000, 20000, 30000] and l.round_sizes[:2] == [8000, 20000]
    t = load_config("tiny")
    assert t.use_cpu and not t.bf16


def test_accelerate_configs_ship():
    for name in ("ddp", "zero3", "fsdp"):
        with open(os.path.join(RECIPES_DIR, "accelerate", f"{name}.yaml")) as f:
            assert "distributed_type" in yaml.safe_load(f)


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eps: 0.05\nround_sizes: [10, 20]\n")
    cfg = load_config("tiny", str(p), parse_overrides(["--k", "7", "--use-peft", "--round-sizes=4,5", "num_rounds=2"]))
    assert cfg.eps == 0.05 and cfg.k == 7 and cfg.use_peft is True and cfg.round_sizes == [4, 5] and cfg.num_rounds == 2
    assert load_config("some/local/path").model == "some/local/path"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eps": "-1"}, "^eps: must be >= 0"),
        ({"k": "1.5"}, "^k: cannot read '1.5' as int"),
        ({"epz": "1"}, "^epz: unknown configuration key .*did you mean eps"),
        ({"method": "ppo"}, "^method: must be one of"),
        ({"num_samples": "1"}, "^num_samples: needs at least 2"),
        ({"round_sizes": "5", "num_rounds": "2"}, "^round_sizes: needs one size per round"),
        ({"bf16": "true"}, "^bf16: set bf16: false with use_cpu: true"),
        ({"leader_loss": "x"}, "^leader_loss: must be one of"),
    ],
)
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", overrides=overrides)


def test_every_field_has_help():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name
