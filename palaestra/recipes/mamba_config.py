"""The Mamba language model's settings: the whole config of ``palaestra train algo=mamba`` (the recipe:
:mod:`palaestra.recipes.mamba`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from palaestra.config.errors import check
from palaestra.config.evaluation import CheckpointEval
from palaestra.config.run import EpochBudget, OptimizerSettings, check_batch
from palaestra.config.tracking import TrackingConfig

__all__ = ["MambaAlgo", "MambaConfig", "MambaTrain", "validate_mamba"]


@dataclass
class MambaAlgo(EpochBudget):
    """A small Mamba language model trained from scratch (MARK's mamba target): a byte-level BPE tokenizer
    trained on the corpus and transformers' Mamba (its selective scan run by mambapy's parallel scan, pure
    PyTorch, so a CPU trains it), measured by held-out perplexity.

    MARK's defaults: a vocabulary of 5000, d_model 256, 4 layers, sequences of 512 tokens. The optimiser's
    settings for training from scratch (batch 8 sequences, lr 2e-3, AdamW betas 0.9/0.95, weight decay 0.1,
    warmup then cosine) are the defaults of :class:`MambaTrain`.
    """

    name: str = "mamba"
    """Algorithm name (recipe)."""
    corpus: Optional[str] = None
    """A folder of .txt files (a document each), a JSONL file of {"text"} lines (a document each) or a text file
    (its paragraphs, separated by blank lines, are the documents); None: the shipped corpus, Python's documentation
    topics (pydoc_data, 79 topics, about 465k characters)."""
    vocab_size: int = 5000
    """Tokens of the byte-level BPE vocabulary (the 256 bytes, 2 special tokens and the learnt merges), trained
    on the training documents; a small corpus may give fewer."""
    d_model: int = 256
    """Width of the model (its hidden size; the scan runs over 2 x d_model channels)."""
    n_layers: int = 4
    """Mamba blocks."""
    max_length: int = 512
    """Tokens per sequence: the corpus, one stream of documents, is cut into chunks of this length."""
    epochs: int = 3
    """Passes over the training chunks."""
    val_fraction: float = 0.1
    """Share of the corpus's characters held out for perplexity: whole documents, drawn with train.seed."""
    early_stopping_patience: int = 2
    """Stop after this many epochs without a lower held-out loss (0 disables)."""
    sample_prompts: list = field(default_factory=lambda: ["The", "A function", "If the"])
    """Prompts continued at the end of every epoch (train.log and the MLflow table samples/epoch-N.json)."""
    sample_tokens: int = 40
    """New tokens generated for each sample prompt (0: no samples)."""
    sample_temperature: float = 0.8
    """Sampling temperature of the samples (top 50 tokens, seeded with train.seed); 0: greedy."""


@dataclass
class MambaTrain(OptimizerSettings):
    """Training from scratch: the Mamba paper's AdamW betas and weight decay, a learning rate for a model this small."""

    sequences_per_step: int = 8
    """Chunks of algo.max_length tokens per optimizer update."""
    sequences_per_forward: int = 2
    """Chunks per forward/backward (and per forward of the held-out perplexity)."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.1
    """AdamW weight decay (not on biases and norms)."""
    warmup_ratio: float = 0.05
    """Fraction of optimizer updates spent in linear warmup."""


@dataclass
class MambaConfig:
    """``palaestra train algo=mamba`` (MARK's mamba target); ``palaestra eval algo=mamba eval.checkpoint=RUN`` measures
    a trained one's held-out perplexity."""

    algo: MambaAlgo = field(default_factory=lambda: MambaAlgo())
    train: MambaTrain = field(default_factory=MambaTrain)
    eval: CheckpointEval = field(default_factory=CheckpointEval)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_mamba(config: MambaConfig) -> None:
    """mamba's own keys (its shared sections are checked first): a corpus that exists and sizes that make
    sense (the corpus is read before the tokenizer is trained)."""
    algo, train = config.algo, config.train
    check(algo.corpus is None or Path(algo.corpus).exists(),
           f"algo.corpus={algo.corpus} does not exist; give a .txt file, a folder of .txt files or a JSONL file of "
           f"{{\"text\"}} lines (or leave it unset for the shipped corpus)")
    check(algo.vocab_size > 258, f"algo.vocab_size={algo.vocab_size} must be > 258 (the 256 bytes and 2 special tokens)")
    for key in ("d_model", "n_layers"):
        check(getattr(algo, key) > 0, f"algo.{key}={getattr(algo, key)} must be positive")
    check(algo.max_length >= 8, f"algo.max_length={algo.max_length} must be >= 8")
    check(0 < algo.val_fraction < 0.5, f"algo.val_fraction={algo.val_fraction} must be in (0, 0.5)")
    for key in ("early_stopping_patience", "sample_tokens", "sample_temperature"):
        check(getattr(algo, key) >= 0, f"algo.{key}={getattr(algo, key)} must be >= 0")
    check(all(isinstance(p, str) and p for p in algo.sample_prompts),
           f"algo.sample_prompts={list(algo.sample_prompts)} must be non-empty strings")
    check_batch("train.sequences_per_step", train.sequences_per_step, "train.sequences_per_forward", train.sequences_per_forward)
    check(train.best_metric in (None, "val_loss"), f"train.best_metric={train.best_metric}: mamba keeps the best "
           "by val_loss (its perplexity, exp(val_loss), ranks the same); leave train.best_metric unset")
