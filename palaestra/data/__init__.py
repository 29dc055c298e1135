"""Training data that is not a task: chat conversations for SFT (loading, chat-template labels, packing)."""

from palaestra.data.chat import (
    IGNORE_INDEX,
    Batch,
    ChatData,
    TokenizedExample,
    block_causal_mask,
    collate,
    dataset_version,
    load_chat_data,
    pack_examples,
    read_chat_jsonl,
    summed_token_loss,
    to_messages,
    tokenize_conversation,
)

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "ChatData",
    "TokenizedExample",
    "block_causal_mask",
    "collate",
    "dataset_version",
    "load_chat_data",
    "pack_examples",
    "read_chat_jsonl",
    "summed_token_loss",
    "to_messages",
    "tokenize_conversation",
]
