"""The mamba target's tokenizer and sequences: byte-level BPE trained on the corpus, documents cut into chunks.

The tokenizer is GPT-2's scheme trained from scratch with ``tokenizers``: text is split into bytes
(so any text encodes, nothing is unknown), then the most frequent adjacent pairs are merged until
the vocabulary holds ``vocab_size`` tokens, two of them special: ``<|endoftext|>`` (ends every
document; also the start of a prompt) and ``<|pad|>``. It is saved as a ``PreTrainedTokenizerFast``
folder, so ``AutoTokenizer.from_pretrained`` loads it beside the model.

The training text is one stream, each document's tokens followed by ``<|endoftext|>``, cut into
chunks of ``max_length`` tokens (the last, shorter one is kept when it has a token to predict).
"""

from __future__ import annotations

from pathlib import Path

from palaestra.export import save_tokenizer  # the atomic tokenizer writer every export uses

__all__ = ["END", "PAD", "SPECIAL_TOKENS", "chunk", "load_tokenizer", "save_tokenizer", "token_stream", "train_tokenizer"]

END, PAD = "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = (END, PAD)
BYTES = 256
"""Byte-level BPE starts from every byte value: the smallest vocabulary is these plus the special tokens."""


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with up to ``vocab_size`` tokens, trained on ``texts``.

    A small corpus may run out of pairs to merge first: the vocabulary is then smaller
    (``len(tokenizer)`` says how large). Training is deterministic: the same texts give the same merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=END, eos_token=END, pad_token=PAD,
                                   model_max_length=max_length)


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Every text's token ids followed by the end-of-text id, in order, as one list."""
    end = tokenizer.convert_tokens_to_ids(END)
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(end)
    return stream


def chunk(ids: list[int], max_length: int) -> list[list[int]]:
    """``ids`` cut into consecutive pieces of ``max_length``; a shorter last piece is kept when it has
    at least 2 tokens (one to predict from, one to predict).

    >>> chunk([1, 2, 3, 4, 5, 6, 7], 3)
    [[1, 2, 3], [4, 5, 6]]
    >>> chunk([1, 2, 3, 4, 5, 6, 7, 8], 3)
    [[1, 2, 3], [4, 5, 6], [7, 8]]
    """
    pieces = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    return [piece for piece in pieces if len(piece) >= 2]
