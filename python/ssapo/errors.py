"""ssapo's error types, in one place (they import nothing of the project, so any module may raise them).

Every message starts with what is at fault (a RunConfig field, a command-line flag, a file or an argument),
so a command prints it as one line (`ssapo train: error: <message>`, exit 2; a failed launch: exit 1):

    ConfigError   a bad configuration value, key or file          "eps: must be >= 0, got -1"
    InputError    a bad input file, column or row                 "preference_data: line 7 of uf.jsonl: ..."
    StepFailed    a step's launch ended without completing it     "step seed failed (exit 1; rank 0: ...); log: ..."

ConfigError and InputError are ValueErrors (a caller catching ValueError keeps working); StepFailed is a
RuntimeError (the input was fine; the run failed). dro_core has its own (ValueError, from Rust).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value, key or file. The message starts with the field
    (or `config`, or the command-line flag) at fault: "eps: must be >= 0, got -1"."""


class InputError(ValueError):
    """A bad input file or column; the message names the argument."""


class StepFailed(RuntimeError):
    """A step's launch ended without completing the step (its log names the cause)."""
