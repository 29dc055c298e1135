"""The mamba target's model: transformers' Mamba built from scratch, its batches, held-out perplexity, samples.

The model is ``MambaForCausalLM`` with ``use_mambapy=True``: without the CUDA-only ``mamba-ssm``
kernels, transformers computes the selective scan with mamba.py's parallel scan (``mambapy``, pure
PyTorch; log2(L) sweeps over the sequence), on a CPU too, instead of its sequential loop over the L
positions. Both give the same numbers; at MARK's sizes (d_model 256, 4 layers) a forward and backward
of 8 x 512 tokens took 8.7 s with the parallel scan and 254 s with the loop on one CPU thread.
"""

from __future__ import annotations

import ctypes
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from palaestra.data.chat import IGNORE_INDEX, summed_token_loss

__all__ = ["Batch", "build_model", "collate", "freed_memory_kept", "generate_samples", "held_out_figures", "parameter_groups",
           "perplexity"]


def build_model(tokenizer, *, d_model: int, n_layers: int, seed: int):
    """A new ``MambaForCausalLM`` for ``tokenizer``'s vocabulary (``d_model`` wide, ``n_layers`` deep),
    initialised from ``seed``; the output layer shares the embedding's weights."""
    import logging

    from transformers import MambaConfig, MambaForCausalLM

    # transformers advises installing the CUDA kernels (mamba-ssm, causal-conv1d) whenever it runs the
    # PyTorch path; on a CPU that path, with mambapy's parallel scan, is the one meant, so the advice is noise
    logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=n_layers, use_mambapy=True,
                         bos_token_id=end, eos_token_id=end, pad_token_id=pad,
                         initializer_range=0.02)  # the reference Mamba's (and GPT-2's) embedding scale
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MambaForCausalLM(config)


@contextmanager
def freed_memory_kept(enabled: bool = True):
    """Within the block, glibc's malloc serves large blocks from its heap and keeps what is freed (Linux).

    Every training step allocates and frees the same large tensors (the parallel scan's states at
    MARK's sizes: 2 chunks x 512 channels x 512 positions x 16 states in fp32, 34 MB each, several
    per layer). By default glibc maps each such block fresh from the kernel and unmaps it when
    freed, so every step faults in and zeroes new pages, which takes about half of a CPU step's
    time. With mmap and trimming off, the next step reuses the same pages (measured on one thread:
    1.5 s -> 0.8 s a forward and backward of 2 x 512 tokens). After the block glibc's defaults are
    back and the kept memory goes back to the system. Yields whether the setting took (False off glibc).
    """
    libc = None
    if enabled and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc (musl has no mallopt)
            libc = None
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters of malloc.h
    if libc is None or not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, -1)):  # -1: never trim
        yield False
        return
    try:
        yield True
    finally:
        libc.mallopt(m_mmap_max, 65536)  # glibc's defaults
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matrices, none on norms, biases, A_log and D (as the reference
    Mamba: decaying A_log would pull every state's decay rate towards the same value)."""
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        no_decay = parameter.ndim < 2 or name.endswith(("A_log", ".D"))
        (plain if no_decay else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@dataclass
class Batch:
    """Chunks padded on the right to the longest; labels are the input ids, IGNORE_INDEX on padding."""

    input_ids: torch.Tensor
    """[B, T] token ids."""
    attention_mask: torch.Tensor
    """[B, T] 1 on tokens, 0 on padding."""
    labels: torch.Tensor
    """[B, T] what position t - 1 predicts (the model shifts them)."""

    @property
    def num_targets(self) -> int:
        """Tokens predicted: every token of a chunk but its first."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(chunks: list[list[int]], pad_id: int) -> Batch:
    """Pad ``chunks`` on the right into one batch (a causal model's tokens never see the padding after them)."""
    width = max(len(c) for c in chunks)
    input_ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, ids in enumerate(chunks):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, input_ids.masked_fill(mask == 0, IGNORE_INDEX))


def summed_loss(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over the batch's predicted tokens, their count)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return summed_token_loss(logits, batch.labels)


def perplexity(mean_loss: float) -> float:
    """exp(token-mean cross-entropy in nats): the number of tokens the model is, on average, as unsure
    between as a uniform guess would be (a uniform model over V tokens scores V)."""
    return math.exp(min(mean_loss, 700.0))  # exp overflows past ~709


@torch.no_grad()
def held_out_figures(model, chunks: list[list[int]], *, batch_size: int, pad_id: int, device,
                     dist=None) -> dict[str, float]:
    """``val_loss`` (the token-mean loss over every predicted token of ``chunks``, however they are
    batched, and with several processes (``dist``) however they are split between them) and
    ``perplexity`` = exp(val_loss)."""
    was_training = model.training
    model.eval()
    chunks = dist.split(chunks) if dist else chunks
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        loss_sum, n = summed_loss(model, collate(chunks[start : start + batch_size], pad_id).to(device))
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    if dist:
        total, count = dist.totals(total, count)
    mean = total / max(1, count)
    return {"val_loss": mean, "perplexity": perplexity(mean)}


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int,
                     device) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` for each prompt, continued from the start of a document: sampled
    at ``temperature`` (top 50 tokens) from a seeded generator that leaves the run's random state
    alone, or greedy when ``temperature`` is 0."""
    was_training = model.training
    model.eval()
    rows = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for prompt in prompts:
            ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]],
                               device=device)
            sampling = dict(do_sample=True, temperature=temperature, top_k=50) if temperature > 0 else dict(do_sample=False)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            rows.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)})
    model.train(was_training)
    return rows
