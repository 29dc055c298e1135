"""The lean Llama decode step computes what the Hugging Face forward computes."""

from __future__ import annotations

import pytest
import torch

from palaestra.models import build_tiny_model
from palaestra.rollout.decode import HFDecodeState
from palaestra.rollout.fast_llama import LlamaDecodeState, supports_fast_decode


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen2ForCausalLM(config).eval()
        for layer in model.model.layers:  # q/k/v biases start at zero; make them matter
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.data.normal_(0.0, 0.5)
    return model


def _prefill(model, prompts, prompt_mask):
    out = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_lean_step_matches_the_hf_forward_step_by_step_with_padding_and_dropped_rows(family, dtype):
    model = build_tiny_model(seed=1)[0] if family == "llama" else _tiny_qwen2()
    model = model.to(dtype)
    assert supports_fast_decode(model)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (3, 6), generator=generator)
    prompt_mask = torch.ones(3, 6, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding: rows sit at different positions
    prompt_mask[2, :4] = 0
    first_logits, cache = _prefill(model, prompts, prompt_mask)
    _, lean_cache = _prefill(model, prompts, prompt_mask)
    hf, lean = HFDecodeState(model, cache), LlamaDecodeState(model, lean_cache, max_new_tokens=5)
    mask = torch.cat([prompt_mask, torch.ones(3, 5, dtype=torch.long)], dim=1)
    positions = prompt_mask.sum(1)
    tokens = first_logits.argmax(-1)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for step in range(4):
        if step == 2:  # the middle row finishes: both caches drop it
            keep = torch.tensor([0, 2])
            hf.keep_rows(keep), lean.keep_rows(keep)
            tokens, mask, positions = tokens[keep], mask[keep], positions[keep]
        expected = hf.step(tokens, positions + step, mask[:, : 6 + step + 1]).float()
        got = lean.step(tokens, positions + step, mask[:, : 6 + step + 1]).float()
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=tolerance * expected.abs().max(), rtol=0), (step, (got - expected).abs().max())
        tokens = expected.argmax(-1)


def test_models_the_lean_step_does_not_cover_fall_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert not supports_fast_decode(gpt2)
    llama = build_tiny_model(seed=0)[0]
    llama.config.hidden_act = "gelu"
    assert not supports_fast_decode(llama)


def _with_adapters(model, names=("planner", "executor")):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(5)
    for parameter_name, parameter in peft_model.named_parameters():
        if "lora_B" in parameter_name:  # B starts at zero; give every adapter a real effect
            parameter.data.normal_(0.0, 0.2, generator=generator)
    return peft_model


@torch.no_grad()
def test_lean_step_applies_the_active_lora_adapter_unmerged_and_sees_base_weight_changes():
    model = _with_adapters(build_tiny_model(seed=2)[0])
    plain = model.get_base_model()
    assert supports_fast_decode(plain)
    prompts = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(1))
    prompt_mask = torch.ones(2, 5, dtype=torch.long)
    tokens, positions, mask = torch.tensor([7, 9]), torch.tensor([5, 5]), torch.ones(2, 6, dtype=torch.long)

    def both():
        first, cache = _prefill(plain, prompts, prompt_mask)
        _, lean_cache = _prefill(plain, prompts, prompt_mask)
        expected = HFDecodeState(plain, cache).step(tokens, positions, mask)
        return expected, LlamaDecodeState(plain, lean_cache, max_new_tokens=2).step(tokens, positions, mask)

    outputs = {}
    for adapter in ("planner", "executor"):  # per-role policies switch the active adapter
        model.set_adapter(adapter)
        expected, got = both()
        assert torch.allclose(got, expected, atol=1e-4), adapter
        outputs[adapter] = got
    assert not torch.allclose(outputs["planner"], outputs["executor"], atol=1e-2)
    with model.disable_adapter():
        expected, got = both()
        assert torch.allclose(got, expected, atol=1e-4)
    # a change to the frozen base (a resumed checkpoint) is seen
    base_weight = plain.model.layers[0].mlp.down_proj.base_layer.weight
    assert not base_weight.requires_grad
    base_weight.mul_(0.5)
    expected, got = both()
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, outputs["executor"], atol=1e-3)


@pytest.mark.parametrize(("weights", "precision"), [
    (torch.float32, "bf16"),  # palaestra eval of a base model at the default precision on a bf16 CPU
    (torch.bfloat16, "bf16"),  # a LoRA run computing in bf16 (bf16 base weights)
    (torch.float32, "fp32"),
])
@torch.no_grad()
def test_lean_step_decodes_every_weight_dtype_and_precision_like_generate(weights, precision):
    from palaestra.rollout import HFGenerator, SamplingParams

    model, tokenizer = build_tiny_model(seed=4)
    model = model.to(weights)
    prompts = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Hi", "Tell me a story about cats")]
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    lean = HFGenerator(model, tokenizer, precision=precision, decoder="palaestra")
    assert supports_fast_decode(model)
    expected = HFGenerator(model, tokenizer, precision=precision, decoder="hf").generate(prompts, 2, greedy)
    got = lean.generate(prompts, 2, greedy)
    assert got.completion_ids.shape[1] > 1
    assert torch.equal(got.completion_ids, expected.completion_ids)
    assert all(parameter.dtype == weights for parameter in model.parameters())  # the weights are left as they were


@torch.no_grad()
def test_prefill_in_chunks_of_prompts_gives_the_same_tokens():
    from palaestra.rollout import HFGenerator, SamplingParams

    model, tokenizer = build_tiny_model(seed=4)
    prompts = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Hi", "Tell me a story", "zzz 9", "ok")]
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    whole = HFGenerator(model, tokenizer, prefill_rows=16).generate(prompts, 2, greedy)
    chunked = HFGenerator(model, tokenizer, prefill_rows=2).generate(prompts, 2, greedy)  # chunks of 2, 2 and 1
    assert torch.equal(chunked.completion_ids, whole.completion_ids)
    assert chunked.texts == whole.texts


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_lean_prefill_matches_the_hf_prefill_with_padding_and_adapters(family, dtype):
    from palaestra.rollout.fast_llama import LlamaWeights, layer_keys_values

    model = build_tiny_model(seed=1)[0] if family == "llama" else _tiny_qwen2()
    model = _with_adapters(model.to(dtype)).get_base_model() if family == "llama" else model.to(dtype)
    prompts = torch.randint(3, 250, (3, 7), generator=torch.Generator().manual_seed(2))
    prompt_mask = torch.ones(3, 7, dtype=torch.long)
    prompt_mask[1, :3] = 0  # left padding
    prompt_mask[2, :6] = 0  # a one-token prompt
    expected_logits, cache = _prefill(model, prompts, prompt_mask)
    logits, layers = LlamaWeights(model).prefill(prompts, prompt_mask)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    scale = expected_logits.abs().max()
    assert torch.allclose(logits.float(), expected_logits.float(), atol=tolerance * scale, rtol=0)
    real = prompt_mask.bool()[:, None, :, None]  # padded slots hold no meaning in either cache
    for index, (keys, values) in enumerate(layers):
        expected_keys, expected_values = layer_keys_values(cache, index)
        for got, expected in ((keys, expected_keys), (values, expected_values)):
            difference = ((got.float() - expected.float()) * real).abs().max()
            assert difference <= tolerance * expected.abs().max(), (index, difference)


@torch.no_grad()
def test_reusing_weights_builds_them_once_per_adapter_state_and_sees_every_change():
    from palaestra.rollout import HFGenerator, SamplingParams

    model, tokenizer = build_tiny_model(seed=4)
    model = _with_adapters(model)
    generator = HFGenerator(model, tokenizer)
    prompts = [[{"role": "user", "content": text}] for text in ("What is 2 + 3?", "Hi")]
    greedy = SamplingParams(max_new_tokens=6, greedy=True)

    def each_adapter():
        out = {}
        for adapter in ("planner", "executor"):
            model.set_adapter(adapter)
            out[adapter] = generator.generate(prompts, 2, greedy).completion_ids
        return out

    fresh = each_adapter()
    with generator.reusing_weights():
        assert each_adapter().keys() == fresh.keys()
        built = {key: weights for key, (_, weights) in generator._reused.entries.items()}
        assert len(built) == 2  # one packed copy per adapter
        again = each_adapter()
        assert all(generator._reused.entries[key][1] is weights for key, weights in built.items())  # reused, not rebuilt
        assert all(torch.equal(again[name], fresh[name]) for name in fresh)
        lora_b = next(p for n, p in model.named_parameters() if "lora_B.planner" in n and "q_proj" in n)
        lora_b.add_(0.5)  # an optimizer step changes the adapter in place
        model.set_adapter("planner")
        changed = generator.generate(prompts, 2, greedy).completion_ids
        assert not any(generator._reused.entries[key][1] is weights for key, weights in built.items() if "planner" in key[0][0])
    assert generator._reused is None  # nothing held after the block
    model.set_adapter("planner")
    assert torch.equal(generator.generate(prompts, 2, greedy).completion_ids, changed)
