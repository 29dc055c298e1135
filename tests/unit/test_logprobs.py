"""The fast paths compute the same numbers as the straightforward ones."""

from __future__ import annotations

import pytest
import torch

from palaestra.models import apply_lora, build_tiny_model
from palaestra.models.logprobs import completion_logprobs, grouped_completion_logprobs
from palaestra.rollout import HFGenerator, SamplingParams


def _lora_model():
    model, tokenizer = build_tiny_model(seed=0)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    generator = torch.Generator().manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; give the adapter a real effect
            parameter.data.normal_(0.0, 0.1, generator=generator)
    return model, tokenizer


def _grouped_batch(group_size: int = 4):
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 200, (2, 7), generator=generator)
    prompt_mask = torch.ones(2, 7, dtype=torch.long)
    prompts[1, :3], prompt_mask[1, :3] = 0, 0  # the second prompt is left-padded
    completions = torch.randint(3, 200, (2 * group_size, 5), generator=generator)
    completion_mask = torch.ones(2 * group_size, 5, dtype=torch.long)
    completion_mask[2, 3:] = 0  # ended early
    completion_mask[5, 1:] = 0  # one token only
    return (prompts.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
            completions, completion_mask)


@pytest.mark.parametrize("group_size", [4, 2, 1])
def test_grouped_logprobs_match_per_row_values_and_gradients(group_size):
    model, _ = _lora_model()
    batch = _grouped_batch()
    mask = batch[3].float()
    plain, plain_entropy = completion_logprobs(model, *batch, temperature=0.7, with_entropy=True)
    grouped, entropy = grouped_completion_logprobs(model, *batch, group_size, temperature=0.7, with_entropy=True)
    assert torch.allclose(plain * mask, grouped, atol=1e-5)  # and exactly 0 past each completion's end
    assert torch.allclose(plain_entropy * mask, entropy, atol=1e-4)
    # a packing budget smaller than one group: every group in its own forward, same numbers
    split, _ = grouped_completion_logprobs(model, *batch, group_size, temperature=0.7, max_packed_tokens=8)
    assert torch.allclose(split, grouped, atol=1e-5)

    trainable = [p for p in model.parameters() if p.requires_grad]
    grads_plain = torch.autograd.grad((plain * mask).sum(), trainable)
    grads_grouped = torch.autograd.grad((grouped * mask).sum(), trainable)
    for a, b in zip(grads_plain, grads_grouped):
        assert torch.allclose(a, b, atol=1e-5)


def test_grouped_logprobs_reject_a_completion_mask_with_holes():
    batch = list(_grouped_batch())
    batch[3] = batch[3].clone()
    batch[3][0, 1] = 0
    with pytest.raises(ValueError, match="prefix"):
        grouped_completion_logprobs(_lora_model()[0], *batch, 4)


def test_shared_prefill_generation_matches_plain_generation():
    model, tokenizer = _lora_model()
    generator = HFGenerator(model, tokenizer)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Hi"}]]
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    shared = generator.generate(prompts, 3, greedy)
    plain = generator.generate([p for p in prompts for _ in range(3)], 1, greedy)
    assert shared.texts == plain.texts
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert torch.equal(shared.prompt_ids, plain.prompt_ids)


def test_bf16_autocast_logprobs_stay_close_to_fp32():
    from palaestra.models.precision import autocast

    model, _ = _lora_model()
    batch = _grouped_batch()
    mask = batch[3].bool()
    exact, _ = completion_logprobs(model, *batch)
    with autocast("bf16", "cpu"):
        mixed, _ = grouped_completion_logprobs(model, *batch, 4)
    # bf16 keeps 8 bits of mantissa: log-probs of a ~5.5-nat distribution move by a few hundredths
    assert (exact - mixed)[mask].abs().max() < 0.1
    assert (exact - mixed)[mask].abs().mean() < 0.03


def test_weights_dtype_auto_keeps_fp32_master_weights_where_needed():
    from palaestra.models.precision import resolve_precision, weights_dtype

    assert weights_dtype("auto", "bf16", lora=True) == "bfloat16"  # frozen base: bf16 is enough
    assert weights_dtype("auto", "bf16", lora=False) == "float32"  # full fine-tuning: fp32 master weights
    assert weights_dtype("auto", "fp32", lora=True) == "float32"
    assert weights_dtype("float16", "bf16", lora=True) == "float16"  # an explicit choice wins
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") in ("bf16", "fp32")


def test_lora_over_a_bf16_base_keeps_fp32_adapters_and_trains():
    model, _ = build_tiny_model(seed=0)
    model = apply_lora(model.to(torch.bfloat16), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    batch = _grouped_batch()
    from palaestra.models.precision import autocast

    with autocast("bf16", "cpu"):
        logp, _ = grouped_completion_logprobs(model, *batch, 4)
    (logp * batch[3]).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


@pytest.mark.parametrize("fast_step", [True, False])
def test_own_decode_loop_gives_generates_greedy_tokens_and_drops_finished_rows(fast_step):
    torch.manual_seed(0)
    model, tokenizer = _lora_model()
    questions = ["What is 2 + 3?", "Hi", "Tell me a story about cats", "zzz 9"]
    prompts = [[{"role": "user", "content": question}] for question in questions]
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    reference = HFGenerator(model, tokenizer, decoder="hf")
    first = reference.generate(prompts, 2, greedy).completion_ids
    # make a token that the greedy completions produce at different steps a stop token, so rows
    # finish at different steps and the loop has to drop them from its batch
    def first_step(row, token):
        hits = (row == token).nonzero()
        return int(hits[0]) if len(hits) else len(row)

    stop = next(t for t in first.flatten().tolist() if len({first_step(row, t) for row in first}) > 1)
    ours = HFGenerator(model, tokenizer, decoder="palaestra", fast_step=fast_step)
    for engine in (reference, ours):
        engine.stop_ids = sorted(set(engine.stop_ids) | {stop})
    expected, got = reference.generate(prompts, 2, greedy), ours.generate(prompts, 2, greedy)
    assert len(set(expected.completion_mask.sum(1).tolist())) > 1  # rows stopped at different steps
    assert torch.equal(got.completion_mask, expected.completion_mask)
    assert torch.equal(got.completion_ids, expected.completion_ids)
    assert got.texts == expected.texts and torch.equal(got.truncated, expected.truncated)


def test_sampling_follows_temperature_top_k_and_top_p_by_hand():
    from palaestra.rollout.decode import sample_next

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(20000, 1)

    def frequencies(**kwargs):
        return torch.bincount(sample_next(logits, greedy=False, **kwargs), minlength=3).float() / len(logits)

    # plain sampling: 0.5 / 0.3 / 0.2
    assert torch.allclose(frequencies(temperature=1.0, top_k=0, top_p=1.0), torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
    # top_p 0.6: 0.5 alone is short of 0.6, 0.5 + 0.3 reaches it -> keep two: 0.5/0.8, 0.3/0.8
    assert torch.allclose(frequencies(temperature=1.0, top_k=0, top_p=0.6), torch.tensor([0.625, 0.375, 0.0]), atol=0.015)
    # top_k 1 is greedy; temperature 0.5 squares the odds: 0.25 : 0.09 : 0.04 over 0.38
    assert frequencies(temperature=1.0, top_k=1, top_p=1.0).tolist() == [1.0, 0.0, 0.0]
    expected = torch.tensor([0.25, 0.09, 0.04]) / 0.38
    assert torch.allclose(frequencies(temperature=0.5, top_k=0, top_p=1.0), expected, atol=0.015)


def test_a_prompt_ending_with_an_assistant_message_is_continued_not_closed():
    _, tokenizer = _lora_model()
    generator = HFGenerator(*_lora_model())
    question = [{"role": "user", "content": "Which way?"}]
    opened = tokenizer.decode(generator.encode_prompts([question])[0])
    started = tokenizer.decode(generator.encode_prompts([question + [{"role": "assistant", "content": "#### ["}]])[0])
    assert started == opened + "#### ["  # the generation prompt, then the answer's start, left open


@pytest.mark.parametrize("entropy_gradient", [False, True], ids=["logged-entropy", "entropy-bonus"])
@pytest.mark.parametrize("grouped", [False, True], ids=["padded", "packed"])
def test_the_lm_head_in_chunks_gives_the_same_logprobs_entropies_and_gradients(grouped, entropy_gradient):
    """train.logprob_chunk_tokens: the LM head over chunks of 3 positions, recomputed in the backward; with an
    entropy bonus (algo.entropy_coef) the entropies' gradient flows too, the same in chunks as whole."""
    batch = _grouped_batch()
    mask = batch[3].float()

    def run(chunk_tokens: int):
        torch.manual_seed(0)  # the adapter's A matrices are drawn from the global generator
        model, _ = _lora_model()
        options = {"temperature": 0.7, "with_entropy": True, "chunk_tokens": chunk_tokens, "entropy_gradient": entropy_gradient}
        if grouped:
            logp, entropy = grouped_completion_logprobs(model, *batch, 4, **options)
        else:
            logp, entropy = completion_logprobs(model, *batch, **options)
        assert entropy.requires_grad == entropy_gradient
        objective = (logp * mask).sum() + (0.5 * entropy * mask).sum() if entropy_gradient else (logp * mask).sum()
        objective.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logp.detach() * mask, entropy.detach() * mask, grads

    whole, chunked = run(0), run(3)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-5, rtol=0)
    assert whole[2].keys() == chunked[2].keys() and whole[2]
    for name in whole[2]:
        torch.testing.assert_close(chunked[2][name], whole[2][name], atol=1e-6, rtol=1e-5)
