"""Workflow operators, the executor (batching, cache, budget), the validator and the isolated runner.

Every executor here is a ScriptedBackend: deterministic replies, and a record of what reached it.
"""

from __future__ import annotations

import asyncio
import doctest
import importlib
import time

import pytest

from palaestra.workflows import (
    FALLBACK_WORKFLOWS,
    Executor,
    Problem,
    ScriptedBackend,
    WorkflowRunner,
    bind_operators,
    validate_workflow,
)
from palaestra.workflows.operators import majority
from palaestra.workflows.execution import answer_text


def workflow(*body: str) -> str:
    """A Workflow class whose __call__ has the given lines."""
    return "class Workflow:\n    async def __call__(self, problem):\n" + "".join(f"        {line}\n" for line in body)


ANSWER = workflow('solution = await AnswerGenerate(input=problem)', 'return solution["answer"]')


@pytest.mark.parametrize("name", ["palaestra.workflows.executor", "palaestra.workflows.operators",
                                  "palaestra.workflows.execution", "palaestra.workflows.experience",
                                  "palaestra.workflows.reward", "palaestra.workflows.demonstrations", "palaestra.tasks.mixture",
                                  "palaestra.tasks.code"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------------- executor


def test_calls_of_concurrent_workflows_are_batched_and_identical_ones_cached():
    backend = ScriptedBackend({"apples": "Answer: 5"}, default="Answer: 7")
    executor = Executor(backend, max_wait_s=60)  # however loaded the machine, every process reaches its call first
    runner = WorkflowRunner(executor)
    three = workflow('a = await AnswerGenerate(input=problem)', 'b = await AnswerGenerate(input=problem)',
                     'c = await Custom(input=problem, instruction="Solve.")',
                     'return (await ScEnsemble(solutions=[a["answer"], b["answer"], c["response"]]))["response"]')
    problems = [Problem("Tom has 2 apples and buys 3", "math"), Problem("What is 3 + 4?", "math")] * 2
    outcomes = runner.run([three, three, ANSWER, ANSWER], problems)
    assert [o.answer for o in outcomes] == ["5", "7", "5", "7"]
    # Round 1: the 4 first AnswerGenerate calls are 2 distinct requests (workflows 3 and 4 ask what 1 and 2
    # ask); round 2: the second AnswerGenerate of workflows 1, 2 (2nd occurrence: new samples); round 3: Custom.
    assert backend.batches == [2, 2, 2]
    assert executor.stats["calls"] == 8 and executor.stats["cache_hits"] == 2 and executor.stats["backend_calls"] == 6
    assert [o.calls for o in outcomes] == [3, 3, 1, 1]
    # A later step asking the same again is answered from the cache.
    runner.run([ANSWER], problems[:1])
    assert backend.batches == [2, 2, 2] and executor.stats["cache_hits"] == 3


def test_budget_of_calls_and_tokens_is_a_runtime_error():
    backend = ScriptedBackend(default="one two three four")  # 4 tokens per reply
    loop = workflow("out = []", "for i in range(5):", "    r = await Custom(input=problem, instruction=str(i))",
                    "    out.append(r['response'])", "return out[-1]")
    by_calls = WorkflowRunner(Executor(backend), max_calls=3).run([loop], [Problem("q", "qa")])[0]
    assert by_calls.runtime_error == "budget: more than 3 executor calls" and by_calls.calls == 3
    # 3 calls x 4 tokens = 12 >= 10: the 4th call is refused before it is made
    by_tokens = WorkflowRunner(Executor(ScriptedBackend(default="one two three four")), max_tokens=10).run(
        [loop], [Problem("q", "qa")])[0]
    assert by_tokens.runtime_error == "budget: more than 10 executor tokens" and by_tokens.tokens == 12
    assert by_calls.answer == "" and not by_calls.credited and by_calls.kind == "runtime_error"


def test_a_workflow_that_never_awaits_is_stopped_without_stalling_the_others():
    spin = workflow("x = 0", "while True:", "    x = x + 1", "return x")
    huge = workflow("return sum(range(10 ** 9))")
    outcomes = WorkflowRunner(Executor(ScriptedBackend(default="Answer: 3")), max_lines=1000).run(
        [spin, huge, ANSWER], [Problem("q", "math")] * 3)
    assert outcomes[0].runtime_error == "ran more than its budget of lines of its own code"
    assert outcomes[1].runtime_error.startswith("ValueError: range of 1000000000 items")
    assert outcomes[2].answer == "3" and outcomes[2].kind == "clean"


def test_timeout_of_a_waiting_workflow():
    class Slow(ScriptedBackend):
        def complete(self, requests):
            import time

            time.sleep(0.3)
            return super().complete(requests)

    outcome = WorkflowRunner(Executor(Slow(default="x")), timeout_s=0.1).run(
        [workflow("a = await Custom(input=problem)", "b = await Custom(input=a['response'])", "return b['response']")],
        [Problem("q", "qa")])[0]
    assert outcome.runtime_error == "timed out after 0.1 s"


# ------------------------------------------------------------------------------------ operators


def _call(operator: str, context: Problem, backend: ScriptedBackend, **kwargs):
    async def go():
        executor = Executor(backend)
        return await bind_operators(executor.client(max_calls=5, max_tokens=10_000), context)[operator](**kwargs)

    return asyncio.run(go())


def test_answer_generate_takes_the_last_answer_line():
    reply = "3 apples plus 4 is 7.\nAnswer: 7 apples\nAnswer: 7"
    out = _call("AnswerGenerate", Problem("q", "math"), ScriptedBackend(default=reply), input="3 + 4 apples?")
    assert out == {"thought": reply, "answer": "7"}


def test_programmer_runs_the_written_code_in_the_sandbox():
    backend = ScriptedBackend(default="Here:\n```python\nprint(6 * 7)\n```")
    out = _call("Programmer", Problem("6 times 7?", "math"), backend, problem="6 times 7?", analysis="multiply")
    assert out == {"code": "print(6 * 7)", "output": "42"}
    crash = _call("Programmer", Problem("q", "math"), ScriptedBackend(default="```python\n1/0\n```"), problem="q")
    assert crash["output"] == "Error: ZeroDivisionError: division by zero"


def test_test_operator_checks_public_tests_and_keeps_a_better_revision():
    meta = {"tests": [["3 4\n", "7"], ["1 1\n", "2"], ["5 5\n", "10"]], "public": 2}
    problem = Problem("Read two integers, print the sum.", "code", meta)
    wrong = "a, b = map(int, input().split())\nprint(a * b)"
    right = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    out = _call("Test", problem, ScriptedBackend(default=right), problem=problem.question, solution=wrong, entry_point=None)
    assert out["result"] is True and "print(a + b)" in out["solution"]
    good = _call("Test", problem, ScriptedBackend(default="unused"), problem=problem.question, solution=right)
    assert good == {"result": True, "solution": right, "feedback": ""}


def test_review_revise_and_self_consistency():
    review = _call("Review", Problem("q", "math"), ScriptedBackend(default="Looks fine.\nVerdict: correct"),
                   problem="q", solution="4")
    assert review["review_result"] is True
    revised = _call("Revise", Problem("q", "math"), ScriptedBackend(default="Fixed.\nAnswer: 5"),
                    problem="q", solution="4", feedback="off by one")
    assert revised == {"solution": "5"}
    # ScEnsemble makes no executor call: 12 and 12.0 are the same number (2 votes) against 13
    backend = ScriptedBackend()
    assert _call("ScEnsemble", Problem("q", "math"), backend, solutions=["13", "12", "12.0"]) == {"response": "12"}
    assert backend.seen == []
    assert majority(["Paris", "paris.", "Lyon"]) == "Paris"


# ------------------------------------------------------------------------------------ validator


def test_a_clean_workflow_passes_unchanged():
    result = validate_workflow(f"Here is my workflow:\n```python\n{ANSWER}```\nDone.", "math")
    assert result.valid and not result.repaired and not result.fallback
    assert result.operators == {"AnswerGenerate"} and "AnswerGenerate(input=problem)" in result.code


def test_aflow_style_workflow_is_repaired_and_flagged():
    aflow = ("```python\nimport asyncio\nclass MyWorkflow:\n    def __init__(self, name, llm_config):\n"
             "        self.custom = operator.Custom(self.llm)\n    def __call__(self, problem):\n"
             "        solution = self.answer_generate(input=problem)\n        answer = solution['answer']\n```")
    result = validate_workflow(aflow, "math")
    assert result.repaired and result.validation_failed and not result.fallback
    assert result.repairs == ["removed imports", "renamed class MyWorkflow to Workflow",
                              "removed __init__ (operators are provided)", "made __call__ async",
                              "operator attributes called by name", "added await to operator calls", "added return answer"]
    assert "await AnswerGenerate(input=problem)" in result.code and result.code.rstrip().endswith("return answer")


def test_cut_off_code_is_repaired_by_dropping_the_broken_tail():
    cut = ANSWER + "    def helper(self, x):\n        return AnswerGenerate(inp"
    result = validate_workflow(cut, "qa")
    # dropping 1 line leaves a method without a body; 2 lines parse
    assert result.repaired and result.repairs == ["dropped 2 cut-off line(s)"] and result.operators == {"AnswerGenerate"}


@pytest.mark.parametrize("body, error", [
    (["import os", "return os.getcwd()"], "attribute access .getcwd is not allowed"),
    (["return problem.__class__"], "dunder attribute __class__ is not allowed"),
    (["return eval(problem)"], "builtin eval is not allowed"),
    (["r = await Custom(question=problem)", "return r"], "Custom has no argument 'question' (it takes input, instruction)"),
    (["r = await Review(problem=problem)", "return r"], "Review needs solution"),
    (["r = await Magic(input=problem)", "return r"], "unknown function Magic"),
    (["print(problem)"], "__call__ never returns a value"),
])
def test_code_that_breaks_a_rule_falls_back(body, error):
    result = validate_workflow(workflow(*body), "code")
    assert result.fallback and result.validation_failed and not result.repaired
    assert error in result.errors
    assert result.code == FALLBACK_WORKFLOWS["code"] and result.operators == set()


def test_text_without_code_is_a_parse_failure_or_a_validation_failure():
    assert validate_workflow("class Workflow(:\n  ((", "math").parse_failed
    assert validate_workflow("I would call AnswerGenerate.", "math").parse_failed
    no_class = validate_workflow("answer = 42", "math")
    assert no_class.fallback and not no_class.parse_failed and no_class.errors == ["needs exactly one class Workflow (found [])"]


def test_fallback_workflows_are_valid():
    for domain, code in FALLBACK_WORKFLOWS.items():
        assert validate_workflow(code, domain).valid


# --------------------------------------------------------------------------------------- runner


def test_workflow_code_sees_only_operators_and_safe_builtins():
    # The validator forbids the names; the runner's globals do not have them either (defence in depth).
    from palaestra.workflows.execution import _instantiate

    with pytest.raises(NameError):
        _instantiate("open('x')", {})
    with pytest.raises(NameError):
        _instantiate("__import__('os')", {})
    assert _instantiate("class Workflow:\n    pass\n", {}).__class__.__name__ == "Workflow"


def test_answers_are_read_from_tuples_and_operator_dicts():
    assert answer_text(("42", 0.1)) == "42" and answer_text({"thought": "t", "answer": "A"}) == "A"
    outcomes = WorkflowRunner(Executor(ScriptedBackend(default="Answer: 9"))).run(
        [workflow("s = await AnswerGenerate(input=problem)", "return s, 0.0"), workflow("return None")],
        [Problem("q", "math")] * 2)
    assert outcomes[0].answer == "9" and outcomes[1].runtime_error == "returned no answer"


def test_example_usage_around_the_class_is_removed():
    text = f"```python\n{ANSWER}\n# Example usage\nworkflow = Workflow()\nprint(workflow('2 + 2'))\n```"
    result = validate_workflow(text, "math")
    assert result.repaired and result.repairs == ["removed code outside the class"]
    assert result.code.strip() == validate_workflow(ANSWER, "math").code.strip()


def test_attributes_a_removed_init_stored_read_the_problem_or_their_constant():
    text = ("class Workflow:\n    def __init__(self, input):\n        self.input = input\n        self.hint = 'Be brief.'\n"
            "    async def __call__(self, problem):\n"
            "        r = await Custom(input=self.input, instruction=self.hint)\n        return r['response']\n")
    result = validate_workflow(text, "qa")
    assert result.repairs == ["removed __init__ (operators are provided)", "replaced attributes set in __init__"]
    assert "Custom(input=problem, instruction='Be brief.')" in result.code


def test_other_spellings_of_operators_and_a_misnamed_single_argument_are_repaired():
    text = workflow("a = await answer_generate(question=problem)", "b = await sc_ensemble(solutions=[a['answer']])",
                    "return b['response']")
    result = validate_workflow(text, "math")
    assert result.repairs == ["answer_generate spelled AnswerGenerate", "argument question of AnswerGenerate renamed input",
                              "sc_ensemble spelled ScEnsemble"]
    assert result.operators == {"AnswerGenerate", "ScEnsemble"} and "AnswerGenerate(input=problem)" in result.code
    # an operator with two arguments is not guessed at
    assert validate_workflow(workflow("r = await Review(question=problem, answer='4')", "return r"), "math").fallback


def test_test_operator_repairs_for_up_to_three_rounds_and_keeps_the_best_program():
    meta = {"tests": [["3 4\n", "7"], ["1 1\n", "2"], ["5 5\n", "10"]], "public": 2}
    problem = Problem("Read two integers, print the sum.", "code", meta)
    product = "a, b = map(int, input().split())\nprint(a * b)"   # passes neither public test (12, 1)
    attempts = iter([
        "```python\na, b = map(int, input().split())\nprint(a - b)\n```",     # round 1: still 0 of 2
        "```python\na, b = map(int, input().split())\nprint(2 * a)\n```",     # round 2: "1 1" -> 2: 1 of 2
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",     # round 3: 2 of 2
    ])
    backend = ScriptedBackend({"fails a test": lambda prompt: next(attempts)})
    out = _call("Test", problem, backend, problem=problem.question, solution=product)
    assert out["result"] is True and out["solution"].endswith("print(a + b)") and out["feedback"] == ""
    assert len(backend.seen) == 3
    # each round sends the latest attempt back, not the first program
    assert "print(a - b)" in backend.seen[1].messages[-1][1] and "print(2 * a)" in backend.seen[2].messages[-1][1]

    stuck = ScriptedBackend(default=f"```python\n{product}\n```")
    out = _call("Test", problem, stuck, problem=problem.question, solution=product)
    assert out["result"] is False and out["solution"] == product and out["feedback"]


# ------------------------------------------------------------------------------------ isolation


def test_a_workflow_that_hogs_memory_or_a_core_fails_alone_in_its_process():
    hog = workflow('big = "x" * (2 ** 30)', 'return big[:3]')  # a 1 GB string
    stuck = workflow("return str(10 ** 10 ** 8)")  # one C-level operation: no line trace or asyncio timeout stops it
    long = workflow('return "7" * 2000000')
    runner = WorkflowRunner(Executor(ScriptedBackend(default="Answer: 3")), memory_mb=256, timeout_s=15.0)
    started = time.monotonic()
    outcomes = runner.run([hog, stuck, long, ANSWER], [Problem("q", "math")] * 4)
    assert time.monotonic() - started < 60
    assert outcomes[0].runtime_error.startswith("MemoryError") and outcomes[0].kind == "runtime_error"
    assert outcomes[1].runtime_error == "timed out after 15 s"
    assert outcomes[2].runtime_error == "the answer has 2000000 characters; at most 1000000 are read"
    assert outcomes[3].answer == "3" and outcomes[3].kind == "clean" and outcomes[3].calls == 1


def test_isolated_and_in_process_workflows_give_the_same_outcomes_and_usage():
    backend = ScriptedBackend({"apples": "Answer: 5"}, default="Answer: 7")
    cost = workflow('a = await AnswerGenerate(input=problem)', 'b = await Custom(input=problem)',
                    'return a["answer"], UsageSummary()["total_cost"]')
    problems = [Problem("Tom has 2 apples and buys 3", "math"), Problem("What is 3 + 4?", "math")]
    outcomes = {}
    for isolation in ("process", "none"):
        runner = WorkflowRunner(Executor(backend, cost_per_million_tokens=1e6), isolation=isolation, max_calls=1)
        outcomes[isolation] = [(o.answer, o.runtime_error, o.calls, o.tokens, o.cost) for o in runner.run([ANSWER, cost], problems)]
    assert outcomes["process"] == outcomes["none"]
    assert outcomes["process"][1][1] == "budget: more than 1 executor calls"  # the budget is kept across the pipe
