"""The teacher of on-policy distillation (GRPO's ``algo.teacher``): the student samples, the teacher scores its tokens.

A teacher is either a palaestra run (or one of its ``checkpoints/step-*`` folders) trained on the policy's own
base model, whose adapter or full weights are put on a fresh copy of that base, or any local causal-LM folder
(a Hugging Face folder, such as ``palaestra export`` writes) whose tokenizer is the policy's: distillation scores
the student's own token ids, so both must read them alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from palaestra.config.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["load_teacher"]


def load_teacher(path: str, model_cfg, device, dtype: str, tokenizer) -> torch.nn.Module:
    """The frozen teacher in eval mode on ``device``, its weights in ``dtype``: the checkpoint's trained weights on
    the ``model`` section's base (without its LoRA settings: the checkpoint brings its own adapter), or the model
    folder, refused in one line when its vocabulary is not ``tokenizer``'s."""
    from palaestra.checkpoint import load_trained_weights, trained_model_source
    from palaestra.models.loading import load_model_and_tokenizer, model_id

    checkpoint = trained_model_source(path, "algo.teacher", model_id(model_cfg.name, model_cfg.path))
    if checkpoint is not None:
        teacher, _ = load_model_and_tokenizer(model_cfg.name, path=model_cfg.path, dtype=dtype, device=device)
        teacher = load_trained_weights(teacher, checkpoint)
    else:
        teacher, teacher_tokenizer = load_model_and_tokenizer("hf", path=str(Path(path).expanduser()), dtype=dtype, device=device)
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"algo.teacher={path} has another tokenizer than the policy's model; on-policy "
                              "distillation scores the student's own tokens, so give a teacher with the same tokenizer")
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.to(device).eval()
