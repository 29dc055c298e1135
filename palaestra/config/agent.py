"""The ``agent`` section: the tools a policy may call over several turns of one episode (grpo and at_grpo), and an
agent program trained through the policy's endpoint (grpo)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from palaestra.config.errors import check, one_of

__all__ = ["AGENT_FORMATS", "AgentSettings", "ToolSettings", "program_function", "validate_agent"]

AGENT_FORMATS = ("auto", "chat_template", "plain")


@dataclass
class ToolSettings:
    """Tool calling: with tools, each completion is an episode of turns, the model calling tools between them (a team:
    every role's answers)."""

    tools: list = field(default_factory=list)
    """The tools: calculator (exact arithmetic), python (a program run in palaestra's sandbox), search (the best
    passage of agent.search_index) or package.module:function (a typed function with a Google-style docstring,
    returning text); empty: single-turn completions, no tools."""
    max_turns: int = 3
    """The most tool calls one episode makes; the turn after the last is its answer."""
    tool_timeout_s: float = 10.0
    """The longest one call may run; past it the model reads a timeout error as the result."""
    max_result_chars: int = 1000
    """A longer result is cut to this many characters before it is appended."""
    format: str = "auto"
    """How the model writes a call and reads a result: chat_template (the tokenizer's own tool template: Qwen2.5/3,
    Hermes, Llama 3.x), plain (<call>TOOL: INPUT</call> then <result>...</result>, for any tokenizer), or auto
    (chat_template when the tokenizer's template renders tools, else plain)."""
    example: bool = True
    """format=plain: show one worked exchange (a question, a call, its result, the answer) before the task's messages."""
    search_index: Optional[str] = None
    """The search tool's index: a folder written by palaestra train algo=rag (or RetrievalIndex.save); None: the
    shipped index over Python's documentation."""
    tool_workers: int = 4
    """Tool calls run at once (threads; the python tool's programs are processes of their own)."""


@dataclass
class AgentSettings(ToolSettings):
    """Tool calling, or any agent program trained through an endpoint served from the policy."""

    program: Optional[str] = None
    """Any agent program, package.module:function: run(example, client) gets the task's Example and an openai.OpenAI
    client bound to this episode's endpoint, served from the policy being trained (use it directly, or its
    base_url with LangChain / LangGraph), and returns its reward (a number) or its answer (a str, scored by
    task.rewards); every call's tokens are recorded and trained with the episode's advantage. None: off."""
    program_max_calls: int = 8
    """The most endpoint calls one program episode may make (past it a call is refused with a 429)."""
    program_timeout_s: float = 120.0
    """The longest a step's program episodes may run (all at once with program_workers=0); an episode still running
    then gets reward 0 and its later calls are refused."""
    program_workers: int = 0
    """Program episodes run at once (threads); 0: every episode of a batch at once (their calls are sampled together)."""


def validate_agent(agent: ToolSettings) -> None:
    one_of("agent.format", agent.format, AGENT_FORMATS)
    check(agent.max_turns >= 1, f"agent.max_turns={agent.max_turns} must be >= 1")
    check(agent.tool_timeout_s > 0, f"agent.tool_timeout_s={agent.tool_timeout_s} must be > 0")
    check(agent.max_result_chars > 0, f"agent.max_result_chars={agent.max_result_chars} must be > 0")
    check(agent.tool_workers >= 1, f"agent.tool_workers={agent.tool_workers} must be >= 1")
    if isinstance(agent, AgentSettings):
        check(agent.program_max_calls >= 1, f"agent.program_max_calls={agent.program_max_calls} must be >= 1")
        check(agent.program_timeout_s > 0, f"agent.program_timeout_s={agent.program_timeout_s} must be > 0")
        check(agent.program_workers >= 0, f"agent.program_workers={agent.program_workers} must be >= 0")
        check(not (agent.program and agent.tools), "agent.program and agent.tools are two kinds of agent: a program "
                                                   "calls its own tools; set one of them")
        if agent.program is not None:
            program_function(agent.program)
    check(len(set(agent.tools)) == len(agent.tools), f"agent.tools={list(agent.tools)} names a tool twice; give each once")
    check(agent.search_index is None or "search" in agent.tools,
          "agent.search_index is set but agent.tools has no search; add search to agent.tools")
    if agent.search_index is not None:
        import os

        check(os.path.isdir(agent.search_index), f"agent.search_index={agent.search_index} is not a folder; point it at "
                                                 "an index folder (palaestra train algo=rag writes one)")
    from palaestra.agents.tools import SHIPPED_TOOLS, resolve_tools

    # a user's tool whose schema cannot be built is one line now (the shipped ones need no check, nor torch's import)
    resolve_tools([name for name in agent.tools if name not in SHIPPED_TOOLS])


def program_function(name: str):
    """The function ``agent.program`` names; a one-line ConfigError when it cannot be imported or is not callable."""
    from palaestra.config.errors import ConfigError
    from palaestra.plugins import lookup

    check(":" in name, f"agent.program={name!r} must be package.module:function")
    try:
        function = lookup(name, {}, "agent.program")
    except ValueError as error:
        raise ConfigError(str(error).split("; use")[0]) from None
    check(callable(function), f"agent.program={name} is not a function; give run(example, client)")
    import inspect

    try:
        inspect.signature(function).bind(None, None)
    except TypeError:
        raise ConfigError(f"agent.program={name} cannot be called as run(example, client); give it those two "
                          "arguments") from None
    except ValueError:  # a builtin without a signature: its call will tell
        pass
    return function
