"""The math and code environments: documented rewards by hand, early stops, problems, loaders.

Programs run in the real sandbox (tens of milliseconds each); the built-in problems' reference
solutions run in one parallel batch.
"""

from __future__ import annotations

import doctest
import json
import threading

import pytest

from palaestra.envs import ENVIRONMENTS, TEST_SEED_OFFSET, CodeEnv, MathEnv, test_seeds, train_seeds
from palaestra.envs.code_env import (
    BUILTIN_PROBLEMS,
    CodeProblem,
    load_code_problems,
    outputs_match,
    parse_test_case,
)
from palaestra.envs.math_env import extract_boxed, load_math_problems, math_equal
from palaestra.sandbox import run_many

PROBLEMS = [{"question": "What is 6 * 7?", "answer": "42"}]
TEST_PROBLEMS = [{"question": "What is 1/4 + 1/4?", "answer": "1/2"}]


def code(body: str) -> str:
    return f"Here it is.\n```python\n{body}\n```"


def case(given: str, expected: str) -> str:
    return f"An edge case.\n**Input**:\n```\n{given}\n```\n**Output**:\n```\n{expected}\n```"


def tokens(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages) // 4  # ~4 characters per token


def math_env(**kwargs) -> MathEnv:
    env = MathEnv(problems=PROBLEMS, test_problems=TEST_PROBLEMS, **kwargs)
    env.reset(0)
    return env


def test_registered_and_doctests():
    import palaestra.envs.code_env
    import palaestra.envs.math_env

    assert ENVIRONMENTS["math"] is MathEnv and ENVIRONMENTS["code"] is CodeEnv
    for module in (palaestra.envs.math_env, palaestra.envs.code_env):
        assert doctest.testmod(module).failed == 0


# ----------------------------------------------------------------------------- math


def test_math_equal_and_boxed():
    assert math_equal("42", "42.0") and math_equal("1/2", "\\frac{1}{2}") and not math_equal("42", "-42")
    assert math_equal("Paris", "paris")  # no math on either side: text comparison
    assert extract_boxed("first \\boxed{1}, finally \\boxed{x^{2}}") == "x^{2}"
    assert extract_boxed("\\boxed{}") is None and extract_boxed("\\boxed{unclosed") is None
    # Parallel rollouts call it from worker threads, where math-verify cannot use signal.alarm.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_equal("42", "\\boxed{42}")))
    worker.start()
    worker.join()
    assert results == [True]


def test_math_tool_rewards():
    # +1 right, 0 wrong, -2 no code / crash / nothing printed; the tool's team reward is always 0.
    expected = [
        (code("print(6 * 7)"), 1.0),
        (code("print('The answer is', 6 * 7)"), 1.0),
        (code("print(41)"), 0.0),
        ("The answer is 42.", -2.0),
        (code("print(1 / 0)"), -2.0),
        (code("x = 42"), -2.0),
    ]
    for answer, reward in expected:
        result = math_env().step("tool", answer)
        assert (result.local_reward, result.team_reward, result.done) == (reward, 0.0, False), answer
    crash = math_env().step("tool", code("print(1 / 0)"))
    assert "ZeroDivisionError" in crash.info["output"]
    assert math_env(invalid_action_penalty=-0.5).step("tool", "no code").local_reward == -0.5


def test_math_answer_prefix_starts_the_tool_answer_and_format_penalty_reads_a_bare_number():
    env = math_env(answer_prefix=True)
    assert env.observation("tool")[-1] == {"role": "assistant", "content": "```python\nprint("}
    tool = env.step("tool", "6 * 7)\n```")
    assert tool.local_reward == 1.0 and tool.info["answer"] == "42"
    assert env.observation("reasoner")[-1]["role"] == "user"  # the reasoner writes its whole answer
    strict = env.copy()
    assert strict.step("reasoner", "The output of the code is 42.").local_reward == -2.0  # the reference: no box
    lenient = math_env(format_penalty=0.5)
    lenient.step("tool", code("print(42)"))
    result = lenient.step("reasoner", "The output of the code is 42.")  # right, read without a box: 1 - 0.5
    assert (result.local_reward, result.team_reward, result.done) == (0.5, 1.0, True) and lenient.success
    assert result.info["lenient"] and result.info["agreed"]
    wrong = math_env(format_penalty=0.5)
    assert wrong.step("reasoner", "It is 41").local_reward == -0.5  # wrong: 0 - 0.5
    assert math_env(format_penalty=0.5).step("reasoner", "no idea").local_reward == -2.0


def test_math_reasoner_rewards_early_stop_and_success():
    env = math_env()
    env.step("tool", code("print(42)"))
    result = env.step("reasoner", "6 * 7 = 42, so \\boxed{42}")
    assert (result.local_reward, result.team_reward) == (1.0, 1.0)
    assert result.done and env.done and env.success and result.info["agreed"]  # tool and reasoner agree

    env = math_env()
    env.step("tool", code("print(42)"))
    wrong = env.step("reasoner", "\\boxed{48}")
    assert (wrong.local_reward, wrong.team_reward, wrong.done, env.success) == (0.0, 0.0, False, False)
    assert "Turn 1: tool printed 42, reasoner answered 48" in env.observation("tool")[1]["content"]
    env.step("tool", code("print(42)"))
    missing = env.step("reasoner", "I am not sure.")
    assert (missing.local_reward, missing.team_reward) == (-2.0, 0.0)
    assert missing.done and not env.success  # max_turns = 2 reached, no right answer

    # Right but disagreeing with a wrong tool: no early stop, yet a success so far.
    env = math_env()
    env.step("tool", code("print(41)"))
    result = env.step("reasoner", "The tool is off by one: \\boxed{42}")
    assert (result.local_reward, result.team_reward, result.done, env.success) == (1.0, 1.0, False, True)
    reasoner_view = env.observation("reasoner")[1]["content"]
    assert "tool printed 41, reasoner answered 42" in reasoner_view
    assert env.step("tool", code("print(42)")).local_reward == 1.0


def test_math_observation_seeds_and_copy():
    env = math_env()
    env.step("tool", code("print(6 * 7)"))
    view = env.observation("reasoner")
    assert "print(6 * 7)" in view[1]["content"] and "\\boxed" in view[1]["content"]
    assert tokens(view) < 350 and tokens(env.observation("tool")) < 350

    branch = env.copy()
    branch.step("reasoner", "\\boxed{42}")
    assert branch.done and not env.done and env.turn == 0 and env.history == []

    env.reset(TEST_SEED_OFFSET)
    assert env.problem == TEST_PROBLEMS[0]
    held = MathEnv(problems=[{"question": f"q{i}", "answer": str(i)} for i in range(8)])
    train = {held._pick(s)["answer"] for s in train_seeds(20)}
    test = {held._pick(s)["answer"] for s in test_seeds(20)}
    assert train == {"0", "1", "2", "4", "5", "6"} and test == {"3", "7"}  # every 4th is held out

    gym = MathEnv()  # reasoning-gym basic_arithmetic, one problem per seed
    gym.reset(5)
    again = MathEnv()
    again.reset(5)
    assert gym.problem == again.problem and gym.problem["question"].startswith("Calculate")
    alone = MathEnv(turn_order=("reasoner",), max_turns=1)
    alone.reset(5)
    assert "Tool agent" not in alone.observation("reasoner")[1]["content"]
    assert alone.step("reasoner", f"\\boxed{{{alone.problem['answer']}}}").done and alone.success
    with pytest.raises(ValueError, match="turn_order"):
        MathEnv(turn_order=("reasoner", "tool"))


def test_load_math_problems(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": 2, "source": "x"}) + "\n\n")
    assert load_math_problems(str(path)) == [{"question": "1+1?", "answer": "2"}]
    path.write_text('{"question": "1+1?"}\n')
    with pytest.raises(ValueError, match=r"math.jsonl:1: expected a JSON object with 'question' and 'answer'"):
        load_math_problems(str(path))


# ----------------------------------------------------------------------------- code

SUM_TWO = BUILTIN_PROBLEMS[0]


def code_env(**kwargs) -> CodeEnv:
    env = CodeEnv(problems=[SUM_TWO], test_problems=[SUM_TWO], **kwargs)
    env.reset(0)
    return env


def test_builtin_problems_pass_their_own_tests():
    assert len(BUILTIN_PROBLEMS) == 24 and len({p.name for p in BUILTIN_PROBLEMS}) == 24
    assert all(3 <= len(p.tests) <= 5 for p in BUILTIN_PROBLEMS)
    pairs = [(p.solution, given) for p in BUILTIN_PROBLEMS for given, _ in p.tests]
    results = iter(run_many(pairs))
    for problem in BUILTIN_PROBLEMS:
        for given, expected in problem.tests:
            result = next(results)
            assert result.ok and outputs_match(expected, result.stdout), (problem.name, given, result)


def test_code_train_and_test_problems_are_disjoint():
    env = CodeEnv()
    train, test = set(), set()
    for seed in train_seeds(50):
        env.reset(seed)
        train.add(env.problem.name)
    for seed in test_seeds(50):
        env.reset(seed)
        test.add(env.problem.name)
    assert len(train) == 18 and len(test) == 6 and not train & test
    assert test == {BUILTIN_PROBLEMS[i].name for i in (3, 7, 11, 15, 19, 23)}
    env.reset(7)
    first = env.problem
    env.reset(7)
    assert env.problem is first  # deterministic


def test_coder_rewards():
    env = code_env()
    result = env.step("coder", code("a, b = map(int, input().split())\nprint(a + b)"))
    assert (result.local_reward, result.team_reward, env.success) == (1.0, 1.0, True)
    assert not result.done  # the tester still acts this turn

    # a - b passes only "0 0" of the 4 ground-truth tests: 1 / 4 = 0.25.
    wrong = code_env().step("coder", code("a, b = map(int, input().split())\nprint(a - b)"))
    assert (wrong.local_reward, wrong.team_reward, wrong.info["gt_passed"]) == (0.25, 0.0, 1)
    crash = code_env().step("coder", code("print(undefined)"))
    assert (crash.local_reward, crash.team_reward) == (0.0, 0.0)
    missing = code_env().step("coder", "I would add the numbers.")
    assert (missing.local_reward, missing.team_reward) == (-2.0, 0.0)

    alone = CodeEnv(problems=[SUM_TWO], test_problems=[SUM_TWO], turn_order=("coder",), max_turns=2)
    alone.reset(0)
    alone.step("coder", code("print(0)"))
    view = alone.observation("coder")[1]["content"]
    assert "Turn 1: program written" in view and "tester" not in view and not alone.done


def test_tester_rewards_history_and_early_stop():
    env = code_env(max_turns=3)
    env.step("coder", code("a, b = map(int, input().split())\nprint(a - b)"))
    # A right case the program fails: +1 (a good catch).
    caught = env.step("tester", case("2 2", "4"))
    assert (caught.local_reward, caught.team_reward, caught.info["verdict"], caught.done) == (1.0, 0.0, "caught", False)
    assert env.generated == [("2 2\n", "4")]
    coder_view = env.observation("coder")[1]["content"]
    assert "program passed 0/1 generated tests (input '2 2': expected '4', got '0')" in coder_view
    assert "print(a - b)" in coder_view

    # The fixed program passes the generated test, so the turn ends the episode early.
    env.step("coder", code("a, b = map(int, input().split())\nprint(a + b)"))
    # A case the reference disagrees with: -1, not added to the generated tests.
    wrong = env.step("tester", case("2 3", "6"))
    assert (wrong.local_reward, wrong.info["verdict"]) == (-1.0, "wrong")
    assert wrong.done and env.done and env.success and env.turn == 2 and len(env.generated) == 1
    assert env.step("coder", code("print(0)")).info["error"] == "episode is over"

    # A right case the program passes: +0.5; it is the only generated test and passes: early stop.
    env = code_env()
    env.step("coder", code("a, b = map(int, input().split())\nprint(a + b)"))
    passed = env.step("tester", "Large numbers.\n**Input:**\n```text\n999 1\n```\n**Output:**\n```\n1000\n```")
    assert (passed.local_reward, passed.info["verdict"], passed.done) == (0.5, "passed", True)

    # Unreadable case: -2 (configurable); a crashing reference input is a wrong case.
    env = code_env(invalid_action_penalty=-3.0)
    env.step("coder", code("print(0)"))
    assert env.step("tester", "Try 2 and 2, it should be 4.").local_reward == -3.0
    assert env.observation("tester")[1]["content"].count("case was missing") == 1
    env.step("coder", code("print(0)"))
    assert env.step("tester", case("two two", "4")).local_reward == -1.0
    assert not env.done and not env.success  # 2 of 3 turns, and no generated test yet


def test_parse_test_case_and_outputs_match():
    assert parse_test_case(case("1 2\n3 4", "3\n7")) == ("1 2\n3 4\n", "3\n7")
    # The last Input/Output pair wins; markers may be bold with the colon inside or outside.
    text = "Input: 1 2 would give Output: 3, but better:\n**Input:**\n```\n5 5\n```\n**Output:**\n```\n10\n```"
    assert parse_test_case(text) == ("5 5\n", "10")
    assert parse_test_case("Input:\n```\n1\n```\nOutput:\n```\n```") is None  # empty output
    assert parse_test_case("**Output**:\n```\n1\n```") is None
    assert outputs_match("1 2\n3\n", "1 2  \n3\n\n") and not outputs_match("1 2", "1  2")


def test_code_copy_and_observation_size():
    env = code_env()
    env.step("coder", code("a, b = map(int, input().split())\nprint(a - b)"))
    branch = env.copy()
    branch.step("tester", case("2 2", "4"))
    assert branch.generated and not env.generated and env.history[-1] == {"turn": 1, "program": True}
    assert env.turn == 0 and branch.turn == 1 and branch.problem is env.problem

    # Every built-in problem's views stay short (~350 tokens), even with a long program and history.
    program = code("import sys\n" + "\n".join(f"x{i} = {i} * 2  # a rather long line of code" for i in range(30)))
    seen = set()
    for seed in train_seeds(18) + test_seeds(6):  # 18 train + 6 test problems: each one once
        env = CodeEnv(max_turns=3, runner=lambda pairs: [_FAILED] * len(pairs))  # nothing needs to run here
        env.reset(seed)
        seen.add(env.problem.name)
        for _ in range(2):
            env.step("coder", program)
            env.step("tester", case("x" * 80, "y" * 80))
        assert tokens(env.observation("coder")) < 350 and tokens(env.observation("tester")) < 350
    assert len(seen) == 24


class _Failed:
    ok, stdout, stderr, timed_out, exit_code = False, "", "Traceback\nValueError: bad input", False, 1


_FAILED = _Failed()


def test_load_code_problems(tmp_path, caplog):
    apps = {"question": "Print a + b.", "solutions": json.dumps(["a, b = map(int, input().split())\nprint(a + b)"]),
            "input_output": json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", ["7"]]})}
    contests = {"name": "echo", "description": "Echo the line.", "solutions": {"language": [2, 3],
                "solution": ["print raw_input()", "print(input())"]},
                "public_tests": {"input": ["hi\n"], "output": ["hi\n"]},
                "private_tests": {"input": ["yo\n"], "output": ["yo\n"]}}
    call_based = {"question": "f(x)", "solution": "def f(x): return x",
                  "input_output": {"fn_name": "f", "inputs": [[1]], "outputs": [1]}}
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (apps, contests, call_based)) + "\n")
    problems = load_code_problems(str(path))
    assert problems[0] == CodeProblem("Print a + b.", apps_solution(apps), (("1 2\n", "3\n"), ("3 4\n", "7")),
                                      name="line 1")
    assert problems[1].solution == "print(input())" and problems[1].tests == (("hi\n", "hi\n"), ("yo\n", "yo\n"))
    assert len(problems) == 2 and "skipped 1 call-based" in caplog.text

    env = CodeEnv(problems=str(path), test_problems=str(path))
    env.reset(1)
    assert env.problem.name == "echo"

    for bad, why in ((apps | {"input_output": json.dumps({"inputs": ["1"], "outputs": []})}, "as many test outputs"),
                     ({"question": "q", "input_output": {"inputs": ["1"], "outputs": ["1"]}}, "no reference solution"),
                     ({"solution": "print(1)"}, "no 'question' text")):
        path.write_text(json.dumps(apps) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=f"code.jsonl:2: .*{why}"):
            load_code_problems(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="code.jsonl:1: "):
        load_code_problems(str(path))


def apps_solution(record: dict) -> str:
    return json.loads(record["solutions"])[0]
