"""Checkpoints: everything needed to resume a run bit for bit, written atomically.

Layout under a run directory::

    checkpoints/
      step-000100/
        trainable.safetensors   parameters with requires_grad (the LoRA adapter, or the whole model)
        adapter/                peft models only: the adapter for PeftModel.from_pretrained
        optimizer.pt  scheduler.pt
        rng.pt                  python `random`, numpy, torch CPU and CUDA generator states
        rng-rank1.pt ...        the same of every other process of a data-parallel run
        trainer_state.json      step, data position, MLflow run id, ... (written last)
      best/                     a copy of the best step so far, plus best.json

A sharded run (``train.strategy=fsdp``) has ``sharded/`` in place of ``trainable.safetensors``, ``adapter/``
and ``optimizer.pt``: the trainable parameters and their optimizer state as every process held them,
written by all of them through ``torch.distributed.checkpoint`` (``adapter-config/`` keeps a LoRA run's
adapter settings). It loads with any number of processes, sharded or not: the reader takes the slices
it needs.

A checkpoint is built in a hidden `.tmp-step-...-<pid>` folder next to its final place and renamed
into place only when complete, so a crash mid-write leaves no half checkpoint that looks real.
Frozen weights are not saved: they come back from the base model that the recipe loads again.
Finding checkpoints (``latest_checkpoint``, ``resolve_resume``, ``read_trainer_state``) imports no
torch, so that config validation can check ``train.resume`` before any heavy import; the functions
that read and write tensors import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the annotations; the functions that need torch import it
    import torch

__all__ = [
    "CorruptCheckpoint", "checkpoint_path", "earlier_checkpoints", "is_sharded_checkpoint", "latest_checkpoint", "load_checkpoint",
    "load_trained_weights", "read_trainer_state", "resolve_resume", "save_best", "save_checkpoint", "save_sharded_checkpoint",
]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_FILE = "trainer_state.json"
_SHARDED = "sharded"
_ADAPTER_CONFIG = "adapter-config"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Rename a finished folder onto `target`; an existing target is moved aside, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fresh_tmp(parent: Path, name: str) -> Path:
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed run that had our pid
    tmp.mkdir(parents=True)
    return tmp


def rng_state() -> dict[str, Any]:
    """This process's random states: python's, numpy's, torch's CPU and CUDA generators."""
    import numpy as np
    import torch

    np_state = np.random.get_state(legacy=False)
    # numpy's key is an array; a plain list keeps the file loadable with weights_only=True
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": np_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # e.g. resuming a 2-GPU run on one GPU: the run goes on, not bit for bit
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d; "
                        "CUDA RNG not restored", len(cuda), torch.cuda.device_count())


@dataclass
class CheckpointPart:
    """One trainable policy in a checkpoint: its named trainable tensors and optimizer state.

    A single-model run has one part (the model's parameters that require grad); a multi-policy
    run (one LoRA adapter per role, or one model per role) has one part per policy.
    """

    parameters: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    peft_model: Any = None  # also save this model's adapters in peft's own format, if given
    module: Any = None  # the model the parameters belong to (a sharded checkpoint reads and writes through it)


def model_part(model: torch.nn.Module, optimizer=None, scheduler=None) -> CheckpointPart:
    """The part of a single-model run: every parameter that requires grad."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    peft_model = model if hasattr(model, "peft_config") and hasattr(model, "save_pretrained") else None
    return CheckpointPart(params, optimizer, scheduler, peft_model, module=model)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict[str, Any],
    keep_last_n: int | None = None,
    parts: dict[str, CheckpointPart] | None = None,
    rank_rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-{step:06d}` atomically and return its path.

    Either `model` (+ optimizer, scheduler) for a single-model run, whose files sit at the top of
    the folder, or `parts` (name -> CheckpointPart) for several policies, each in `policy-<name>/`.
    `trainer_state` is any JSON-serialisable dict (data position, MLflow run id, best metric...);
    `step` is added to it. With `keep_last_n`, older `step-*` folders beyond the newest n are
    deleted (never the one just written, never `best`). `rank_rng_states`: every process's random
    states, in rank order, for a data-parallel run (this process, the main one, is the first).
    """
    import torch

    if keep_last_n is not None and keep_last_n < 1:
        raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
    parts = _parts(model, optimizer, scheduler, parts)
    ckpt_dir = Path(run_dir) / "checkpoints"
    target = ckpt_dir / f"step-{step:06d}"
    tmp = _fresh_tmp(ckpt_dir, target.name)
    try:
        for name, part in parts.items():
            folder = tmp / f"policy-{name}" if name else tmp
            folder.mkdir(exist_ok=True)
            _save_part(folder, part)
        torch.save(rng_state(), tmp / "rng.pt")
        for rank, state in enumerate((rank_rng_states or [])[1:], start=1):
            torch.save(state, tmp / f"rng-rank{rank}.pt")
        _write_json(tmp / _STATE_FILE, {**trainer_state, "step": step})  # last: marks it complete
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if keep_last_n is not None:
        older = [p for p in _complete_checkpoints(ckpt_dir) if p != target]
        for stale in older[: max(0, len(older) - (keep_last_n - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def _parts(model, optimizer, scheduler, parts) -> dict[str, CheckpointPart]:
    if (model is None) == (parts is None):
        raise ValueError("give either model (with optimizer and scheduler) or parts, not both")
    return parts if parts is not None else {"": model_part(model, optimizer, scheduler)}


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    *,
    dist,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict[str, Any],
    keep_last_n: int | None = None,
    rank_rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """:func:`save_checkpoint` of a sharded model, called by every process together (``dist``): each writes its
    slices of the trainable parameters and of their optimizer state into ``sharded/``, the main process the
    rest, and the folder is renamed into place once all have written. Returns its path."""
    import torch
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(run_dir) / "checkpoints"
    target = ckpt_dir / f"step-{step:06d}"
    tmp = dist.broadcast(_fresh_tmp(ckpt_dir, target.name) if dist.is_main else None)
    try:
        part = model_part(model, optimizer, scheduler)
        dcp.save(_sharded_state(part), checkpoint_id=str(tmp / _SHARDED))
        if dist.is_main:
            if part.peft_model is not None:
                part.peft_model.peft_config["default"].save_pretrained(str(tmp / _ADAPTER_CONFIG))
            torch.save(scheduler.state_dict() if scheduler is not None else None, tmp / "scheduler.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            for rank, state in enumerate((rank_rng_states or [])[1:], start=1):
                torch.save(state, tmp / f"rng-rank{rank}.pt")
            _write_json(tmp / _STATE_FILE, {**trainer_state, "step": step, "processes": dist.world})
        dist.barrier()
        if dist.is_main:
            _swap_into_place(tmp, target)
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last_n is not None and dist.is_main:
        older = [p for p in _complete_checkpoints(ckpt_dir) if p != target]
        for stale in older[: max(0, len(older) - (keep_last_n - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return target


def _sharded_state(part: CheckpointPart) -> dict[str, Any]:
    """The trainable parameters (by the model's own names) and their optimizer state, as this process holds them:
    DTensor slices of a sharded model, whole tensors of a model that is not."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = {name: value for name, value in get_model_state_dict(part.module).items() if name in part.parameters}
    state: dict[str, Any] = {"model": weights}
    if part.optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(part.module, part.optimizer)
    return state


def is_sharded_checkpoint(path: Path) -> bool:
    """True for a checkpoint a sharded run wrote (its weights under ``sharded/``)."""
    return (Path(path) / _SHARDED / ".metadata").is_file()


def _save_part(folder: Path, part: CheckpointPart) -> None:
    import torch
    from safetensors.torch import save_file

    # named_parameters() lists a tied weight once; the copy gives each tensor its own storage,
    # which safetensors requires
    weights = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in part.parameters.items()}
    save_file(weights, str(folder / "trainable.safetensors"))
    if part.peft_model is not None:
        part.peft_model.save_pretrained(str(folder / "adapter"))
    torch.save(part.optimizer.state_dict() if part.optimizer is not None else None, folder / "optimizer.pt")
    torch.save(part.scheduler.state_dict() if part.scheduler is not None else None, folder / "scheduler.pt")


class CorruptCheckpoint(ValueError):
    """A checkpoint file cannot be read (truncated, empty, not what it should be); the message names the file."""


def _read(file: Path, reader):
    """``reader(file)``, with any failure to read it as a :class:`CorruptCheckpoint` naming the file."""
    try:
        return reader(file)
    except Exception as error:  # a truncated or foreign file fails in the reader's own way
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpoint(f"checkpoint file {file} is corrupt ({detail[:160]})") from None


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path`` (CorruptCheckpoint if it is not a JSON object)."""
    state = _read(Path(path) / _STATE_FILE, lambda file: json.loads(file.read_text()))
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"checkpoint file {Path(path) / _STATE_FILE} is corrupt (not a JSON object)")
    return state


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    parts: dict[str, CheckpointPart] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` into the given objects; return trainer_state.

    Every trainable parameter must be in the checkpoint, and every saved tensor must match a
    parameter by name and shape; anything else is a ValueError listing the names. A file that
    cannot be read is a :class:`CorruptCheckpoint` naming it.
    """
    import torch

    path = Path(path)
    if not (path / _STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_STATE_FILE})")
    state = read_trainer_state(path)
    for name, part in _parts(model, optimizer, scheduler, parts).items():
        _load_part(path / f"policy-{name}" if name else path, part, path)
    if restore_rng:
        _set_rng_state(_read(path / "rng.pt", lambda file: torch.load(file, weights_only=True)))
    return state


def restore_rank_rng(path: Path, rank: int) -> bool:
    """Set this process's random states to those the checkpoint holds for ``rank`` (rank 0's are ``rng.pt``);
    False when it holds none (it was written by fewer processes)."""
    import torch

    file = Path(path) / ("rng.pt" if rank == 0 else f"rng-rank{rank}.pt")
    if rank and not file.is_file():
        return False
    _set_rng_state(_read(file, lambda handle: torch.load(handle, weights_only=True)))
    return True


def _load_part(folder: Path, part: CheckpointPart, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    if is_sharded_checkpoint(folder):
        _load_sharded_part(folder, part, path)
        return

    saved = _read(folder / "trainable.safetensors", lambda file: load_file(str(file)))
    params = part.parameters
    missing = sorted(n for n in params if n not in saved)
    unexpected = sorted(n for n in saved if n not in params)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing trainable {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (a different model or LoRA config?)"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    if part.optimizer is not None:
        part.optimizer.load_state_dict(_read(folder / "optimizer.pt", lambda file: torch.load(file, weights_only=True)))
    if part.scheduler is not None:
        part.scheduler.load_state_dict(_read(folder / "scheduler.pt", lambda file: torch.load(file, weights_only=True)))


def _load_sharded_part(folder: Path, part: CheckpointPart, path: Path) -> None:
    """Read a sharded checkpoint into ``part``: each process reads the slices its parameters hold (all of them
    when the model is not sharded), so any number of processes loads it."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if part.module is None:
        raise ValueError(f"checkpoint {path} is sharded; loading it needs the model (CheckpointPart.module)")
    state = _sharded_state(part)
    metadata = _read(folder / _SHARDED, lambda file: dcp.FileSystemReader(str(file)).read_metadata())
    saved = {key.split(".", 1)[1] for key in metadata.state_dict_metadata if key.startswith("model.")}
    missing, unexpected = sorted(set(state["model"]) - saved), sorted(saved - set(state["model"]))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing trainable {missing[:5]}, unexpected "
                         f"{unexpected[:5]} (a different model or LoRA config?)")
    _read(folder / _SHARDED, lambda file: dcp.load(state, checkpoint_id=str(file)))
    set_model_state_dict(part.module, state["model"], options=StateDictOptions(strict=False))
    if part.optimizer is not None:
        set_optimizer_state_dict(part.module, part.optimizer, state["optimizer"])
    if part.scheduler is not None:
        part.scheduler.load_state_dict(_read(folder / "scheduler.pt", lambda file: torch.load(file, weights_only=True)))


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """`step-*` folders with a trainer_state.json, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / _STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def earlier_checkpoints(checkpoint: Path) -> list[Path]:
    """The complete step checkpoints of ``checkpoint``'s run before it, newest first (for a fallback)."""
    checkpoint = Path(checkpoint)
    found = _complete_checkpoints(checkpoint.parent)
    return list(reversed(found[: found.index(checkpoint)])) if checkpoint in found else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step complete checkpoint of a run, or None (unfinished `.tmp-*` are ignored)."""
    found = _complete_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def save_best(run_dir: Path, checkpoint_path: Path, metric_name: str, value: float,
              mode: str = "max") -> bool:
    """Copy `checkpoint_path` to `run_dir/checkpoints/best` if `value` beats the recorded best.

    The record is `best/best.json`; a record of a different metric is replaced. NaN never wins.
    Files are hard-linked when possible (checkpoint files are never modified in place).
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    value = float(value)
    if math.isnan(value):
        return False
    best_dir = Path(run_dir) / "checkpoints" / "best"
    record = best_dir / "best.json"
    if record.is_file():
        old = json.loads(record.read_text())
        if old.get("metric") == metric_name:
            better = value > old["value"] if mode == "max" else value < old["value"]
            if not better:
                return False

    tmp = _fresh_tmp(best_dir.parent, "best")
    tmp.rmdir()  # copytree wants to create it

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    try:
        shutil.copytree(checkpoint_path, tmp, copy_function=link_or_copy)
        _write_json(tmp / "best.json", {"metric": metric_name, "value": value, "mode": mode,
                                        "checkpoint": Path(checkpoint_path).name})
        _swap_into_place(tmp, best_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def resolve_resume(resume: str | None, run_dir: Path, runs_root: Path | None = None) -> Path | None:
    """Turn a `resume=` setting into a checkpoint folder, or None for a fresh start.

    None or "" -> None. "auto" -> the latest checkpoint of `run_dir`, None if it has none.
    A path (or a run name under `runs_root`) -> that checkpoint, or the latest checkpoint of that
    run directory or `checkpoints/` folder. A path that does not exist, or holds no checkpoint,
    raises FileNotFoundError.
    """
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    candidates = [Path(resume).expanduser()]
    if runs_root is not None and not candidates[0].is_absolute():
        candidates.append(Path(runs_root) / resume)
    for path in candidates:
        if not path.exists():
            continue
        if (path / _STATE_FILE).is_file():
            return path
        found = _complete_checkpoints(path / "checkpoints") or _complete_checkpoints(path)
        if found:
            return found[-1]
        raise FileNotFoundError(f"resume={resume!r}: {path} holds no complete checkpoint")
    raise FileNotFoundError(f"resume={resume!r}: no such checkpoint or run directory "
                            f"(looked at {', '.join(str(p) for p in candidates)})")


def load_trained_weights(model, checkpoint: Path):
    """Put a checkpoint's trained weights on ``model``: its LoRA adapter, or its full weights."""
    adapter = checkpoint / "adapter"
    if adapter.is_dir():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter))
    if (checkpoint / _ADAPTER_CONFIG).is_dir():  # a sharded LoRA run: its adapter's settings, its weights in sharded/
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig.from_pretrained(str(checkpoint / _ADAPTER_CONFIG)))
        load_checkpoint(checkpoint, model=model, restore_rng=False)
        return model
    for parameter in model.parameters():  # full fine-tuning: every weight was trainable
        parameter.requires_grad_(True)
    load_checkpoint(checkpoint, model=model, restore_rng=False)
    return model


def trained_model_source(path: str, key: str, model: str) -> Path | None:
    """The checkpoint ``key=path`` names (a run folder's latest, or a step folder), or None when it is a plain model
    folder (config.json); a one-line ConfigError when it is neither, or when the checkpoint was trained on another
    base model than ``model`` (:func:`palaestra.config.model.model_id`). Cheap: reads no weights."""
    from palaestra.config.errors import ConfigError

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{key}={path} is not a folder; give a palaestra run folder (or its checkpoints/step-* "
                          "folder) or a local model folder with config.json")
    try:
        checkpoint = resolve_resume(str(folder), folder)
    except FileNotFoundError:
        if (folder / "config.json").is_file():
            return None
        raise ConfigError(f"{key}={path} holds neither a palaestra checkpoint nor a model (no config.json); give a "
                          "palaestra run folder (or its checkpoints/step-* folder) or a local model folder") from None
    trained_on = (read_trainer_state(checkpoint).get("identity") or {}).get("model")
    if trained_on is not None and trained_on != model:
        raise ConfigError(f"{key}={path} was trained on the model {trained_on!r}, not on this run's {model!r}; give a "
                          "run of the same base model, or an exported model folder")
    return checkpoint


def checkpoint_path(path: str | None) -> Path | None:
    """The checkpoint named by eval.checkpoint (a step folder, or a run folder's latest), or None."""
    if not path:
        return None
    from palaestra.config.errors import ConfigError

    if not Path(path).exists():
        raise ConfigError(f"eval.checkpoint={path} does not exist; point it at a run folder or a checkpoints/step-* folder")
    try:
        checkpoint = resolve_resume(path, Path(path))
    except FileNotFoundError:
        checkpoint = None
    if checkpoint is None:
        raise ConfigError(f"eval.checkpoint={path} holds no complete checkpoint; point it at a run folder or a "
                          "checkpoints/step-* folder")
    return checkpoint
