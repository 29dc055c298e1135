"""Export a trained policy: LoRA merged into the base as a plain Hugging Face folder, or the adapter alone.

    palaestra export eval.checkpoint=runs/chain_sum-grpo/<stamp> export.output_dir=exported/chain_sum
    palaestra export eval.checkpoint=... export.merge=false      # the peft adapter folder only

A merged export loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``),
safetensors weights, tokenizer and chat template included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def export_policy(model, tokenizer, output_dir: Path, *, merge: bool = True) -> Path:
    """Write ``model`` (a peft model or a plain one) to ``output_dir`` atomically; return the folder."""
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(f".tmp-{output_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if hasattr(model, "peft_config"):
            if merge:
                model = model.merge_and_unload()
            else:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                return _into_place(tmp, output_dir)
        model = model.to(torch.float32) if merge and next(model.parameters()).dtype != torch.float32 else model
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        return _into_place(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    """Write the tokenizer folder atomically (a temp sibling renamed into place); return it."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    return _into_place(tmp, folder)


def _into_place(tmp: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def export_command(model_cfg, checkpoint: str, output_dir: str, *, merge: bool = True) -> str:
    """``palaestra export eval.checkpoint=...``: the trained policy of a checkpoint (or run folder) on the
    ``model`` section's base, written to ``output_dir`` as a Hugging Face folder."""
    from palaestra.checkpoint import checkpoint_path, load_trained_weights
    from palaestra.models import load_model_and_tokenizer

    found = checkpoint_path(checkpoint)
    model, tokenizer = load_model_and_tokenizer(model_cfg.name, path=model_cfg.path, dtype="float32")
    model = load_trained_weights(model, found)
    folder = export_policy(model, tokenizer, Path(output_dir), merge=merge)
    kind = "merged model" if merge else "adapter"
    return f"exported the {kind} of {found} to {folder}"

