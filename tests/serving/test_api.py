"""The API against a real uvicorn server on 127.0.0.1, called with the official ``openai`` client."""

from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest

from palaestra.models import build_tiny_model
from palaestra.rollout.hf import encode_chat
from tests.serving.conftest import ANSWER, PROMPT


def _metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_models_lists_the_base_and_the_trained_adapter(client):
    ids = [model.id for model in client.models.list()]
    assert ids[:2] == ["tiny", "tuned"]
    assert client.models.retrieve("tuned").id == "tuned"


def test_chat_answers_with_the_adapter_chosen_per_request(client):
    tuned = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40)
    base = client.chat.completions.create(model="tiny", messages=PROMPT, temperature=0, max_tokens=len(ANSWER))
    assert tuned.choices[0].message.content == ANSWER
    assert tuned.choices[0].finish_reason == "stop"  # the adapter learnt to end with the end-of-turn token
    assert base.choices[0].message.content != ANSWER  # the same base, adapter off
    _, tokenizer = build_tiny_model()
    prompt_tokens = len(encode_chat(tokenizer, PROMPT))
    # the byte-level tokenizer: one token per character, plus the end-of-turn token
    assert (tuned.usage.prompt_tokens, tuned.usage.completion_tokens) == (prompt_tokens, len(ANSWER) + 1)
    assert tuned.usage.total_tokens == prompt_tokens + len(ANSWER) + 1


def test_streamed_text_equals_the_whole_text_at_temperature_zero(client):
    for model in ("tuned", "tiny"):
        whole = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=30)
        chunks = list(client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=30, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = client.completions.create(model="tiny", prompt="Once upon", temperature=0, max_tokens=20)
    streamed = list(client.completions.create(model="tiny", prompt="Once upon", temperature=0, max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 20


def test_n_choices_seeded_sampling_and_max_completion_tokens(client):
    first = client.chat.completions.create(model="tiny", messages=PROMPT, n=2, temperature=1.0, seed=7, max_completion_tokens=12)
    again = client.chat.completions.create(model="tiny", messages=PROMPT, n=2, temperature=1.0, seed=7, max_completion_tokens=12)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]  # the seed decides
    assert first.choices[0].message.content != first.choices[1].message.content  # each choice draws its own
    assert first.usage.completion_tokens <= 24
    texts = client.completions.create(model="tiny", prompt=["ab", "cd"], n=2, temperature=0.8, max_tokens=5)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI numbers them


def test_stop_strings_are_trimmed_with_finish_reason_stop(client):
    reply = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, stop=["there"], max_tokens=40)
    assert reply.choices[0].message.content == "Hello "
    assert reply.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, stop=[",", "xyz"],
                                                   max_tokens=40, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "Hello there"
    cut = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=5)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == (ANSWER[:5], "length")


def test_logprobs_have_the_shape_clients_read(client):
    reply = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == ANSWER  # one entry per generated token (the end token has no text)
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the most likely one
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
    text = client.completions.create(model="tiny", prompt="abc", temperature=0, max_tokens=6, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0


def test_the_usage_chunk_comes_last_before_done(client, server):
    chunks = list(client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ANSWER) + 1
    assert all(c.usage is None for c in chunks[:-1])
    raw = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "messages": PROMPT, "temperature": 5}, "temperature"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny"}, "messages"),
    ({"model": "tiny", "messages": PROMPT, "n": 0}, "n"),
    ({"model": "tiny", "messages": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "tiny", "messages": PROMPT, "max_tokens": 5000}, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
])
def test_bad_requests_are_400_in_openai_shape(server, body, param):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and "\n" not in error["message"] and "Traceback" not in response.text


def test_the_server_keeps_serving_after_bad_requests(client, server):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=PROMPT, temperature=3)
    broken = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["message"] == "the request body is not valid JSON"
    unknown = httpx.get(f"{server.url}/v1/nothing-here")
    assert unknown.status_code == 404 and "error" in unknown.json()
    tools = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": PROMPT, "tools": [{"x": 1}]})
    assert tools.status_code == 400 and "tools are not supported" in tools.json()["error"]["message"]
    assert client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40).choices[0].message.content == ANSWER


def test_health_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'palaestra_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text)
    assert re.search(r'palaestra_tokens_total\{kind="completion",model="tiny"\} [1-9]', text)
    assert "palaestra_request_latency_seconds_bucket" in text


def test_search_over_the_rag_index(server):
    hits = httpx.post(f"{server.url}/v1/search", json={"query": "password refunds", "k": 3}).json()["data"]
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["id"] == "reset" and hits[1]["id"] == "refund" and hits[0]["metadata"] == {"topic": "account"}
    assert httpx.post(f"{server.url}/v1/search", json={"query": "", "k": 2}).status_code == 400


def test_concurrent_requests_are_decoded_together_and_match_one_at_a_time(client, server):
    prompts = [[{"role": "user", "content": f"count to {i}"}] for i in range(8)]
    alone = [client.chat.completions.create(model="tiny", messages=p, temperature=0, max_tokens=24).choices[0].message.content
             for p in prompts]
    steps, rows = _metric(server, "palaestra_decode_steps"), _metric(server, "palaestra_decoded_rows")
    together = [None] * 8

    def ask(i):
        together[i] = client.chat.completions.create(model="tiny", messages=prompts[i], temperature=0, max_tokens=24).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    mean_batch = (_metric(server, "palaestra_decoded_rows") - rows) / (_metric(server, "palaestra_decode_steps") - steps)
    assert mean_batch > 2  # alone it is 1: the 8 requests shared decode steps


def test_a_long_request_does_not_block_a_short_one_and_a_dropped_stream_stops(client, server):
    long_done = threading.Event()

    def long_request():
        client.completions.create(model="tiny", prompt="a", temperature=0, max_tokens=1500)
        long_done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.3)
    short = client.chat.completions.create(model="tuned", messages=PROMPT, temperature=0, max_tokens=40)
    assert short.choices[0].message.content == ANSWER
    assert not long_done.is_set()  # the short one joined the running batch and finished first
    thread.join()
    # a client that goes away mid-stream stops its generation
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"model": "tiny", "prompt": "a", "temperature": 0, "max_tokens": 1900, "stream": True}) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass
    deadline = time.monotonic() + 5
    while _metric(server, "palaestra_running_rows") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "palaestra_running_rows") == 0
