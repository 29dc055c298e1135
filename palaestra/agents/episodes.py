"""Tool-calling episodes with exact token trajectories: what GRPO samples when ``agent.tools`` is set.

An episode, top to bottom: the prompt's tokens (the task's messages with the tools described, in
the format of :mod:`palaestra.agents.formats`); then turns: the policy samples until its turn ends
(a stop token, or the text that closes a call); a turn that holds a call has the tool run (in
parallel with the other episodes' calls, each within ``timeout_s``) and the result's tokens
appended; up to ``max_turns`` calls, then the last turn is the answer.

The trained sequence is the concatenation, in order, of the sampled ids and the result ids; nothing
is decoded and re-encoded. The loss counts the sampled tokens only (``Rollout.trained_mask``), while
the model attends to everything, results included. The reward scores the episode's last turn (the
answer); the whole transcript is kept for the logs.

:class:`ToolAgent` wraps a rollout engine and has its ``generate`` signature, so the training step
and the evaluation run episodes without knowing it.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

import torch

from palaestra.agents.formats import ParsedCall
from palaestra.agents.tools import Tool, ToolResult, call_tool
from palaestra.rollout.decode import StopStrings
from palaestra.rollout.hf import Rollout, SamplingParams

__all__ = ["Episode", "ToolAgent", "episode_rollout", "tool_agent"]


@dataclass
class ToolCall:
    """One call an episode made, as the logs show it."""

    name: str | None
    arguments: dict | None
    result: str
    ok: bool


@dataclass
class Episode:
    """One episode's tokens after its prompt, and what happened in it."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    """Sampled and result tokens, in order."""
    sampled: list[int] = field(default_factory=list)
    """1 where ``ids`` holds a sampled token, 0 on a result's tokens."""
    answer_ids: list[int] = field(default_factory=list)
    """The last turn's sampled tokens, its end-of-turn token apart (what the reward reads)."""
    calls: list[ToolCall] = field(default_factory=list)
    end: str = ""
    """How the last turn ended: "stop", "string" (a call past the turn limit) or "length"."""

    def add(self, ids: list[int], sampled: bool) -> None:
        self.ids.extend(ids)
        self.sampled.extend([int(sampled)] * len(ids))


def episode_rollout(episodes: list[Episode], *, pad_id: int, decode) -> Rollout:
    """A :class:`Rollout` of finished episodes: prompts left-padded, each episode's tokens right-padded, the
    attention mask over all of them and ``trained_mask`` over the sampled ones; ``texts`` are the answers.

    >>> e = Episode([5, 6], ids=[1, 2, 9, 9, 3], sampled=[1, 1, 0, 0, 1], answer_ids=[3], end="stop")
    >>> r = episode_rollout([e, Episode([7], ids=[4], sampled=[1], answer_ids=[4], end="length")], pad_id=0,
    ...                     decode=lambda ids: " ".join(map(str, ids)))
    >>> r.prompt_ids.tolist(), r.completion_mask.tolist(), r.trained_mask.tolist(), r.texts, r.truncated.tolist()
    ([[5, 6], [0, 7]], [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], [[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]], ['3', '4'], [False, True])
    """
    rows = len(episodes)
    width = max(len(e.prompt_ids) for e in episodes)
    length = max(1, max(len(e.ids) for e in episodes))
    prompt_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((rows, width), dtype=torch.long)
    completion_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((rows, length), dtype=torch.long)
    trained = torch.zeros((rows, length), dtype=torch.long)
    for row, episode in enumerate(episodes):
        prompt_ids[row, width - len(episode.prompt_ids):] = torch.tensor(episode.prompt_ids)
        prompt_mask[row, width - len(episode.prompt_ids):] = 1
        completion_ids[row, : len(episode.ids)] = torch.tensor(episode.ids, dtype=torch.long)
        completion_mask[row, : len(episode.ids)] = 1
        trained[row, : len(episode.ids)] = torch.tensor(episode.sampled, dtype=torch.long)
    truncated = torch.tensor([e.end == "length" for e in episodes], dtype=torch.bool)
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated,
                   [decode(e.answer_ids) for e in episodes], trained_mask=trained)


class ToolAgent:
    """A rollout engine whose ``generate`` runs tool-calling episodes (every other attribute is the engine's).

    Args:
        generator: an :class:`~palaestra.rollout.hf.HFGenerator` (it continues token sequences as they are).
        tools: the tools the model may call.
        tool_format: a :class:`~palaestra.agents.formats.PlainFormat` or
            :class:`~palaestra.agents.formats.ChatTemplateFormat`.
        max_turns: the most calls an episode makes; the turn after the last is its answer.
        timeout_s: the most seconds one call runs.
        max_result_chars: a longer result is cut (its tokens count against the context).
        workers: calls run at once.
    """

    def __init__(self, generator, tools: list[Tool], tool_format, *, max_turns: int = 3, timeout_s: float = 10.0,
                 max_result_chars: int = 1000, workers: int = 4):
        self.generator, self.format = generator, tool_format
        self.tools = {tool.name: tool for tool in tools}
        self.max_turns, self.timeout_s, self.max_result_chars, self.workers = max_turns, timeout_s, max_result_chars, workers
        self.stop_strings = StopStrings(generator.tokenizer, list(tool_format.stop_strings)) if tool_format.stop_strings else None
        self.last_episodes: list[Episode] = []
        self._totals = _Totals()

    def __getattr__(self, name):  # sync_adapter, reusing_weights, tokenizer, ... are the engine's
        return getattr(self.generator, name)

    @torch.no_grad()
    def generate(self, prompts: list[list[dict]], num_samples: int, sampling: SamplingParams) -> Rollout:
        """``num_samples`` episodes per prompt (rows grouped prompt by prompt), as a :class:`Rollout` whose
        ``texts`` are the answers; the episodes themselves are kept in ``last_episodes``."""
        starts = [self.format.prompt_ids(messages) for messages in prompts]
        episodes = [Episode(list(starts[row // num_samples])) for row in range(len(prompts) * num_samples)]
        live = list(episodes)
        for turn in range(self.max_turns + 1):
            if turn == 0:  # every group shares its prompt: prefilled once, sampled num_samples times
                turns = self.generator.generate_ids(starts, num_samples, sampling, self.stop_strings)
            else:
                turns = self.generator.generate_ids([e.prompt_ids + e.ids for e in live], 1, sampling, self.stop_strings)
            calling: list[tuple[Episode, ParsedCall]] = []
            for episode, (ids, end) in zip(live, turns):
                episode.add(ids, sampled=True)
                content = ids[:-1] if end == "stop" else ids  # the end-of-turn token is not the turn's text
                episode.answer_ids, episode.end = content, end
                call = self.format.parse(self._text(content)) if end == self.format.call_end else None
                if call is not None and turn < self.max_turns:
                    calling.append((episode, call))
            for (episode, call), result in zip(calling, self._run(calls=[c for _, c in calling])):
                episode.calls.append(ToolCall(call.name, call.arguments, result.text, result.ok))
                episode.add(self.format.result_ids(result.text), sampled=False)
            live = [episode for episode, _ in calling]
            if not live:
                break
        self.last_episodes = episodes
        self._totals.add(episodes)
        return episode_rollout(episodes, pad_id=self.generator.tokenizer.pad_token_id, decode=self._text)

    def _text(self, ids: list[int]) -> str:
        return self.generator.tokenizer.decode(ids, skip_special_tokens=True)

    def _run(self, calls: list[ParsedCall]) -> list[ToolResult]:
        """Every call of a turn, ``workers`` at a time; a malformed call's result is its error."""
        def run(call: ParsedCall) -> ToolResult:
            if call.error is not None:
                return ToolResult(call.error, False)
            return call_tool(self.tools[call.name], call.arguments, self.timeout_s, self.max_result_chars)

        if len(calls) <= 1:
            return [run(call) for call in calls]
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tool-calls") as pool:
            return list(pool.map(run, calls))

    def transcripts(self) -> list[str]:
        """The last ``generate`` call's episodes as text, results included (for the logs)."""
        return [self.generator.tokenizer.decode(e.ids, skip_special_tokens=False) for e in self.last_episodes]

    def figures(self) -> dict[str, float]:
        """Tool use over the episodes since the last call, then start counting anew: calls per episode, the share
        of calls that ran (well-formed, known tool, no error), the share of episodes that called a tool."""
        totals, self._totals = self._totals, _Totals()
        return totals.figures()


@dataclass
class _Totals:
    episodes: int = 0
    calls: int = 0
    valid: int = 0
    used: int = 0

    def add(self, episodes: list[Episode]) -> None:
        self.episodes += len(episodes)
        self.calls += sum(len(e.calls) for e in episodes)
        self.valid += sum(call.ok for e in episodes for call in e.calls)
        self.used += sum(bool(e.calls) for e in episodes)

    def figures(self) -> dict[str, float]:
        if not self.episodes:
            return {}
        return {"tool/calls_per_episode": self.calls / self.episodes,
                "tool/valid_call_share": self.valid / self.calls if self.calls else 0.0,
                "tool/used_share": self.used / self.episodes}


def tool_agent(settings, generator, instruction: str | None = None) -> ToolAgent:
    """``generator`` wrapped to run tool-calling episodes with the tools of ``settings`` (the ``agent`` section);
    ``instruction``: the task's, for the plain format's worked exchange."""
    import logging

    from palaestra.agents.formats import tool_format
    from palaestra.agents.tools import resolve_tools

    tools = resolve_tools(list(settings.tools), settings.search_index)
    form = tool_format(settings.format, generator.tokenizer, tools, generator.stop_ids, settings.tool_timeout_s,
                       instruction=instruction, example=settings.example)
    logging.getLogger("palaestra").info("agent: tools %s in the %s format, up to %d calls an episode",
                                        ", ".join(t.name for t in tools), form.name, settings.max_turns)
    return ToolAgent(generator, tools, form, max_turns=settings.max_turns, timeout_s=settings.tool_timeout_s,
                     max_result_chars=settings.max_result_chars, workers=settings.tool_workers)
