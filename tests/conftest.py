"""Fixtures shared by the test files (pytest finds them here by name).

- `task_dir`: the built-in gold-reward task at its test size (`ssapo.bench.task.prepare_task(seed=42,
  size="test")`: a tiny Llama SFT'd locally, labelled pairs, a prompt pool), built once per session;
  tests copy a file before changing it.
- `task_paths`: its SFT model and data as RunConfig fields (model, preference_data, prompt_data), as a
  user's run would name them.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> str:
    from ssapo.bench.task import prepare_task

    d = str(tmp_path_factory.mktemp("task"))
    prepare_task(d, seed=42, size="test")
    return d


@pytest.fixture(scope="session")
def task_paths(task_dir) -> dict:
    return {
        "model": os.path.join(task_dir, "sft"),
        "preference_data": os.path.join(task_dir, "preferences.jsonl"),
        "prompt_data": os.path.join(task_dir, "prompts.jsonl"),
    }
