"""LangChain: the chat model and the retriever pass langchain-tests' standard tests; the chain; ChatOpenAI on the server."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from palaestra.integrations.langchain import ChatPalaestra, PalaestraRetriever, retrieve_then_answer
from tests.serving.conftest import ANSWER, PROMPT


@lru_cache(maxsize=1)
def _faq_index() -> str:
    """A BM25 index of three documents (no embedder), built once per test session."""
    from palaestra.retrieval.data import Document
    from palaestra.retrieval.index import RetrievalIndex

    documents = [Document("reset", "Reset your password from the settings page.", {}),
                 Document("refund", "Refunds reach your password-protected account in five days.", {}),
                 Document("hours", "Support answers password questions from nine to five.", {})]
    folder = Path(tempfile.mkdtemp(prefix="palaestra-rag-")) / "index"
    RetrievalIndex.build(documents, None, mode="bm25").save(folder)
    return str(folder)


class TestChatPalaestraStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        return ChatPalaestra

    @property
    def chat_model_params(self) -> dict:
        return {"model": "tiny"}


class TestPalaestraRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return PalaestraRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": _faq_index(), "k": 3}

    @property
    def retriever_query_example(self) -> str:
        return "password"


def test_the_chat_model_answers_with_a_trained_adapter(adapter_dir):
    llm = ChatPalaestra(model="tiny", checkpoint=str(adapter_dir), temperature=0, max_tokens=40)
    reply = llm.invoke([("human", PROMPT[0]["content"])])
    assert reply.content == ANSWER and reply.response_metadata["finish_reason"] == "stop"
    assert reply.usage_metadata["output_tokens"] == len(ANSWER) + 1
    assert "".join(chunk.content for chunk in llm.stream([("human", PROMPT[0]["content"])])) == ANSWER
    assert llm.invoke([("human", PROMPT[0]["content"])], stop=["there"]).content == "Hello "


def test_retrieve_then_answer_puts_the_documents_before_the_model(adapter_dir):
    from langchain_core.prompts import ChatPromptTemplate

    llm = ChatPalaestra(model="tiny", checkpoint=str(adapter_dir), temperature=0, max_tokens=12)
    retriever = PalaestraRetriever(index=_faq_index(), k=2)
    result = retrieve_then_answer(retriever, llm).invoke("reset password")
    assert [d.id for d in result["documents"]] == [d.id for d in retriever.invoke("reset password")]
    assert result["documents"][0].id == "reset"
    context = "\n\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(result["documents"], 1))
    from palaestra.integrations.langchain import ANSWER_PROMPT

    messages = ChatPromptTemplate.from_messages([("user", ANSWER_PROMPT)]).invoke({"context": context, "question": "reset password"})
    assert result["answer"] == llm.invoke(messages).content  # the same prompt, greedy: the same answer


def test_chat_openai_talks_to_the_server(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model="tuned", temperature=0, max_tokens=40, max_retries=0)
    assert llm.invoke(PROMPT[0]["content"]).content == ANSWER
    assert "".join(chunk.content for chunk in llm.stream(PROMPT[0]["content"])) == ANSWER
