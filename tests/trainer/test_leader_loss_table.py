"""The leader losses as one table (ssapo.leader_losses, issue 18 item 1): every name, column, parameter,
choice and help of a loss is derived from its declaration, and a loss declared inside a test (one
`LeaderLoss`, registered before ssapo.config is imported, in a process of its own so that nothing leaks into
the other tests) reaches RunConfig, `ssapo train`'s parser and --help, SSAPOConfig and SSAPOTrainer."""

import os
import subprocess
import sys
import textwrap

import pytest

from ssapo import leader_losses
from ssapo.atoms import COLUMNS as ATOM_COLUMNS
from ssapo.config import FIELDS, LEADER_LOSSES, check_bounds, field_groups
from ssapo.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_names_columns_and_choices_are_the_table():
    from ssapo import losses
    from ssapo.trainer import LEADER_LOSSES as ALL
    from ssapo.trainer import SHARED_LEADER_FIELDS, SSAPOConfig

    table = leader_losses.TABLE
    assert ALL == tuple(table) and set(ALL) == {
        *("dpo", "shift_prob", "shift_margin", "weights", "kept_mass", "spa"),
        *("drop_moved", "flip_moved", "trimmed"),
        *("rdpo", "cdpo", "drdpo", "kldpo"),
    }
    assert LEADER_LOSSES == (
        *("shift_prob", "shift_margin", "weights", "kept_mass"),
        *("drop_moved", "flip_moved", "trimmed", "dpo", "spa"),
    )
    assert FIELDS["leader_loss"].metadata["choices"] == LEADER_LOSSES
    assert SSAPOConfig.__dataclass_fields__["leader_loss"].metadata["choices"] == list(ALL)
    for name, loss in table.items():
        assert set(loss.columns) <= set(ATOM_COLUMNS)
        assert (f"{name} ({loss.help})" in FIELDS["leader_loss"].metadata["help"]) == loss.ssapo_leader
        assert callable(loss.per_pair()) and loss.per_pair() is getattr(losses, loss.function)
        assert loss.batch == "mean" or callable(loss.combine())
    assert {n: table[n].columns for n in table if table[n].columns} == {
        "shift_prob": ("shift", "mass"),
        "shift_margin": ("shift", "mass"),
        "weights": ("weight",),
        "kept_mass": ("shift", "mass"),
        "drop_moved": ("shift", "mass"),
        "flip_moved": ("shift", "mass"),
        "trimmed": ("shift", "mass"),
    }
    assert SHARED_LEADER_FIELDS == (
        *("clamp_min", "drop_threshold", "trim_fraction"),
        *("spa_alpha", "spa_quantile", "spa_window", "spa_warmup_ratio"),
        *("drdpo_beta", "kldpo_tau", "kldpo_max_weight"),
    )


def test_every_parameter_is_declared_once_and_both_configs_take_it():
    """RunConfig's and SSAPOConfig's parameter fields carry the declaration's type, default, bounds and
    help (one text each); trl's own label_smoothing keeps trl's default in SSAPOConfig."""
    from trl import DPOConfig

    from ssapo.config import Bounds
    from ssapo.trainer import SSAPOConfig

    ssapo_fields = SSAPOConfig.__dataclass_fields__
    for p in leader_losses.PARAMS.values():
        assert leader_losses.users(p.name), f"{p.name}: used by no loss"
        if p.run:
            f = FIELDS[p.name]
            assert (f.type, f.default, f.metadata["help"]) == (p.type.__name__, p.default, p.help)
            assert f.metadata["bounds"] == Bounds.of(p.bounds)
            assert any(p.name in names for _, names in field_groups())
        if p.trl:
            assert ssapo_fields[p.name].default == DPOConfig.__dataclass_fields__[p.name].default
        else:
            f = ssapo_fields[p.name]
            assert (f.default, f.metadata["help"]) == (p.default, p.help)
    # a parameter that is SSAPOConfig's only (SPA's per-round λ) is checked from its declaration
    with pytest.raises(ConfigError, match=r"^spa_lambda: must be >= 0 \(0 = the policy itself\), got -1"):
        check_bounds("spa_lambda", -1.0)


def test_leader_fields_hand_over_the_losses_own_trl_fields_only():
    from ssapo.config import load_config
    from ssapo.trainer import leader_fields

    cfg = load_config("tiny")
    for name, loss in leader_losses.TABLE.items():
        kw = leader_fields(cfg, name)
        assert kw["leader_loss"] == name
        assert ("label_smoothing" in kw) == ("label_smoothing" in loss.param_names) == (name in ("rdpo", "cdpo"))


def test_a_bad_declaration_is_refused():
    P = leader_losses.Param
    with pytest.raises(ValueError, match="declared twice"):
        leader_losses.register(leader_losses.LeaderLoss(name="dpo", help="", function="dpo_loss"))
    with pytest.raises(ValueError, match="declared by another loss"):
        leader_losses.register(
            leader_losses.LeaderLoss(
                name="x_test", help="", function="dpo_loss", params=(P("clamp_min", float, 1e-6, "> 0", ""),)
            )
        )
    with pytest.raises(ValueError, match="not among its params"):
        leader_losses.register(
            leader_losses.LeaderLoss(name="x_test", help="", function="dpo_loss", function_args=("a",))
        )
    with pytest.raises(ValueError, match="declared by no loss"):
        leader_losses.register(leader_losses.LeaderLoss(name="x_test", help="", function="dpo_loss", params=("nope",)))
    with pytest.raises(ValueError, match="batch must be one of"):
        leader_losses.LeaderLoss(name="x_test", help="", function="dpo_loss", batch="max")
    assert "x_test" not in leader_losses.TABLE


# the whole path of a loss declared here: registered before ssapo.config / ssapo.trainer are imported, as the
# declarations in ssapo/leader_losses.py are; run in a fresh interpreter, so that it leaks into no other test
_NEW_LOSS = textwrap.dedent(
    """
    import io, json, math, contextlib
    import ssapo.leader_losses as L

    def scaled_dpo_loss(h, beta, scale):
        from ssapo.losses import dpo_loss
        return scale * dpo_loss(h, beta)

    L.register(L.LeaderLoss(
        name="scaled_dpo",
        help="DPO's loss times scaled_dpo_scale (a test's loss)",
        function=scaled_dpo_loss,
        function_args=("scaled_dpo_scale",),
        params=(L.Param("scaled_dpo_scale", float, 1.0, "> 0", "scaled_dpo: the factor of DPO's loss.",
                        group="Scaled DPO"),),
        ssapo_leader=True,
    ))
    out = {}
    from ssapo.config import FIELDS, LEADER_LOSSES, field_groups, load_config
    from ssapo.errors import ConfigError
    cfg = load_config("tiny", overrides={"leader_loss": "scaled_dpo", "scaled_dpo_scale": "2.5"})
    out["config"] = [cfg.leader_loss, cfg.scaled_dpo_scale, "scaled_dpo" in LEADER_LOSSES]
    out["group"] = [g for g in field_groups() if "scaled_dpo_scale" in g[1]]
    try:
        load_config("tiny", overrides={"leader_loss": "scaled_dpo", "scaled_dpo_scale": "0"})
    except ConfigError as e:
        out["refused"] = str(e)

    from ssapo.cli import build_parser
    from ssapo.commands.train import build_config
    args, extra = build_parser().parse_known_args(
        ["train", "--model", "tiny", "--leader-loss", "scaled_dpo", "--scaled-dpo-scale", "3"])
    cli = build_config(args, extra)
    out["cli"] = [cli.leader_loss, cli.scaled_dpo_scale]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            build_parser().parse_args(["train", "--help"])
        except SystemExit:
            pass
    out["help"] = " ".join(text.getvalue().split())

    import torch
    from datasets import Dataset
    from ssapo.tiny import build_tokenizer, tiny_llama
    from ssapo.trainer import SSAPOConfig, SSAPOTrainer, leader_fields
    torch.set_num_threads(1)
    rows = [{"prompt": "a b ", "chosen": "c d", "rejected": "e f"}, {"prompt": "b c ", "chosen": "d e", "rejected": "g h"}]

    def train(**kw):
        tok = build_tokenizer("a b c d e f g h".split())
        args = SSAPOConfig(output_dir=kw.pop("out"), per_device_train_batch_size=2, max_steps=2, learning_rate=5e-3,
                           report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", beta=0.1,
                           seed=0, data_seed=0, disable_tqdm=True, **kw)
        tr = SSAPOTrainer(tiny_llama(tok, hidden_size=64, num_layers=2, seed=0), args=args,
                          train_dataset=Dataset.from_list(rows * 2), processing_class=tok)
        tr.train()
        return [r["loss"] for r in tr.state.log_history if "loss" in r]

    import sys, tempfile
    d = tempfile.mkdtemp()
    ours = train(out=d + "/a", **leader_fields(cfg, cfg.leader_loss))
    dpo = train(out=d + "/b", leader_loss="dpo")
    out["losses"] = [ours, dpo]
    try:
        SSAPOConfig(output_dir=d + "/c", use_cpu=True, bf16=False, leader_loss="scaled_dpo", scaled_dpo_scale=-1.0)
    except ConfigError as e:
        out["trainer_refused"] = str(e)
    print("RESULT " + json.dumps(out))
    """
)


def test_a_loss_declared_here_runs_through_the_parser_and_the_trainer(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-c", _NEW_LOSS], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    import json

    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["config"] == ["scaled_dpo", 2.5, True]
    assert out["group"] == [["Scaled DPO", ["scaled_dpo_scale"]]]
    assert out["refused"] == "scaled_dpo_scale: must be > 0, got 0.0"
    assert out["cli"] == ["scaled_dpo", 3.0]
    assert (
        "RunConfig: Scaled DPO: --scaled-dpo-scale FLOAT scaled_dpo: the factor of DPO's loss. [float; > 0; default: 1.0]"
        in (out["help"])
    )
    assert "scaled_dpo (DPO's loss times scaled_dpo_scale (a test's loss))" in out["help"]
    ours, dpo = out["losses"]
    # the first step: the same model and data, so exactly 2.5 times DPO's loss (later steps differ: larger steps)
    assert len(ours) == len(dpo) == 2 and ours[0] == pytest.approx(2.5 * dpo[0], rel=1e-6)
    assert out["trainer_refused"] == "scaled_dpo_scale: must be > 0, got -1.0"
    assert "scaled_dpo" not in leader_losses.TABLE  # nothing registered in this process


def test_architecture_says_how_to_add_a_loss():
    with open(os.path.join(REPO, "docs", "ARCHITECTURE.md")) as f:
        text = f.read()
    section = text.split("## How to add a leader loss", 1)[1].split("\n## ", 1)[0]
    assert "leader_losses" in section and "LeaderLoss(" in section
    assert "One declaration in `ssapo.leader_losses.TABLE` and its test; nothing else changes." in section
    for stale in ("NEEDED_COLUMNS", "SHARED_LEADER_FIELDS", "its branch in"):
        assert stale not in section
