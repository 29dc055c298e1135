"""The operators a workflow is built from: each one a few executor calls, some with sandboxed code.

A workflow calls them by name with keyword arguments and awaits a dict, as in AFlow::

    answer = await AnswerGenerate(input=problem)          # {"thought": ..., "answer": ...}
    code = await Programmer(problem=problem, analysis="")  # {"code": ..., "output": ...}

===============  =======================================  ====================================
operator         arguments                                returns
===============  =======================================  ====================================
Custom           input, instruction                       response
AnswerGenerate   input                                    thought, answer
Programmer       problem, analysis                        code, output (code run in the sandbox)
Test             problem, solution, entry_point           result (bool), solution, feedback
Review           problem, solution                        review_result (bool), feedback
Revise           problem, solution, feedback              solution
ScEnsemble       solutions, problem                       response (the most common answer)
===============  =======================================  ====================================

``OPERATORS`` is the table the validator checks calls against (names and keyword arguments) and
the runner binds. Model-written code (Programmer's program, Test's solution) only ever runs in
:func:`palaestra.sandbox.run_python`; ``Test`` sees the problem's public tests only.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field

from palaestra.tasks.answers import extract_answer, normalize_text, parse_number
from palaestra.tasks.code import code_pass_rate, extract_code
from palaestra.workflows.executor import ExecutorClient

__all__ = ["OPERATORS", "OperatorSpec", "Problem", "bind_operators", "majority"]


@dataclass
class Problem:
    """What the operators may know about the problem a workflow is solving."""

    question: str
    domain: str
    """math, qa or code."""
    meta: dict = field(default_factory=dict)
    """For code: the tests (``palaestra.tasks.code``); Test uses the public ones only."""


@dataclass(frozen=True)
class OperatorSpec:
    """An operator's name, its keyword arguments and which of them are required."""

    name: str
    params: tuple[str, ...]
    required: tuple[str, ...]
    calls_code: bool = False
    """Runs model-written code (the code-domain operators)."""


OPERATORS: dict[str, OperatorSpec] = {spec.name: spec for spec in (
    OperatorSpec("Custom", ("input", "instruction"), ("input",)),
    OperatorSpec("AnswerGenerate", ("input",), ("input",)),
    OperatorSpec("Programmer", ("problem", "analysis"), ("problem",), calls_code=True),
    OperatorSpec("Test", ("problem", "solution", "entry_point"), ("problem", "solution"), calls_code=True),
    OperatorSpec("Review", ("problem", "solution"), ("problem", "solution")),
    OperatorSpec("Revise", ("problem", "solution", "feedback"), ("problem", "solution")),
    OperatorSpec("ScEnsemble", ("solutions", "problem"), ("solutions",)),
)}

_ANSWER_LINE = re.compile(r"^\s*\**\s*(?:final\s+)?answer\s*\**\s*:\s*(.+?)\s*$", flags=re.IGNORECASE | re.MULTILINE)


def _answer_of(text: str) -> str:
    """The final answer of a reply: its last "Answer: ..." line, an <answer> tag, else the last line."""
    lines = _ANSWER_LINE.findall(text or "")
    if lines:
        return lines[-1].strip()
    tagged = extract_answer(text or "") if "<answer>" in (text or "").lower() else None
    if tagged:
        return tagged
    rest = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return rest[-1] if rest else ""


def majority(solutions: list[str]) -> str:
    """The most common answer (numbers compared by value, text after normalisation); ties go to the first.

    >>> majority(["12", "twelve", "12.0", "13"])
    '12'
    """
    if not solutions:
        return ""

    def key(text: str):
        number = parse_number(str(text).strip())
        return ("number", number) if number is not None else ("text", normalize_text(str(text)))

    counts = Counter(key(s) for s in solutions)
    best = max(counts.values())
    return next(str(s) for s in solutions if counts[key(s)] == best)


def bind_operators(client: ExecutorClient, context: Problem, *, sandbox_seconds: float = 5.0, repair_rounds: int = 3) -> dict:
    """The operators of one workflow run, as async callables bound to its executor client and problem
    (``context``: the operators' own ``problem`` argument is the text the workflow passes); ``Test``
    repairs a failing program up to ``repair_rounds`` times."""
    has_tests = bool(context.meta.get("tests") or context.meta.get("asserts"))

    async def ask(prompt: str) -> str:
        return await client.chat([{"role": "user", "content": prompt}])

    async def Custom(input, instruction=""):  # noqa: N802 - operators keep their AFlow names
        return {"response": await ask(f"{instruction}\n\n{input}".strip())}

    async def AnswerGenerate(input):  # noqa: N802
        text = await ask(f"{input}\n\nThink step by step, then give the final answer on a last line 'Answer: <answer>'.")
        return {"thought": text, "answer": _answer_of(text)}

    async def Programmer(problem, analysis=""):  # noqa: N802
        prompt = (f"{problem}\n\n{('Analysis: ' + str(analysis)) if analysis else ''}\n"
                  "Write a complete Python program that prints the final answer. Reply with one ```python block.")
        code = extract_code(await ask(prompt.strip()))
        from palaestra.sandbox import SandboxLimits, run_python

        limits = SandboxLimits(wall_seconds=sandbox_seconds, cpu_seconds=max(1, int(sandbox_seconds)))
        result = await asyncio.to_thread(run_python, code, limits=limits)
        output = result.stdout.strip() if result.ok else f"Error: {(result.stderr.strip().splitlines() or ['timed out'])[-1]}"
        return {"code": code, "output": output}

    async def Test(problem, solution, entry_point=None):  # noqa: N802
        # entry_point is accepted as AFlow writes it; the problem's own tests (and entry point) decide.
        # Up to `repair_rounds` rounds of repair, as AFlow's Test: each round sends the latest program back
        # with its first failure; the best program seen is what Test returns.
        if not has_tests:
            return {"result": False, "solution": solution, "feedback": "this problem has no tests"}
        best = attempt = extract_code(str(solution)) or str(solution)
        rate, failure = await asyncio.to_thread(code_pass_rate, best, context.meta, public_only=True,
                                                wall_seconds=sandbox_seconds)
        best_rate, attempt_failure, repaired = rate, failure, False
        for _ in range(repair_rounds):
            if best_rate >= 1.0:
                break
            attempt = extract_code(await ask(f"{problem}\n\nThis solution fails a test ({attempt_failure}):\n```python\n"
                                             f"{attempt}\n```\nReply with the corrected program in one ```python block."))
            attempt_rate, attempt_failure = await asyncio.to_thread(code_pass_rate, attempt, context.meta, public_only=True,
                                                                    wall_seconds=sandbox_seconds)
            if attempt_rate > best_rate:
                best, best_rate, failure, repaired = attempt, attempt_rate, attempt_failure, True
        return {"result": best_rate >= 1.0, "solution": best if repaired else solution,
                "feedback": "" if best_rate >= 1.0 else failure}

    async def Review(problem, solution):  # noqa: N802
        text = await ask(f"Problem: {problem}\n\nProposed solution: {solution}\n\nIs the solution correct? "
                         "Give brief feedback, then a last line 'Verdict: correct' or 'Verdict: incorrect'.")
        verdict = re.findall(r"verdict\s*:\s*(\w+)", text, flags=re.IGNORECASE)
        return {"review_result": bool(verdict) and verdict[-1].lower() == "correct", "feedback": text}

    async def Revise(problem, solution, feedback=""):  # noqa: N802
        if context.domain == "code":
            text = await ask(f"Problem: {problem}\n\nProgram:\n{solution}\n\nFeedback: {feedback}\n\n"
                             "Reply with the improved program in one ```python block.")
            return {"solution": extract_code(text)}
        text = await ask(f"Problem: {problem}\n\nSolution: {solution}\n\nFeedback: {feedback}\n\n"
                         "Write the improved solution. End with a last line 'Answer: <answer>'.")
        return {"solution": _answer_of(text)}

    async def ScEnsemble(solutions, problem=""):  # noqa: N802
        return {"response": majority([str(s) for s in (solutions or [])])}

    bound = {"Custom": Custom, "AnswerGenerate": AnswerGenerate, "Programmer": Programmer, "Test": Test,
             "Review": Review, "Revise": Revise, "ScEnsemble": ScEnsemble}
    assert set(bound) == set(OPERATORS)
    return bound
