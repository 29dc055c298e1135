"""Unit tests for palaestra.models.value_head: shapes, one shared forward, hand-checked values, state."""

from __future__ import annotations

import math

import pytest
import torch

from palaestra.models import apply_lora, build_tiny_model
from palaestra.models.logprobs import completion_logprobs
from palaestra.models.value_head import ValueHead, explained_variance, logprobs_and_values


def _batch():
    """Two left-padded prompts [2, 5] and two right-padded completions [2, 4]."""
    prompt_ids = torch.tensor([[0, 0, 40, 41, 42], [50, 51, 52, 53, 54]])
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    completion_ids = torch.tensor([[60, 61, 2, 0], [70, 71, 72, 73]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _policy():
    model, _ = build_tiny_model()
    return apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")


def test_head_is_w_dot_h_plus_b():
    head = ValueHead(2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.linear.bias.fill_(0.5)
    hidden = torch.tensor([[[1.0, 1.0], [0.0, 3.0]]])  # [B=1, T=2, H=2]
    # 1*1 + 2*1 + 0.5 = 3.5;  1*0 + 2*3 + 0.5 = 6.5
    torch.testing.assert_close(head(hidden), torch.tensor([[3.5, 6.5]]))


def test_head_starts_at_zero_and_stays_float32_under_bf16():
    head = ValueHead(64)
    hidden = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden)
    assert values.shape == (2, 3) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(2, 3))


def test_shapes_and_logprobs_match_the_plain_forward():
    model = _policy()
    head = ValueHead.for_model(model)
    batch = _batch()
    logp, values, entropy = logprobs_and_values(model, head, *batch, temperature=0.7, with_entropy=True)
    assert logp.shape == values.shape == entropy.shape == (2, 4)
    reference, _ = completion_logprobs(model, *batch, temperature=0.7)
    torch.testing.assert_close(logp, reference)


def test_values_and_logits_come_from_one_forward():
    model = _policy()
    head = ValueHead.for_model(model)
    torch.nn.init.normal_(head.linear.weight)
    calls = []
    model.get_base_model().register_forward_hook(lambda module, args, kwargs, out: calls.append(out), with_kwargs=True)
    batch = _batch()
    _, values, _ = logprobs_and_values(model, head, *batch)
    assert len(calls) == 1  # one pass of the trunk gives both heads their input
    # values[:, t] reads the hidden state one position left of completion token t. The 5 prompt
    # columns are left-padded to the bucketed width 16, so the prompt's last token sits at 15 and the
    # 4 completion tokens at 16..19: values read positions 15..18
    hidden = calls[0].hidden_states[-1]
    torch.testing.assert_close(values, head(hidden[:, 15:19]))


def test_one_backward_reaches_the_adapter_and_the_head():
    model = _policy()
    head = ValueHead.for_model(model)
    torch.nn.init.normal_(head.linear.weight)
    logp, values, _ = logprobs_and_values(model, head, *_batch())
    (logp.sum() + values.sum()).backward()
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0
    lora_a = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    # LoRA B starts at 0, so A's gradient is 0 at first; B's gradient is not
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_a and all(g is not None for g in lora_a)
    assert any(g.abs().sum() > 0 for g in lora_b)


def test_state_round_trip(tmp_path):
    head = ValueHead(8)
    torch.nn.init.normal_(head.linear.weight)
    torch.nn.init.normal_(head.linear.bias)
    folder = head.save(tmp_path / "value_head")
    loaded = ValueHead.load(folder)
    assert loaded.hidden_size == 8
    for key, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    twin = ValueHead(8)
    twin.load_state_dict(head.state_dict())
    hidden = torch.randn(1, 2, 8)
    assert torch.equal(twin(hidden), head(hidden))
    head.save(folder)  # overwriting an existing folder is fine
    with pytest.raises(FileNotFoundError, match="no value head"):
        ValueHead.load(tmp_path / "elsewhere")


def test_explained_variance_by_hand():
    mask = torch.tensor([[1, 1, 1, 1]])
    returns = torch.tensor([[0.0, 2.0, 4.0, 6.0]])  # mean 3, population variance (9+1+1+9)/4 = 5
    perfect = explained_variance(returns.clone(), returns, mask)
    assert perfect == pytest.approx(1.0)
    # residuals [1, -1, 1, -1]: mean 0, variance 1 -> 1 - 1/5 = 0.8
    assert explained_variance(returns - torch.tensor([[1.0, -1.0, 1.0, -1.0]]), returns, mask) == pytest.approx(0.8)
    # a constant critic explains nothing: the residual's variance is the returns' own
    assert explained_variance(torch.full((1, 4), 3.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones(1, 4), mask))
