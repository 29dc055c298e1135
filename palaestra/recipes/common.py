"""Pieces every training recipe shares: run folders, logging, signals, schedules, timing."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger("palaestra")


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Add the wall time of the block to ``timings[name]`` (the per-step breakdown)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def policy_identity(model_cfg) -> dict[str, str]:
    """What a causal-LM recipe's checkpoint belongs to besides its method: the base model and the adapter's
    shape (a checkpoint of another is refused on resume, see :class:`palaestra.recipes.run.Run`)."""
    from palaestra.models import model_id

    lora = model_cfg.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(map(str, lora.target_modules))
    adapter = f"LoRA r={lora.r} alpha={lora.alpha} on {targets}" if lora.enabled else "full fine-tuning"
    return {"model": model_id(model_cfg.name, model_cfg.path), "adapter": adapter}


def training_device(choice: str = "auto") -> str:
    """``train.device`` as a torch device: auto is a CUDA GPU when torch sees one, else the CPU."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed python, numpy and torch; ``threads`` > 0 also sets torch's CPU threads."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(total: int, warmup_ratio: float, schedule: str):
    """Linear warmup over warmup_ratio of the updates, then cosine to 0 (or constant)."""
    warmup = int(total * warmup_ratio)

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (update - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def clip_gradients(parameters: list, max_norm: float) -> float:
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    norms = [p.grad.detach().norm() for p in parameters if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def remember(state: dict, figures: dict, step: int) -> None:
    """Keep curves in the trainer state so plots survive a resume."""
    for key, value in figures.items():
        state["history"].setdefault(key, []).append([step, float(value)])  # lists: JSON round-trips them


def attach_log_file(path: Path) -> None:
    """Log to train.log beside the checkpoints (appending on resume) and to the console."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = TqdmHandler()
    console.addFilter(lambda record: getattr(record, "console", True))  # per-step lines go to the file only
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False


class TqdmHandler(logging.Handler):
    """Console lines that do not break the progress bar."""

    def emit(self, record):
        tqdm.write(self.format(record))


def append_jsonl(path: Path, record: dict) -> None:
    """A local, exact record of every step's figures beside the checkpoints."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def memory_figures() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in MB (``memory/rss_mb``,
    ``memory/peak_rss_mb``): logged every step, so memory that grows with the steps shows in the run."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    try:
        with open("/proc/self/statm") as handle:
            current = int(handle.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:  # no /proc (macOS): the peak is the best figure there is
        current = peak
    return {"memory/rss_mb": current, "memory/peak_rss_mb": peak}


def fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


class StopSignals:
    """SIGUSR1: save a checkpoint at the next step boundary. SIGINT/SIGTERM: save and stop there.

    A second SIGINT interrupts immediately.
    """

    def __init__(self):
        self.requested = False
        self.save_requested = False
        self.received: int | None = None
        """The signal that stopped the run (SIGINT or SIGTERM), for the exit code 128 + its number."""
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, sig, frame):
        if sig == getattr(signal, "SIGUSR1", None):
            self.save_requested = True
            return
        if self.requested and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.received = self.received or int(sig)
        log.info("signal %s received: saving at the end of this step", signal.Signals(sig).name)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lock_run_folder(run_dir: Path):
    """Hold ``run_dir/.lock`` while this process writes the run folder; returns the open lock file (close it
    to let go), or None where the system has no ``flock``.

    A second process that wants the same folder gets a one-line ConfigError at once instead of
    interleaving its train.log and metrics.jsonl with the first and pruning its checkpoints. The
    operating system drops the lock when the holder ends, however it ends, so a killed run leaves no
    stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # not a Unix system
        return None
    from palaestra.config import ConfigError

    handle = open(Path(run_dir) / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"run folder {run_dir} is in use by {holder}; wait for that run to end, or give another "
                          "train.output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    return handle


def resolve_run_dir(train_cfg, runs_root: Path) -> tuple[Path, Path | None]:
    """The run folder and the checkpoint to resume from (None: a fresh start).

    ``train.resume`` = a path: that checkpoint (its run folder continues; a different
    ``train.output_dir`` is a ConfigError). ``train.output_dir``:
    that folder (with ``resume=auto``, its latest checkpoint). Otherwise a new timestamped folder
    under ``runs_root``, or with ``resume=auto`` the newest run there that has a checkpoint.
    """
    from palaestra import checkpoint as ckpt

    resume = train_cfg.resume
    if resume and resume != "auto":
        checkpoint = ckpt.resolve_resume(resume, Path(resume))
        if checkpoint is not None:
            own = checkpoint.parent.parent  # a resumed run goes on in its own folder (and its own MLflow run)
            if train_cfg.output_dir and Path(train_cfg.output_dir).resolve() != own.resolve():
                from palaestra.config import ConfigError

                raise ConfigError(f"train.resume={resume} goes on in its own run folder {own}, not "
                                  f"train.output_dir={train_cfg.output_dir}; drop one of the two")
            return own, checkpoint
    if train_cfg.output_dir:
        run_dir = Path(train_cfg.output_dir)
        return run_dir, ckpt.resolve_resume(resume, run_dir) if resume else None
    if resume == "auto":
        for candidate in sorted(runs_root.glob("*"), reverse=True):
            checkpoint = ckpt.latest_checkpoint(candidate)
            if checkpoint is not None:
                return candidate, checkpoint
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = runs_root / stamp
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_root / f"{stamp}-{suffix}"
    return run_dir, None


def stop_now(train_cfg, stop: "StopSignals", loop_started: float, steps_this_run: int) -> tuple[bool, bool]:
    """(out_of_time, interrupted) after a step: the time budget is spent; this invocation should
    stop here (a signal, the time budget or ``train.stop_after_steps``), saving a checkpoint first."""
    out_of_time = bool(train_cfg.max_seconds) and time.perf_counter() - loop_started >= train_cfg.max_seconds
    interrupted = stop.requested or out_of_time or bool(train_cfg.stop_after_steps and steps_this_run >= train_cfg.stop_after_steps)
    return out_of_time, interrupted


def load_pairs(data, seed: int) -> tuple[list, list]:
    """Training and held-out preference pairs of the ``data`` section; file problems become one-line ConfigErrors."""
    from palaestra.config import ConfigError
    from palaestra.data.preferences import load_preference_splits

    try:
        return load_preference_splits(data.path, train_file=data.preference_train_file, val_file=data.preference_val_file,
                                      val_fraction=data.val_fraction, seed=seed)
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None


def track_data_method(run, config, dataset_version: str | None = None):
    """Start the MLflow run of a method trained on the ``data`` section (reward, dpo, ppo): the planner
    contract's tags (policy_id, task, dataset_version: default the data folder's) and the whole config as params."""
    from palaestra.data.chat import dataset_version as version_of
    from palaestra.models import model_id
    from palaestra.recipes.run import config_dict

    data, algo = config.data, config.algo.name
    dataset_version = dataset_version or version_of(data.path, data.version)
    tags = {"task": data.name, "algo": algo, "model": model_id(config.model.name, config.model.path),
            "dataset_version": dataset_version, "policy_id": config.tracking.policy_id or f"{data.name}-{algo}"}
    return run.track(config.tracking, run_name=f"{data.name}-{algo}-{config.model.name}", tags=tags, config=config_dict(config))


def register(tracker, name: str, results: dict) -> None:
    """Register the run's ``model`` artifact as a new version of ``name`` in MLflow's model registry."""
    from palaestra.registry.models import register_model

    store = tracker.live()  # the registry needs the run's writes in the store
    if store is None:
        log.warning("the model was not registered as %s: the tracking store is away; resume the run when it is back "
                    "to register it", name)
        return
    version = register_model(store, store.run_id, name)
    tracker.set_tags({"registered_model": name, "registered_model_version": version})
    results["registered_model_version"] = version
    log.info("registered models:/%s/%s", name, version)


def adamw(params, train, total_updates: int):
    """(AdamW over ``params`` (tensors or param groups) with the ``train`` section's settings, its
    schedule: linear warmup then cosine or constant over ``total_updates`` optimizer updates)."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    # the fused kernel (one pass over all parameters) steps a 22M-parameter encoder in a fifth of the time
    # of the per-tensor loop on a CPU; it needs floating-point parameters on a CPU or a GPU
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_updates, train.warmup_ratio, train.lr_schedule))
    return optimizer, scheduler


def load_policy(model_cfg, device: str):
    """(model, tokenizer, compute precision, weights dtype): the ``model`` section's causal LM on
    ``device``, with its LoRA adapter when ``model.lora.enabled``."""
    from palaestra.models import apply_lora, load_model_and_tokenizer
    from palaestra.models.precision import resolve_precision, weights_dtype

    precision = resolve_precision(model_cfg.precision, device)
    dtype = weights_dtype(model_cfg.dtype, precision, model_cfg.lora.enabled)
    model, tokenizer = load_model_and_tokenizer(model_cfg.name, path=model_cfg.path, dtype=dtype, device=device)
    if model_cfg.lora.enabled:
        lora = model_cfg.lora
        model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    return model, tokenizer, precision, dtype


def next_items(items: list, position: int, count: int, seed: int) -> tuple[list, int]:
    """The next ``count`` items of a seeded shuffle per epoch; ``position`` counts the items consumed."""
    chosen = []
    while len(chosen) < count:
        epoch, offset = divmod(position, len(items))
        order = list(range(len(items)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        take = order[offset : offset + count - len(chosen)]
        chosen.extend(items[i] for i in take)
        position += len(take)
    return chosen, position


def pair_rows(tokenizer, train_pairs: list, val_pairs: list, *, max_length: int, add_eos: bool) -> tuple[list, list]:
    """Tokenised training and held-out preference pairs; a warning when truncation made training pairs identical."""
    from palaestra.data.preferences import encode_pair, identical_pairs

    train_rows = [encode_pair(tokenizer, pair, max_length, add_eos=add_eos) for pair in train_pairs]
    val_rows = [encode_pair(tokenizer, pair, max_length, add_eos=add_eos) for pair in val_pairs]
    if identical_pairs(train_rows):
        log.warning("%d training pairs are identical after truncation to data.max_length=%d; raise data.max_length",
                    identical_pairs(train_rows), max_length)
    return train_rows, val_rows


def pair_steps(pairs: int, batch_size: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """(steps per epoch, steps in all: ``max_steps`` or ``epochs`` epochs) of training on ``pairs`` pairs."""
    per_epoch = math.ceil(pairs / batch_size)
    return per_epoch, max_steps or epochs * per_epoch


def pair_batch(rows: list, batch_size: int, step: int, seed: int) -> tuple[int, list]:
    """(epoch, the rows of ``step``): the step's share of its epoch's seeded shuffle (the step number alone fixes it)."""
    from palaestra.data.preferences import batch_for_step

    epoch, indices = batch_for_step(len(rows), batch_size, step, seed)
    return epoch, [rows[i] for i in indices]


def pair_epoch(step: int, epoch: int, batch_size: int, count: int) -> float:
    """Epochs done after ``step`` of :func:`palaestra.data.preferences.batch_for_step` (fractional)."""
    per_epoch = math.ceil(count / batch_size)
    return epoch + min(((step - 1) % per_epoch + 1) * batch_size, count) / count
