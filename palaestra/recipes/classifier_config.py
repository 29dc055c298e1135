"""The text classifier's settings: the whole config of ``palaestra train algo=classifier`` (the recipe:
:mod:`palaestra.recipes.classifier`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from palaestra.config.errors import check
from palaestra.config.model import EncoderConfig
from palaestra.config.run import OptimizerSettings
from palaestra.config.tracking import TrackingConfig

__all__ = ["ClassifierAlgo", "ClassifierConfig", "ClassifierTrain", "validate_classifier"]


@dataclass
class ClassifierAlgo:
    """A text classifier (MARK's transformer target): a BERT-family encoder fine-tuned on labelled text.

    The encoder is the model section (:class:`palaestra.config.EncoderConfig`). MARK's defaults (batch 16,
    lr 5e-5, 5 epochs) are the defaults of this schema.
    """

    name: str = "classifier"
    """Algorithm name (recipe)."""
    data: Optional[str] = None
    """A folder of train.jsonl, val.jsonl and optionally test.jsonl, or one JSONL file (split here), each line
    {"text", "label"}; None: the shipped topic set (datasets/classification/topics)."""
    num_labels: int = 3
    """Number of labels; the data must use exactly this many."""
    labels: Optional[list] = None
    """Label names in class-id order (None: the sorted names found in the training split)."""
    epochs: int = 5
    """Passes over the training split."""
    max_length: int = 128
    """Texts longer than this many tokens are truncated."""
    val_fraction: float = 0.1
    """Share of a single data file held out for validation, and the same share for test."""
    early_stopping_patience: int = 2
    """Stop after this many epochs without a better validation figure (train.best_metric, macro_f1 by default; 0 disables)."""
    eval_batch_size: int = 64
    """Texts per forward when evaluating."""
    dropout: Optional[float] = None
    """Dropout of every dropout layer of the encoder and its head while training; None keeps the model's own
    (0.1 for BERT models)."""


@dataclass
class ClassifierTrain(OptimizerSettings):
    """The classifier's updates (MARK's optimiser settings: lr 5e-5, AdamW betas 0.9/0.999, weight decay 0.01,
    10% warmup)."""

    texts_per_step: int = 16
    """Labelled texts per optimizer update."""
    learning_rate: float = 5e-5
    """Peak AdamW learning rate."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer updates spent in linear warmup."""


@dataclass
class ClassifierConfig:
    """``palaestra train algo=classifier`` (MARK's transformer target)."""

    model: EncoderConfig = field(default_factory=EncoderConfig)
    algo: ClassifierAlgo = field(default_factory=lambda: ClassifierAlgo())
    train: ClassifierTrain = field(default_factory=ClassifierTrain)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate_classifier(config: ClassifierConfig) -> None:
    """The classifier's own keys (its shared sections are checked first): data that exists and numbers that
    make sense (the files are parsed before the encoder loads)."""
    algo = config.algo
    check(config.train.texts_per_step > 0, f"train.texts_per_step={config.train.texts_per_step} must be positive")
    check(algo.num_labels >= 2, f"algo.num_labels={algo.num_labels} must be >= 2")
    check(not algo.labels or len(algo.labels) == algo.num_labels,
           f"algo.labels has {len(algo.labels or [])} names but algo.num_labels={algo.num_labels}; give one name per label")
    check(algo.epochs > 0, f"algo.epochs={algo.epochs} must be positive")
    check(algo.max_length >= 8, f"algo.max_length={algo.max_length} must be >= 8")
    check(0 < algo.val_fraction < 0.5, f"algo.val_fraction={algo.val_fraction} must be in (0, 0.5)")
    check(algo.early_stopping_patience >= 0, f"algo.early_stopping_patience={algo.early_stopping_patience} must be >= 0")
    check(algo.eval_batch_size > 0, f"algo.eval_batch_size={algo.eval_batch_size} must be positive")
    check(algo.dropout is None or 0 <= algo.dropout < 1, f"algo.dropout={algo.dropout} must be in [0, 1)")
    check(algo.data is None or Path(algo.data).exists(),
           f"algo.data={algo.data} does not exist; give a folder of train/val/test.jsonl or a JSONL file of {{\"text\", \"label\"}} lines")
