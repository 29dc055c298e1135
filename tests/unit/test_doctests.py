"""The examples in docstrings are tests too."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "palaestra.rewards.correctness",
    "palaestra.rewards.tiered",
    "palaestra.rewards.tunix_gsm8k",
    "palaestra.tasks.answers",
    "palaestra.tasks.base",
    "palaestra.evaluation.metrics",
    "palaestra.rollout.hf",
    "palaestra.algorithms.at_grpo",
    "palaestra.planner.metrics",
    "palaestra.data.chat",
    "palaestra.pipeline",
    "palaestra.rollout.decode",
    "palaestra.rollout.vllm_engine",
    "palaestra.envs.plan_path",
    "palaestra.models.logprobs",
    "palaestra.rewards.planner",
    "palaestra.models.value_head",
    "tests.recipes.rewards",
    "palaestra.rewards",
    "palaestra.cli",
    "palaestra.config",
    "palaestra.jobs",
    "palaestra.classification.metrics",
    "palaestra.models.shapes",
    "palaestra.retrieval.docs_index",
    "palaestra.rewards.qa",
    "palaestra.agents.episodes",
    "palaestra.rollout.int8",
    "palaestra.rollout.fast_llama",
    "palaestra.optim",
    "palaestra.recipes.run",
    "palaestra.models.precision",
    "palaestra.config.rollout",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
