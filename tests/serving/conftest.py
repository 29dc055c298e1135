"""Fixtures for the serving tests: a tiny LoRA adapter trained here, a BM25 index, a live server on a free port."""

from __future__ import annotations

import warnings

import pytest
import torch

from palaestra.config import ServeJob
from palaestra.models import apply_lora, build_tiny_model
from palaestra.rollout.hf import encode_chat

ANSWER = "Hello there, friend!"
"""What the tuned adapter says to PROMPT (greedy)."""
PROMPT = [{"role": "user", "content": "Say hi"}]
_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter over the tiny model, trained (a few dozen steps) to answer PROMPT with ANSWER."""
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model()
    with warnings.catch_warnings():  # the tied output layer is adapted on purpose: its LoRA sets the logits' scale
        warnings.simplefilter("ignore", UserWarning)
        model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules=[*_LINEAR, "lm_head"])
    prompt = encode_chat(tokenizer, PROMPT)
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(100):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, f"the adapter did not learn its answer (loss {loss.item():.3f})"
    folder = tmp_path_factory.mktemp("adapter") / "tuned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory):
    """A BM25 retrieval index of four documents (no embedder needed)."""
    from palaestra.retrieval.data import Document
    from palaestra.retrieval.index import RetrievalIndex

    documents = [
        Document("reset", "To reset your password open settings and choose reset password.", {"topic": "account"}),
        Document("refund", "Refunds are paid back to the original card within five days.", {"topic": "billing"}),
        Document("shipping", "Parcels ship from our warehouse every weekday morning.", {"topic": "orders"}),
        Document("hours", "The support desk is open from nine to five.", {"topic": "support"}),
    ]
    folder = tmp_path_factory.mktemp("rag") / "index"
    RetrievalIndex.build(documents, None, mode="bm25").save(folder)
    return folder


def serve_config(adapter_dir, index_dir=None, **serve) -> ServeJob:
    """The config ``palaestra serve model=tiny serve.models=[ADAPTER] ...`` would make."""
    config = ServeJob()
    config.model.name, config.model.dtype = "tiny", "float32"
    config.serve.models = [str(adapter_dir)]  # served as "tuned", its folder's name
    config.serve.embedder = None
    config.serve.index = str(index_dir) if index_dir else None
    config.serve.device = "cpu"
    for key, value in serve.items():
        setattr(config.serve, key, value)
    return config


@pytest.fixture(scope="module")
def server(adapter_dir, index_dir):
    """The API over the tiny model and the tuned adapter, on 127.0.0.1 and a free port."""
    from palaestra.serving import BackgroundServer, build_app
    from palaestra.serving.command import build_services

    app = build_app(build_services(serve_config(adapter_dir, index_dir, max_tokens=48)))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
