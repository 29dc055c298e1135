"""Code-writing tasks: the model answers with a Python program, checked by running tests in the sandbox.

Two kinds of problem, both as :class:`~palaestra.tasks.base.Example` with their tests in ``meta``:

- **stdin/stdout** (the 24 problems palaestra ships with its code environment, or an APPS /
  CodeContests JSONL file): ``meta["tests"]`` is a list of ``[stdin, expected stdout]`` pairs and the
  program reads its input and prints its answer;
- **function** (HumanEval or MBPP JSONL): ``meta["entry_point"]`` names the function and
  ``meta["asserts"]`` holds test snippets that call it (``assert f(1) == 2``; HumanEval's ``check``
  function counts as one test).

``meta["public"]`` is how many of the tests are public (shown to a ``Test`` operator); all of them
decide the pass rate. Every program runs in :func:`palaestra.sandbox.run_python`, never in-process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.data.jsonl import read_jsonl
from palaestra.tasks.base import Example, Task, split_examples

__all__ = ["build_code_task", "code_pass_rate", "extract_code", "load_function_problems", "shipped_code_examples"]

_TEST_SECONDS = 5.0


def extract_code(text: str) -> str:
    """The program in an answer: its last fenced block, else the whole text.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```")
    'print(1)'
    """
    from palaestra.envs.base import extract_python_code

    return extract_python_code(text) or (text or "").strip()


def code_pass_rate(answer: str, meta: dict, *, public_only: bool = False, wall_seconds: float = _TEST_SECONDS,
                   ) -> tuple[float, str]:
    """(fraction of tests the answer's program passes, a one-line note on the first failure or "").

    ``public_only`` runs only the first ``meta["public"]`` tests (what a ``Test`` operator may see).
    """
    from palaestra.envs.code_env import outputs_match
    from palaestra.sandbox import SandboxLimits, run_many

    code = extract_code(answer)
    limits = SandboxLimits(wall_seconds=wall_seconds, cpu_seconds=max(1, int(wall_seconds)))
    if meta.get("entry_point"):
        tests = list(meta.get("asserts") or [])
        tests = tests[: meta.get("public", len(tests))] if public_only else tests
        if not tests or not code:
            return 0.0, "no program" if not code else "no tests"
        results = run_many([(f"{code}\n\n{test}\n", "") for test in tests], limits=limits)
        passed = [result.ok for result in results]
        failure = next((f"failed: {test.strip().splitlines()[-1][:120]} ({_last_line(r.stderr)})"
                        for test, r, ok in zip(tests, results, passed) if not ok), "")
    else:
        tests = [tuple(pair) for pair in meta.get("tests") or []]
        tests = tests[: meta.get("public", len(tests))] if public_only else tests
        if not tests or not code:
            return 0.0, "no program" if not code else "no tests"
        results = run_many([(code, stdin) for stdin, _ in tests], limits=limits)
        passed = [r.ok and outputs_match(expected, r.stdout) for (_, expected), r in zip(tests, results)]
        failure = next((f"input {stdin!r}: expected {expected!r}, got {r.stdout.strip()[:80]!r} {_last_line(r.stderr)}".strip()
                        for (stdin, expected), r, ok in zip(tests, results, passed) if not ok), "")
    return sum(passed) / len(tests), failure


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def shipped_code_examples() -> list[Example]:
    """The stdin/stdout problems palaestra ships (:data:`palaestra.envs.code_env.BUILTIN_PROBLEMS`)."""
    from palaestra.envs.code_env import BUILTIN_PROBLEMS

    return [_stdio_example(p.statement, p.tests, p.name) for p in BUILTIN_PROBLEMS]


def _stdio_example(statement: str, tests, name: str) -> Example:
    tests = [[stdin, expected] for stdin, expected in tests]
    return Example(question=statement, answer="", meta={"tests": tests, "public": max(1, len(tests) // 2), "name": name})


def load_function_problems(path: str | Path) -> list[Example]:
    """Function-style problems from a HumanEval JSONL (``prompt``, ``test``, ``entry_point``) or an MBPP
    JSONL (``text`` or ``prompt``, ``test_list``, and ``entry_point`` or the name called by the first test).

    APPS / CodeContests stdin/stdout files are read by :func:`palaestra.envs.code_env.load_code_problems`.
    A line that cannot be read is a one-line ConfigError naming the file, the line and what is wrong.
    """
    examples = []
    for where, record in read_jsonl(path, "code problems"):
        try:
            if "test_list" in record:  # MBPP
                asserts = [str(test) for test in record["test_list"]]
                entry = record.get("entry_point") or asserts[0].split("assert", 1)[-1].strip().split("(")[0].strip()
                question = f"{record.get('text') or record['prompt']}\nWrite a Python function `{entry}`."
            else:  # HumanEval: the prompt is the signature and docstring; check(candidate) is one test
                entry = record["entry_point"]
                question = f"Complete this Python function:\n{record['prompt']}"
                asserts = [f"{record['test']}\ncheck({entry})"]
        except KeyError as error:
            raise ConfigError(f"{where}: no {error} field; a HumanEval line needs prompt, test and entry_point, an MBPP "
                              "line text (or prompt) and test_list") from None
        except (TypeError, AttributeError, IndexError) as error:
            raise ConfigError(f"{where}: not a HumanEval or MBPP problem ({error})") from None
        meta = {"entry_point": entry, "asserts": asserts, "public": 1, "name": record.get("task_id", where)}
        examples.append(Example(question=question, answer="", meta=meta))
    return examples


def _is_function_file(path: str | Path) -> bool:
    _, first = next(read_jsonl(path, "code problems"), ("", {}))
    return "test_list" in first or "entry_point" in first


def build_code_task(path: str | None, *, train_size: int | None, test_size: int, seed: int, instruction: str,
                    system_prompt: str | None, name: str = "code") -> Task:
    """The shipped problems (``path`` None) or a JSONL file of problems, split train/test by a seeded shuffle.

    Correct means the answer's program passes every test.
    """
    if path is None:
        examples, version = shipped_code_examples(), "palaestra-shipped-code-24"
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"path={path} does not exist; point it at an APPS, MBPP or HumanEval JSONL file")
        if _is_function_file(path):
            examples = load_function_problems(path)
        else:
            from palaestra.envs.code_env import load_code_problems

            examples = [_stdio_example(p.statement, p.tests, p.name) for p in load_code_problems(str(path))]
        version = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    train, test = split_examples(examples, test_size, train_size, seed, "code problems")
    return Task(name=name, train=train, test=test, instruction=instruction, system_prompt=system_prompt,
                dataset_version=version, verifier=lambda completion, example: code_pass_rate(completion, example.meta)[0] >= 1.0)
