"""``palaestra serve`` as a trainer's rollout worker, in vLLM's conventions: adapters loaded and unloaded at
runtime (``/v1/load_lora_adapter``), every sampled token id returned with the log-probability it was drawn
with, checked against what the trainer computes from the same adapter."""

from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from palaestra.config import ConfigError, ServeJob
from palaestra.config.sections import validate_sections
from palaestra.models import apply_lora, build_tiny_model, load_model_and_tokenizer
from palaestra.rollout.decode import filtered_logits
from palaestra.rollout.hf import encode_chat
from palaestra.serving import BackgroundServer, build_app
from palaestra.serving.batch import HFBatch
from palaestra.serving.catalog import Catalog, ModelNotFound, Route
from palaestra.serving.command import build_services
from palaestra.serving.engine import Engine, Finished, GenerationJob, Sampling
from tests.serving.conftest import ANSWER, PROMPT, serve_config

_, TOKENIZER = build_tiny_model()
EOS = TOKENIZER.eos_token_id
PROMPT_IDS = TOKENIZER("The answer is", add_special_tokens=False)["input_ids"]


def _make_adapter(folder, seed: int = 1, hidden: int = 64):
    """A LoRA adapter over the tiny model (or one ``hidden`` wide) whose B matrices are random, so that
    it changes every logit (a fresh adapter's B = 0 would compute exactly what the base does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden == 64:
        model, _ = build_tiny_model()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = apply_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return _make_adapter(tmp_path_factory.mktemp("policy") / "policy")


def _start(adapter_dir, **serve):
    config = serve_config(adapter_dir, runtime_lora=True, logprobs_mode="processed_logprobs", **serve)
    return BackgroundServer(build_app(build_services(config))).start()


@pytest.fixture(scope="module")
def worker(adapter_dir):
    """A rollout worker: runtime LoRA on, processed log-probabilities; serves tiny and the tuned adapter."""
    running = _start(adapter_dir)
    yield running
    running.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _services(server):
    return server.server.config.app.state.services


def _load(server, name, folder):
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)}, timeout=60)


def _unload(server, name):
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def _trainer_logprobs(folder, prompt: list[int], ids: list[int], temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """What the trainer computes for a rollout: one fp32 forward of the peft model (``folder``; None: the
    base) over prompt + ids, log_softmax of the filtered scores (temperature 1, no top-k/p: the raw
    logits) gathered at the sampled ids [len(ids)]."""
    from peft import PeftModel

    model, _ = load_model_and_tokenizer("tiny", dtype="float32")
    if folder is not None:
        with warnings.catch_warnings():  # the tuned adapter adapts the tied output layer on purpose
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(folder))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
    predicting = logits[len(prompt) - 1 : len(prompt) + len(ids) - 1]  # position t predicts token t + 1
    scores = filtered_logits(predicting, temperature, top_k, top_p)
    return torch.log_softmax(scores, dim=-1).gather(1, torch.tensor(ids)[:, None])[:, 0]


def test_runtime_adapter_log_probs_are_what_the_trainer_computes(worker, policy_dir):
    loaded = _load(worker, "policy-v1", policy_dir)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'policy-v1' added successfully."
    client = _client(worker)
    assert "policy-v1" in [model.id for model in client.models.list()]
    reply = client.completions.create(model="policy-v1", prompt=PROMPT_IDS, n=4, temperature=0.7, max_tokens=12, logprobs=0,
                                      seed=0, extra_body={"return_token_ids": True})
    assert len({tuple(choice.token_ids) for choice in reply.choices}) > 1  # four draws, not one answer four times
    assert sum(len(choice.token_ids) for choice in reply.choices) == reply.usage.completion_tokens
    for choice in reply.choices:
        ids, served = choice.token_ids, torch.tensor(choice.logprobs.token_logprobs)
        assert choice.prompt_token_ids == PROMPT_IDS and len(served) == len(ids) >= 1
        assert len(ids) == 12 or (choice.finish_reason == "stop" and ids[-1] == EOS)
        # processed: log_softmax(logits / 0.7) of the adapted model, token by token
        assert torch.allclose(served, _trainer_logprobs(policy_dir, PROMPT_IDS, ids, 0.7), atol=1e-4)
        # the base model's would differ: a stale or missing adapter is caught
        assert (served - _trainer_logprobs(None, PROMPT_IDS, ids, 0.7)).abs().max() > 0.05
    # with top-k and top-p the distribution drawn from is the filtered one
    reply = client.completions.create(model="policy-v1", prompt=PROMPT_IDS, n=2, temperature=0.7, top_p=0.9, max_tokens=12,
                                      logprobs=0, seed=1, extra_body={"return_token_ids": True, "top_k": 8})
    for choice in reply.choices:
        expected = _trainer_logprobs(policy_dir, PROMPT_IDS, choice.token_ids, 0.7, top_k=8, top_p=0.9)
        assert torch.allclose(torch.tensor(choice.logprobs.token_logprobs), expected, atol=1e-4)


def test_the_stop_token_comes_back_with_its_log_prob(worker, adapter_dir):
    # the tuned adapter answers PROMPT with ANSWER and the end token: loaded at runtime, sampled at 0.7
    assert _load(worker, "policy-v2", adapter_dir).status_code == 200
    prompt = encode_chat(TOKENIZER, PROMPT)
    reply = _client(worker).completions.create(model="policy-v2", prompt=prompt, n=2, temperature=0.7, max_tokens=32,
                                               logprobs=0, seed=0, extra_body={"return_token_ids": True})
    stopped = [choice for choice in reply.choices if choice.finish_reason == "stop"]
    assert stopped, "the tuned adapter should end its answer within 32 tokens"
    for choice in stopped:
        assert choice.token_ids[-1] == EOS and TOKENIZER.eos_token not in choice.text  # the text never shows it
        served = torch.tensor(choice.logprobs.token_logprobs)
        assert len(served) == len(choice.token_ids)
        assert torch.allclose(served, _trainer_logprobs(adapter_dir, prompt, choice.token_ids, 0.7), atol=1e-4)


def test_raw_log_probs_leave_the_temperature_out_and_chat_returns_ids_too(server, adapter_dir):
    # the conftest server: serve.logprobs_mode left at raw_logprobs, "tuned" loaded at startup
    client = _client(server)
    reply = client.completions.create(model="tuned", prompt=PROMPT_IDS, n=2, temperature=0.7, max_tokens=10, logprobs=0,
                                      seed=0, extra_body={"return_token_ids": True})
    for choice in reply.choices:
        served = torch.tensor(choice.logprobs.token_logprobs)
        assert torch.allclose(served, _trainer_logprobs(adapter_dir, PROMPT_IDS, choice.token_ids), atol=1e-4)
        assert (served - _trainer_logprobs(adapter_dir, PROMPT_IDS, choice.token_ids, 0.7)).abs().max() > 1e-3
    # chat, greedy: ANSWER's characters (one token each) and the end token; without return_token_ids the
    # end token has no log-prob (OpenAI's shape: one entry per token of the text)
    with_ids = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40, logprobs=True,
                                              extra_body={"return_token_ids": True})
    plain = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40, logprobs=True)
    choice = with_ids.choices[0]
    prompt = encode_chat(TOKENIZER, PROMPT)
    assert choice.message.content == ANSWER and choice.token_ids[-1] == EOS and len(choice.token_ids) == len(ANSWER) + 1
    assert with_ids.prompt_token_ids == choice.prompt_token_ids == prompt
    assert len(choice.logprobs.content) == len(ANSWER) + 1 and len(plain.choices[0].logprobs.content) == len(ANSWER)
    expected = _trainer_logprobs(adapter_dir, prompt, choice.token_ids)
    assert torch.allclose(torch.tensor([t.logprob for t in choice.logprobs.content]), expected, atol=1e-4)
    assert not hasattr(plain.choices[0], "token_ids") or plain.choices[0].token_ids is None


def test_top_k_one_at_temperature_one_is_greedy(worker):
    client = _client(worker)
    greedy = client.completions.create(model="tiny", prompt=PROMPT_IDS, temperature=0, max_tokens=12,
                                       extra_body={"return_token_ids": True})
    top1 = client.completions.create(model="tiny", prompt=PROMPT_IDS, n=3, temperature=1.0, max_tokens=12, logprobs=0,
                                     extra_body={"return_token_ids": True, "top_k": 1})
    for choice in top1.choices:
        assert choice.token_ids == greedy.choices[0].token_ids
        # processed: one token is left to draw from, so its log-prob is log 1 = 0
        assert choice.logprobs.token_logprobs == [0.0] * len(choice.token_ids)
    for off in (0, -1):  # vLLM's ways to say "no top-k"
        response = httpx.post(f"{worker.url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2, "top_k": off})
        assert response.status_code == 200
    assert httpx.post(f"{worker.url}/v1/completions", json={"model": "tiny", "prompt": "a", "top_k": -2}).status_code == 400
    streamed = httpx.post(f"{worker.url}/v1/completions", json={"model": "tiny", "prompt": "a", "stream": True, "return_token_ids": True})
    assert streamed.status_code == 400 and "return_token_ids" in streamed.json()["error"]["message"]


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    return error


def test_load_and_unload_errors_are_one_line(worker, server, policy_dir, tmp_path):
    assert _error(_load(server, "x", policy_dir), 404)["message"] == (
        "this server does not load adapters at runtime; start it with serve.runtime_lora=true")
    assert _error(_unload(server, "tuned"), 404)["code"] == "runtime_lora_off"
    peft_adapters = len(_services(worker).catalog.routes["tiny"].loaded.adapters)
    assert _error(_load(worker, "x", tmp_path / "nowhere"), 400)["param"] == "lora_path"
    assert "adapter_config.json" in _error(_load(worker, "x", tmp_path), 400)["message"]
    assert "already been loaded" in _error(_load(worker, "tiny", policy_dir), 400)["message"]
    assert "already been loaded" in _error(_load(worker, "tuned", policy_dir), 400)["message"]
    misfit = _error(_load(worker, "x", _make_adapter(tmp_path / "wide", hidden=32)), 400)
    assert misfit["param"] == "lora_path" and "does not fit the base model tiny: size mismatch" in misfit["message"]
    assert _error(httpx.post(f"{worker.url}/v1/load_lora_adapter", json={"lora_path": str(policy_dir)}), 400)["param"] == "lora_name"
    assert len(_services(worker).catalog.routes["tiny"].loaded.adapters) == peft_adapters  # nothing left behind
    assert _error(_unload(worker, "no-such-adapter"), 404)["code"] == "model_not_found"
    assert "not a LoRA adapter" in _error(_unload(worker, "tiny"), 400)["message"]
    # unloaded: gone from the list, and a request for it is OpenAI's model_not_found
    assert _load(worker, "short-lived", policy_dir).status_code == 200
    unloaded = _unload(worker, "short-lived")
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'short-lived' removed successfully."
    client = _client(worker)
    assert "short-lived" not in [model.id for model in client.models.list()]
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="short-lived", prompt="a", max_tokens=2)
    assert caught.value.code == "model_not_found"
    assert client.completions.create(model="tuned", prompt="a", max_tokens=2).usage.completion_tokens >= 1  # still serving


def test_a_name_unloaded_and_loaded_again_serves_the_new_adapter(worker, policy_dir, adapter_dir):
    # vLLM's clients may reuse one lora_name for every version: nothing of the old one may answer
    client = _client(worker)
    assert _load(worker, "policy", policy_dir).status_code == 200
    first = client.chat.completions.create(model="policy", messages=PROMPT, temperature=0, max_tokens=24)
    assert first.choices[0].message.content != ANSWER
    assert _unload(worker, "policy").status_code == 200
    assert _load(worker, "policy", adapter_dir).status_code == 200
    again = client.chat.completions.create(model="policy", messages=PROMPT, temperature=0, max_tokens=24)
    assert again.choices[0].message.content == ANSWER  # the tuned adapter's answer, not the random one's
    assert _unload(worker, "policy").status_code == 200


def test_a_new_adapter_every_step_does_not_grow_memory(worker, policy_dir):
    services = _services(worker)
    loaded = services.catalog.routes["tiny"].loaded
    layer = loaded.hf_model.model.layers[0].self_attn.q_proj
    names = set()
    previous = None
    for step in range(20):  # the trainer's loop: push the new policy, roll out with it, drop the old one
        assert _load(worker, f"step-{step}", policy_dir).status_code == 200
        names.add(services.catalog.routes[f"step-{step}"].adapter)
        reply = httpx.post(f"{worker.url}/v1/completions", json={"model": f"step-{step}", "prompt": PROMPT_IDS, "n": 2,
                                                                  "temperature": 0.7, "max_tokens": 3}, timeout=60)
        assert reply.status_code == 200
        if previous:
            assert _unload(worker, previous).status_code == 200
        previous = f"step-{step}"
        assert len(loaded.adapters) == len(loaded.model.peft_config) == len(layer.lora_A)  # one per served adapter
        assert len(loaded.packed.entries) <= len(loaded.adapters) + 1  # one packed copy per adapter (+ the base's)
        assert len(services.engine._groups) <= services.engine.kept_batches
    assert _unload(worker, previous).status_code == 200
    assert len(names) == 20  # adapter names are never reused, so a stale one cannot name a new adapter
    assert not any(route.startswith("step-") for route in services.catalog.routes)
    assert not any(name in layer.lora_A for name in names)


def test_requests_in_flight_go_on_while_adapters_come_and_go(adapter_dir, policy_dir):
    """A fresh worker (no adapter yet: the first load wraps the base model in peft under a running request)."""
    running = _start(adapter_dir, models=[])
    try:
        client = _client(running)

        def greedy(model):
            return client.completions.create(model=model, prompt="a", temperature=0, max_tokens=400).choices[0]

        def while_busy(model, work):
            """``greedy(model)`` (its choice, or the error it raised) with ``work()`` done while it decodes."""
            answer = []

            def ask():
                try:
                    answer.append(greedy(model))
                except openai.APIError as error:
                    answer.append(error)

            engine = _services(running).engine
            steps = engine.steps
            thread = threading.Thread(target=ask)
            thread.start()
            deadline = time.monotonic() + 30
            while engine.steps < steps + 2 and time.monotonic() < deadline:  # it is decoding
                time.sleep(0.002)
            work()
            overlapped = thread.is_alive()
            thread.join()
            return answer[0], overlapped

        alone = greedy("tiny")
        assert alone.finish_reason == "length"  # 400 tokens to decode: long enough to overlap the loads
        busy, overlapped = while_busy("tiny", lambda: _load(running, "first", policy_dir).raise_for_status())
        assert overlapped and busy.text == alone.text
        alone = greedy("first")
        assert alone.text != busy.text  # the adapter changes the answer

        def churn():
            _load(running, "second", adapter_dir).raise_for_status()
            _unload(running, "second").raise_for_status()

        busy, overlapped = while_busy("first", churn)
        assert overlapped and busy.text == alone.text
        # unloading the adapter a request is decoding with fails that request: OpenAI's model_not_found
        failed, _ = while_busy("first", lambda: _unload(running, "first").raise_for_status())
        assert isinstance(failed, openai.NotFoundError) and failed.code == "model_not_found"
    finally:
        running.stop()


@dataclass(frozen=True)
class _HFRoute(Route):
    """The route on the Hugging Face forward (what a model without the lean step gets): its forwards run
    through the peft layers themselves, so a half-loaded adapter would show."""

    def batch(self):
        if self.adapter is not None and self.adapter not in self.loaded.adapters:
            raise ModelNotFound(self.key)
        return HFBatch(self.loaded.plain)


def test_hugging_face_batches_in_flight_survive_adapter_loads(policy_dir, adapter_dir):
    catalog = Catalog.load(model_name="tiny", model_path=None, base_id="tiny", plan={}, device="cpu", dtype="float32")
    engine = Engine(window_s=0)

    def decode(route, during=lambda: None) -> list[int]:
        """Greedy token ids of ``route`` for PROMPT_IDS, ``during()`` run while they decode."""
        events, steps = queue.Queue(), engine.steps
        engine.submit(GenerationJob(route, [PROMPT_IDS], 1, Sampling(max_tokens=200, temperature=0), events.put))
        deadline = time.monotonic() + 30
        while engine.steps < steps + 2 and time.monotonic() < deadline:  # it is decoding
            time.sleep(0.001)
        during()
        while not isinstance(event := events.get(timeout=60), Finished):
            pass
        return event.token_ids

    def load(name, folder):
        engine.call(lambda: catalog.add_adapter(name, folder))
        assert engine.running_rows == 1  # loaded between two steps of the running request

    try:
        base = _HFRoute("tiny", catalog.routes["tiny"].loaded)
        alone = decode(base)
        assert decode(base, lambda: load("policy", policy_dir)) == alone  # the first adapter wraps the model in peft
        policy = _HFRoute("policy", base.loaded, catalog.routes["policy"].adapter)
        alone_policy = decode(policy)
        assert alone_policy != alone

        def churn():
            load("other", adapter_dir)
            engine.call(lambda: catalog.remove_adapter("other"))

        assert decode(policy, churn) == alone_policy
        assert decode(base) == alone
    finally:
        engine.close()


def test_engine_call_runs_on_the_decode_thread_and_returns_or_raises():
    engine = Engine(window_s=0)
    try:
        assert engine.call(lambda: threading.current_thread().name) == "palaestra-decode"
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0)
        assert engine.call(lambda: 7) == 7  # the thread survived
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.call(lambda: 1)


def test_logprobs_mode_is_checked_in_one_line():
    config = ServeJob()
    config.serve.logprobs_mode = "processed_logits"
    with pytest.raises(ConfigError) as caught:
        validate_sections(config)
    assert str(caught.value) == "serve.logprobs_mode='processed_logits' is unknown; use one of raw_logprobs, processed_logprobs"
