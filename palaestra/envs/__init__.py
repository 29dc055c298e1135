"""Multi-turn, multi-agent environments.

``ENVIRONMENTS`` maps a name to its class; build one with its keyword arguments, then
``reset(seed)``. Training seeds come from ``train_seeds``, test seeds from ``test_seeds`` (the
two ranges never overlap).
"""

from palaestra.envs.base import (
    TEST_SEED_OFFSET,
    TRAIN_SEED_OFFSET,
    MultiAgentEnv,
    StepResult,
    ToolPlanEnv,
    extract_python_code,
    parse_action_list,
    run_tool_code,
    test_seeds,
    train_seeds,
)
from palaestra.envs.code_env import CodeEnv
from palaestra.envs.math_env import MathEnv
from palaestra.envs.plan_path import PlanPathEnv
from palaestra.plugins import lookup
from palaestra.envs.sokoban import SokobanEnv
from palaestra.envs.sudoku import SudokuEnv

ENVIRONMENTS: dict[str, type[MultiAgentEnv]] = {
    "code": CodeEnv,
    "math": MathEnv,
    "plan_path": PlanPathEnv,
    "sokoban": SokobanEnv,
    "sudoku": SudokuEnv,
}
"""Environment name -> class."""


def resolve_env(name: str) -> type[MultiAgentEnv]:
    """The environment class for a name in ``ENVIRONMENTS`` or an import path "package.module:Class"."""
    env_class = lookup(name, ENVIRONMENTS, "env.name")
    if isinstance(env_class, type) and issubclass(env_class, MultiAgentEnv):
        return env_class
    raise ValueError(f"env.name={name!r} is not a MultiAgentEnv subclass")


__all__ = [
    "ENVIRONMENTS",
    "resolve_env",
    "TEST_SEED_OFFSET",
    "TRAIN_SEED_OFFSET",
    "CodeEnv",
    "MathEnv",
    "MultiAgentEnv",
    "PlanPathEnv",
    "SokobanEnv",
    "StepResult",
    "SudokuEnv",
    "ToolPlanEnv",
    "extract_python_code",
    "parse_action_list",
    "run_tool_code",
    "test_seeds",
    "train_seeds",
]
