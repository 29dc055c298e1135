"""Math: a tool agent computes the answer with Python, a reasoner checks it and answers in ``\\boxed{}``.

Each turn, in ``turn_order`` ("tool", "reasoner"):

1. the *tool* agent writes a ```python``` program (standard library only) that prints the answer on
   its last line; it runs in the sandbox and that line is checked against the gold answer with
   math-verify. Local reward: +1.0 right, 0.0 wrong, ``invalid_action_penalty`` (-2.0) when there
   is no code block, the program fails, or it prints nothing. Team reward 0.0 (nothing is final yet).
2. the *reasoner* sees the problem, the tool's code and output, and ends with ``\\boxed{answer}``.
   Local reward: +1.0 right, 0.0 wrong, ``invalid_action_penalty`` when there is no ``\\boxed{}``.
   Team reward: 1.0 when the reasoner is right, else 0.0.

The episode stops early when the tool's printed answer and the reasoner's boxed answer agree (as
the reference does), else after ``max_turns`` turns; later turns see the earlier answers (never
whether they were right). ``success`` is whether the reasoner's latest answer is right.

Problems come from reasoning-gym (item 0 of ``create_dataset(dataset, size=1, seed=seed, **params)``,
so each seed is one problem and train/test seeds are different generators; a tiny problem space can
still repeat a question), or from a list (or JSONL file) of ``{"question", "answer"}`` records: test
seeds (``>= TEST_SEED_OFFSET``) then draw from ``test_problems`` or, without it, from every
``holdout_every``-th record, which train seeds never see.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable, Sequence

from palaestra.envs.base import (
    TEST_SEED_OFFSET,
    MultiAgentEnv,
    StepResult,
    _short,
    extract_python_code,
    run_tool_code,
)

__all__ = ["MathEnv", "extract_boxed", "last_number", "load_math_problems", "math_equal"]

TOOL, REASONER = "tool", "reasoner"
R_CORRECT, R_WRONG = 1.0, 0.0
"""Local reward of a right / wrong answer (either agent)."""

_SYSTEM = {
    TOOL: "You are the tool agent of a team of two. Write Python that computes the answer.",
    REASONER: "You are the reasoner of a team of two. Check the tool agent's result and give the final answer.",
}
_SYSTEM_ALONE = "You solve math problems. Reason briefly, then give the final answer."
ANSWER_PREFIX = {TOOL: "```python\nprint("}
"""How an agent's answer starts when ``answer_prefix`` is on (the tool agent only: a reasoner made to
start with ``\\boxed{`` copies whatever number the prompt shows, e.g. the format example)."""
_BOXED = "\\boxed{"
_SMALL = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None.

    >>> extract_boxed("so x = \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_boxed("no box") is None
    True
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            content = text[begin:i].strip()
            return content or None
    return None


def math_equal(gold: str, answer: str) -> bool:
    """Does ``answer`` equal ``gold`` mathematically (math-verify), or as text when neither parses?

    math-verify's timeouts use ``signal.alarm``, which only works in the main thread, so other
    threads (parallel rollouts) run it without one.

    >>> math_equal("-61", "\\\\boxed{-61.0}"), math_equal("1/2", "0.5"), math_equal("3", "-3")
    (True, True, False)
    """
    if gold is None or answer is None:
        return False
    from math_verify import parse, verify  # imported here: it pulls in sympy

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(str(gold), parsing_timeout=timeout) or parse(f"${gold}$", parsing_timeout=timeout)
        answer_parsed = parse(str(answer), parsing_timeout=timeout)
        if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=timeout):
            return True
    except Exception:  # math-verify on odd input: fall back to the text comparison
        pass
    return " ".join(str(gold).split()).lower() == " ".join(str(answer).split()).lower()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (integer, decimal or fraction), or None.

    >>> last_number("The output of the code is -8446."), last_number("about 1/2 or 0.5"), last_number("none")
    ('-8446', '0.5', None)
    """
    found = _NUMBER.findall(text or "")
    return found[-1] if found else None


def load_math_problems(path: str) -> list[dict]:
    """``{"question", "answer"}`` records from a JSONL file (other fields are ignored)."""
    problems = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problems.append({"question": str(record["question"]), "answer": str(record["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with 'question' and 'answer' ({exc})") from None
    return problems


def _as_problems(problems) -> list[dict] | None:
    if problems is None:
        return None
    if isinstance(problems, str):
        return load_math_problems(problems)
    return [{"question": str(p["question"]), "answer": str(p["answer"])} for p in problems]


class MathEnv(MultiAgentEnv):
    """Tool agent + reasoner on a math problem.

    Args:
        dataset: reasoning-gym dataset the problems come from (when ``problems`` is None).
        params: that dataset's config fields (not ``seed``/``size``); default: 2-3 terms of 1-2 digits
            for ``basic_arithmetic`` and ``chain_sum``, the dataset's own defaults otherwise.
        problems: instead of reasoning-gym, ``{"question", "answer"}`` dicts or a JSONL path.
        test_problems: the problems of test seeds (default: every ``holdout_every``-th of ``problems``).
        holdout_every: see ``test_problems``.
        max_turns: turns per episode.
        turn_order: ``("tool", "reasoner")``, or ``("reasoner",)`` for the single-agent baseline
            (which has no agreement to stop on, so it always runs ``max_turns`` turns).
        invalid_action_penalty: local reward of a missing code block / failed program / missing box.
        tool_timeout: seconds the tool agent's program may run (reference: 20).
        code_runner: a plain function ``answer -> (output, ok)``; defaults to ``run_tool_code``.
        history_turns: how many previous turns the observations recall (one line each).
        answer_prefix: start the tool agent's answer for the model (off in the reference): a python
            block opening with ``print(``; the model writes the rest and ``step`` reads prefix +
            continuation (see ``ToolPlanEnv``).
        format_penalty: None (the reference) accepts only a ``\\boxed{}`` answer from the reasoner.
            A number turns on lenient reading for small models: without a box, the last number in
            the text is the answer, scored, and charged this much (see ``ToolPlanEnv``).
    """

    name = "math"

    def __init__(
        self,
        *,
        dataset: str = "basic_arithmetic",
        params: dict | None = None,
        problems: Sequence[dict] | str | None = None,
        test_problems: Sequence[dict] | str | None = None,
        holdout_every: int = 4,
        max_turns: int = 2,
        turn_order: tuple[str, ...] = (TOOL, REASONER),
        invalid_action_penalty: float = -2.0,
        tool_timeout: float = 20.0,
        code_runner: Callable[[str], tuple[str, bool]] | None = None,
        history_turns: int = 2,
        answer_prefix: bool = False,
        format_penalty: float | None = None,
    ):
        turn_order = tuple(turn_order)
        if turn_order not in ((TOOL, REASONER), (REASONER,)):
            raise ValueError(f"turn_order must be ('tool', 'reasoner') or ('reasoner',), got {turn_order}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.turn_order, self.max_turns = turn_order, max_turns
        self.dataset = dataset
        if params is None:  # small numbers by default, for the arithmetic datasets that take these fields
            params = _SMALL if dataset in ("basic_arithmetic", "chain_sum") else {}
        reserved = {"seed", "size"} & set(params)
        if reserved:
            raise ValueError(f"params may not set {sorted(reserved)}: the episode seed picks the problem")
        self.params = dict(params)
        self.train_pool, self.test_pool = _split_pools(
            _as_problems(problems), _as_problems(test_problems), holdout_every)
        self.invalid_action_penalty = invalid_action_penalty
        self.tool_timeout = tool_timeout
        self.code_runner = code_runner
        self.history_turns = history_turns
        self.answer_prefix = answer_prefix
        self.format_penalty = format_penalty
        self.seed: int | None = None
        self.problem: dict | None = None
        self._start_episode()

    def _start_episode(self) -> None:
        self.turn = 0
        self.history: list[dict] = []
        self._tool: dict | None = None  # this turn's tool answer: code, output, answer
        self.answer: str | None = None  # the reasoner's latest boxed answer (None: no box)
        self.correct = False  # whether that answer is right
        self.agreed = False

    def reset(self, seed: int) -> None:
        self.seed = seed
        self.problem = self._pick(seed)
        self._start_episode()

    def _pick(self, seed: int) -> dict:
        if self.train_pool is None:
            import reasoning_gym

            entry = reasoning_gym.create_dataset(self.dataset, size=1, seed=seed, **self.params)[0]
            return {"question": str(entry["question"]), "answer": str(entry["answer"])}
        return _pool_item(self.train_pool, self.test_pool, seed, type(self).__name__)

    def copy(self) -> MathEnv:
        # The problem pools are shared (never mutated); only the episode state is copied.
        new = copy.copy(self)
        new.history = [dict(h) for h in self.history]
        new._tool = dict(self._tool) if self._tool is not None else None
        return new

    @property
    def success(self) -> bool:
        return self.correct

    @property
    def done(self) -> bool:
        return self.problem is not None and (self.agreed or self.turn >= self.max_turns)

    # -- steps ---------------------------------------------------------------------------------

    def step(self, agent: str, action: str) -> StepResult:
        if self.problem is None:
            raise RuntimeError("MathEnv: call reset(seed) first")
        if agent not in self.turn_order:
            raise ValueError(f"unknown agent {agent!r}; this environment's agents are {self.turn_order}")
        if self.done:
            return StepResult(0.0, 0.0, True, {"error": "episode is over", "success": self.success})
        if self.answer_prefix and agent in ANSWER_PREFIX:
            action = ANSWER_PREFIX[agent] + (action or "")
        return self._tool_step(action) if agent == TOOL else self._reasoner_step(action)

    def _tool_step(self, answer: str) -> StepResult:
        code = extract_python_code(answer) or ""
        runner = self.code_runner or (lambda text: run_tool_code(text, timeout=self.tool_timeout))
        output, ok = runner(answer) if code else ("", False)
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        printed = lines[-1][-200:] if ok and lines else None  # math-verify on a huge line would crawl
        self._tool = {"code": code, "output": output, "answer": printed}
        info = {"code_ok": ok, "output": output, "answer": printed, "success": self.success}
        if printed is None:
            info["error"] = ("no ```python``` code block" if not code
                             else "the program failed" if not ok else "it printed nothing")
            return StepResult(float(self.invalid_action_penalty), 0.0, self.done, info)
        correct = math_equal(self.problem["answer"], printed)
        info["correct"] = correct
        return StepResult(R_CORRECT if correct else R_WRONG, 0.0, self.done, info)

    def _reasoner_step(self, answer: str) -> StepResult:
        boxed = extract_boxed(answer)
        lenient = boxed is None and self.format_penalty is not None
        if lenient:
            boxed = last_number(answer)
            lenient = boxed is not None
        tool_answer = (self._tool or {}).get("answer")
        self.answer = boxed
        self.correct = boxed is not None and math_equal(self.problem["answer"], boxed)
        self.agreed = boxed is not None and tool_answer is not None and math_equal(tool_answer, boxed)
        if boxed is None:
            result = StepResult(float(self.invalid_action_penalty), 0.0, False, {"error": "no \\boxed{} answer"})
        else:
            reward = (R_CORRECT if self.correct else R_WRONG) - (self.format_penalty if lenient else 0.0)
            info = {"correct": self.correct, "agreed": self.agreed, "lenient": lenient}
            result = StepResult(reward, 1.0 if self.correct else 0.0, False, info)
        self.history.append({"turn": self.turn + 1, "tool": tool_answer, "reasoner": boxed, "agreed": self.agreed})
        self.turn += 1
        self._tool = None
        result.done = self.done
        result.info.update(answer=boxed, tool_answer=tool_answer, success=self.success)
        return result

    # -- observations --------------------------------------------------------------------------

    def observation(self, agent: str) -> list[dict]:
        if self.problem is None:
            raise RuntimeError("MathEnv: call reset(seed) first")
        if agent not in self.turn_order:
            raise ValueError(f"unknown agent {agent!r}; this environment's agents are {self.turn_order}")
        parts = [f"Problem: {self.problem['question']}"]
        recent = self.history[-self.history_turns:] if self.history_turns > 0 else []
        if recent:
            lines = [self._history_line(h) for h in recent]
            parts.append("Previous turns (not final):\n" + "\n".join(lines))
        if agent == TOOL:
            parts.append("Write a ```python``` program (standard library only) that computes the answer "
                         "and prints it on its last line.")
            system = _SYSTEM[TOOL]
        else:
            if self._tool is not None:
                code = _short(self._tool["code"], 300) or "(none)"
                output = _short(self._tool["output"], 100) or "(nothing)"
                parts.append(f"Tool agent's code:\n```python\n{code}\n```\nIts output: {output}")
            parts.append("Reason briefly, then end with the final answer like: \\boxed{42}")
            system = _SYSTEM[REASONER] if TOOL in self.turn_order else _SYSTEM_ALONE
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]
        if self.answer_prefix and agent in ANSWER_PREFIX:  # the answer's start; the model continues it
            messages.append({"role": "assistant", "content": ANSWER_PREFIX[agent]})
        return messages

    def _history_line(self, record: dict) -> str:
        reasoner = _short(record["reasoner"], 30) if record["reasoner"] is not None else "(no \\boxed{})"
        if TOOL not in self.turn_order:
            return f"Turn {record['turn']}: answered {reasoner}"
        tool = _short(record["tool"], 30) if record["tool"] is not None else "(no answer)"
        return f"Turn {record['turn']}: tool printed {tool}, reasoner answered {reasoner}"


def _split_pools(problems, test_problems, holdout_every: int):
    """(train pool, test pool) of a problem list; both None when there is no list."""
    if problems is None:
        if test_problems is not None:
            raise ValueError("test_problems needs problems as well")
        return None, None
    if test_problems is not None:
        return tuple(problems), tuple(test_problems)
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2, got {holdout_every}")
    held = [i % holdout_every == holdout_every - 1 for i in range(len(problems))]
    return (tuple(p for p, h in zip(problems, held) if not h), tuple(p for p, h in zip(problems, held) if h))


def _pool_item(train_pool: Sequence, test_pool: Sequence, seed: int, owner: str):
    """The problem of ``seed``: test seeds (``>= TEST_SEED_OFFSET``) index the test pool, others the train pool."""
    test = seed >= TEST_SEED_OFFSET
    pool = test_pool if test else train_pool
    if not pool:
        raise ValueError(f"{owner} has no {'test' if test else 'train'} problems (pass more problems or test_problems)")
    return pool[(seed - TEST_SEED_OFFSET if test else seed) % len(pool)]
