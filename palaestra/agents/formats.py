"""How a model calls a tool and reads its result, as tokens: the model's chat-template format or a plain one.

Both formats answer the same four questions for the episode loop (:mod:`palaestra.agents.episodes`):
the prompt's tokens (the task's messages with the tools described), the texts that end a turn
that holds a call, how to read a call from a turn's text, and the tokens of a result that are
appended after the model's own tokens (never re-rendering what came before, so the trained
sequence is exactly the sampled one).

- **chat_template** (Qwen2.5 / Qwen3, Hermes, Llama 3.x): the tokenizer's own template renders the
  tools (``apply_chat_template(..., tools=...)``); the model ends its turn after
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen) or a bare
  ``{"name": ..., "parameters": {...}}`` (Llama 3.x); the result is the template's own tool turn and
  the next assistant header, found once by rendering a probe conversation with and without a tool
  message and keeping the difference.
- **plain** (any tokenizer, e.g. the embedded SmolLM2, whose template knows no tools): the tools are
  described in the system message and the model writes, inside its answer::

      <call>calculator: 48213 + 99812</call>

  (``NAME: INPUT``, where INPUT fills the tool's one required argument, or is a JSON object of its
  arguments); sampling stops at ``</call>``, the result follows as ``\\n<result>148025</result>\\n``
  and the model goes on in the same turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from palaestra.agents.tools import Tool, call_tool
from palaestra.config.errors import ConfigError
from palaestra.rollout.hf import encode_chat

__all__ = ["ChatTemplateFormat", "ParsedCall", "PlainFormat", "tool_format"]

_PLACEHOLDER = "\u27e6RESULT\u27e7"


@dataclass(frozen=True)
class ParsedCall:
    """A call read from a model's turn: the tool and its arguments, or what is wrong with it."""

    name: str | None
    arguments: dict | None
    error: str | None = None
    """Why the call cannot be run (shown to the model as the result); None for a well-formed call."""


class PlainFormat:
    """``<call>NAME: INPUT</call>`` inside the answer, ``<result>...</result>`` after it (see the module docstring)."""

    name = "plain"
    stop_strings = ("</call>",)
    call_end = "string"  # a turn with a call ends at the stop string
    _CALL = re.compile(r"<call>\s*([\w.\-]+)\s*(?::\s*(.*?))?\s*</call>", re.S)

    def __init__(self, tokenizer, tools: list[Tool], timeout_s: float = 10.0, instruction: str | None = None,
                 example: bool = True):
        self.tokenizer, self.tools = tokenizer, {tool.name: tool for tool in tools}
        self.instructions = self._instructions(tools)
        self.example = self._example(tools, timeout_s, instruction) if example else []

    @staticmethod
    def _instructions(tools: list[Tool]) -> str:
        """Each tool as the call that uses it (a small model follows a concrete form better than a schema)."""
        lines = ["You can use these tools. Write the call and stop; its result comes back as <result>...</result>. "
                 "Then give your answer."]
        for tool in tools:
            argument = tool.main_parameter
            given = argument.upper() if argument else "JSON object of " + json.dumps(tool.parameters.get("properties", {}))
            lines.append(f"<call>{tool.name}: {given}</call> {tool.description}".rstrip())
        return "\n".join(lines)

    def _example(self, tools: list[Tool], timeout_s: float, instruction: str | None) -> list[dict]:
        """One worked exchange before the task's messages (a small model copies a shown call far more readily than it
        follows a described one): a question, the call, the tool's own result and the answer, in the task's answer
        tags when its ``instruction`` asks for <answer></answer>."""
        tool = next((tool for tool in tools if tool.name in _EXAMPLES), None)
        if tool is None:
            return []
        question, given, answer = _EXAMPLES[tool.name]
        result = call_tool(tool, {tool.main_parameter: given}, timeout_s).text
        answer = answer or result
        if instruction and "<answer>" in instruction:
            question, answer = f"{question}\n\n{instruction}", f"<answer>{answer}</answer>"
        return [{"role": "user", "content": question},
                {"role": "assistant", "content": f"<call>{tool.name}: {given}</call>\n<result>{result}</result>\n{answer}"}]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tool instructions first in the system message, the worked exchange, then the task's messages."""
        messages = [dict(m) for m in messages]
        system = {"role": "system", "content": self.instructions}
        if messages and messages[0]["role"] == "system":
            system["content"] += "\n\n" + messages.pop(0)["content"]
        return encode_chat(self.tokenizer, [system, *self.example, *messages])

    def parse(self, text: str) -> ParsedCall | None:
        """The last call of a turn that ended at ``</call>``."""
        found = list(self._CALL.finditer(text))
        if not found:
            return ParsedCall(None, None, "error: write a call as <call>TOOL: INPUT</call>")
        name, given = found[-1].group(1), (found[-1].group(2) or "").strip()
        tool = self.tools.get(name)
        if tool is None:
            return ParsedCall(name, None, f"error: no tool {name!r}; the tools are {', '.join(self.tools)}")
        if given.startswith("{"):
            try:
                arguments = json.loads(given)
            except json.JSONDecodeError:
                return ParsedCall(name, None, "error: INPUT starts with { but is not a JSON object")
            if isinstance(arguments, dict):
                return ParsedCall(name, arguments)
        if tool.main_parameter is None:
            return ParsedCall(name, None, f"error: {name} takes a JSON object of its arguments as INPUT")
        return ParsedCall(name, {tool.main_parameter: given})

    def result_ids(self, text: str) -> list[int]:
        """The tokens appended after a call: the result, on a line of its own."""
        return self.tokenizer(f"\n<result>{text}</result>\n", add_special_tokens=False)["input_ids"]


class ChatTemplateFormat:
    """The tokenizer's own tool-calling chat template (see the module docstring)."""

    name = "chat_template"
    stop_strings = ()
    call_end = "stop"  # a turn with a call ends at the end-of-turn token
    _TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def __init__(self, tokenizer, tools: list[Tool], stop_ids: list[int]):
        self.tokenizer, self.tools, self.schemas = tokenizer, {tool.name: tool for tool in tools}, [t.schema for t in tools]
        self._ends = [end for end in (tokenizer.decode([i]) for i in stop_ids) if end]
        self._probe_call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call0", "type": "function", "function": {"name": tools[0].name, "arguments": {}}}]}
        self.tool_turn(_PLACEHOLDER)  # a template that cannot render a tool turn fails here, before any sampling

    def _render(self, messages: list[dict], **kwargs) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.schemas, tokenize=False, **kwargs)

    def tool_turn(self, result: str) -> str:
        """The text that follows the model's end-of-turn token when a tool answers ``result``: the template's tool
        turn and the next assistant header, read from a probe conversation (a call, its result) rendered by the
        template, after the end-of-turn that closes the call. Only this turn is taken from the template (rendered
        per result, so the template escapes it as it would, e.g. Llama 3's JSON string); the turns before it are
        never re-rendered (a template may render them otherwise once they are not the last, as Qwen3's drops an
        empty think block)."""
        probe = [{"role": "user", "content": "question"}, self._probe_call,
                 {"role": "tool", "name": self._probe_call["tool_calls"][0]["function"]["name"], "tool_call_id": "call0",
                  "content": result}]
        try:
            text = self._render(probe, add_generation_prompt=True)
        except Exception as error:  # a template error (jinja raises its own types)
            raise ConfigError(f"the chat template cannot render a tool call ({str(error).splitlines()[0]}); "
                              "use agent.format=plain") from None
        name = f'"{self._probe_call["tool_calls"][0]["function"]["name"]}"'
        called_at = text.find(name, text.find("question"))
        closing = [text.find(end, called_at) + len(end) for end in self._ends if called_at >= 0 and text.find(end, called_at) >= 0]
        if not closing or (result == _PLACEHOLDER and result not in text[min(closing):]):  # checked once, at start
            raise ConfigError("the chat template does not render a tool call and its result as turns that end with the "
                              "model's end-of-turn token; use agent.format=plain")
        return text[min(closing):]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The task's messages rendered with the tools, ready for the assistant's turn."""
        if messages and messages[-1]["role"] == "assistant":
            text = self._render(messages, continue_final_message=True)
        else:
            text = self._render(messages, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def parse(self, text: str) -> ParsedCall | None:
        """The first call of a finished turn: a ``<tool_call>`` block, or a turn that is one JSON object with a
        name; None when the turn holds no call (it is the answer)."""
        tagged = self._TAGGED.search(text)
        body = tagged.group(1) if tagged else text.replace("<|python_tag|>", "").strip()
        if not tagged and not (body.startswith("{") and '"name"' in body):
            return None
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return ParsedCall(None, None, "error: the tool call is not valid JSON")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return ParsedCall(None, None, 'error: a tool call is {"name": ..., "arguments": {...}}')
        arguments = call.get("arguments", call.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            return ParsedCall(call["name"], None, "error: the arguments are not a JSON object")
        if call["name"] not in self.tools:
            return ParsedCall(call["name"], None, f"error: no tool {call['name']!r}; the tools are {', '.join(self.tools)}")
        return ParsedCall(call["name"], arguments)

    def result_ids(self, text: str) -> list[int]:
        """The template's tool turn holding ``text``, then the next assistant header."""
        return self.tokenizer(self.tool_turn(text), add_special_tokens=False)["input_ids"]


_EXAMPLES = {
    "calculator": ("What is 1234 + 5678?", "1234 + 5678", None),
    "python": ("What is 6 times 7?", "print(6 * 7)", None),
    "search": ("What does a break statement in a loop's first suite terminate?",
               "What does a break statement in a loop's first suite terminate?", "the loop"),  # the question as query
}
"""The plain format's worked exchange per shipped tool: (question, the call's input, the answer; None: the result)."""


def tool_format(kind: str, tokenizer, tools: list[Tool], stop_ids: list[int], timeout_s: float = 10.0,
                instruction: str | None = None, example: bool = True):
    """The format ``agent.format`` names; ``auto``: the chat template's when it renders tools, else plain."""
    if kind == "auto":
        kind = "chat_template" if "tools" in (tokenizer.chat_template or "") else "plain"
    if kind == "chat_template":
        if "tools" not in (tokenizer.chat_template or ""):
            raise ConfigError("agent.format=chat_template, but this tokenizer's chat template does not render tools; "
                              "use agent.format=plain")
        return ChatTemplateFormat(tokenizer, tools, stop_ids)
    return PlainFormat(tokenizer, tools, timeout_s, instruction, example)
