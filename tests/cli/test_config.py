"""Recipes stay loadable and in step with RunConfig; preset values are the
paper's (docs/METHOD.md §4.6); overrides are typed; bad
values name the field; `ssapo train` reports them with exit code 2."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from ssapo.accelerate_configs import ACCELERATE_CONFIGS
from ssapo.config import (
    FIELDS,
    METHODS,
    PRESETS,
    RECIPES_DIR,
    ConfigError,
    RunConfig,
    load_config,
    parse_overrides,
    recipe_path,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(path):
    with open(path) as f:
        return yaml.safe_load(f)


# -- recipes --


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_recipe_key_is_a_field(preset):
    keys = set(read(recipe_path(preset)))
    assert keys <= set(FIELDS), f"recipe keys that are not RunConfig fields: {keys - set(FIELDS)}"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_recipe_sets_every_field_but_the_task_ones(preset):
    """A recipe is the whole run: a new field must be added to every recipe."""
    keys = set(read(recipe_path(preset)))
    # the baselines' and LoRA's knobs keep their defaults; the built-in task's only matter to tiny
    optional = {f for f in FIELDS if f.startswith(("spa_", "sera_", "lora_"))}
    # the length-aware ranking knobs default to the paper's ranking (issue 11 item 5); the robust-DPO
    # baselines' knobs, like SPA's and SeRA's, keep their defaults
    optional |= {"annotation_reward", "annotation_length_penalty", "annotation_score_stop", "label_smoothing"}
    optional |= {f for f in FIELDS if f.startswith(("drdpo_", "kldpo_"))}
    # every leader-loss parameter but the default loss's (ssapo.leader_losses: a new loss needs no recipe line)
    from ssapo import leader_losses

    optional |= {p.name for p in leader_losses.run_params()} - set(leader_losses.get("shift_prob").param_names)
    if preset != "tiny":
        optional |= {f for f in FIELDS if f.startswith("task_")}
    assert set(FIELDS) - optional - keys == set()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_recipe_loads_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    assert RunConfig(**yaml.safe_load(cfg.to_yaml())) == cfg
    path = tmp_path / "c.yaml"
    cfg.to_yaml(str(path))
    assert RunConfig.from_yaml(str(path)) == cfg
    assert load_config(None, str(path)) == cfg
    # the recipe file on its own gives the same config as the preset
    assert RunConfig.from_yaml(recipe_path(preset)) == cfg


def test_recipes_ship_inside_the_package_and_the_top_level_is_a_link():
    assert RECIPES_DIR == os.path.join(
        os.path.dirname(os.path.abspath(sys.modules["ssapo.config"].__file__)), "recipes"
    )
    for preset, path in PRESETS.items():
        assert path == os.path.join(RECIPES_DIR, preset, "config.yaml") and os.path.isfile(path)
    top = os.path.join(REPO, "recipes")
    if os.path.exists(top):
        # a checkout: recipes/ is the package's folder, not a copy that could drift ...
        src = os.path.join(REPO, "python", "ssapo", "recipes")
        assert os.path.realpath(top) == os.path.realpath(src)

        # ... and the installed package ships exactly those files
        def files(d):
            return {
                os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f)).read()
                for r, _, fs in os.walk(d)
                for f in fs
                if f.endswith((".yaml", ".json"))  # accelerate configs and the DeepSpeed JSON they name
            }

        assert files(RECIPES_DIR) == files(src)


def test_accelerate_configs_ship():
    assert set(ACCELERATE_CONFIGS) == {"ddp", "zero3", "fsdp", "zero3_cpu"}
    kinds = {name: read(path)["distributed_type"] for name, path in ACCELERATE_CONFIGS.items()}
    assert kinds == {"ddp": "MULTI_GPU", "zero3": "DEEPSPEED", "fsdp": "FSDP", "zero3_cpu": "DEEPSPEED"}
    assert read(ACCELERATE_CONFIGS["zero3"])["deepspeed_config"]["zero_stage"] == 3
    # the CPU (gloo) variant CI runs: ZeRO-3 without use_cpu (with it accelerate skips DeepSpeed), its
    # DeepSpeed settings in the JSON it names (shipped next to it), fp32 unless the launch says bf16
    cpu = read(ACCELERATE_CONFIGS["zero3_cpu"])
    assert cpu["use_cpu"] is False and "mixed_precision" not in cpu
    ds_file = os.path.join(
        os.path.dirname(ACCELERATE_CONFIGS["zero3_cpu"]), cpu["deepspeed_config"]["deepspeed_config_file"]
    )
    ds = json.load(open(ds_file))
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    from ssapo.accelerate_configs import accelerate_config_path

    assert accelerate_config_path("zero3_cpu") == ACCELERATE_CONFIGS["zero3_cpu"]
    assert load_config("tiny", overrides={"accelerate_config": "zero3_cpu"}).accelerate_config == "zero3_cpu"


def test_paper_values():
    m, l, t = load_config("mistral-7b"), load_config("llama3-8b"), load_config("tiny")  # noqa: E741
    assert (m.model, m.seed_learning_rate, m.learning_rate, m.beta, m.seed_epochs, m.num_rounds) == (
        "alignment-handbook/zephyr-7b-sft-full",
        5e-7,
        5e-7,
        0.1,
        3,
        3,
    )
    assert m.round_sizes == [8000, 20000, 30000]
    assert (l.model, l.seed_learning_rate, l.learning_rate, l.beta, l.seed_epochs, l.num_rounds) == (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        1e-6,
        1e-6,
        0.05,
        1,
        2,
    )
    assert l.round_sizes == [8000, 20000]
    for c in (m, l):
        assert c.preference_data == "argilla/ultrafeedback-binarized-preferences-cleaned"
        assert (c.batch_size, c.lr_scheduler_type, c.warmup_ratio, c.num_train_epochs_per_round) == (
            32,
            "cosine",
            0.1,
            1,
        )
        assert (c.seed, c.seed_size, c.max_length, c.max_prompt_length) == (42, 2000, 2048, 1024)
        assert (c.num_samples, c.temperature, c.top_p, c.max_new_tokens) == (2, 0.7, 1.0, 300)
        assert (c.eps, c.k, c.group_size, c.beta_follower, c.follower_space) == (0.01, 6, 100, 0.1, "prob")
        assert (c.leader_loss, c.clamp_min, c.round_reference, c.annotation_reference) == (
            "shift_prob",
            1e-6,
            "previous",
            "init",
        )
        assert (c.bf16, c.use_cpu, c.accelerate_config, c.method, c.trust_remote_code) == (
            True,
            False,
            "zero3",
            "ssapo",
            False,
        )
        assert c.accumulation_steps(num_processes=4) == 8  # the paper: 1 × 8 × 4 GPUs
    assert t.model == "tiny" and t.use_cpu and not t.bf16 and t.accelerate_config is None
    assert t.seed_size <= 128 and max(t.round_sizes) <= 256 and 8 <= t.max_new_tokens <= 16


def test_released_code_differences_are_named_in_the_recipes():
    text = open(recipe_path("mistral-7b")).read()
    assert "3.0e-7" in text and "0.05" in text  # the released yaml's lr and run_train.sh's ε, as comments
    assert "0.1" in open(recipe_path("llama3-8b")).read().split("beta_follower:")[1].split("\n")[0]


def test_defaults_are_the_paper_mistral_setting_and_documented():
    d = RunConfig()
    assert (d.seed, d.seed_size, d.round_sizes, d.num_rounds, d.max_new_tokens) == (
        42,
        2000,
        [8000, 20000, 30000],
        3,
        300,
    )
    assert (d.beta_follower, d.eps, d.k, d.group_size, d.leader_loss, d.round_reference) == (
        0.1,
        0.01,
        6,
        100,
        "shift_prob",
        "previous",
    )
    assert (d.spa_alpha, d.spa_lambdas, d.spa_quantile, d.spa_window, d.spa_warmup_ratio) == (
        0.1,
        [0.5, 0.25, 0.125],
        0.1,
        50,
        0.2,
    )
    assert (d.sera_keep, d.sera_num_samples, d.sera_top_p, d.sera_gamma) == (0.7, 4, 0.95, 0.3)
    assert "hard-codes 0.1" in FIELDS["beta_follower"].metadata["help"]
    from ssapo import leader_losses
    from ssapo.config import field_groups

    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        # a leader-loss parameter the docstring does not place is shown in its declared group (field_groups)
        placed = f.name in leader_losses.PARAMS and any(f.name in names for _, names in field_groups())
        assert placed or f.name in RunConfig.__doc__, f"{f.name} is missing from RunConfig's grouped docstring"


# -- overrides --


def test_overrides_are_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eps: 0.05\nround_sizes: [10, 20]\nlearning_rate: 5e-7\n")  # YAML reads 5e-7 as a string
    cfg = load_config(
        "tiny",
        str(p),
        [
            "--k",
            "7",
            "--use-peft",
            "--round-sizes=4,5",
            "num_rounds=2",
            "--spa-lambdas",
            "[0.5, 0.1]",
            "--group-size",
            "global",
            "--save-total-limit",
            "null",
            "--gradient-accumulation-steps",
            "2",
            "--per-device-train-batch-size",
            "4",
            "--batch-size",
            "16",
        ],
    )
    assert cfg.eps == 0.05 and cfg.learning_rate == 5e-7 and isinstance(cfg.learning_rate, float)
    assert cfg.k == 7 and cfg.use_peft is True and cfg.round_sizes == [4, 5] and cfg.num_rounds == 2
    assert cfg.spa_lambdas == [0.5, 0.1] and cfg.group_size == 0 and cfg.save_total_limit is None
    assert cfg.accumulation_steps(num_processes=2) == 2  # 4 × 2 × 2 processes = 16
    with pytest.raises(ConfigError, match="^batch_size: 16 cannot be split"):  # 4 × 2 × 1 = 8: refused, not run at 8
        cfg.accumulation_steps()
    # a mapping works too, and trl's key of the epochs per round is an alias
    cfg = load_config("tiny", overrides={"num_train_epochs": "2", "bf16": "no", "seed": 7})
    assert cfg.num_train_epochs_per_round == 2.0 and cfg.seed == 7
    with pytest.raises(ValueError, match="^epochs_per_round: unknown configuration key.*num_train_epochs_per_round"):
        load_config("tiny", overrides={"epochs_per_round": "2"})  # the 0.1.0 shim is gone
    assert RunConfig(group_size="global").group_size == 0


def test_model_path_and_precedence(tmp_path):
    assert load_config("some/local/path").model == "some/local/path"
    p = tmp_path / "c.yaml"
    p.write_text("eps: 0.05\nk: 4\n")
    cfg = load_config("llama3-8b", str(p), {"k": 5})
    assert (cfg.beta, cfg.eps, cfg.k) == (0.05, 0.05, 5)  # recipe < file < overrides
    assert load_config("./my-sft", str(p)).model == "./my-sft"


def test_parse_overrides():
    assert parse_overrides(["--eps", "0.1", "--use-peft", "--k=3", "beta=0.2", "--eps-x", "-1"]) == {
        "eps": "0.1",
        "use_peft": "true",
        "k": "3",
        "beta": "0.2",
        "eps_x": "-1",
    }
    with pytest.raises(ValueError, match="^eps: expected --key value or key=value"):
        parse_overrides(["eps"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"eps": "-1"}, "^eps: must be >= 0"),
        ({"k": "1.5"}, "^k: cannot read '1.5' as int"),
        ({"k": "0"}, "^k: must be >= 1"),
        ({"epz": "1"}, "^epz: unknown configuration key .*did you mean eps"),
        ({"lerning_rate": "1"}, "did you mean learning_rate"),
        ({"method": "ppo"}, f"^method: must be one of {', '.join(METHODS)}, got 'ppo'"),  # the methods table's
        ({"num_samples": "1"}, "^num_samples: needs at least 2"),
        ({"round_sizes": "5", "num_rounds": "2"}, "^round_sizes: needs one size per round"),
        ({"round_sizes": "5,x"}, "^round_sizes: cannot read '5,x' as a list of int"),
        ({"bf16": "true"}, "^bf16: set bf16: false with use_cpu: true"),
        ({"bf16": "maybe"}, "^bf16: cannot read 'maybe' as bool"),
        ({"leader_loss": "x"}, "^leader_loss: must be one of"),
        ({"follower_space": "logit"}, "^follower_space: must be one of prob, margin"),
        ({"round_reference": "seed"}, "^round_reference: must be one of previous, init"),
        ({"generation_backend": "sglang"}, "^generation_backend: must be one of auto, transformers, vllm"),
        ({"sera_gamma_role": "x"}, "^sera_gamma_role: must be one of ensemble, mix, threshold"),
        ({"sera_pool": "x"}, "^sera_pool: must be one of round, cumulative"),
        ({"accelerate_config": "zero2"}, "^accelerate_config: must be one of null, ddp, zero3, fsdp"),
        ({"group_size": "-3"}, "^group_size: must be >= 0"),
        ({"group_size": "all"}, "^group_size: cannot read 'all' as int"),
        ({"top_p": "0"}, r"^top_p: must be in \(0, 1\]"),
        ({"warmup_ratio": "1"}, r"^warmup_ratio: must be in \[0, 1\)"),
        ({"learning_rate": "0"}, "^learning_rate: must be > 0"),
        ({"batch_size": "20", "per_device_train_batch_size": "16"}, r"^batch_size: must be a multiple of .*\(16\)"),
        ({"max_prompt_length": "64"}, r"^max_prompt_length: must be below max_length \(64\)"),
        ({"load_in_4bit": "true"}, "^load_in_4bit: needs use_peft"),
        ({"spa_lambdas": ""}, "^spa_lambdas: needs one or more values"),
        ({"resolve_every": "-1"}, "^resolve_every: must be >= 0"),
    ],
)
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("tiny", overrides=overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"spa_alpha": 0.7}, r"^spa_alpha: must be in \[0, 0.5\], got 0.7"),
        ({"spa_quantile": 1.5}, r"^spa_quantile: must be in \[0, 1\], got 1.5"),
        ({"spa_warmup_ratio": -0.1}, r"^spa_warmup_ratio: must be in \[0, 1\], got -0.1"),
        (
            {"leader_loss": "shift_margin"},
            r"^leader_loss: shift_margin needs follower_space: margin.*got follower_space: prob",
        ),
    ],
)
def test_run_config_refuses_what_the_trainer_refuses(overrides, match):
    # the SPA bounds are the trainer's (SSAPOConfig reads them from RunConfig's fields): a value accepted
    # at start-up no longer fails at round 1; shift_margin's shifts are in units of βh, not probabilities
    with pytest.raises(ValueError, match=match):
        RunConfig(**overrides)


def test_spa_bounds_are_closed_and_shared():
    cfg = RunConfig(spa_alpha=0.5, spa_quantile=1.0, spa_warmup_ratio=1.0)
    assert (cfg.spa_alpha, cfg.spa_quantile, cfg.spa_warmup_ratio) == (0.5, 1.0, 1.0)
    assert RunConfig(leader_loss="shift_margin", follower_space="margin").leader_loss == "shift_margin"
    for name in ("spa_alpha", "spa_quantile", "spa_warmup_ratio"):
        assert "bounds" in FIELDS[name].metadata  # SSAPOConfig checks these same bounds (check_bounds)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="^config: no such file"):
        load_config("tiny", str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config("tiny", str(tmp_path / "list.yaml"))
    (tmp_path / "bad.yaml").write_text("epsilon: 0.1\n")
    with pytest.raises(ValueError, match=r"^epsilon: unknown configuration key in .*bad.yaml"):
        load_config("tiny", str(tmp_path / "bad.yaml"))


# -- ssapo train --


def _cli(*argv):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "train", *argv], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--eps", "-1"], "eps"),
        (["--set", "k=zero"], "k"),
        (["--epz", "0.1"], "epz"),
        (["--config", "/nonexistent/x.yaml"], "config"),
        (["--method", "sera", "--sera-keep", "2"], "sera_keep"),
    ],
)
def test_train_reports_bad_config_with_exit_2(argv, field):
    r = _cli("--model", "tiny", *argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"ssapo train: error: {field}:") and "Traceback" not in r.stderr


def test_train_builds_the_config_from_flags_and_free_keys():
    from ssapo.cli import build_parser
    from ssapo.commands.train import build_config

    args, extra = build_parser().parse_known_args(
        [
            "train",
            "--model",
            "llama3-8b",
            "--eps",
            "0.05",
            "--round-sizes",
            "1,2",
            "--set",
            "k=5",
            "--use-peft",
            "--method",
            "iterative-dpo",
            "--output-dir",
            "/tmp/x",
            "--trust-remote-code",
            "--seed=3",
        ]
    )
    cfg = build_config(args, extra)
    assert (
        cfg.eps,
        cfg.round_sizes,
        cfg.k,
        cfg.use_peft,
        cfg.method,
        cfg.output_dir,
        cfg.trust_remote_code,
        cfg.seed,
        cfg.beta,
    ) == (0.05, [1, 2], 5, True, "iterative-dpo", "/tmp/x", True, 3, 0.05)


# -- one configuration: errors, bounds and the generated parser --


def test_every_configuration_error_is_a_config_error(tmp_path):
    from ssapo.errors import ConfigError

    assert issubclass(ConfigError, ValueError)
    (tmp_path / "bad.yaml").write_text("epsilon: 0.1\n")
    for call in (
        lambda: load_config("tiny", overrides={"eps": "-1"}),
        lambda: load_config("tiny", overrides={"k": "x"}),
        lambda: load_config("tiny", str(tmp_path / "bad.yaml")),
        lambda: load_config("tiny", str(tmp_path / "missing.yaml")),
        lambda: RunConfig(method="ppo"),
        lambda: RunConfig(round_sizes=[1], num_rounds=2),
        lambda: parse_overrides(["eps"]),
    ):
        with pytest.raises(ConfigError):
            call()


def _outside(b):
    """A value just outside Bounds `b` and one on its edge inside (None where there is none)."""
    if b.lo is not None:
        return b.lo - (0 if b.lo_open else 1), (None if b.lo_open else b.lo)
    return b.hi + (0 if b.hi_open else 1), (None if b.hi_open else b.hi)


@pytest.mark.parametrize("name", [f for f in FIELDS if "bounds" in FIELDS[f].metadata])
def test_every_declared_bound_is_checked_by_run_config(name):
    """RunConfig checks each field's bounds from its metadata: a value just outside is refused naming
    the field, a closed edge is accepted (a field missing from a hand-written list would pass here)."""
    from ssapo.config import default_of
    from ssapo.errors import ConfigError

    b = FIELDS[name].metadata["bounds"]
    bad, edge = _outside(b)
    if isinstance(default_of(name), list):
        bad, edge = [bad], (None if edge is None else [edge])
    base = {"round_sizes": [5, 5, 5]} if name == "num_rounds" else {"num_rounds": 1} if name == "round_sizes" else {}
    if name in ("max_prompt_length", "max_length"):
        base = {"max_prompt_length": 1, "max_length": 2}
    if name in ("batch_size", "per_device_train_batch_size", "gradient_accumulation_steps"):
        base = {"batch_size": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": None}
    with pytest.raises(ConfigError, match=f"^{name}: "):
        RunConfig(**{**base, name: bad})
    if edge is not None and name != "max_length":  # max_length 1 leaves no room for a prompt
        assert getattr(RunConfig(**{**base, name: edge}), name) == edge


def test_no_bound_is_declared_twice():
    """The numbers of the bounds live on the fields: __post_init__ compares no field with a literal."""
    import inspect
    import io
    import re
    import tokenize

    src = inspect.getsource(RunConfig.__post_init__)
    code = " ".join(t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type != tokenize.STRING)
    assert not re.search(r"[<>]=?\s*-?\d", code), "a bound written in __post_init__: declare it on the field"


def _train(*argv, columns="200"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": columns}
    return subprocess.run(
        [sys.executable, "-m", "ssapo.cli", "train", *argv], capture_output=True, text=True, env=env, timeout=120
    )


def test_train_help_lists_every_field_in_its_group():
    from ssapo.commands.train import _show_value
    from ssapo.config import default_of, field_groups

    r = _train("--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    text = text[text.index("RunConfig: ") :]  # the fields' groups (the description shows some flags too)
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f" {flag} " in text, f"{flag} is not in ssapo train --help"
        after = text.split(f" {flag} ", 1)[1]
        help_text = " ".join(f.metadata["help"].split())
        assert help_text in after[: len(help_text) + 200], f"{flag}: its help is not shown"
        shown = "tiny, a preset" if f.name == "model" else _show_value(default_of(f.name))
        assert f"default: {shown}]" in after, f"{flag}: its default is not shown"
        for c in f.metadata.get("choices", ()):
            assert _show_value(c) in after.split("]", 1)[0], f"{flag}: choice {c!r} is not shown"
    # in RunConfig's groups, in their order, each group's fields together
    starts = [text.index(f"RunConfig: {title}:") for title, _ in field_groups()]
    assert starts == sorted(starts) and len(field_groups()) >= 10
    for (_, names), lo, hi in zip(field_groups(), starts, starts[1:] + [len(text)]):
        for name in names:
            assert f" --{name.replace('_', '-')} " in text[lo:hi]
    # and train's own options, before the fields
    own = " ".join(r.stdout.split()).split("RunConfig: ")[0]
    for flag in ("--config", "--resume", "--num-processes", "--num-machines", "--main-process-ip", "--set"):
        assert f" {flag} " in own


@pytest.mark.parametrize(
    "argv, line",
    [
        (["--method", "ppo"], f"ssapo train: error: method: must be one of {', '.join(METHODS)}, got 'ppo'"),
        (["--spa-alpha", "0.7"], r"ssapo train: error: spa_alpha: must be in \[0, 0.5\], got 0.7"),
        (["--top_p", "0"], r"ssapo train: error: top_p: must be in \(0, 1\], got 0"),
        (["--use-peft", "maybe"], "ssapo train: error: use_peft: cannot read 'maybe' as bool"),
        (["--follower-space", "logit"], "ssapo train: error: follower_space: must be one of prob, margin"),
        (["--num-proceses", "2"], "ssapo train: error: num_proceses: unknown option .*did you mean --num-processes"),
        (["--eps"], "ssapo train: error: argument --eps: expected one argument"),
        (["--round-sizes", "1", "x"], "ssapo train: error: round_sizes: cannot read '1 x' as a list of int"),
    ],
)
def test_train_bad_flag_is_one_line_naming_it(argv, line):
    import re

    r = _train("--model", "tiny", *argv)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and re.match(line, r.stderr), r.stderr


@pytest.mark.parametrize(
    "argv, want",
    [
        (["--round-sizes", "4", "5"], {"round_sizes": [4, 5], "num_rounds": 2}),
        (["--round-sizes", "4,5,6"], {"round_sizes": [4, 5, 6], "num_rounds": 3}),
        (["--round_sizes=[7, 8]"], {"round_sizes": [7, 8], "num_rounds": 2}),
        (["--spa-lambdas", "0.5", "0.25"], {"spa_lambdas": [0.5, 0.25]}),
        (["--use-peft"], {"use_peft": True}),
        (["--use-peft", "false", "--trust_remote_code"], {"use_peft": False, "trust_remote_code": True}),
        (
            ["--use-peft", "--no-use-peft", "--no_gradient_checkpointing"],
            {"use_peft": False, "gradient_checkpointing": False},
        ),
        (["--group-size", "global", "--save-total-limit", "null"], {"group_size": 0, "save_total_limit": None}),
        (["--num-train-epochs", "2"], {"num_train_epochs_per_round": 2.0}),
        (["--set", "k=5", "--k", "4"], {"k": 4}),  # the flag wins over --set
        (["k=3"], {"k": 3}),
    ],
)
def test_train_flags_parse_to_typed_fields(argv, want):
    from ssapo.cli import build_parser
    from ssapo.commands.train import build_config

    base = ["train", "--model", "tiny", "--num-rounds", str(want.get("num_rounds", 1))]
    args, extra = build_parser().parse_known_args([*base, *argv])
    cfg = build_config(args, extra)
    assert {k: getattr(cfg, k) for k in want} == want


def test_cli_reports_a_config_error_of_any_command_in_one_line(monkeypatch, capsys):
    import ssapo.commands.train as train
    from ssapo.cli import main
    from ssapo.errors import ConfigError

    def run(args, extra=None):
        raise ConfigError("eps: must be >= 0, got -1")

    monkeypatch.setattr(train, "run", run)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == "ssapo train: error: eps: must be >= 0, got -1\n"
