"""The multi-turn, multi-agent environment API, and the tool + plan protocol of the grid games.

``MultiAgentEnv`` is what rollout code sees: ``reset(seed)``, then for each turn every agent in
``turn_order`` reads ``observation(agent)`` (chat messages) and answers with ``step(agent, text)``,
which returns a ``StepResult`` (the agent's own reward, the team reward, done, info). ``copy()`` is
cheap so a tree rollout can branch one state K times.

``ToolPlanEnv`` implements the two-agent protocol the reference uses for games and planning:

1. the *tool* agent writes Python whose printed output contains ``**Actions List**: [...]``; the
   code runs in the sandbox and its actions are tried on a copy of the state (a proposal: scored as
   the tool agent's local reward, the real state does not change, team reward 0);
2. the *plan* agent sees the task, the tool's code, output and proposal, reasons, and ends with
   ``#### [actions]``, which is applied for real (local reward = team reward = that step's reward).

An empty or unparseable action earns ``invalid_action_penalty`` (-2.0 in the reference) as the
acting agent's local reward and changes nothing. The episode ends at success, when a game's own
move budget runs out, or after ``max_turns`` turns. A game subclass supplies only the puzzle:
``_generate``, ``_apply``, ``_render``, ``_summary`` and ``success``.
"""

from __future__ import annotations

import ast
import copy
import math
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "TEST_SEED_OFFSET",
    "TRAIN_SEED_OFFSET",
    "MultiAgentEnv",
    "StepResult",
    "ToolPlanEnv",
    "extract_python_code",
    "parse_action_list",
    "run_tool_code",
    "test_seeds",
    "train_seeds",
]

TRAIN_SEED_OFFSET = 0
"""Training episodes use seeds ``[0, TEST_SEED_OFFSET)``."""
TEST_SEED_OFFSET = 100_000
"""Test episodes use seeds from here on (the reference offsets test seeds by 100000)."""


def train_seeds(n: int, base: int = 0) -> list[int]:
    """``n`` training seeds starting at ``base``; never reaches the test range.

    >>> train_seeds(3, base=10)
    [10, 11, 12]
    """
    if base < 0 or TRAIN_SEED_OFFSET + base + n > TEST_SEED_OFFSET:
        raise ValueError(f"train seeds must stay in [0, {TEST_SEED_OFFSET}); got base={base}, n={n}")
    return [TRAIN_SEED_OFFSET + base + i for i in range(n)]


def test_seeds(n: int, base: int = 0) -> list[int]:
    """``n`` test seeds: ``TEST_SEED_OFFSET + base + i``.

    >>> test_seeds(2)
    [100000, 100001]
    """
    if base < 0:
        raise ValueError(f"base must be >= 0, got {base}")
    return [TEST_SEED_OFFSET + base + i for i in range(n)]


test_seeds.__test__ = False  # not a pytest test, despite the name


@dataclass
class StepResult:
    """What one agent's action did."""

    local_reward: float
    """The acting agent's own reward: its action's score (the penalty for an empty/unparseable action)."""
    team_reward: float
    """The environment (team) reward of this step; 0.0 for proposal-only (tool) steps."""
    done: bool
    """Whether the episode is over after this step."""
    info: dict = field(default_factory=dict)
    """Details: parsed ``actions``, ``error``, ``success``, ``proposal`` and per-game fields."""


class MultiAgentEnv(ABC):
    """A multi-turn environment that several agents act in, in a fixed order each turn."""

    turn_order: tuple[str, ...]
    """Agent names in the order they act each turn, e.g. ``("tool", "plan")``."""
    max_turns: int
    """The episode ends after this many turns at the latest."""

    @abstractmethod
    def reset(self, seed: int) -> None:
        """Start a new episode; the same seed always gives the same episode."""

    @abstractmethod
    def observation(self, agent: str) -> list[dict]:
        """Chat messages (system + user) that ``agent`` answers in the current state."""

    @abstractmethod
    def step(self, agent: str, action: str) -> StepResult:
        """Apply ``agent``'s answer (the raw model text)."""

    def copy(self) -> MultiAgentEnv:
        """An independent copy of the current state (no re-generation)."""
        return copy.deepcopy(self)

    @property
    @abstractmethod
    def success(self) -> bool:
        """Whether the task is solved."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the episode is over."""


# --------------------------------------------------------------------------- parsing and code


_MARKER = re.compile(r"\*\*Actions List\*\*|####")
_FENCE = re.compile(r"```[ \t]*(\w*)[^\n]*\n(.*?)(?:```|\Z)", flags=re.DOTALL)
_BARE_WORD = re.compile(r"(?<![\w'\"])([A-Za-z_]\w*)(?![\w'\"])")


def parse_action_list(text: str) -> list | None:
    """The list after the last ``**Actions List**:`` or ``####`` marker, or None.

    The list is read with ``ast.literal_eval``; bare words are quoted first if that fails, so
    ``[R, D]`` reads like ``['R', 'D']``. Anything that is not a list gives None.

    >>> parse_action_list("Output: **Actions List**: ['R', 'D']")
    ['R', 'D']
    >>> parse_action_list("first #### [1] then the final answer:\\n#### [[0, 1, 2]]")
    [[0, 1, 2]]
    >>> parse_action_list("#### [R, R, U]")
    ['R', 'R', 'U']
    >>> parse_action_list("no marker [1, 2]") is None
    True
    """
    if not isinstance(text, str):
        return None
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    rest = text[markers[-1].end():]
    start = rest.find("[")
    if start < 0:
        return None
    prefix = rest[:start].strip(" \t\n:*`=")
    if "\n" in prefix or len(prefix) > 40:  # the list must follow the marker closely
        return None
    snippet = _bracketed(rest, start)
    if snippet is None:
        return None
    for candidate in (snippet, _BARE_WORD.sub(r"'\1'", snippet)):
        try:
            value = ast.literal_eval(candidate)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        return value if isinstance(value, list) else None
    return None


def _bracketed(text: str, start: int) -> str | None:
    """The balanced ``[...]`` that opens at ``text[start]`` (brackets inside quotes ignored)."""
    depth, quote = 0, None
    for i in range(start, len(text)):
        char = text[i]
        if quote:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def extract_python_code(answer: str) -> str | None:
    """The last fenced code block of ``answer`` (```python preferred), or None.

    An unclosed final fence counts (generations are often cut off at the token limit).

    >>> extract_python_code("Plan:\\n```python\\nprint(1)\\n```")
    'print(1)'
    """
    if not isinstance(answer, str):
        return None
    blocks = [(lang.lower(), body.strip()) for lang, body in _FENCE.findall(answer)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    chosen = python or [body for lang, body in blocks if not lang]
    return chosen[-1] if chosen and chosen[-1] else None


def run_tool_code(answer: str, timeout: float = 20.0) -> tuple[str, bool]:
    """Run the Python block of a tool agent's answer in the sandbox: ``(output, ok)``.

    ``output`` is the program's stdout, followed by the last line of its error when the run failed
    (so the plan agent sees why). No code block gives ``("", False)``. The reference allows 20 s.
    """
    code = extract_python_code(answer)
    if code is None:
        return "", False
    # Imported here: the sandbox is only needed once tool code actually runs.
    from palaestra.sandbox import SandboxLimits, run_python

    limits = SandboxLimits(wall_seconds=timeout, cpu_seconds=max(1, math.ceil(timeout)))
    result = run_python(code, limits=limits)
    output = result.stdout or ""
    if not result.ok:
        lines = (result.stderr or "").strip().splitlines()
        error = "timed out" if result.timed_out else (lines[-1] if lines else f"exit code {result.exit_code}")
        output = f"{output.rstrip()}\nError: {error[-200:]}".strip()  # no brackets: never read as an action list
    return output, bool(result.ok)


def _short(value, limit: int) -> str:
    """``str(value)`` cut to about ``limit`` characters, keeping both ends."""
    text = value if isinstance(value, str) else repr(value)
    text = text.strip()
    if len(text) <= limit:
        return text
    half = max(limit // 2 - 3, 1)
    return f"{text[:half]} ... {text[-half:]}"


# --------------------------------------------------------------------------- the tool + plan protocol

TOOL, PLAN = "tool", "plan"

_SYSTEM = {
    TOOL: "You are the tool agent of a team of two. Write Python that solves the puzzle.",
    PLAN: "You are the plan agent of a team of two. Check the tool agent's answer and give the final one.",
}
_SYSTEM_ALONE = "You solve puzzles. Reason briefly, then give the final answer."
ANSWER_PREFIX = {TOOL: "```python\nprint('**Actions List**:', [", PLAN: "#### ["}
"""How each agent's answer starts when ``answer_prefix`` is on."""


class ToolPlanEnv(MultiAgentEnv):
    """The reference tool + plan protocol; a game subclass supplies the puzzle.

    Args:
        max_turns: turns per episode (the reference uses 5).
        turn_order: who acts each turn; ``("plan",)`` is the single-agent baseline. A turn ends
            when the plan agent has acted.
        invalid_action_penalty: local reward of an empty or unparseable action (reference: -2.0).
        tool_timeout: seconds the tool agent's program may run (reference: 20).
        code_runner: a plain function ``answer -> (output, ok)`` (copied by reference with the
            environment); defaults to ``run_tool_code``, the sandbox.
        history_turns: how many previous turns the observations recall (one line each).
        format_penalty: None (the reference) accepts only the exact answer format. A number turns
            on lenient reading for small models: an answer without the ``####`` list (or the tool
            agent's program) whose text still names actions (``move right, then down``; a bare
            list) is applied, scored, and charged this much on top. Such answers earn more than
            an unreadable one (the -2 penalty) and less than the same answer in the right format,
            so GRPO has a signal from the first step and a reason to learn the format.
        answer_prefix: start each answer for the model (off in the reference): the observation
            ends with the beginning of the answer as an assistant message (the plan agent's
            ``#### [``, the tool agent's ``print('**Actions List**:', [`` in a python block), the
            model writes the rest, and ``step`` reads prefix + continuation. For small models that
            cannot yet produce the format at all, it turns the task into choosing the actions.
    """

    name = "tool_plan"
    action_example = "['R', 'D']"
    """An example action list, shown in the output-format instructions."""

    def __init__(
        self,
        *,
        max_turns: int = 5,
        turn_order: tuple[str, ...] = (TOOL, PLAN),
        invalid_action_penalty: float = -2.0,
        tool_timeout: float = 20.0,
        code_runner: Callable[[str], tuple[str, bool]] | None = None,
        history_turns: int = 2,
        format_penalty: float | None = None,
        answer_prefix: bool = False,
    ):
        turn_order = tuple(turn_order)
        if PLAN not in turn_order or not set(turn_order) <= {TOOL, PLAN} or len(set(turn_order)) != len(turn_order):
            raise ValueError(f"turn_order must be ('tool', 'plan') or ('plan',), got {turn_order}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.turn_order = turn_order
        self.max_turns = max_turns
        self.invalid_action_penalty = invalid_action_penalty
        self.tool_timeout = tool_timeout
        self.code_runner = code_runner
        self.history_turns = history_turns
        self.format_penalty = format_penalty
        self.answer_prefix = answer_prefix
        self.seed: int | None = None
        self._ready = False
        self._start_episode()

    # -- what a game provides ----------------------------------------------------------------

    @abstractmethod
    def _generate(self, rng: random.Random) -> None:
        """Build a new puzzle from ``rng`` and set the initial state."""

    @abstractmethod
    def _apply(self, actions: list) -> tuple[float, dict] | None:
        """Apply a parsed action list to this state: ``(reward, info)``, or None if malformed."""

    @abstractmethod
    def _render(self) -> str:
        """The task as text: rules, legend, the board, the goal."""

    @abstractmethod
    def _summary(self) -> str:
        """A few words on the state after a turn, for the history lines."""

    def _play_moves(self, actions: list, move) -> tuple[float, int] | None:
        """Apply string moves one by one with ``move(m) -> reward`` until the game ends.

        Returns (total reward, moves applied), or None when an action is not a string. The shared
        loop of move-based games (plan_path, sokoban); their ``_apply`` adds its own info.
        """
        if not all(isinstance(a, str) for a in actions):
            return None
        total, applied = 0.0, 0
        for action in actions:
            if self.success or self._game_over:
                break
            total += move(action)
            applied += 1
        return total, applied

    def _lenient_actions(self, text: str) -> list | None:
        """Actions named in free text (format_penalty mode): by default the last bare ``[...]`` list.

        Move games override this to read direction words as well.
        """
        for start in reversed([i for i, char in enumerate(text) if char == "["]):
            snippet = _bracketed(text, start)
            if snippet:
                value = parse_action_list("#### " + snippet)
                if value:
                    return value
        return None

    def _read_actions(self, text: str) -> tuple[list | None, bool]:
        """(actions, lenient): the exact format first, then (with format_penalty) free text."""
        actions = parse_action_list(text)
        if actions or self.format_penalty is None:
            return actions, False
        actions = self._lenient_actions(text or "")
        return actions, bool(actions)

    def _format_actions(self, actions) -> str:
        """An action list, briefly, for the history lines."""
        return _short(actions, 40)

    @property
    def _game_over(self) -> bool:
        """True when the game itself ended the episode (e.g. its move budget ran out)."""
        return False

    # -- the protocol --------------------------------------------------------------------------

    def _start_episode(self) -> None:
        self.turn = 0
        self.history: list[dict] = []
        self._tool: dict | None = None  # this turn's tool answer: code, output, proposal

    def reset(self, seed: int) -> None:
        self.seed = seed
        self._generate(random.Random(seed))
        self._ready = True
        self._start_episode()

    def _require_ready(self) -> None:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}: call reset(seed) first")

    @property
    def done(self) -> bool:
        return self._ready and (self.success or self._game_over or self.turn >= self.max_turns)

    def step(self, agent: str, action: str) -> StepResult:
        self._require_ready()
        if agent not in self.turn_order:
            raise ValueError(f"unknown agent {agent!r}; this environment's agents are {self.turn_order}")
        if self.done:
            return StepResult(0.0, 0.0, True, {"error": "episode is over", "success": self.success})
        if self.answer_prefix:
            action = ANSWER_PREFIX[agent] + (action or "")
        if agent == TOOL:
            return self._tool_step(action)
        return self._plan_step(action)

    def _tool_step(self, answer: str) -> StepResult:
        code = extract_python_code(answer) or ""
        runner = self.code_runner or (lambda text: run_tool_code(text, timeout=self.tool_timeout))
        output, ok = runner(answer) if code else ("", False)
        proposal, lenient = self._read_actions(output) if code else (None, False)
        if not proposal and self.format_penalty is not None:  # no program, or it printed no list
            proposal, lenient = self._lenient_actions(answer) or None, True
        self._tool = {"code": code, "output": output, "proposal": proposal}
        info = {"proposal": proposal, "code_ok": ok, "output": output, "lenient": lenient}
        if not code and not proposal:
            return self._penalty(info, "no ```python``` code block")
        if not proposal:
            return self._penalty(info, "the output has no non-empty **Actions List**: [...]")
        trial = self.copy()  # a proposal: the real state does not change
        scored = trial._apply(proposal)
        if scored is None:
            return self._penalty(info, "the proposed actions are malformed")
        reward, details = scored
        reward -= self.format_penalty if lenient else 0.0
        self._tool["score"] = reward
        info.update(details, proposal_success=trial.success, success=self.success)
        return StepResult(float(reward), 0.0, self.done, info)

    def _plan_step(self, answer: str) -> StepResult:
        actions, lenient = self._read_actions(answer)
        scored = self._apply(actions) if actions else None
        if scored is not None and lenient:
            scored = (scored[0] - self.format_penalty, {**scored[1], "lenient": True})
        tool = self._tool or {}
        record = {"turn": self.turn + 1, "proposal": tool.get("proposal"), "actions": actions}
        if scored is None:
            error = "no non-empty #### [...] list" if not actions else "the actions are malformed"
            result = self._penalty({"actions": actions}, error)
            record.update(reward=0.0, summary="invalid answer")
        else:
            reward, details = scored
            result = StepResult(float(reward), float(reward), False, {"actions": actions, **details})
            record.update(reward=float(reward), summary=self._summary())
        self.history.append(record)
        self.turn += 1
        self._tool = None
        result.done = self.done
        result.info["success"] = self.success
        return result

    def _penalty(self, info: dict, error: str) -> StepResult:
        info.update(error=error, success=self.success)
        return StepResult(float(self.invalid_action_penalty), 0.0, self.done, info)

    # -- observations --------------------------------------------------------------------------

    def observation(self, agent: str) -> list[dict]:
        self._require_ready()
        if agent not in self.turn_order:
            raise ValueError(f"unknown agent {agent!r}; this environment's agents are {self.turn_order}")
        parts = [self._render()]
        recent = self.history[-self.history_turns:] if self.history_turns > 0 else []
        if recent:
            lines = [f"Turn {h['turn']}: {self._format_actions(h['actions'])} -> {h['summary']}" for h in recent]
            parts.append("Previous turns:\n" + "\n".join(lines))
        if agent == TOOL:
            parts.append(f"Write a ```python``` program that prints the answer like:\n"
                         f"print('**Actions List**:', {self.action_example})")
            system = _SYSTEM[TOOL]
        else:
            if self._tool is not None:
                proposal = _short(self._tool["proposal"], 60)
                section = f"Tool agent's code:\n```python\n{_short(self._tool['code'], 160) or '(none)'}\n```\n"
                # The actions line is shown parsed below; the rest of the output (errors) as is.
                extra = [line for line in self._tool["output"].splitlines() if "**Actions List**" not in line]
                if "\n".join(extra).strip():
                    section += f"Its other output: {_short(' '.join(extra), 60)}\n"
                parts.append(section + f"Its proposal: {proposal}")
            parts.append(f"Reason briefly, then end with the final answer like:\n#### {self.action_example}")
            system = _SYSTEM[PLAN] if TOOL in self.turn_order else _SYSTEM_ALONE
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]
        if self.answer_prefix:  # the answer's start; the model continues it
            messages.append({"role": "assistant", "content": ANSWER_PREFIX[agent]})
        return messages
