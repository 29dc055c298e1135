"""Chat data for supervised fine-tuning: loading, tokenising with the chat template, packing.

A dataset is a folder of JSONL splits (``train.jsonl``, ``val.jsonl``, ``test.jsonl``; a dated
folder ``YYYY-MM-DD`` names the dataset version) or a single JSONL file split by ``val_fraction``.
One line is one conversation, in either of the two usual shapes::

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "..." or [messages], "completion": "..."}

Tokenising renders the conversation with the tokenizer's own chat template and marks which tokens
the assistant wrote (the only ones scored, by default). Packing concatenates several short
examples into one sequence; a block-diagonal causal mask keeps them from attending to each other
and position ids restart at 0 for each, so a packed batch computes exactly what the examples would
alone (tests/unit/test_chat_data.py checks the loss to 1e-5).

Note on transformers: with ``attention_mask=None`` a Llama forward does *not* separate packed
examples from restarting ``position_ids`` alone on CPU (sdpa or eager), so we pass an explicit
4D additive mask, which every attention implementation except flash-attention takes as it is.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from palaestra.config.errors import ConfigError
from palaestra.data.jsonl import read_jsonl
from palaestra.models.shapes import bucket_length

__all__ = [
    "IGNORE_INDEX", "Batch", "ChatData", "TokenizedExample", "block_causal_mask", "collate",
    "dataset_version", "load_chat_data", "pack_examples", "read_chat_jsonl", "summed_token_loss",
    "to_messages", "tokenize_conversation",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that is not scored (prompt, padding, the first token of each example)."""

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ROLES = ("system", "user", "assistant", "tool")


# ------------------------------------------------------------------------------------------ loading


@dataclass
class ChatData:
    """The conversations of one dataset, split, with its version."""

    train: list[list[dict]]
    """Training conversations (each a list of {"role", "content"} messages)."""
    val: list[list[dict]]
    """Validation conversations (the val file, or the last val_fraction of train)."""
    test: list[list[dict]] = field(default_factory=list)
    """Held-out conversations (empty when the dataset has no test file)."""
    version: str = ""
    """dataset_version: data.version, the dated folder's name, or the file's stem."""


def to_messages(row: dict, where: str = "row") -> list[dict]:
    """One JSONL row as chat messages; ``where`` (``file:line``) prefixes any error.

    >>> to_messages({"prompt": "2+2?", "completion": "4"})
    [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    >>> to_messages({"text": "hi"}, "a.jsonl:3")
    Traceback (most recent call last):
    ...
    palaestra.config.errors.ConfigError: a.jsonl:3: a row needs "messages" or "prompt" and "completion" (got keys: text)
    """
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
        messages += [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion or [])
    else:
        raise ConfigError(f'{where}: a row needs "messages" or "prompt" and "completion" (got keys: {", ".join(row) or "none"})')
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    clean = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(message.get("content"), str):
            raise ConfigError(f"{where}: each message needs a role ({', '.join(_ROLES)}) and a string content, got {str(message)[:80]}")
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ConfigError(f"{where}: the conversation has no assistant turn to learn from")
    return clean


def read_chat_jsonl(path: Path | str) -> list[list[dict]]:
    """Every conversation of a JSONL file (blank lines skipped); errors name the file and line."""
    return [to_messages(row, where) for where, row in read_jsonl(path, "chat data")]


def dataset_version(path: Path | str, version: str | None = None) -> str:
    """The dataset's version: ``version`` if given, else the dated folder's name, else the name.

    >>> dataset_version("datasets/planner/2026-11-22")
    '2026-11-22'
    >>> dataset_version("datasets/planner/2026-11-22/train.jsonl")
    '2026-11-22'
    >>> dataset_version("data/chats.jsonl"), dataset_version("data/chats.jsonl", version="v3")
    ('chats', 'v3')
    """
    if version:
        return str(version)
    path = Path(path)
    if path.suffix and _DATE.match(path.parent.name):  # a file inside a dated folder
        return path.parent.name
    return path.name if not path.suffix else path.stem


def _split_off(conversations: list, fraction: float, what: str) -> tuple[list, list]:
    """(head, tail): the last ``fraction`` (at least one) held out; the head keeps at least one."""
    if len(conversations) < 2:
        raise ConfigError(f"{what} has {len(conversations)} conversation(s); at least 2 are needed to hold out a validation share")
    held = min(len(conversations) - 1, max(1, math.ceil(len(conversations) * fraction)))
    return conversations[:-held], conversations[-held:]


def load_chat_data(data) -> ChatData:
    """Load the splits that ``data`` (a :class:`palaestra.config.DataConfig`) points at.

    A folder needs ``data.train_file``; a missing ``data.val_file`` holds out the last
    ``data.val_fraction`` of train, a missing ``data.test_file`` leaves test empty. A single file is
    split into train and val the same way.
    """
    root = Path(data.path)
    if not root.exists():
        raise FileNotFoundError(f"data.path={data.path} does not exist; give a folder of JSONL splits or a JSONL file")
    if root.is_dir():
        train = read_chat_jsonl(root / data.train_file)
        if (root / data.val_file).is_file():
            val = read_chat_jsonl(root / data.val_file)
        else:
            train, val = _split_off(train, data.val_fraction, str(root / data.train_file))
        test = read_chat_jsonl(root / data.test_file) if (root / data.test_file).is_file() else []
    else:
        train, val = _split_off(read_chat_jsonl(root), data.val_fraction, str(root))
        test = []
    if not train or not val:
        raise ConfigError(f"data.path={data.path}: the {'training' if not train else 'validation'} split is empty")
    return ChatData(train, val, test, dataset_version(root, data.version))


# ------------------------------------------------------------------------------------- tokenising


@dataclass
class TokenizedExample:
    """One conversation as token ids with its loss labels (same length)."""

    input_ids: list[int]
    """Token ids of the rendered conversation, at most max_length of them."""
    labels: list[int]
    """The token id where the token is scored, else IGNORE_INDEX; the first label is always ignored."""

    @property
    def num_targets(self) -> int:
        """Tokens that count in the loss (a label at position 0 is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes its own specials


class _Boundaries:
    """Where a rendered prefix of the conversation ends, in tokens of the full conversation."""

    def __init__(self, tokenizer, full_text: str, full_ids: list[int]):
        self.tokenizer, self.full_text, self.full_ids = tokenizer, full_text, full_ids
        self._offsets = None

    def span(self, messages: list[dict], index: int) -> tuple[int, int]:
        """Token range [start, end) of assistant message ``index``, its end-of-turn marker included."""
        return (self._end_of(messages[:index], add_generation_prompt=True),
                self._end_of(messages[: index + 1], add_generation_prompt=False))

    def _end_of(self, prefix: list[dict], add_generation_prompt: bool) -> int:
        try:
            text = _render(self.tokenizer, prefix, add_generation_prompt) if prefix or add_generation_prompt else ""
        except Exception:  # some templates refuse a prefix (e.g. no messages at all)
            return 0
        ids = _encode(self.tokenizer, text)
        if self.full_ids[: len(ids)] == ids:  # the usual case: the prefix tokenises the same on its own
            return len(ids)
        offsets = self._offset_mapping() if self.full_text.startswith(text) else None
        if offsets is not None:
            # a token merged across the boundary: map characters to tokens; a token that straddles
            # the boundary counts as the answer's (the start of the answer, or its end-of-turn)
            n = len(text)
            if add_generation_prompt:
                return next((i for i, (_, end) in enumerate(offsets) if end > n), len(offsets))
            return next((i for i, (start, _) in enumerate(offsets) if start >= n), len(offsets))
        common = next((i for i, (a, b) in enumerate(zip(ids, self.full_ids)) if a != b), min(len(ids), len(self.full_ids)))
        log.warning("the chat template renders a prefix differently from the whole conversation; "
                    "assistant tokens are located approximately (longest common prefix)")
        return common

    def _offset_mapping(self):
        if self._offsets is None and getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(self.full_text, add_special_tokens=False, return_offsets_mapping=True)
            self._offsets = encoded["offset_mapping"]
        return self._offsets


def tokenize_conversation(tokenizer, messages: list[dict], *, max_length: int, assistant_only: bool = True) -> TokenizedExample:
    """Render ``messages`` with the chat template; label the assistant's tokens (or all of them).

    Each assistant turn spans from the end of the prefix rendered with the generation prompt
    (``<|im_start|>assistant\\n``) to the end of the prefix that includes the turn (its end-of-turn
    token included, so the model learns to stop). Conversations longer than ``max_length`` keep
    their last ``max_length`` tokens: the prompt is cut from the left and the answer kept.
    """
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    ids = _encode(tokenizer, full_text)
    if assistant_only:
        labels = [IGNORE_INDEX] * len(ids)
        bounds = _Boundaries(tokenizer, full_text, ids)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                start, end = bounds.span(messages, index)
                labels[start:end] = ids[start:end]
    else:
        labels = list(ids)
    ids, labels = ids[-max_length:], labels[-max_length:]
    if labels:
        labels[0] = IGNORE_INDEX  # never predicted inside its own sequence; in a pack it follows another example
    return TokenizedExample(ids, labels)


# ------------------------------------------------------------------------------ packing, batches


def pack_examples(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group example indices, in order, into sequences of at most ``max_length`` tokens (next fit).

    >>> pack_examples([5, 3, 4, 6, 2], max_length=8)
    [[0, 1], [2], [3, 4]]
    """
    bins: list[list[int]] = []
    used = max_length + 1
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens, more than max_length={max_length}; tokenise with truncation")
        if used + length > max_length:
            bins.append([])
            used = 0
        bins[-1].append(index)
        used += length
    return bins


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask [B, 1, T, T] from segment ids [B, T]: 0 where query t may see key s.

    Token t sees token s when s <= t and both belong to the same segment (example); elsewhere the
    mask holds the dtype's most negative value. Every token sees at least itself, so no row is
    fully masked.

    >>> block_causal_mask(torch.tensor([[0, 0, 1]]))[0, 0].eq(0).int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


@dataclass
class Batch:
    """Rows of examples (one, or several packed) padded on the right to one length T."""

    input_ids: torch.Tensor
    """[B, T] token ids; padding is the tokenizer's pad id."""
    labels: torch.Tensor
    """[B, T] targets, IGNORE_INDEX on prompts, padding and each example's first token."""
    position_ids: torch.Tensor
    """[B, T] positions, restarting at 0 for every example of a row."""
    segment_ids: torch.Tensor
    """[B, T] the example each token belongs to within its row (0, 1, ...); -1 on padding."""
    packed: bool
    """Rows hold several examples: the model gets a block-diagonal 4D mask instead of a 2D one."""

    @property
    def num_targets(self) -> int:
        """Tokens scored by the loss (labels shifted by one, as the loss reads them)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def model_inputs(self, device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Keyword arguments for a causal LM's forward; ``dtype`` is the 4D mask's (the compute dtype)."""
        if self.packed:
            mask = block_causal_mask(self.segment_ids.to(device), dtype)
        else:
            mask = (self.segment_ids >= 0).long().to(device)
        return {"input_ids": self.input_ids.to(device), "attention_mask": mask,
                "position_ids": self.position_ids.to(device), "use_cache": False}


def collate(rows: list[list[TokenizedExample]], pad_id: int, packed: bool) -> Batch:
    """Concatenate each row's examples, pad rows on the right to the longest (its length bucketed:
    a bounded set of matrix shapes, see models.shapes), build the ids."""
    width = bucket_length(max(sum(len(e) for e in row) for row in rows))
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, example in enumerate(row):
            n = len(example)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids)
            labels[r, at : at + n] = torch.tensor(example.labels)
            position_ids[r, at : at + n] = torch.arange(n)
            segment_ids[r, at : at + n] = s
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # padding: positions go on, attends only to padding
    return Batch(input_ids, labels, position_ids, segment_ids, packed)


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over scored tokens, number of scored tokens).

    logits [B, T, V] predict labels [B, T] shifted by one: position t predicts label t + 1.
    Dividing the sum by the count of a whole update gives its token-mean loss.
    """
    targets = labels[:, 1:]
    count = int((targets != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten().to(logits.device),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, count
