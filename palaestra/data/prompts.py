"""Chat prompts with their row's other columns: what an on-policy method (PPO) samples from and scores.

The splits are those of :func:`palaestra.data.chat.load_chat_data`; each row keeps its structured
columns beside the conversation, because reward functions read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.data.chat import dataset_version, to_messages
from palaestra.data.jsonl import read_jsonl

__all__ = ["ChatPrompt", "load_prompts", "read_prompts"]


@dataclass
class ChatPrompt:
    """One chat prompt and the row's other columns (what reward functions read)."""

    messages: list[dict]
    """The conversation up to the assistant's answer (system and user messages)."""
    columns: dict
    """Every other field of the row, e.g. household, pantry, constraints and plan for the planner."""


def load_prompts(data) -> tuple[list[ChatPrompt], list[ChatPrompt], str]:
    """Train prompts, held-out prompts (test split, else val, else the tail of train) and the dataset version.

    The splits are those of :func:`palaestra.data.chat.load_chat_data`, read here row by row
    because PPO also needs each row's structured columns (the reward functions' inputs).
    """
    root = Path(data.path)
    if root.is_dir():
        train = read_prompts(root / data.train_file)
        heldout_file = next((root / name for name in (data.test_file, data.val_file) if (root / name).is_file()), None)
        heldout = read_prompts(heldout_file) if heldout_file else []
    else:
        train, heldout = read_prompts(root), []
    if not heldout:
        keep = max(1, round(len(train) * (1 - data.val_fraction)))
        train, heldout = train[:keep], train[keep:]
    if not train:
        raise ConfigError(f"data.path={data.path} has no training prompts")
    return train, heldout, dataset_version(root, data.version)


def read_prompts(path: Path) -> list[ChatPrompt]:
    """The chat rows of a JSONL file as prompts: the messages before the (last) assistant answer."""
    prompts = []
    for where, row in read_jsonl(path, "prompt"):
        messages = to_messages(row, where)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # the answer is what PPO samples
        if not messages:
            raise ConfigError(f"{where}: the conversation has no prompt before the assistant's answer")
        columns = {k: v for k, v in row.items() if k not in ("messages", "prompt", "completion")}
        prompts.append(ChatPrompt(messages, columns))
    return prompts
