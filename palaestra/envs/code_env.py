"""Code: a coder writes a stdin/stdout program, a tester writes test cases that try to break it.

Each turn, in ``turn_order`` ("coder", "tester"):

1. the *coder* writes a ```python``` program. It runs on the hidden ground-truth tests and on the
   tester's valid cases so far. Local reward = fraction of ground-truth tests passed
   (``invalid_action_penalty``, -2.0, when there is no code block); team reward = 1.0 when it passes
   all ground-truth tests, else 0.0.
2. the *tester* writes ONE case (the ``_CASE_FORMAT`` below). The reference solution runs on its
   input: a case whose expected output disagrees with the reference (or whose input makes the
   reference fail) is wrong, ``r_wrong_test`` (-1.0). A right case is added to the generated tests
   and run on the coder's program: ``r_catch`` (+1.0) when the program gets it wrong, ``r_valid_test``
   (+0.5) when it passes (or there is no program to catch). No parseable case:
   ``invalid_action_penalty``. Team reward 0.0 (the code did not change).

``success`` = the latest program passes all ground-truth tests. As in the reference, the episode stops
early at the end of a turn in which the program passes every generated test (at least one), else
after ``max_turns`` turns. Later turns recall each turn's verdicts and a mismatch (input, expected,
got), briefly; ground-truth tests are never shown. Outputs are compared with trailing spaces and
blank lines stripped. All code runs in the sandbox (``run_many``).

Problems: a built-in set of 24 easy ones (``BUILTIN_PROBLEMS``), a list of ``CodeProblem``, or an
APPS/CodeContests-style JSONL file (``load_code_problems``). Train seeds never see the test problems:
``test_problems``, or by default every ``holdout_every``-th problem.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from palaestra.envs.base import MultiAgentEnv, StepResult, _short, extract_python_code
from palaestra.envs.math_env import _pool_item, _split_pools

__all__ = [
    "BUILTIN_PROBLEMS",
    "CodeEnv",
    "CodeProblem",
    "load_code_problems",
    "normalize_output",
    "outputs_match",
    "parse_test_case",
]

log = logging.getLogger(__name__)

CODER, TESTER = "coder", "tester"
_SYSTEM = {
    CODER: "You are the coder of a team of two. Write a correct Python program.",
    TESTER: "You are the tester of a team of two. Write a test case that a wrong program would fail.",
}
_SYSTEM_ALONE = "You write correct Python programs."
_CASE_FORMAT = "**Input**:\n```\n<stdin>\n```\n**Output**:\n```\n<expected stdout>\n```"
_MARKER = re.compile(r"\**[ \t]*\b(input|output)[ \t]*\**[ \t]*:[ \t]*\**", flags=re.IGNORECASE)
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", flags=re.DOTALL)


def normalize_output(text: str) -> str:
    """Trailing spaces of each line and trailing blank lines stripped.

    >>> normalize_output("1 2 \\n3\\n\\n")
    '1 2\\n3'
    """
    return "\n".join(line.rstrip() for line in (text or "").rstrip().splitlines())


def outputs_match(expected: str, got: str) -> bool:
    """Equal up to ``normalize_output``.

    >>> outputs_match("7\\n", "7"), outputs_match("7", "07")
    (True, False)
    """
    return normalize_output(expected) == normalize_output(got)


def parse_test_case(text: str) -> tuple[str, str] | None:
    """``(input, output)`` from the last ``**Input**: ... **Output**: ...`` pair of ``text``, or None.

    Each part is the first fenced block after its marker, or, without a fence, the text up to the
    next marker. The input gets a final newline.

    >>> parse_test_case("Edge case.\\n**Input**:\\n```\\n3 4\\n```\\n**Output**:\\n```\\n7\\n```")
    ('3 4\\n', '7')
    >>> parse_test_case("Input: 5\\nOutput: 120")
    ('5\\n', '120')
    >>> parse_test_case("no case here") is None
    True
    """
    if not isinstance(text, str):
        return None
    markers = list(_MARKER.finditer(text))
    for i in range(len(markers) - 2, -1, -1):
        first, second = markers[i], markers[i + 1]
        if first.group(1).lower() != "input" or second.group(1).lower() != "output":
            continue
        end = markers[i + 2].start() if i + 2 < len(markers) else len(text)
        given, expected = _part(text[first.end():second.start()]), _part(text[second.end():end])
        if given is None or expected is None:
            return None
        return given.strip("\n") + "\n", expected.strip("\n")
    return None


def _part(segment: str) -> str | None:
    fence = _FENCE.search(segment)
    content = fence.group(1) if fence else segment
    return content if content.strip() else None


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class CodeProblem:
    """A stdin/stdout programming problem."""

    statement: str
    """What the program must do, with the input and output format."""
    solution: str
    """A correct Python program: the reference the tester's cases are checked against."""
    tests: tuple[tuple[str, str], ...]
    """Ground-truth ``(stdin, expected stdout)`` pairs, hidden from both agents."""
    name: str = ""


def load_code_problems(path: str) -> list[CodeProblem]:
    """Problems from an APPS/CodeContests-style JSONL file.

    Each line: ``question`` (or ``description``), ``solutions`` (a list, or a JSON string of one as
    in APPS; CodeContests' ``{"language": [...], "solution": [...]}`` keeps Python 3) or ``solution``,
    and ``input_output`` = ``{"inputs": [...], "outputs": [...]}`` (a JSON string in APPS) or
    CodeContests' ``public_tests``/``private_tests`` = ``{"input": [...], "output": [...]}``. The first
    solution is the reference. Call-based problems (``fn_name``) are skipped with a warning. A line
    that cannot be read raises ``ValueError("path:line: why")``.
    """
    problems, skipped = [], 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                problem = _problem_from_record(json.loads(line), name=f"line {number}")
            except KeyError as exc:
                raise ValueError(f"{path}:{number}: missing field {exc}") from None
            except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{number}: {exc}") from None
            if problem is None:
                skipped += 1
            else:
                problems.append(problem)
    if skipped:
        log.warning("%s: skipped %d call-based (fn_name) problems; only stdin/stdout ones are supported", path, skipped)
    return problems


def _problem_from_record(record: dict, name: str) -> CodeProblem | None:
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    statement = record.get("question") or record.get("description")
    if not isinstance(statement, str) or not statement.strip():
        raise ValueError("no 'question' text")
    solutions = record.get("solutions", record.get("solution"))
    if isinstance(solutions, str) and solutions.lstrip().startswith("["):
        solutions = json.loads(solutions)  # APPS stores the list as a JSON string
    if isinstance(solutions, dict):  # CodeContests: keep Python 3 (language 3)
        pairs = zip(solutions.get("language", []), solutions.get("solution", []))
        solutions = [code for language, code in pairs if language == 3]
    if isinstance(solutions, str):
        solutions = [solutions]
    if not solutions or not isinstance(solutions[0], str):
        raise ValueError("no reference solution ('solutions' or 'solution')")
    io = record.get("input_output")
    if isinstance(io, str):
        io = json.loads(io) if io.strip() else None
    if io is not None:
        if io.get("fn_name"):
            return None
        inputs, outputs = io["inputs"], io["outputs"]
    else:
        inputs, outputs = [], []
        for key in ("public_tests", "private_tests"):
            tests = record.get(key) or {}
            inputs, outputs = inputs + list(tests.get("input", [])), outputs + list(tests.get("output", []))
    if not inputs or len(inputs) != len(outputs):
        raise ValueError(f"need as many test outputs as inputs (at least one), got {len(inputs)} and {len(outputs)}")
    tests = tuple((_text(i), _text(o)) for i, o in zip(inputs, outputs))
    return CodeProblem(statement.strip(), solutions[0], tests, name=str(record.get("name") or name))


def _text(value) -> str:
    """A test input/output as text: APPS sometimes stores them as lists of lines."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _as_problems(problems) -> list[CodeProblem] | None:
    if problems is None:
        return None
    return load_code_problems(problems) if isinstance(problems, str) else list(problems)


# --------------------------------------------------------------------------- the environment


@dataclass(frozen=True)
class _Run:
    """One program's verdict on one test."""

    given: str
    expected: str
    got: str
    passed: bool


class CodeEnv(MultiAgentEnv):
    """Coder + tester on a stdin/stdout programming problem.

    Args:
        problems: ``CodeProblem``s or a JSONL path (``load_code_problems``); default the built-in set.
        test_problems: the problems of test seeds (default: every ``holdout_every``-th of ``problems``).
        holdout_every: see ``test_problems``.
        max_turns: turns per episode.
        turn_order: ``("coder", "tester")``, or ``("coder",)`` for the single-agent baseline.
        invalid_action_penalty: local reward of an answer without code / without a parseable case.
        r_wrong_test, r_catch, r_valid_test: the tester's rewards (see the module docstring).
        timeout: seconds each program run may take.
        max_workers: programs run in parallel.
        runner: a plain function ``[(code, stdin)] -> [SandboxResult]``; defaults to the sandbox's
            ``run_many``.
        history_turns: how many previous turns the observations recall (one line each).
    """

    name = "code"

    def __init__(
        self,
        *,
        problems: Sequence[CodeProblem] | str | None = None,
        test_problems: Sequence[CodeProblem] | str | None = None,
        holdout_every: int = 4,
        max_turns: int = 3,
        turn_order: tuple[str, ...] = (CODER, TESTER),
        invalid_action_penalty: float = -2.0,
        r_wrong_test: float = -1.0,
        r_catch: float = 1.0,
        r_valid_test: float = 0.5,
        timeout: float = 5.0,
        max_workers: int = 2,
        runner: Callable[[list[tuple[str, str]]], list] | None = None,
        history_turns: int = 2,
    ):
        turn_order = tuple(turn_order)
        if turn_order not in ((CODER, TESTER), (CODER,)):
            raise ValueError(f"turn_order must be ('coder', 'tester') or ('coder',), got {turn_order}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.turn_order, self.max_turns = turn_order, max_turns
        problems = _as_problems(problems)
        self.train_pool, self.test_pool = _split_pools(
            list(BUILTIN_PROBLEMS) if problems is None else problems, _as_problems(test_problems), holdout_every)
        self.invalid_action_penalty = invalid_action_penalty
        self.r_wrong_test, self.r_catch, self.r_valid_test = r_wrong_test, r_catch, r_valid_test
        self.timeout, self.max_workers = timeout, max_workers
        self.runner = runner
        self.history_turns = history_turns
        self.seed: int | None = None
        self.problem: CodeProblem | None = None
        self._start_episode()

    def _start_episode(self) -> None:
        self.turn = 0
        self.history: list[dict] = []
        self.program: str | None = None  # the coder's latest program
        self.generated: list[tuple[str, str]] = []  # the tester's valid cases
        self.gt_passed = 0  # ground-truth tests the latest program passes
        self._runs: list[_Run] = []  # the latest program on the generated tests
        self._stop = False

    def reset(self, seed: int) -> None:
        self.seed = seed
        self.problem = _pool_item(self.train_pool, self.test_pool, seed, type(self).__name__)
        self._start_episode()

    def copy(self) -> CodeEnv:
        # The problem pools are shared (immutable); only the episode state is copied.
        new = copy.copy(self)
        new.history = [dict(h) for h in self.history]
        new.generated, new._runs = list(self.generated), list(self._runs)
        return new

    @property
    def success(self) -> bool:
        return self.problem is not None and self.gt_passed == len(self.problem.tests)

    @property
    def done(self) -> bool:
        return self.problem is not None and (self._stop or self.turn >= self.max_turns)

    def _run(self, pairs: list[tuple[str, str]]) -> list:
        if not pairs:
            return []
        if self.runner is not None:
            return self.runner(pairs)
        from palaestra.sandbox import SandboxLimits, run_many

        limits = SandboxLimits(wall_seconds=self.timeout, cpu_seconds=max(1, math.ceil(self.timeout)))
        return run_many(pairs, limits=limits, max_workers=self.max_workers)

    # -- steps ---------------------------------------------------------------------------------

    def step(self, agent: str, action: str) -> StepResult:
        if self.problem is None:
            raise RuntimeError("CodeEnv: call reset(seed) first")
        if agent not in self.turn_order:
            raise ValueError(f"unknown agent {agent!r}; this environment's agents are {self.turn_order}")
        if self.done:
            return StepResult(0.0, 0.0, True, {"error": "episode is over", "success": self.success})
        result = self._coder_step(action) if agent == CODER else self._tester_step(action)
        if agent == self.turn_order[-1]:  # the turn is over
            failed = [run for run in self._runs if not run.passed]
            self.history[-1]["passed"] = (len(self._runs) - len(failed), len(self._runs))
            if self.program and failed:
                self.history[-1]["mismatch"] = (failed[-1].given, failed[-1].expected, failed[-1].got)
            self._stop = bool(self._runs) and not failed
            self.turn += 1
        result.done = self.done
        result.info["success"] = self.success
        return result

    def _coder_step(self, answer: str) -> StepResult:
        self.program = extract_python_code(answer)
        tests = self.problem.tests
        if self.program is None:
            self.gt_passed, self._runs = 0, [_Run(i, o, "(no program)", False) for i, o in self.generated]
            self.history.append({"turn": self.turn + 1, "program": False})
            info = {"error": "no ```python``` code block", "gt_passed": 0, "gt_total": len(tests)}
            return StepResult(float(self.invalid_action_penalty), 0.0, False, info)
        cases = list(tests) + self.generated
        results = self._run([(self.program, given) for given, _ in cases])
        runs = [_verdict(given, expected, result) for (given, expected), result in zip(cases, results)]
        self.gt_passed = sum(run.passed for run in runs[:len(tests)])
        self._runs = runs[len(tests):]
        self.history.append({"turn": self.turn + 1, "program": True})
        fraction = self.gt_passed / len(tests)
        info = {"gt_passed": self.gt_passed, "gt_total": len(tests),
                "generated_passed": sum(run.passed for run in self._runs), "generated_total": len(self._runs)}
        return StepResult(fraction, 1.0 if self.success else 0.0, False, info)

    def _tester_step(self, answer: str) -> StepResult:
        case = parse_test_case(answer)
        record = self.history[-1]  # this turn's, opened by the coder
        if case is None:
            record["case"] = "missing (unreadable)"
            info = {"error": f"no test case in the format {_CASE_FORMAT!r}"}
            return StepResult(float(self.invalid_action_penalty), 0.0, False, info)
        given, expected = case
        pairs = [(self.problem.solution, given)] + ([(self.program, given)] if self.program else [])
        results = self._run(pairs)
        reference = results[0]
        info = {"input": _short(given, 200), "expected": _short(expected, 200),
                "reference_output": _short(reference.stdout, 200)}
        if not reference.ok or not outputs_match(reference.stdout, expected):
            record["case"] = "wrong (not the correct output for that input)"
            return StepResult(float(self.r_wrong_test), 0.0, False, dict(info, verdict="wrong"))
        run = _verdict(given, expected, results[1]) if self.program else _Run(given, expected, "(no program)", False)
        if given not in {g for g, _ in self.generated}:
            self.generated.append((given, expected))
            self._runs.append(run)
        caught = self.program is not None and not run.passed
        record["case"] = "correct, and the program failed it" if caught else "correct; the program passed it"
        reward = self.r_catch if caught else self.r_valid_test
        return StepResult(float(reward), 0.0, False, dict(info, verdict="caught" if caught else "passed"))

    # -- observations --------------------------------------------------------------------------

    def observation(self, agent: str) -> list[dict]:
        if self.problem is None:
            raise RuntimeError("CodeEnv: call reset(seed) first")
        if agent not in self.turn_order:
            raise ValueError(f"unknown agent {agent!r}; this environment's agents are {self.turn_order}")
        parts = [f"Problem:\n{self.problem.statement}"]
        recent = [h for h in self.history if "passed" in h][-self.history_turns:] if self.history_turns > 0 else []
        if recent:
            parts.append("Previous turns:\n" + "\n".join(_history_line(h, agent) for h in recent))
        if agent == CODER:
            if self.program and recent:
                parts.append(f"Your last program:\n```python\n{_short(self.program, 400)}\n```")
            parts.append("Write a complete Python program that reads standard input and prints the answer, "
                         "in one ```python``` block.")
            system = _SYSTEM[CODER] if TESTER in self.turn_order else _SYSTEM_ALONE
        else:
            parts.append(f"The coder's program:\n```python\n{_short(self.program or '(none)', 400)}\n```")
            parts.append(f"Write ONE test case (an input and its correct output) exactly like:\n{_CASE_FORMAT}")
            system = _SYSTEM[TESTER]
        return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def _history_line(record: dict, agent: str) -> str:
    """One turn, briefly: the program's generated-test score and a mismatch, the tester's case."""
    passed, total = record["passed"]
    line = f"Turn {record['turn']}: " + ("no program" if not record["program"] else "program written" if not total
                                         else f"program passed {passed}/{total} generated tests")
    if record.get("mismatch"):
        given, expected, got = (_short(text, 25) for text in record["mismatch"])
        line += f" (input {given!r}: expected {expected!r}, got {got!r})"
    if "case" in record:
        whose = "your" if agent == TESTER else "the tester's"
        line += f"; {whose} case was {record['case']}"
    return line


def _verdict(given: str, expected: str, result) -> _Run:
    if result.ok:
        got = result.stdout
    else:
        lines = (result.stderr or "").strip().splitlines()
        got = "[timed out]" if result.timed_out else f"[error] {lines[-1] if lines else f'exit {result.exit_code}'}"
    return _Run(given, expected, got, result.ok and outputs_match(expected, result.stdout))


# --------------------------------------------------------------------------- the built-in problems


def _problem(name: str, statement: str, solution: str, *tests: tuple[str, str]) -> CodeProblem:
    return CodeProblem(statement, solution.strip() + "\n", tuple(tests), name=name)


BUILTIN_PROBLEMS: tuple[CodeProblem, ...] = (
    _problem("sum_two", "Read two integers a and b on one line. Print a + b.",
             "a, b = map(int, input().split())\nprint(a + b)",
             ("3 4\n", "7"), ("-5 10\n", "5"), ("0 0\n", "0"), ("1000000 2345678\n", "3345678")),
    _problem("reverse_string", "Read one line of text. Print it reversed.",
             "print(input()[::-1])",
             ("hello\n", "olleh"), ("abc\n", "cba"), ("a\n", "a"), ("Palaestra\n", "artsealaP")),
    _problem("count_vowels", "Read one line of text. Print how many of its letters are vowels (a, e, i, o, u; "
             "upper or lower case).",
             "print(sum(c in 'aeiou' for c in input().lower()))",
             ("hello world\n", "3"), ("AEIOU xyz\n", "5"), ("rhythm\n", "0"), ("Programming Is Fun\n", "5")),
    _problem("max_of_list", "The first line has n (n >= 1), the second n integers. Print the largest.",
             "input()\nprint(max(map(int, input().split())))",
             ("5\n3 9 -2 7 1\n", "9"), ("1\n-4\n", "-4"), ("3\n-1 -5 -3\n", "-1"), ("4\n10 10 2 10\n", "10")),
    _problem("fizzbuzz", "Read n. For i = 1..n print one line: FizzBuzz if i is divisible by 15, Fizz if by 3, "
             "Buzz if by 5, else i.",
             "for i in range(1, int(input()) + 1):\n"
             "    print('FizzBuzz' if i % 15 == 0 else 'Fizz' if i % 3 == 0 else 'Buzz' if i % 5 == 0 else i)",
             ("5\n", "1\n2\nFizz\n4\nBuzz"), ("1\n", "1"), ("3\n", "1\n2\nFizz"),
             ("15\n", "1\n2\nFizz\n4\nBuzz\nFizz\n7\n8\nFizz\nBuzz\n11\nFizz\n13\n14\nFizzBuzz")),
    _problem("factorial", "Read n (0 <= n <= 20). Print n! (0! = 1).",
             "import math\nprint(math.factorial(int(input())))",
             ("0\n", "1"), ("5\n", "120"), ("10\n", "3628800"), ("20\n", "2432902008176640000")),
    _problem("is_prime", "Read n (1 <= n <= 10^6). Print YES if n is prime, else NO.",
             "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')",
             ("2\n", "YES"), ("1\n", "NO"), ("97\n", "YES"), ("91\n", "NO"), ("7919\n", "YES")),
    _problem("count_words", "Read one line. Print how many words it has (words are separated by spaces; "
             "there may be several spaces in a row).",
             "print(len(input().split()))",
             ("the quick brown fox\n", "4"), ("  spaced   out  \n", "2"), ("single\n", "1")),
    _problem("palindrome", "Read one word. Print YES if it reads the same backwards, else NO.",
             "s = input().strip()\nprint('YES' if s == s[::-1] else 'NO')",
             ("level\n", "YES"), ("hello\n", "NO"), ("a\n", "YES"), ("abba\n", "YES"), ("ab\n", "NO")),
    _problem("digit_sum", "Read a non-negative integer (up to 100 digits). Print the sum of its digits.",
             "print(sum(int(c) for c in input().strip()))",
             ("12345\n", "15"), ("0\n", "0"), ("9999999999\n", "90")),
    _problem("fibonacci", "Read n (0 <= n <= 80). Print F(n), where F(0) = 0, F(1) = 1, "
             "F(k) = F(k-1) + F(k-2).",
             "a, b = 0, 1\nfor _ in range(int(input())):\n    a, b = b, a + b\nprint(a)",
             ("0\n", "0"), ("1\n", "1"), ("10\n", "55"), ("50\n", "12586269025")),
    _problem("sort_numbers", "The first line has n, the second n integers. Print them in ascending order, "
             "separated by spaces.",
             "input()\nprint(*sorted(map(int, input().split())))",
             ("5\n3 1 4 1 5\n", "1 1 3 4 5"), ("1\n42\n", "42"), ("4\n-2 8 0 -7\n", "-7 -2 0 8")),
    _problem("gcd", "Read two positive integers a and b. Print their greatest common divisor.",
             "import math\na, b = map(int, input().split())\nprint(math.gcd(a, b))",
             ("12 18\n", "6"), ("17 5\n", "1"), ("100 75\n", "25"), ("7 7\n", "7")),
    _problem("range_width", "The first line has n (n >= 1), the second n integers. Print the largest minus the "
             "smallest.",
             "input()\nxs = list(map(int, input().split()))\nprint(max(xs) - min(xs))",
             ("4\n3 9 1 4\n", "8"), ("1\n5\n", "0"), ("3\n-10 0 10\n", "20")),
    _problem("count_even", "The first line has n, the second n integers. Print how many of them are even.",
             "input()\nprint(sum(int(x) % 2 == 0 for x in input().split()))",
             ("6\n1 2 3 4 5 6\n", "3"), ("3\n1 3 5\n", "0"), ("4\n0 -2 7 8\n", "3")),
    _problem("uppercase", "Read one line. Print it with every letter in upper case.",
             "print(input().upper())",
             ("hello World\n", "HELLO WORLD"), ("abc123\n", "ABC123"), ("ALREADY\n", "ALREADY")),
    _problem("count_char", "The first line is a word, the second a single character c. Print how many times c "
             "occurs in the word.",
             "word = input()\nprint(word.count(input().strip()))",
             ("banana\na\n", "3"), ("hello\nz\n", "0"), ("mississippi\ns\n", "4")),
    _problem("sum_to_n", "Read n (n >= 0). Print 1 + 2 + ... + n (0 when n is 0).",
             "n = int(input())\nprint(n * (n + 1) // 2)",
             ("1\n", "1"), ("10\n", "55"), ("100\n", "5050"), ("0\n", "0")),
    _problem("squares", "Read n (n >= 1). Print the squares 1, 4, 9, ..., n*n, one per line.",
             "for i in range(1, int(input()) + 1):\n    print(i * i)",
             ("3\n", "1\n4\n9"), ("1\n", "1"), ("5\n", "1\n4\n9\n16\n25")),
    _problem("binary", "Read a non-negative integer n. Print n in binary, without leading zeros (0 prints 0).",
             "print(bin(int(input()))[2:])",
             ("0\n", "0"), ("5\n", "101"), ("255\n", "11111111"), ("1024\n", "10000000000")),
    _problem("leap_year", "Read a year. Print YES if it is a leap year (divisible by 4, except centuries not "
             "divisible by 400), else NO.",
             "y = int(input())\nprint('YES' if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 'NO')",
             ("2000\n", "YES"), ("1900\n", "NO"), ("2024\n", "YES"), ("2023\n", "NO")),
    _problem("average", "The first line has n (n >= 1), the second n integers. Print their average with exactly "
             "two digits after the decimal point.",
             "n = int(input())\nprint(f'{sum(map(int, input().split())) / n:.2f}')",
             ("3\n1 2 3\n", "2.00"), ("2\n1 2\n", "1.50"), ("4\n-1 -2 -3 -5\n", "-2.75")),
    _problem("dedupe", "The first line has n, the second n integers. Print each distinct value once, in the "
             "order it first appears, separated by spaces.",
             "input()\nprint(*dict.fromkeys(input().split()))",
             ("6\n3 1 3 2 1 4\n", "3 1 2 4"), ("3\n5 5 5\n", "5"), ("2\n1 2\n", "1 2")),
    _problem("caesar", "Read a lowercase word and an integer k (0 <= k <= 25). Print the word with each letter "
             "shifted k places forward in the alphabet, wrapping from z to a.",
             "w, k = input().split()\nprint(''.join(chr((ord(c) - 97 + int(k)) % 26 + 97) for c in w))",
             ("abc 1\n", "bcd"), ("xyz 3\n", "abc"), ("hello 13\n", "uryyb"), ("same 0\n", "same")),
)
"""24 easy stdin/stdout problems; with ``holdout_every=4`` problems 3, 7, ..., 23 are the test set."""
