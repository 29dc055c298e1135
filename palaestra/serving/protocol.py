"""The OpenAI API's request bodies (the fields clients rely on) and its error shape.

Requests are pydantic models: a wrong type or a value out of range is a 400 whose body is
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (see :func:`error_body`), never
FastAPI's default 422. Fields that clients send and that change nothing here (``user``,
``metadata``, zero penalties, ...) are accepted; features that would change the result and are
not implemented (tools, penalties, ``echo``, ``suffix``, images) are refused in one line, not
silently ignored. vLLM's extensions that a trainer's rollout client sends are read too: ``top_k``,
``return_token_ids`` (the sampled and prompt token ids in the answer) and the runtime LoRA
requests (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ApiError", "ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "LoadLoraAdapterRequest", "SearchRequest",
    "UnloadLoraAdapterRequest", "error_body",
]


class ApiError(Exception):
    """An error to answer in OpenAI's shape: HTTP ``status``, one-line ``message``, and OpenAI's
    ``type`` / ``param`` / ``code``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body.

    >>> error_body("bad", param="n")
    {'error': {'message': 'bad', 'type': 'invalid_request_error', 'param': 'n', 'code': None}}
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist; GET /v1/models lists the served ones", param="model",
                    code="model_not_found")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send more fields than we read (user, metadata, ...)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampled(_Request):
    """Fields shared by chat and text completions."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict | None = None
    top_k: int | None = Field(None, ge=-1)
    """vLLM's: sample among the top_k most likely tokens (None, 0 or -1: all)."""
    return_token_ids: bool | None = False
    """vLLM's: each choice carries token_ids (every sampled id, the stop token included) and prompt_token_ids;
    its log-probabilities then have one entry per id of token_ids."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server; leave it out or 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.return_token_ids and self.stream:
            raise ValueError("return_token_ids is not supported with stream=true by this server")
        return self

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class _Text(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[_Text], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampled):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than text is not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def prompt_ids(self, tokenizer) -> list[int]:
        """The messages rendered by the model's chat template (a developer message as a system one), ready for the
        assistant's answer; a template that refuses them is a 400."""
        from palaestra.rollout.hf import encode_chat

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        try:
            return encode_chat(tokenizer, messages)
        except Exception as error:  # noqa: BLE001 - a template that refuses these messages
            raise ApiError(400, f"messages: the model's chat template refused them ({str(error).splitlines()[0]})",
                           param="messages") from None


class CompletionRequest(_Sampled):
    """``POST /v1/completions``: ``prompt`` is a text, texts, token ids, or lists of token ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if self.best_of not in (None, self.n or 1):
            raise ValueError("best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class SearchRequest(_Request):
    """``POST /v1/search``: the ``k`` best documents of the served retrieval index for ``query``."""

    query: str = Field(min_length=1)
    k: int = Field(4, ge=1, le=100)


class LoadLoraAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter`` (vLLM's): serve the peft adapter folder ``lora_path`` as ``lora_name``."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter`` (vLLM's): stop serving the adapter ``lora_name``."""

    lora_name: str = Field(min_length=1)
