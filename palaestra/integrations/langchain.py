"""LangChain: a chat model over a trained run (in-process), a retriever over a RAG index, and a
retrieve-then-answer chain (MARK's integration).

    from palaestra.integrations.langchain import ChatPalaestra, PalaestraRetriever, retrieve_then_answer

    llm = ChatPalaestra(model="smollm2-135m", checkpoint="runs/faq-sft/20260101-120000", temperature=0)
    retriever = PalaestraRetriever(index="runs/faq-rag/20260101-130000", k=3)
    chain = retrieve_then_answer(retriever, llm)
    chain.invoke("How do I reset my password?")   # {"question", "documents", "answer"}

``ChatPalaestra`` decodes on the same batching engine as ``palaestra serve`` (concurrent calls
from threads share decode steps), loading the model on first use. Against a running server, use
``langchain-openai`` instead: ``ChatOpenAI(base_url="http://HOST:PORT/v1", api_key="-", model=ID)``.
"""

from __future__ import annotations

import queue
import threading
from functools import lru_cache
from typing import Any, Iterator, Optional

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

__all__ = ["ChatPalaestra", "PalaestraRetriever", "retrieve_then_answer"]

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


class ChatPalaestra(BaseChatModel):
    """A palaestra model as a LangChain chat model: the base model, or a trained run over it."""

    model: str = "smollm2-135m"
    """The base model: smollm2-135m (embedded), tiny, or hf with ``model_path``."""
    model_path: Optional[str] = None
    """A local Hugging Face folder for ``model="hf"``."""
    checkpoint: Optional[str] = None
    """A trained run folder, checkpoint, adapter folder or exported model folder (None: the base)."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_tokens: Optional[int] = 256
    """Completion budget."""
    stop: Optional[list[str]] = None
    """Stop strings (trimmed from the answer)."""
    seed: Optional[int] = None
    """Seed of the sampling (the same seed, the same answer)."""
    timeout: Optional[float] = None
    """Seconds to wait for an answer (None: no limit)."""
    max_retries: int = 0
    """Accepted for the standard interface; decoding in-process has nothing to retry."""
    device: str = "cpu"
    """cpu or cuda."""
    dtype: str = "float32"
    """Weights dtype: float32 or bfloat16."""

    @property
    def _llm_type(self) -> str:
        return "palaestra"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "checkpoint": self.checkpoint, "temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="palaestra", ls_model_name=kwargs.get("model", self.checkpoint or self.model),
                                 ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature))
        if self.max_tokens:
            params["ls_max_tokens"] = kwargs.get("max_tokens", self.max_tokens)
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    def _job(self, messages: list[BaseMessage], stop: Optional[list[str]], kwargs: dict):
        from palaestra.rollout.hf import encode_chat
        from palaestra.serving.engine import GenerationJob, Sampling

        engine, route = _runtime(self.model, self.model_path, self.checkpoint, self.device, self.dtype)
        chat = []
        for message in messages:
            role = _ROLES.get(message.type) or getattr(message, "role", None)
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"ChatPalaestra takes system, human and ai messages, not {message.type!r}")
            chat.append({"role": role, "content": message.text})
        prompt = encode_chat(route.tokenizer, chat)
        room = route.max_positions - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model reads at most {route.max_positions - 1}")
        max_tokens = min(kwargs.get("max_tokens", self.max_tokens) or room, room)
        sampling = Sampling(max_tokens=max_tokens, temperature=kwargs.get("temperature", self.temperature),
                            top_p=kwargs.get("top_p", self.top_p), stop=list(stop or self.stop or []),
                            seed=kwargs.get("seed", self.seed))
        events: queue.Queue = queue.Queue()
        job = GenerationJob(route, [prompt], 1, sampling, events.put)
        engine.submit(job)
        return job, events, len(prompt)

    def _events(self, job, events: queue.Queue):
        from palaestra.serving.engine import Failed, Finished

        try:
            while True:
                try:
                    event = events.get(timeout=self.timeout)
                except queue.Empty:
                    raise TimeoutError(f"no answer within {self.timeout} s") from None
                if isinstance(event, Failed):
                    raise RuntimeError(event.message)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancel()  # a no-op once finished; stops decoding when the caller stops reading

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        from palaestra.serving.engine import Delta

        job, events, prompt_tokens = self._job(messages, stop, kwargs)
        text, finished = "", None
        for event in self._events(job, events):
            if isinstance(event, Delta):
                text += event.text
            else:
                finished = event
        usage = {"input_tokens": prompt_tokens, "output_tokens": finished.completion_tokens,
                 "total_tokens": prompt_tokens + finished.completion_tokens}
        message = AIMessage(content=text, usage_metadata=usage, response_metadata={"finish_reason": finished.reason,
                                                                                     "model_name": self.checkpoint or self.model})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        from palaestra.serving.engine import Delta

        job, events, prompt_tokens = self._job(messages, stop, kwargs)
        for event in self._events(job, events):
            if isinstance(event, Delta):
                if not event.text:
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.text))
                if run_manager:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk
            else:
                usage = {"input_tokens": prompt_tokens, "output_tokens": event.completion_tokens,
                         "total_tokens": prompt_tokens + event.completion_tokens}
                yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage,
                                                                 response_metadata={"finish_reason": event.reason}))


_RUNTIME_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _load_runtime(model: str, model_path: str | None, checkpoint: str | None, device: str, dtype: str):
    from palaestra.serving.catalog import Catalog, plan_models
    from palaestra.serving.engine import Engine

    plan = plan_models([], "base", {"trained": checkpoint} if checkpoint else {})
    catalog = Catalog.load(model_name=model, model_path=model_path, base_id="base", plan=plan, device=device, dtype=dtype)
    return Engine(), catalog.route("trained" if checkpoint else "base")


def _runtime(*key):
    """The engine and route of a (model, path, checkpoint, device, dtype): loaded once, shared by every instance."""
    with _RUNTIME_LOCK:
        return _load_runtime(*key)


class PalaestraRetriever(BaseRetriever):
    """The ``k`` best documents of a retrieval index built by ``palaestra train --target=rag``."""

    index: str = Field(description="a rag run folder, or its index folder")
    k: int = 4
    """Documents per query (``invoke(query, k=2)`` overrides it)."""

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        hits = _load_index(self.index).search([query], int(kwargs.get("k", self.k)))[0]
        return [Document(page_content=hit.text, id=hit.id, metadata={**hit.metadata, "id": hit.id, "score": hit.score})
                for hit in hits]


@lru_cache(maxsize=4)
def _load_index(folder: str):
    from pathlib import Path

    from palaestra.retrieval.index import RetrievalIndex

    given = Path(folder)
    return RetrievalIndex.load(given if (given / "index.json").is_file() else given / "index")


ANSWER_PROMPT = ("Answer the question using only the context below. If the context does not answer it, say so.\n\n"
                 "Context:\n{context}\n\nQuestion: {question}")
"""The user message of :func:`retrieve_then_answer`."""


def retrieve_then_answer(retriever: BaseRetriever, llm: BaseChatModel, prompt: str = ANSWER_PROMPT):
    """A chain: question -> {"question", "documents" (retrieved), "answer" (the model's, from them)}."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableParallel, RunnablePassthrough

    template = ChatPromptTemplate.from_messages([("user", prompt)])
    context = lambda inputs: "\n\n".join(f"[{i}] {d.page_content}" for i, d in enumerate(inputs["documents"], 1))  # noqa: E731
    answer = RunnablePassthrough.assign(context=context) | template | llm | StrOutputParser()
    return RunnableParallel(question=RunnablePassthrough(), documents=retriever) | RunnablePassthrough.assign(answer=answer)
