"""Models: loading (the embedded default, a tiny test model, any HF model) and LoRA adapters."""
from palaestra.models.loading import (
    EMBEDDED_MODELS,
    ModelLoadError,
    build_tiny_model,
    default_cache_dir,
    embedded_model_dir,
    load_model_and_tokenizer,
    model_id,
)
from palaestra.models.lora import (
    apply_lora,
    count_parameters,
    frozen_reference_copy,
    load_trainable_state_dict,
    reference_logits_context,
    trainable_state_dict,
)
from palaestra.models.value_head import ValueHead, explained_variance, logprobs_and_values

__all__ = [
    "EMBEDDED_MODELS",
    "ModelLoadError",
    "apply_lora",
    "build_tiny_model",
    "count_parameters",
    "default_cache_dir",
    "embedded_model_dir",
    "frozen_reference_copy",
    "load_model_and_tokenizer",
    "load_trainable_state_dict",
    "model_id",
    "reference_logits_context",
    "trainable_state_dict",
    "ValueHead",
    "explained_variance",
    "logprobs_and_values",
]
