"""Preference pairs: loading, tokenising and batching for the reward-model and DPO recipes.

A pair is one prompt with a *chosen* and a *rejected* answer. On disk it is a JSONL row::

    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "chosen": "...", "rejected": "..."}
    {"prompt": "plain text prompt", "chosen": "...", "rejected": "..."}

Chat prompts go through the tokenizer's chat template with the generation prompt added, then the
answer's tokens follow, so the model sees exactly what it sees when it writes that answer. When a
prompt and answer exceed the token budget, the prompt gives way first, losing tokens from the left
(its end, the latest user turn, matters most; the answers are what a pair compares), down to a
quarter of the budget; only then is the answer cut on the right.
A batch (:func:`collate_pairs`) keeps prompts left-padded and answers right-padded, the layout of
a rollout, with the chosen answers in the first half of the rows and the rejected ones after.
"""

from __future__ import annotations

import logging

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from palaestra.data.jsonl import read_jsonl
from palaestra.models.shapes import bucket_length


log = logging.getLogger("palaestra")

__all__ = [
    "EncodedPair", "PreferenceBatch", "PreferencePair", "batch_for_step", "collate_pairs",
    "encode_pair", "encode_prompt_response", "identical_pairs", "load_preference_file", "load_preference_splits", "prompt_ids",
]


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a better and a worse answer."""

    prompt: list | str
    """Chat messages (role/content dicts, ending with the user's turn) or a plain text prompt."""
    chosen: str
    """The preferred answer."""
    rejected: str
    """The dispreferred answer."""
    kind: str | None = None
    """Optional label of how the rejected answer was made (e.g. the planner's corruption name)."""


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one pair: the (possibly truncated) prompt of each side and each answer."""

    chosen_prompt: list[int]
    chosen: list[int]
    rejected_prompt: list[int]
    rejected: list[int]


@dataclass
class PreferenceBatch:
    """B pairs as 2B rows: rows [0, B) are the chosen answers, rows [B, 2B) the rejected ones."""

    prompt_ids: torch.Tensor
    """[2B, P] prompt tokens, left-padded."""
    prompt_mask: torch.Tensor
    """[2B, P] 1 for real prompt tokens."""
    completion_ids: torch.Tensor
    """[2B, C] answer tokens, right-padded."""
    completion_mask: torch.Tensor
    """[2B, C] 1 for real answer tokens (the tokens a DPO log-prob sums over)."""

    @property
    def num_pairs(self) -> int:
        return self.prompt_ids.shape[0] // 2

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``position_ids`` [2B, P + C] of prompt + answer.

        Positions follow the attention mask, so a left-padded row is numbered as if unpadded.
        """
        input_ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


# ---------------------------------------------------------------------------------------- loading


def _pair_from_row(row: object, where: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a preference row must be a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: needs a string {key!r} (rows are {{\"messages\" or \"prompt\", \"chosen\", \"rejected\"}})")
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        )
        if not ok:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        if messages[-1]["role"] == "assistant":
            raise ValueError(f"{where}: 'messages' ends with an assistant turn; the answers belong in 'chosen' and 'rejected'")
        prompt: list | str = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    else:
        raise ValueError(f"{where}: needs 'messages' (chat turns) or a string 'prompt'")
    kind = row.get("kind")
    return PreferencePair(prompt, row["chosen"], row["rejected"], kind if isinstance(kind, str) else None)


def load_preference_file(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL file of preference rows; a bad row is a one-line ValueError naming file and line."""
    pairs = [_pair_from_row(row, where) for where, row in read_jsonl(path, "preference")]
    if not pairs:
        raise ValueError(f"{path} holds no preference pairs")
    return pairs


def load_preference_splits(
    path: str | Path, *, train_file: str = "preferences_train.jsonl", val_file: str = "preferences_val.jsonl",
    val_fraction: float = 0.1, seed: int = 0,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Training and held-out pairs from a dataset folder or a single JSONL file.

    A folder gives ``path/train_file`` and ``path/val_file``; without the latter (or for a single
    file) a seeded ``val_fraction`` of the training pairs is held out (at least one pair).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.path={path} does not exist")
    if path.is_dir():
        train = load_preference_file(path / train_file)
        if (path / val_file).is_file():
            return train, load_preference_file(path / val_file)
    else:
        train = load_preference_file(path)
    if len(train) < 2:
        raise ValueError(f"{path}: {len(train)} pair(s) cannot be split into training and held-out pairs; add more")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(train) * val_fraction))
    val_index = set(order[:held])
    return [p for i, p in enumerate(train) if i not in val_index], [train[i] for i in sorted(val_index)]


def batch_for_step(num_items: int, batch_size: int, step: int, seed: int) -> tuple[int, list[int]]:
    """``(epoch, indices)`` of the 1-based optimizer ``step``: epochs of a seeded shuffle in batches.

    The last batch of an epoch may be smaller; nothing depends on earlier steps, so a resumed run
    picks up exactly where it stopped from the step number alone.

    >>> batch_for_step(5, 2, 3, seed=0)[0], len(batch_for_step(5, 2, 3, seed=0)[1])   # 3 batches per epoch
    (0, 1)
    """
    per_epoch = math.ceil(num_items / batch_size)
    epoch, index = divmod(step - 1, per_epoch)
    order = list(range(num_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return epoch, order[index * batch_size : (index + 1) * batch_size]


# ---------------------------------------------------------------------------------------- tokenising


def prompt_ids(tokenizer, prompt: list | str) -> list[int]:
    """Token ids of a prompt as the model sees it right before it answers.

    Chat messages use the chat template with the generation prompt; a plain string is wrapped as
    one user turn when the tokenizer has a chat template, and used as raw text otherwise.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str) and not has_template:
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not has_template:
        raise ValueError("chat prompts need a tokenizer with a chat template; use string 'prompt' rows or another model")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt_response(
    tokenizer, prompt: list | str, response: str, max_length: int, *, add_eos: bool = True, prompt_tokens: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` with ``len(prompt) + len(response) <= max_length``.

    ``add_eos`` ends the answer with the end-of-sequence token (the policy learns to stop; a
    reward model scores the last answer token instead). Truncation: the prompt loses tokens from
    the left, keeping at least ``max_length // 4`` of them (or all, if fewer); an answer that still
    does not fit is cut on the right.
    """
    ids = prompt_ids(tokenizer, prompt) if prompt_tokens is None else prompt_tokens
    answer = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    if len(ids) + len(answer) > max_length:
        keep = max(max_length - len(answer), min(len(ids), max_length // 4))
        ids, answer = ids[len(ids) - keep:], answer[: max_length - keep]
    return ids, answer


def encode_pair(tokenizer, pair: PreferencePair, max_length: int, *, add_eos: bool = True) -> EncodedPair:
    """Both sides of a pair, each fitted to ``max_length`` (the prompt is tokenised once)."""
    shared = prompt_ids(tokenizer, pair.prompt)
    chosen_prompt, chosen = encode_prompt_response(tokenizer, pair.prompt, pair.chosen, max_length, add_eos=add_eos, prompt_tokens=shared)
    rejected_prompt, rejected = encode_prompt_response(tokenizer, pair.prompt, pair.rejected, max_length, add_eos=add_eos, prompt_tokens=shared)
    return EncodedPair(chosen_prompt, chosen, rejected_prompt, rejected)


def _pad(rows: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = bucket_length(max(len(r) for r in rows))  # a bounded set of matrix shapes (models.shapes)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def identical_pairs(pairs: list[EncodedPair]) -> int:
    """How many pairs have the same tokens on both sides (no signal: usually a token budget too small)."""
    return sum(p.chosen_prompt + p.chosen == p.rejected_prompt + p.rejected for p in pairs)


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int) -> PreferenceBatch:
    """Stack B encoded pairs into a :class:`PreferenceBatch` of 2B rows (chosen first)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    prompts = [p.chosen_prompt for p in pairs] + [p.rejected_prompt for p in pairs]
    answers = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    prompt_ids_, prompt_mask = _pad(prompts, pad_token_id, left=True)
    completion_ids, completion_mask = _pad(answers, pad_token_id, left=False)
    return PreferenceBatch(prompt_ids_, prompt_mask, completion_ids, completion_mask)


def load_pairs(data, seed: int) -> tuple[list, list]:
    """Training and held-out preference pairs of the ``data`` section; file problems become one-line ConfigErrors."""
    from palaestra.config.errors import ConfigError

    try:
        return load_preference_splits(data.path, train_file=data.preference_train_file, val_file=data.preference_val_file,
                                      val_fraction=data.val_fraction, seed=seed)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None


def pair_rows(tokenizer, train_pairs: list, val_pairs: list, *, max_length: int, add_eos: bool) -> tuple[list, list]:
    """Tokenised training and held-out preference pairs; a warning when truncation made training pairs identical."""
    train_rows = [encode_pair(tokenizer, pair, max_length, add_eos=add_eos) for pair in train_pairs]
    val_rows = [encode_pair(tokenizer, pair, max_length, add_eos=add_eos) for pair in val_pairs]
    if identical_pairs(train_rows):
        log.warning("%d training pairs are identical after truncation to data.max_length=%d; raise data.max_length",
                    identical_pairs(train_rows), max_length)
    return train_rows, val_rows


def pair_steps(pairs: int, batch_size: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """(steps per epoch, steps in all: ``max_steps`` or ``epochs`` epochs) of training on ``pairs`` pairs."""
    per_epoch = math.ceil(pairs / batch_size)
    return per_epoch, max_steps or epochs * per_epoch


def pair_batch(rows: list, batch_size: int, step: int, seed: int) -> tuple[int, list]:
    """(epoch, the rows of ``step``): the step's share of its epoch's seeded shuffle (the step number alone fixes it)."""
    epoch, indices = batch_for_step(len(rows), batch_size, step, seed)
    return epoch, [rows[i] for i in indices]


def pair_epoch(step: int, epoch: int, batch_size: int, count: int) -> float:
    """Epochs done after ``step`` of :func:`palaestra.data.preferences.batch_for_step` (fractional)."""
    per_epoch = math.ceil(count / batch_size)
    return epoch + min(((step - 1) % per_epoch + 1) * batch_size, count) / count
