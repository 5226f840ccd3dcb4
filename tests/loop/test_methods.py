"""Methods as data: the table (one module per method) and the steps the loop runs from it agree."""

import os
import pkgutil

import pytest

import ssapo.methods as methods
from ssapo.accelerate_configs import accelerate_config_path
from ssapo.config import METHODS, load_config
from ssapo.launch import Launcher
from ssapo.loop import STEPS, step_spec
from ssapo.methods import TABLE, method_of, round_step_names, steps_of
from ssapo.trainer import LEADER_LOSSES


def test_the_table_is_one_module_per_method_and_the_config_choices():
    modules = [m.name for m in pkgutil.iter_modules(methods.__path__) if not m.name.startswith("_")]
    assert sorted(name.replace("_", "-") for name in modules) == sorted(TABLE)
    assert METHODS == tuple(TABLE)
    assert {"ssapo", "dpo", "iterative-dpo", "spa", "sera"} <= set(TABLE)
    with pytest.raises(ValueError, match="^method: must be one of"):
        load_config("tiny", overrides={"method": "no-such-method"})
    with pytest.raises(ValueError, match="^method: must be one of"):
        method_of("no-such-method")


def test_config_reads_the_method_names_and_help_without_importing_the_table():
    """ssapo.config imports nothing of the project (issue 18, item 2): the method field's choices and help
    are read from the method modules' text, and equal the imported table's."""
    import subprocess
    import sys

    from ssapo.config import _METHOD_HELP

    assert _METHOD_HELP == {name: m.help for name, m in TABLE.items()}
    code = "import sys, ssapo.config; print(sorted(m for m in sys.modules if m.startswith('ssapo')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # leaves only: the accelerate configs, the errors, the leader-loss table and the method names' reader
    leaves = ["ssapo.accelerate_configs", "ssapo.errors", "ssapo.leader_losses", "ssapo.method_names"]
    assert out.strip() == str(sorted(["ssapo", "ssapo.config", *leaves]))


@pytest.mark.parametrize("name", sorted(TABLE))
def test_the_steps_are_the_declaration(tmp_path, name):
    m = TABLE[name]
    cfg = load_config("llama3-8b", overrides={"method": name, "num_rounds": "2", "generation_backend": "transformers"})
    steps = steps_of(cfg)
    assert steps[:2] == ["seed", "seed/eval"]
    rounds = [s for s in steps if s.startswith("round_")]
    if not m.rounds:
        assert rounds == []
    else:
        assert rounds == [f"round_{t}/{s}" for t in (1, 2) for s in round_step_names(m)]
        assert ("round_1/follow" in steps) == m.follower
        for extra in m.extra_steps:
            assert f"round_2/{extra.name}" in steps and extra.name not in STEPS
        assert m.leader_loss_of(cfg) in LEADER_LOSSES
        assert isinstance(m.leader_params(cfg, 1), dict)
    # every step has a declared kind, and the launcher puts it where the kind says
    launcher = Launcher(str(tmp_path), 4, accelerate_config_path("zero3"), echo=False)
    for s in steps:
        spec, t = step_spec(cfg, s)
        how = launcher.how(cfg, s)
        assert t == (0 if s.startswith("seed") else int(s.split("/")[0][6:]))
        if spec.kind == "driver":
            assert how is None
        elif spec.kind == "train":
            assert how == (launcher.engine_config, 4)
        else:
            assert how == (launcher.data_config, 4) and os.path.basename(how[0]) == "data_parallel.yaml"
    # a given π_0: no seed stage
    given = load_config("llama3-8b", overrides={"method": name, "num_rounds": "2", "seed_model": "/pi0"})
    assert steps_of(given) == steps[1:]
    with pytest.raises(ValueError, match="^step: unknown step 'round_1/nothing'"):
        step_spec(cfg, "round_1/nothing")


def test_the_methods_declare_what_the_loop_did_for_them():
    cfg = load_config("tiny", overrides={"spa_lambdas": "0.5 0.25", "leader_loss": "weights"})
    assert method_of("ssapo").follower and method_of("ssapo").leader_loss_of(cfg) == "weights"
    assert [method_of(n).leader_loss_of(cfg) for n in ("iterative-dpo", "spa", "sera")] == ["dpo", "spa", "dpo"]
    spa = method_of("spa")
    assert [spa.leader_params(cfg, t)["spa_lambda"] for t in (1, 2, 3)] == [0.5, 0.25, 0.25]  # the last repeats
    sera = method_of("sera")
    assert [s.name for s in sera.extra_steps] == ["sera"] and sera.extra_steps[0].generates
    assert sera.train_rows is not None and not sera.follower
    assert not method_of("dpo").rounds
