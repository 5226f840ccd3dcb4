"""The gold reward as an annotator: the iterative-DPO oracle of `ssapo bench`.

    annotator: ssapo.bench.oracle:gold_annotator
    annotator_args: <task dir>/task.json

`gold_annotator(task_json)` returns the scorer `ssapo.annotators.load_annotator`
expects: `score(prompts, responses) -> rewards`, prompts as annotations.jsonl
writes them (a string or chat messages), responses[i] the decoded texts of
prompts[i], one gold reward per response. With it the loop's rounds label their
pairs by the task's hidden reward, the best any self-annotator could do on the
same prompts and samples.
"""

from __future__ import annotations

from typing import Callable, List, Sequence


def _text(message) -> str:
    """The text of a prompt: a string, or the last turn of chat messages."""
    if isinstance(message, str):
        return message
    return message[-1]["content"]


def gold_annotator(task_json) -> Callable[[List, List[List[str]]], Sequence[Sequence[float]]]:
    """The scorer of the task whose task.json is `task_json` (ValueError naming annotator_args otherwise)."""
    import os

    from ssapo.bench.task import gold_reward, load_spec

    if not task_json or not os.path.isfile(str(task_json)):
        raise ValueError(
            f"annotator_args: ssapo.bench.oracle:gold_annotator needs the task's task.json, got {task_json!r}"
        )
    spec = load_spec(str(task_json))

    def score(prompts: List, responses: List[List[str]]) -> List[List[float]]:
        return [[gold_reward(spec, _text(p), r) for r in rs] for p, rs in zip(prompts, responses)]

    return score
