"""Registered models served by name@version and name@alias, and sentence embeddings, through the real server."""

from __future__ import annotations

import math

import pytest

from palaestra.models import build_tiny_model
from palaestra.registry import register_model
from palaestra.tracking import MlflowTracker
from tests.serving.conftest import serve_config


@pytest.fixture(scope="module")
def registry_server(tmp_path_factory, adapter_dir, index_dir):
    """A server with serve.registry=true over a SQLite store holding planner_model version 1, alias active,
    and the MiniLM embedder."""
    from palaestra.serving import BackgroundServer, build_app
    from palaestra.serving.command import build_services

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    model, tokenizer = build_tiny_model()
    folder = root / "plain"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    tracker = MlflowTracker("serving", run_name="plain", tracking_uri=uri)
    tracker.client.log_artifacts(tracker.run_id, str(folder), "model")
    version = register_model(tracker, tracker.run_id, "planner_model")
    tracker.client.set_registered_model_alias("planner_model", "active", version)
    tracker.end()

    config = serve_config(adapter_dir, index_dir, max_tokens=8, registry=True, embedder="all-minilm-l6-v2")
    config.tracking.tracking_uri = uri
    with BackgroundServer(build_app(build_services(config))) as running:
        yield running


@pytest.fixture
def registry_client(registry_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{registry_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_registered_versions_and_aliases_are_model_ids(registry_client):
    import openai

    ids = [m.id for m in registry_client.models.list().data]
    assert {"planner_model@1", "planner_model@active", "tuned"} <= set(ids)
    for model_id in ("planner_model@1", "planner_model@active"):  # downloaded and loaded on first use
        reply = registry_client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        registry_client.chat.completions.create(model="planner_model@7", messages=[{"role": "user", "content": "Hi"}])


def test_embeddings_are_minilm_unit_vectors_in_input_order(registry_client):
    texts = ["How do I reset my password?", "Refunds go back to the card.", "How can I change my password?"]
    reply = registry_client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    vectors = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    cosine = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731  (unit vectors: the inner product)
    assert cosine(vectors[0], vectors[2]) > cosine(vectors[0], vectors[1])  # the two password questions are closest
    assert reply.usage.prompt_tokens > 0
    from palaestra.retrieval.embedder import Embedder

    direct = Embedder().encode(texts[:1])[0]
    assert max(abs(a - b) for a, b in zip(direct, vectors[0])) < 1e-5  # the same embedder as palaestra's RAG index
