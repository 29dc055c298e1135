"""The batching engine directly: both batch kinds decode what ``generate`` decodes, rows join mid-flight."""

from __future__ import annotations

import queue
from dataclasses import dataclass

import pytest
import torch

from palaestra.models import load_model_and_tokenizer
from palaestra.rollout.hf import encode_chat
from palaestra.serving.batch import HFBatch, LeanBatch
from palaestra.serving.catalog import Catalog, Route, Source
from palaestra.serving.engine import Delta, Engine, Finished, GenerationJob, Sampling
from tests.serving.conftest import ANSWER

MESSAGES = [[{"role": "user", "content": text}] for text in ("Say hi", "Say", "Say hello", "xxxxxxx", "Tell me")]
"""Prompts the tuned adapter answers differently (and of different lengths)."""


@dataclass(frozen=True)
class _HFRoute(Route):
    """The same model on the Hugging Face forward (what a model without the lean step gets)."""

    def batch(self):
        return HFBatch(self.loaded.plain)


@pytest.fixture(scope="module")
def routes(adapter_dir):
    plan = {"tuned": Source("adapter", adapter_dir)}
    catalog = Catalog.load(model_name="tiny", model_path=None, base_id="tiny", plan=plan, device="cpu", dtype="float32")
    lean = catalog.route("tuned")
    return {"lean": lean, "hf": _HFRoute("tuned-hf", lean.loaded, lean.adapter)}


@pytest.fixture(scope="module")
def expected(adapter_dir):
    """Greedy texts of ``generate`` on the peft model (the adapter applied, not merged), one prompt at a time."""
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer("tiny")
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    texts = []
    for messages in MESSAGES:
        ids = torch.tensor([encode_chat(tokenizer, messages)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert len(set(texts)) == len(texts)  # five different answers: the comparison below means something
    return texts


def _run(engine, route, prompts, max_tokens=16):
    sinks = []
    for prompt in prompts:
        events = queue.Queue()
        engine.submit(GenerationJob(route, [prompt], 1, Sampling(max_tokens=max_tokens, temperature=0), events.put))
        sinks.append(events)
    texts = []
    for events in sinks:
        text = ""
        while not isinstance(event := events.get(timeout=60), Finished):
            text += event.text if isinstance(event, Delta) else ""
        texts.append(text)
    return texts


@pytest.mark.parametrize("kind", ["lean", "hf"])
def test_batched_greedy_text_equals_generate(routes, expected, kind):
    engine = Engine(max_batch_size=8, window_s=0.05)
    try:
        route = routes[kind]
        prompts = [encode_chat(route.tokenizer, m) for m in MESSAGES]
        assert isinstance(route.batch(), LeanBatch if kind == "lean" else HFBatch)
        assert _run(engine, route, prompts) == expected  # all five in one batch, prompts of different lengths
    finally:
        engine.close()


def test_rows_join_a_running_batch_and_a_full_batch_waits(routes, expected):
    engine = Engine(max_batch_size=2, window_s=0)
    try:
        route = routes["lean"]
        prompts = [encode_chat(route.tokenizer, m) for m in MESSAGES]
        long_events = queue.Queue()
        engine.submit(GenerationJob(route, [prompts[0]], 1, Sampling(max_tokens=200, temperature=0), long_events.put))
        text = long_events.get(timeout=60).text  # it is decoding now
        # the others join it (2 rows at most: they wait for a place, then join whichever row is running)
        assert _run(engine, route, prompts[1:]) == expected[1:]
        while not isinstance(event := long_events.get(timeout=60), Finished):
            text += event.text
        assert text == ANSWER and event.reason == "stop"
        assert engine.steps < engine.rows_decoded  # some steps decoded two rows
    finally:
        engine.close()
