"""Weight-only int8 rollouts: the int8 building blocks by hand, the sampler's log-probs against the trainer's, and
the corrected update, which equals the plain one when the sampler is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from palaestra.config import ConfigError
from palaestra.models.loading import build_tiny_model
from palaestra.models.logprobs import completion_logprobs
from palaestra.models.lora import apply_lora
from palaestra.recipes.update import policy_update
from palaestra.rollout import HFGenerator, SamplingParams
from palaestra.rollout.int8 import Int8Projection, Int8Sampling, QuantizedBase, kernel_works, lora_factors, quantize_rows

needs_kernel = pytest.mark.skipif(not kernel_works(), reason="this PyTorch build has no CPU weight-only int8 kernel")

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "Say hello."}]]
SAMPLING = SamplingParams(max_new_tokens=12, temperature=1.0)


def _policy():
    """The tiny Llama with a LoRA adapter on every linear layer, its B matrices drawn (not the no-op start)."""
    model, tokenizer = build_tiny_model()
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    generator = torch.Generator().manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    return model, tokenizer


def test_quantized_rows_are_within_half_a_step_of_the_weight():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q, scales = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).tolist() == [127] * 16  # each row's largest maps to 127
    assert bool(((weight - q.float() * scales[:, None]).abs() <= scales[:, None] / 2 + 1e-7).all())


def test_lora_factors_rebuild_the_deltas_of_fused_modules():
    model, _ = _policy()
    attention = model.get_base_model().model.layers[0].self_attn
    modules = [attention.q_proj, attention.k_proj, attention.v_proj]
    down, up = lora_factors(modules)
    expected = torch.cat([module.get_delta_weight("default") for module in modules])
    assert down.shape == (12, 64) and up.shape == (expected.shape[0], 12)  # 3 adapters of rank 4, B block-diagonal
    assert torch.allclose(up @ down, expected, atol=1e-6)
    with model.disable_adapter():
        assert lora_factors(modules) is None


def test_the_quantized_base_is_made_once_and_again_after_the_weight_changes():
    weight = torch.nn.Parameter(torch.randn(8, 32))
    base = QuantizedBase()
    first = base.get([weight])
    assert base.get([weight]) is first
    with torch.no_grad():
        weight.mul_(2.0)  # an optimizer step: a new in-place version
    assert base.get([weight]) is not first


@needs_kernel
def test_an_int8_projection_is_close_to_the_merged_weight_for_few_rows_and_exact_for_many():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=generator) * 0.05, torch.randn(48, generator=generator)
    down, up = torch.randn(4, 64, generator=generator) * 0.1, torch.randn(48, 4, generator=generator) * 0.1

    def full(x):
        return F.linear(x, weight + up @ down, bias)

    q, scales = quantize_rows(weight)
    projection = Int8Projection(full, q, scales, bias, (down, up), max_rows=4, dtype=torch.float32)
    few, many = torch.randn(3, 64, generator=generator), torch.randn(8, 64, generator=generator)
    error = float((projection(few) - full(few)).norm() / full(few).norm())
    assert 0 < error < 0.02  # int8 weights and bf16 activations: close, not equal
    assert torch.equal(projection(many), full(many))  # more rows than the limit: the full-precision product


@needs_kernel
def test_int8_rollouts_carry_log_probs_close_to_the_trainers():
    model, tokenizer = _policy()
    generator = HFGenerator(model, tokenizer, quantize="int8")
    generator.int8 = Int8Sampling(max_rows=64)  # every decode step on the int8 weights, whatever this CPU prefers
    torch.manual_seed(0)
    rollout = generator.generate(PROMPTS, 4, SAMPLING)
    mask = rollout.completion_mask.bool()
    assert rollout.sampler_logprobs.shape == rollout.completion_ids.shape
    assert bool((rollout.sampler_logprobs[~mask] == 0).all()) and bool((rollout.sampler_logprobs[mask] < 0).all())
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                         rollout.completion_mask)
    gap = (trainer - rollout.sampler_logprobs).abs()[mask]
    assert 0 < float(gap.mean()) < 0.05, float(gap.mean())
    # an evaluation samples the policy itself: full precision, no sampler log-probs, the tokens of an exact generator
    exact_generator = HFGenerator(model, tokenizer)
    with generator.exact():
        torch.manual_seed(0)
        exact = generator.generate(PROMPTS, 4, SAMPLING)
    torch.manual_seed(0)
    plain = exact_generator.generate(PROMPTS, 4, SAMPLING)
    assert exact.sampler_logprobs is None and torch.equal(exact.completion_ids, plain.completion_ids)


def test_an_exact_sampler_reports_the_trainers_log_probs_and_the_corrected_update_equals_the_plain_one():
    model, tokenizer = _policy()
    generator = HFGenerator(model, tokenizer, quantize="int8")
    generator.int8 = Int8Sampling(max_rows=0)  # no step on int8 weights: the sampler is the trainer's weights
    torch.manual_seed(0)
    rollout = generator.generate(PROMPTS, 4, SAMPLING)
    batch = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad():
        trainer, _ = completion_logprobs(model, *batch)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(trainer[mask], rollout.sampler_logprobs[mask], atol=1e-4)

    parameters = [p for p in model.parameters() if p.requires_grad]
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.0])

    def gradients(**correction):
        optimizer = torch.optim.SGD(parameters, lr=0.0)
        policy_update(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), parameters, advantages,
                      rollout.completion_mask.float(), slices=[slice(0, 4), slice(4, 8)],
                      logprobs=lambda rows: (completion_logprobs(model, *(t[rows] for t in batch))[0], None),
                      loss_type="grpo", epsilon=0.2, **correction)
        return [p.grad.clone() for p in parameters]

    plain = gradients()
    corrected = gradients(sampler_logps=lambda rows: rollout.sampler_logprobs[rows], correction="token_truncate",
                          correction_cap=2.0)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, corrected))
    assert any(float(g.abs().max()) > 0 for g in plain)


def test_int8_rollouts_need_the_lean_decode_step():
    model, tokenizer = _policy()
    with pytest.raises(ConfigError, match="rollout.quantize=int8 samples on the lean decode step"):
        HFGenerator(model, tokenizer, decoder="hf", quantize="int8")
