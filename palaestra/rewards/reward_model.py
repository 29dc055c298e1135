"""A trained reward model as a reward: score (prompt, completion) pairs with one scalar each.

The folder is what ``palaestra train --target=reward`` writes (``<run>/reward_model``): a plain
Hugging Face sequence-classification model with one label, plus its tokenizer. Prompts and
completions are tokenised exactly as the reward-model recipe tokenised its training pairs
(:func:`palaestra.data.preferences.encode_prompt_response`), so scores mean what they meant there.

    scorer = load_reward_model("runs/planner-reward/<stamp>/reward_model")
    scorer.score([[{"role": "user", "content": "2+2?"}]], ["4"])   # -> [1.73]

As a reward function (GRPO, evaluation): ``task.rewards=[reward_model:<folder>]`` resolves to
:func:`reward_model_reward`, which reads the prompts from the ``prompt`` column.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

__all__ = [
    "METADATA_FILE", "RewardModelScorer", "load_reward_model", "reward_model_function", "reward_model_reward", "score_rows",
]

METADATA_FILE = "palaestra_reward_model.json"
"""Written beside the weights by the recipe: the token budget the model was trained with."""
_DEFAULT_MAX_LENGTH = 1024


class RewardModelScorer:
    """Scores completions with a reward-model folder; load once, call ``score`` many times."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", *, batch_size: int = 8,
                 max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"reward model folder {folder} has no config.json; train one with palaestra train --target=reward")
        self.folder = folder
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), local_files_only=True)
        self.model.to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{folder} is a classifier with {self.model.config.num_labels} labels; a reward model has 1")
        if self.model.config.pad_token_id is None:  # the score is read at the last token that is not padding
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        metadata = folder / METADATA_FILE
        trained = json.loads(metadata.read_text()).get("max_length") if metadata.is_file() else None
        self.max_length = int(max_length or trained or _DEFAULT_MAX_LENGTH)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        """One scalar reward per (prompt, completion); prompts are chat messages (or plain strings).

        Batched (``batch_size`` rows per forward), no gradients; higher means better.
        """
        from palaestra.data.preferences import encode_prompt_response

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        pad = self.model.config.pad_token_id
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            rows = [
                encode_prompt_response(self.tokenizer, prompt, completion, self.max_length, add_eos=False)
                for prompt, completion in zip(prompts[start:start + self.batch_size], completions[start:start + self.batch_size])
            ]
            scores.extend(score_rows(self.model, rows, pad, self.device))
        return scores

    def __call__(self, prompts: list[list[dict]], completions: list[str]) -> list[float]:
        return self.score(prompts, completions)


def score_rows(model, rows: list[tuple[list[int], list[int]]], pad_token_id: int, device) -> list[float]:
    """Scores of (prompt_ids, answer_ids) rows: one forward, right-padded, positions from the mask."""
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        tokens = prompt + answer
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=position_ids.to(device)).logits
    return [float(v) for v in logits[:, 0].float().cpu()]


_CACHE: dict[tuple[str, str], RewardModelScorer] = {}
_LOCK = threading.Lock()


def load_reward_model(folder: str, device: str = "cpu") -> RewardModelScorer:
    """The scorer of ``folder`` on ``device``, loaded once per process and cached by folder."""
    key = (str(Path(folder).resolve()), str(device))
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = RewardModelScorer(folder, device)
        return _CACHE[key]


def reward_model_reward(completions: list[str], *, folder: str, prompt: list | None = None, **columns) -> list[float]:
    """Reward function over a reward-model folder; needs the ``prompt`` column (chat messages per row).

    ``resolve_reward("reward_model:<folder>")`` returns this function with ``folder`` bound.
    The model loads on first use (then stays cached), on the GPU when there is one.
    """
    if prompt is None:
        raise ValueError("reward_model rewards need the prompt of each completion: the task must pass a 'prompt' column")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_reward_model(folder, device).score(list(prompt), list(completions))


def reward_model_function(folder: str):
    """``(completions, **columns) -> list[float]`` scoring with the reward model in ``folder``.

    Cheap: checks the folder exists and defers loading the model to the first call.
    """
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"reward 'reward_model:{folder}': {folder} is not a reward model folder (no config.json)")
    folder = str(folder)

    def reward_model(completions: list[str], **columns) -> list[float]:
        return reward_model_reward(completions, folder=folder, **columns)

    return reward_model
