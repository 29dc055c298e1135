"""Bucketed lengths: at most 1/8 padding, a handful of sizes, and the training forwards use them."""

from __future__ import annotations

import torch

from palaestra.models import apply_lora, build_tiny_model
from palaestra.models.logprobs import completion_logprobs, grouped_completion_logprobs
from palaestra.models.shapes import bucket_length


def test_buckets_cover_every_length_with_little_padding_and_few_sizes():
    sizes = {bucket_length(n) for n in range(1, 4097)}
    for n in range(1, 4097):
        bucket = bucket_length(n)
        assert bucket >= n and bucket_length(bucket) == bucket  # rounding up, and a bucket is its own bucket
        if n >= 128:
            assert bucket - n <= n / 8  # at most 12.5% padding from 128 tokens on
    # 1..128: multiples of 16 (8 sizes); then 8 sizes per octave up to 4096 (5 octaves)
    assert len(sizes) == 8 + 5 * 8


def _record_widths(model):
    widths = []
    model.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return widths


def test_training_forwards_meet_only_bucketed_lengths_whatever_the_completion_lengths():
    model = apply_lora(build_tiny_model(seed=0)[0], r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    widths = _record_widths(model)
    generator = torch.Generator().manual_seed(0)
    for completion_width in (3, 5, 9, 11, 14):  # a new completion length every step
        prompts = torch.randint(3, 200, (4, 7), generator=generator)
        completions = torch.randint(3, 200, (4, completion_width), generator=generator)
        masks = torch.ones(4, 7, dtype=torch.long), torch.ones(4, completion_width, dtype=torch.long)
        grouped_completion_logprobs(model, prompts, masks[0], completions, masks[1], 2)
        completion_logprobs(model, prompts, masks[0], completions, masks[1])
    packed = {width for batch, width in widths if batch == 1}
    padded = {width for batch, width in widths if batch == 4}
    # packed rows of 2 x 7 + 4 x C tokens (26..70) land on 32, 48, 64, 80; padded rows hold 16 prompt
    # columns and 16 kept positions from the prompt's last token on: 16 + 16 - 1 = 31, for every C
    assert packed == {32, 48, 64, 80} and padded == {31}
