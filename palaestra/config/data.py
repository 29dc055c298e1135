"""The ``data`` section of the methods trained on files (sft, reward, dpo, ppo): chat examples or preference
pairs in a folder of JSONL splits (a dated folder gives the dataset version) or one JSONL file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from palaestra.config.errors import check

__all__ = ["ChatData", "DataSource", "PairData", "PromptData", "validate_data"]


@dataclass
class DataSource:
    """Where the data is and how it is cut."""

    name: str = "planner"
    """Short name used in tags and run names (the planner metrics apply when it is planner)."""
    path: str = "datasets/planner/2026-11-22"
    """A folder of JSONL splits (a dated folder YYYY-MM-DD gives the dataset version) or one JSONL file (split by val_fraction)."""
    val_fraction: float = 0.1
    """Share of the training file held out when there is no validation file."""
    version: Optional[str] = None
    """dataset_version; None uses the dated folder's name (or the file's stem)."""
    max_length: int = 512
    """Token budget per sequence; longer examples are truncated from the left of the prompt."""


@dataclass
class ChatData(DataSource):
    """Chat examples: ``{"messages": [...]}`` or ``{"prompt": ..., "completion": ...}`` per line (sft)."""

    train_file: str = "train.jsonl"
    """Chat examples for training."""
    val_file: str = "val.jsonl"
    """Chat examples for validation (missing: val_fraction of train)."""
    test_file: str = "test.jsonl"
    """Held-out chat examples for generation metrics and replay."""


@dataclass
class PromptData(ChatData):
    """Chat examples whose prompts a policy answers, scored by reward functions (ppo)."""

    rewards: list = field(default_factory=lambda: ["planner_quality"])
    """Without a reward model: reward functions by name or import path, summed."""
    metrics: Optional[str] = None
    """Held-out figures beyond the reward: "package.module:function" taking (completions, rows' columns) and
    returning {name: value} ({} where they do not apply; conf/algo/ppo.yaml names the planner's); null: none."""


@dataclass
class PairData(DataSource):
    """Preference pairs: ``{"prompt" or "messages", "chosen", "rejected"}`` per line (reward, dpo)."""

    preference_train_file: str = "preferences_train.jsonl"
    """Preference pairs for training."""
    preference_val_file: str = "preferences_val.jsonl"
    """Held-out preference pairs (pairwise accuracy)."""


def validate_data(data: DataSource) -> None:
    """The data files exist and the numbers make sense (the files are parsed later, before the model loads)."""
    root = Path(data.path)
    hint = ("generate the planner data with: palaestra data planner" if data.name == "planner"
            else "point data.path at a folder of JSONL splits or a JSONL file")
    check(root.exists(), f"data.path={data.path} does not exist; {hint}")
    if root.is_dir():
        needed = data.preference_train_file if isinstance(data, PairData) else data.train_file
        check((root / needed).is_file(), f"{root / needed} is missing; {hint}")
    check(data.max_length > 16, f"data.max_length={data.max_length} must be > 16")
    check(0 < data.val_fraction < 1, f"data.val_fraction={data.val_fraction} must be in (0, 1)")
