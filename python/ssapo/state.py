"""DIR/state.json, the run's record of its finished steps, and its one owner: `State` (the loop's, written by
one process at a time) and `recorded_steps` (what the driver reads between launches).

    {"done": ["seed", "seed/eval", "round_1/annotate", ...],   # completed steps, in order
     "last": "round_1/annotate",
     "stopped": {"at": ..., "round": t, "result": ..., "why": ..., "skipped": [...]}}   # only when the rounds
                                                                                     # ended early
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from ssapo.errors import ConfigError
from ssapo.io import write_json
from ssapo.processes import Solo

STATE_FILE = "state.json"


def recorded_steps(out: str) -> List[str]:
    """The steps DIR/state.json records as done ([] when there is none or it cannot be read)."""
    try:
        with open(os.path.join(out, STATE_FILE)) as f:
            return list(json.load(f)["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


class State:
    """DIR/state.json: {"done": [steps completed, in order], "last": the last
    one, and "stopped" when the rounds ended early (`stop`)}. Only the main process of `procs` (accelerate's
    PartialState inside a launch; `Solo()` by default) writes; `mark` is also the barrier after a step,
    after which every process reads what the main one wrote."""

    def __init__(self, out: str, resume: bool, procs=None):
        self.procs = procs if procs is not None else Solo()
        self.path = os.path.join(out, STATE_FILE)
        self.done: List[str] = []
        self.stopped: Optional[Dict[str, Any]] = None
        if os.path.exists(self.path):
            if not resume:
                raise ConfigError(
                    f"output_dir: {out} already holds a run (state.json); pass --resume "
                    "(resume=True) to continue it, or choose another directory"
                )
            self.reload()

    def reload(self) -> None:
        if os.path.exists(self.path):
            with open(self.path) as f:
                data = json.load(f)
            self.done, self.stopped = list(data["done"]), data.get("stopped")

    @property
    def main(self) -> bool:
        return self.procs.is_main_process

    def wait(self) -> None:
        self.procs.wait_for_everyone()

    def __contains__(self, step: str) -> bool:
        return step in self.done

    def mark(self, step: str, stopped: Optional[Dict[str, Any]] = None, skipped: Sequence[str] = ()) -> None:
        """Records `step` as done; with `stopped` (the main process's), the rounds end here: the `skipped`
        steps are recorded as done too, never run, and state.json says why."""
        if step not in self.done:
            self.done.append(step)
        if stopped is not None:
            self.stopped = {**stopped, "skipped": list(skipped)}
            self.done += [s for s in skipped if s not in self.done]
        if self.main:
            write_json(
                self.path, {"done": self.done, "last": step, **({"stopped": self.stopped} if self.stopped else {})}
            )
        self.wait()
        if not self.main:
            self.reload()  # what the main process recorded (a stop included)
