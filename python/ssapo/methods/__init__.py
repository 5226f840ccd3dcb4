"""Methods as data: one module per method in this package, each declaring what
it needs from the loop in a `METHOD = Method(...)`; `TABLE` holds them all.

    from ssapo.methods import method_of
    m = method_of(cfg)                       # cfg.method's declaration
    m.leader_loss_of(cfg), m.leader_params(cfg, t), m.follower, m.extra_steps

The loop (`ssapo.loop`) runs, for every method: the seed stage (unless
`seed_model` is given) and its evaluation; then, when `rounds`, for t = 1..T:
`annotate` (self-annotation), `follow` (when `follower`: the follower's atoms
on every pair), the method's `extra_steps` in order, `lead` (the leader, with
`leader_loss_of(cfg)` and `leader_params(cfg, t)`, on `train_rows(run, t)`,
default the annotated pairs with their atoms) and `eval`.

Adding a method is one new module here, e.g. `methods/rdpo.py`:

    from ssapo.methods import Method

    METHOD = Method(
        name="rdpo",
        help="robust DPO (Chowdhury et al., 2024) on the self-labels: unbiased under flips at rate label_smoothing",
        leader_loss="rdpo",
    )

plus its test; `RunConfig.method` takes it at once (config.METHODS is this
table's names, read from the modules' text: ssapo.config imports nothing of the
project, so `name` and `help` are plain strings). The leader loss itself is
a declaration of `ssapo.leader_losses.TABLE`; its parameters are RunConfig
fields made from it that the trainer's config takes over
(`ssapo.trainer.leader_fields`), or, per round, `leader_params`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

KINDS = ("train", "data", "driver")


@dataclass(frozen=True)
class Step:
    """A step of a round. `fn(run, state, t)` runs it on every process of
    `state` and returns the sections it adds to round t's metrics.json
    (e.g. {"sera": {...}}; None on the other processes); `kind` says where it
    runs: 'train' (under the recipe's engine, ZeRO-3/FSDP), 'data'
    (data-parallel processes with whole models) or 'driver' (the driver
    itself: milliseconds of numpy, no torch); `generates`: it samples
    responses (one process under vLLM); `after(run, t)`: run on the main
    process once the sections are recorded (e.g. the round's report)."""

    name: str
    fn: Callable
    kind: str = "data"
    generates: bool = False
    after: Optional[Callable] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")


def _no_params(cfg, t: int) -> dict:
    return {}


@dataclass(frozen=True)
class Method:
    """What a method needs from the loop (see the module docstring).

    - `rounds`: self-annotation rounds after the seed stage (False: π_0 is the result);
    - `follower`: the follow step, and the follower's atoms attached to every pair
      (and the re-solve hook with resolve_every);
    - `extra_steps`: steps between annotation (or the follower) and the leader;
    - `leader_loss`: a leader loss of `ssapo.leader_losses.TABLE`, or a function of the RunConfig;
    - `leader_params(cfg, t)`: round t's extra SSAPOConfig fields (recorded in
      the leader's metrics);
    - `train_rows(run, t)`: the rows round t's leader trains on (None: the
      annotated pairs, with their atoms when `follower`)."""

    name: str
    help: str
    rounds: bool = True
    follower: bool = False
    extra_steps: Tuple[Step, ...] = ()
    leader_loss: Union[str, Callable] = "dpo"
    leader_params: Callable = _no_params
    train_rows: Optional[Callable] = None

    def leader_loss_of(self, cfg) -> str:
        return self.leader_loss(cfg) if callable(self.leader_loss) else self.leader_loss


def _load_table() -> Dict[str, Method]:
    table: Dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        m = getattr(mod, "METHOD", None)
        if not isinstance(m, Method):
            raise TypeError(f"{mod.__name__}: a method module must define METHOD = Method(...)")
        if m.name in table:
            raise ValueError(f"{mod.__name__}: method name {m.name!r} is declared twice")
        table[m.name] = m
    return table


TABLE: Dict[str, Method] = _load_table()


def names() -> Tuple[str, ...]:
    """Every method's name (RunConfig.method's choices)."""
    return tuple(TABLE)


def method_of(cfg_or_name) -> Method:
    name = getattr(cfg_or_name, "method", cfg_or_name)
    if name not in TABLE:
        raise ValueError(f"method: must be one of {', '.join(TABLE)}, got {name!r}")
    return TABLE[name]


# the loop's own steps and where each runs, (kind, generates) as in `Step` (ssapo.loop gives them their
# functions): declared here so that the launcher knows where a step runs without importing the loop
LOOP_STEPS: Dict[str, Tuple[str, bool]] = {
    "seed": ("train", False),
    "annotate": ("data", True),
    "follow": ("driver", False),
    "lead": ("train", False),
    "eval": ("data", False),
}


def steps_of(cfg) -> List[str]:
    """Every step of a run of `cfg`, in order (from its method's declaration)."""
    m = method_of(cfg)
    steps = ([] if cfg.seed_model else ["seed"]) + ["seed/eval"]
    if m.rounds:
        steps += [f"round_{t}/{name}" for t in range(1, cfg.num_rounds + 1) for name in round_step_names(m)]
    return steps


def parse_step(cfg, step: str) -> Tuple[str, int]:
    """(the step's name, its round t; 0 for the seed stage) of a step such as 'seed', 'seed/eval' or
    'round_2/lead'; ValueError naming `step` for one this run does not have."""
    head, _, name = step.partition("/")
    if head == "seed":
        t, name = 0, name or "seed"
    elif head.startswith("round_") and head[6:].isdigit() and name != "seed":
        t = int(head[6:])
    else:
        t, name = -1, ""
    if t < 0 or (name not in LOOP_STEPS and name not in {s.name for s in method_of(cfg).extra_steps}):
        raise ValueError(f"step: unknown step {step!r} (steps of this run: {', '.join(steps_of(cfg))})")
    return name, t


def step_kind(cfg, step: str) -> Tuple[str, bool]:
    """(kind, generates) of a step (`Step`'s): the loop's own (LOOP_STEPS) or the method's extra step."""
    name, _ = parse_step(cfg, step)
    extra = {s.name: s for s in method_of(cfg).extra_steps}
    return LOOP_STEPS[name] if name in LOOP_STEPS else (extra[name].kind, extra[name].generates)


def round_step_names(method: Method) -> List[str]:
    """The names of a round's steps, in order."""
    return ["annotate", *(["follow"] if method.follower else []), *(s.name for s in method.extra_steps), "lead", "eval"]
