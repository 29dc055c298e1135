"""The encoder the classifier target fine-tunes: a BERT-family model with a sequence-classification head.

Which encoder: ``model.path`` (any local Hugging Face encoder folder), ``model.name=tiny`` (a small
random BERT over the embedded encoder's vocabulary, for tests), else the embedded default,
all-MiniLM-L6-v2 (a 6-layer BERT shipped offline by the package that ships the RAG embedder). The
head is new and seeded; the label names go into the model's config (``id2label``), so the exported
folder answers with names in a ``transformers`` pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from palaestra.models.shapes import bucket_length

__all__ = ["TextBatch", "encode_batches", "load_classifier"]


def load_classifier(name: str, path: str | None, labels: list[str], device: str, dropout: float | None = None):
    """(model, tokenizer): the chosen encoder (see the module docstring) with a ``len(labels)``-way head;
    ``dropout`` (None: the model's own) sets the rate of every dropout layer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

    from palaestra.models import ModelLoadError
    from palaestra.retrieval.embedder import EmbedderError, embedded_embedder_dir

    label_maps = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    try:
        folder = Path(path) if path else embedded_embedder_dir()
    except EmbedderError as error:
        raise ModelLoadError(str(error)) from None
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model.path={folder} has no config.json; give a Hugging Face encoder folder (e.g. a BERT model)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if name == "tiny" and not path:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128, num_labels=len(labels), **label_maps)
        model = BertForSequenceClassification(config)
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=len(labels), local_files_only=True, ignore_mismatched_sizes=True, **label_maps)
        except (ValueError, OSError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(f"model.path={folder} cannot be loaded as a text classifier ({first}); "
                                 "give an encoder folder such as a BERT model") from None
    if tokenizer.pad_token_id is None:
        raise ModelLoadError(f"the tokenizer of {folder} has no padding token; give an encoder with one (BERT models have [PAD])")
    model.config.pad_token_id = tokenizer.pad_token_id
    if dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    return model.to(device), tokenizer


@dataclass
class TextBatch:
    """Tokenised texts padded to a shared width (a bucketed length, so that few shapes recur)."""

    input_ids: torch.Tensor
    """[batch, width] token ids."""
    attention_mask: torch.Tensor
    """[batch, width] 1 on tokens, 0 on padding."""
    labels: torch.Tensor
    """[batch] class ids."""
    positions: list[int]
    """Each row's index in the list of texts it came from."""

    def to(self, device) -> TextBatch:
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.positions)


def encode_batches(tokenizer, texts: list[str], labels: list[int], order: list[int], batch_size: int,
                   max_length: int) -> list[TextBatch]:
    """``order``'s texts in batches of ``batch_size``, each padded to its longest row rounded up by
    :func:`~palaestra.models.shapes.bucket_length` (at most ``max_length``)."""
    ids = tokenizer([texts[i] for i in order], truncation=True, max_length=max_length)["input_ids"]
    batches = []
    for start in range(0, len(order), batch_size):
        rows = ids[start : start + batch_size]
        width = min(max_length, bucket_length(max(len(r) for r in rows), minimum=8))  # short texts: 8, 16, 24 ...
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            input_ids[k, : len(row)] = torch.tensor(row)
            mask[k, : len(row)] = 1
        positions = order[start : start + batch_size]
        batches.append(TextBatch(input_ids, mask, torch.tensor([labels[i] for i in positions]), positions))
    return batches
