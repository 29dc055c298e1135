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
from palaestra.envs.plan_path import PlanPathEnv
from palaestra.envs.sokoban import SokobanEnv
from palaestra.envs.sudoku import SudokuEnv

ENVIRONMENTS: dict[str, type[MultiAgentEnv]] = {
    "plan_path": PlanPathEnv,
    "sokoban": SokobanEnv,
    "sudoku": SudokuEnv,
}
"""Environment name -> class."""

__all__ = [
    "ENVIRONMENTS",
    "TEST_SEED_OFFSET",
    "TRAIN_SEED_OFFSET",
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
