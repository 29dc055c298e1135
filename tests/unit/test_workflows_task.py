"""The workflow task: rewards with penalties, the experience buffer, the mixture and its sources, the
config, and the in-process and URL executor backends (on the tiny model)."""

from __future__ import annotations

import json

import pytest

from palaestra.config import ConfigError
from palaestra.jobs import to_config
from palaestra.tasks.base import Example, Task
from palaestra.tasks.build import build_task
from palaestra.workflows import FALLBACK_WORKFLOWS, ExperienceBuffer, ScriptedBackend, WorkflowTask
from palaestra.workflows.reward import workflow_clean, workflow_fallback, workflow_reward, workflow_valid


def workflow(*body: str) -> str:
    return "class Workflow:\n    async def __call__(self, problem):\n" + "".join(f"        {line}\n" for line in body)


DIRECT = workflow("s = await AnswerGenerate(input=problem)", "return s['answer']")
PROGRAM = workflow("p = await Programmer(problem=problem, analysis='')", "return p['output']")
AFLOW = workflow("s = self.answer_generate(input=problem)", "return s['answer']")  # repaired: await + name


def _task(train, test, replies, **kwargs) -> WorkflowTask:
    base = Task(name="t", train=train, test=test, instruction="", system_prompt=None, dataset_version="v")
    backend = ScriptedBackend(replies, default="Answer: 0")
    return WorkflowTask(base, backend_factory=lambda policy_generator=None: backend, **kwargs)


MATH = Example("Tom has 60 apples and buys 40. How many?", "100", {"domain": "math"})
QA = Example("Passage: It may only be used at the module level.\n\nQuestion: Where?", "the module level",
             {"domain": "qa", "answers": ["the module level"]})
CODE = Example("Read two integers a and b on one line. Print a + b.", "",
               {"domain": "code", "tests": [["3 4\n", "7"], ["1 1\n", "2"], ["0 0\n", "0"], ["2 2\n", "4"]], "public": 2})


def test_reward_is_the_tier_minus_penalties_and_a_fallback_earns_nothing():
    task = _task([MATH, QA, CODE], [], {
        "complete Python program": "```python\nprint(103)\n```",  # Programmer's prompt: 103 is 3% off 100
        "apples": "60 + 40 = 100\nAnswer: 100",
        "module level": "Answer: the module level",
        # right on (3,4), (0,0) and (2,2), wrong on (1,1): pass rate 3/4
        "Read two integers": "```python\na, b = map(int, input().split())\nprint(a + b if a != 1 else 0)\n```",
    })
    cases = [
        (DIRECT, MATH),    # tier 1.0, no penalty                                       -> 1.0
        (AFLOW, MATH),     # tier 1.0, repaired: -0.2 = 0.8, snapped                      -> 0.7
        (PROGRAM, MATH),   # 103: tier 0.7; Programmer on math: -0.4 = 0.3, tie goes down -> 0.2
        (DIRECT, QA),      # exact span                                                   -> 1.0
        (workflow("r = await Custom(input=problem, instruction='Write it.')", "return r['response']"), CODE),
        #                    pass rate 0.75 -> tier 0.7
        ("no code at all", MATH),                    # parse failure: fallback, never credited -> 0.0
        (workflow("return problem[10 ** 6]"), QA),   # IndexError: runtime error               -> 0.0
    ]
    completions, examples = [c for c, _ in cases], [e for _, e in cases]
    columns = task.columns(examples)
    assert workflow_reward(completions, **columns) == [1.0, 0.7, 0.2, 1.0, 0.7, 0.0, 0.0]
    assert workflow_valid(completions, **columns) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    assert workflow_clean(completions, **columns) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert workflow_fallback(completions, **columns) == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    scores = task.score(completions, examples)
    assert [s.outcome.kind for s in scores] == ["clean", "repaired", "clean", "clean", "clean", "parse_failure",
                                                "runtime_error"]
    assert [s.operator_mismatch for s in scores] == [False, False, True, False, False, False, False]
    # the fallback answered 100, right, but that is not the policy's answer: tier 0
    assert scores[5].outcome.answer == "100" and scores[5].tier == 0.0 and not scores[5].outcome.credited
    # the verifier reuses the scores: no second run of any workflow
    calls = task.runner.executor.stats["calls"]
    assert [task.is_correct(c, e) for c, e in cases] == [True, True, False, True, True, False, False]
    assert task.runner.executor.stats["calls"] == calls


def test_good_training_workflows_enter_the_buffer_and_the_prompt_but_held_out_ones_do_not():
    held_out = Example("Sam has 1 pear and gets 1. How many?", "2", {"domain": "math"})
    task = _task([MATH], [held_out], {"apples": "Answer: 100", "pear": "Answer: 2"}, experience_shots=1)
    assert "answers directly" in task.prompt(MATH)[1]["content"]
    task.score([DIRECT, DIRECT], [MATH, held_out])  # both correct; only the training problem may enter
    assert len(task.experience) == 1
    entry = task.experience.shots("math", 1)[0]
    assert (entry.question, entry.answer, entry.reward) == (MATH.question, "100", 1.0) and "AnswerGenerate" in entry.workflow
    prompt = task.prompt(held_out)
    assert prompt[0]["role"] == "system" and "ScEnsemble(solutions)" in prompt[0]["content"]
    assert "solved a similar problem" in prompt[1]["content"] and "AnswerGenerate(input=problem)" in prompt[1]["content"]
    # the checkpoint round trip (JSON, as the trainer state is written)
    state = json.loads(json.dumps(task.state_dict()))
    fresh = _task([MATH], [held_out], {})
    fresh.load_state_dict(state)
    assert fresh.prompt(held_out) == prompt


def test_experience_buffer_is_bounded_and_keeps_the_best():
    buffer = ExperienceBuffer(capacity=2)
    assert [buffer.add("math", f"q{i}", f"w{i}", r) for i, r in enumerate([0.7, 1.0, 0.69, 0.7, 1.0])] == \
        [True, True, False, True, True]
    # capacity 2: w0 (0.7, oldest) was replaced by w3 (0.7, newer), then w3 by w4 (1.0)
    assert [e.workflow for e in buffer.shots("math", 5)] == ["w4", "w1"]
    assert buffer.add("code", "q", "w", 1.0) and len(buffer) == 3
    restored = ExperienceBuffer(capacity=1)
    restored.load_state_dict(buffer.state_dict())
    assert [e.workflow for e in restored.shots("math", 5)] == ["w4"]  # the smaller capacity keeps the best


# --------------------------------------------------------------------------------------- data


def _config(**task):
    return to_config({"task": task}).task


MIXTURE = {"name": "mix", "source": "mixture", "train_size": 20, "test_size": 10,
           "components": {"math": {"ratio": 0.4, "source": "reasoning_gym", "dataset": "gsm_symbolic"},
                          "qa": {"ratio": 0.3, "source": "qa"}, "code": {"ratio": 0.3, "source": "code"}}}


def test_mixture_takes_each_domain_by_ratio_and_never_shares_a_test_problem():
    task = build_task(_config(**MIXTURE))
    domains = [e.meta["domain"] for e in task.train]
    # 20 x 0.4 / 0.3 / 0.3 = 8 / 6 / 6; 10 test examples = 4 / 3 / 3
    assert (domains.count("math"), domains.count("qa"), domains.count("code")) == (8, 6, 6)
    assert [e.meta["domain"] for e in task.test] == ["math"] * 4 + ["qa"] * 3 + ["code"] * 3
    assert not {e.question for e in task.train} & {e.question for e in task.test}
    qa = next(e for e in task.test if e.meta["domain"] == "qa")
    assert qa.answer in qa.question  # a span of its passage
    assert "inside <answer></answer>" in task.prompt(qa)[0]["content"]
    code = next(e for e in task.test if e.meta["domain"] == "code")
    from palaestra.envs.code_env import BUILTIN_PROBLEMS

    reference = next(p.solution for p in BUILTIN_PROBLEMS if p.name == code.meta["name"])
    assert task.is_correct(f"```python\n{reference}```", code) and not task.is_correct("print(0)", code)
    from palaestra.tasks.mixture import domain_tier_reward

    columns = task.columns([code, qa])
    assert domain_tier_reward([f"```python\n{reference}```", f"<answer>{qa.answer}</answer>"], **columns) == [1.0, 1.0]


def test_function_style_code_problems_from_mbpp_and_humaneval_files(tmp_path):
    from palaestra.tasks.code import code_pass_rate, load_function_problems

    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4",
                                                                         "assert add(0, 5) == 5"]}) + "\n"
                    + json.dumps({"prompt": "def double(x):\n    \"\"\"Twice x.\"\"\"\n", "entry_point": "double",
                                  "test": "def check(f):\n    assert f(2) == 4\n    assert f(0) == 0\n"}) + "\n")
    mbpp, humaneval = load_function_problems(path)
    assert mbpp.meta["entry_point"] == "add" and humaneval.meta["asserts"][0].endswith("check(double)")
    # a + b is wrong only for add(2, 2): 2 of 3
    rate, failure = code_pass_rate("def add(a, b):\n    return a + b if a != 2 else 0", mbpp.meta)
    assert rate == pytest.approx(2 / 3) and "add(2, 2)" in failure
    assert code_pass_rate("def double(x):\n    return 2 * x", humaneval.meta) == (1.0, "")
    assert code_pass_rate("def add(a, b):\n    return a + b", mbpp.meta, public_only=True)[0] == 1.0


@pytest.mark.parametrize("task, message", [
    ({"source": "mixture"}, "task.source=mixture needs task.components"),
    ({**MIXTURE, "components": {"math": {"ratio": 0, "dataset": "gsm_symbolic"}}}, "task.components.math.ratio=0"),
    ({**MIXTURE, "components": {"x": {"source": "web"}}}, "task.components.x.source='web' is unknown"),
    ({**MIXTURE, "components": {"code": {"source": "code", "path": "missing.jsonl"}}},
     "task.components.code.path=missing.jsonl does not exist"),
    ({"source": "qa", "workflow": {"enabled": True, "executor": {"backend": "url"}}},
     "task.workflow.executor.backend=url needs task.workflow.executor.url"),
    ({"source": "qa", "workflow": {"enabled": True, "executor": {"backend": "gpt"}}},
     "task.workflow.executor.backend='gpt' is unknown"),
    ({"source": "qa", "workflow": {"enabled": True, "max_calls": 0}}, "task.workflow.max_calls=0 must be positive"),
])
def test_bad_mixture_and_workflow_settings_are_one_line_config_errors(task, message):
    with pytest.raises(ConfigError) as error:
        to_config({"task": task})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_workflow_task_is_built_from_config_with_its_executor():
    config = _config(**MIXTURE, workflow={"enabled": True, "experience_size": 3,
                                          "executor": {"backend": "scripted", "replies": {"apples": "Answer: 1"}}},
                     rewards=["palaestra.workflows.reward:workflow_reward"])
    task = build_task(config)
    assert isinstance(task, WorkflowTask) and task.experience.capacity == 3
    assert isinstance(task.runner.executor.backend, ScriptedBackend)
    assert task.runner.executor.backend.rules == {"apples": "Answer: 1"}
    assert task.dataset_version.startswith("workflow:mixture[math=0.4")


def test_the_policy_backend_needs_the_policy_bound_first():
    from palaestra.models import build_tiny_model
    from palaestra.rollout import HFGenerator
    from palaestra.workflows import GeneratorBackend

    task = build_task(_config(source="qa", test_size=4, workflow={"enabled": True, "executor": {"backend": "policy"}}))
    with pytest.raises(ValueError, match="needs the policy: call WorkflowTask.bind first"):
        task.runner
    model, tokenizer = build_tiny_model()
    task.bind(HFGenerator(model, tokenizer))
    backend = task.runner.executor.backend
    assert isinstance(backend, GeneratorBackend) and backend.adapter_off and backend.generator.model is model


# ----------------------------------------------------------------------------- real backends


def test_in_process_backend_batches_on_the_tiny_model():
    from palaestra.models import build_tiny_model
    from palaestra.rollout import HFGenerator
    from palaestra.workflows import Executor, GeneratorBackend, Problem, WorkflowRunner

    model, tokenizer = build_tiny_model()
    generator = HFGenerator(model, tokenizer, max_prompt_length=128)
    executor = Executor(GeneratorBackend(generator), max_tokens=6)
    outcomes = WorkflowRunner(executor).run([DIRECT] * 3, [Problem("1 + 1?", "math"), Problem("2 + 2?", "math"),
                                                           Problem("1 + 1?", "math")])
    assert executor.stats["batches"] == 1 and executor.stats["backend_calls"] == 2 and executor.stats["cache_hits"] == 1
    assert all(o.tokens > 6 for o in outcomes)  # prompt + completion tokens of each reply
    assert outcomes[0].answer == outcomes[2].answer  # the same call, the same reply


def test_url_backend_talks_to_an_openai_compatible_server():
    from palaestra.config import ServeJob
    from palaestra.serving import BackgroundServer, build_app
    from palaestra.serving.command import build_services
    from palaestra.workflows import OpenAIBackend, Request

    config = ServeJob()
    config.model.name, config.model.dtype = "tiny", "float32"
    config.serve.models, config.serve.embedder, config.serve.index, config.serve.device = [], None, None, "cpu"
    with BackgroundServer(build_app(build_services(config))) as server:
        backend = OpenAIBackend(f"{server.url}/v1", "tiny")
        requests = [Request((("user", "Hello"),), 5, 0.0), Request((("user", "Bye"),), 5, 0.0)]
        replies = backend.complete(requests)
        assert len(replies) == 2 and all(reply.tokens > 0 for reply in replies)
        assert backend.complete(requests[:1])[0].text == replies[0].text  # greedy: the same reply again
        bad = OpenAIBackend(f"{server.url}/v1", "no-such-model").complete(requests[:1])
        assert bad[0].text == "" and bad[0].tokens == 0  # a failed call is an empty reply, not a crash


# ----------------------------------------------------------------------------------- evaluation


def test_per_domain_figures_and_the_before_after_plot(tmp_path):
    from palaestra.workflows.evaluation import plot_outcome_shares, workflow_figures

    task = _task([MATH, QA], [], {"complete Python program": "```python\nprint(100)\n```", "apples": "Answer: 100",
                                  "module level": "Answer: the module level"})
    cases = [(DIRECT, MATH), (PROGRAM, MATH), ("no code", MATH), (AFLOW, QA), (workflow("return problem[10 ** 6]"), QA)]
    scores = task.score([c for c, _ in cases], [e for _, e in cases])
    figures = workflow_figures(scores, ["math", "math", "math", "qa", "qa"])
    # math: rewards 1.0 (clean), 0.7 (100 exact, Programmer mismatch: 1.0 - 0.4 = 0.6 -> 0.7), 0 (fallback)
    assert figures["workflow/math/mean_reward"] == pytest.approx((1.0 + 0.7 + 0.0) / 3)
    assert figures["workflow/math/accuracy"] == pytest.approx(2 / 3)
    assert figures["workflow/math/validity_rate"] == pytest.approx(2 / 3)
    assert figures["workflow/math/share/clean"] == pytest.approx(2 / 3)
    assert figures["workflow/math/share/parse_failure"] == pytest.approx(1 / 3) == figures["workflow/math/share/fallback"]
    assert figures["workflow/math/operator_match_rate"] == 0.5  # of the 2 that ran their own code, 1 used Programmer
    assert figures["workflow/math/executor_calls"] == 1.0  # each made one call (the fallback's included)
    # qa: one repaired (1.0 - 0.2 -> 0.7), one runtime error (0)
    assert figures["workflow/qa/mean_reward"] == pytest.approx(0.35) and figures["workflow/qa/share/repaired"] == 0.5
    assert figures["workflow/qa/share/runtime_error"] == 0.5 and figures["workflow/qa/validity_rate"] == 0.5
    assert figures["workflow/all/accuracy"] == pytest.approx(3 / 5)
    assert sum(figures[f"workflow/all/share/{k}"] for k in ("parse_failure", "validation_failure", "repaired",
                                                             "runtime_error", "clean")) == pytest.approx(1.0)
    # the recipe's hook: the figures of an evaluation's samples, from the cached scores
    samples = [{"question": e.question, "completion": c} for c, e in cases]
    assert task.evaluation_figures(samples) == figures
    path = plot_outcome_shares({k: 0.0 for k in figures} | {"workflow/math/share/parse_failure": 1.0}, figures,
                               tmp_path / "plots" / "outcomes.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_workflows_writes_and_runs_one_workflow_per_problem():
    from palaestra.models import build_tiny_model
    from palaestra.rollout import HFGenerator, SamplingParams
    from palaestra.workflows.evaluation import evaluate_workflows

    model, tokenizer = build_tiny_model()
    task = _task([MATH], [MATH, QA, CODE], {})
    figures, rows = evaluate_workflows(HFGenerator(model, tokenizer, max_prompt_length=64), task, task.test,
                                       SamplingParams(8, greedy=True), batch_size=2)
    assert [row["domain"] for row in rows] == ["math", "qa", "code"]
    # the random tiny policy writes no workflow: every one falls back, and earns nothing
    assert figures["workflow/all/share/fallback"] == 1.0 and figures["workflow/all/mean_reward"] == 0.0
    assert all(row["ran"] == FALLBACK_WORKFLOWS[row["domain"]] and row["reward"] == 0.0 for row in rows)


def test_policy_backend_answers_with_the_adapter_switched_off():
    import torch

    from palaestra.models import apply_lora, build_tiny_model
    from palaestra.rollout import HFGenerator
    from palaestra.workflows import GeneratorBackend, Request

    base, tokenizer = build_tiny_model()
    policy, _ = build_tiny_model()  # the same weights (seed 0), then an adapter that changes the outputs
    policy = apply_lora(policy, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    requests = [Request((("user", "Say something"),), 8, 0.0), Request((("user", "Count to three"),), 8, 0.0)]
    plain = GeneratorBackend(HFGenerator(base, tokenizer)).complete(requests)
    adapter_off = GeneratorBackend(HFGenerator(policy, tokenizer), adapter_off=True).complete(requests)
    adapter_on = GeneratorBackend(HFGenerator(policy, tokenizer)).complete(requests)
    assert [r.text for r in adapter_off] == [r.text for r in plain]
    assert [r.text for r in adapter_on] != [r.text for r in plain]


def test_mixture_components_from_gsm8k_and_apps_files(tmp_path):
    from tests.conftest import write_gsm8k

    gsm8k = write_gsm8k(tmp_path / "gsm8k.jsonl", count=12)
    apps = tmp_path / "apps.jsonl"
    with open(apps, "w") as handle:
        for k in range(6):
            handle.write(json.dumps({"question": f"Read n. Print n + {k}.", "solutions": json.dumps([f"print(int(input()) + {k})"]),
                                     "input_output": json.dumps({"inputs": ["1\n", "5\n"], "outputs": [f"{1 + k}\n", f"{5 + k}\n"]})}) + "\n")
    task = build_task(_config(name="files", source="mixture", train_size=10, test_size=4, components={
        "math": {"ratio": 1.0, "source": "gsm8k", "path": str(gsm8k)}, "code": {"ratio": 1.0, "source": "code", "path": str(apps)}}))
    assert [e.meta["domain"] for e in task.test] == ["math", "math", "code", "code"]
    assert sum(e.meta["domain"] == "code" for e in task.train) == 5  # 4 distinct problems, one repeated
    code = task.test[2]
    k = int(code.question.split("+ ")[1].rstrip("."))
    assert task.is_correct(f"```python\nprint(int(input()) + {k})\n```", code)
    math = task.test[0]
    assert task.is_correct(f"<answer>{math.answer}</answer>", math)


# ------------------------------------------------------------------------------- demonstrations


def test_every_demonstration_pattern_is_a_clean_workflow_with_its_operators():
    import random

    from palaestra.workflows.demonstrations import PATTERNS, demonstration_workflow
    from palaestra.workflows.validator import validate_workflow

    expected = {"direct": {"AnswerGenerate"}, "custom": {"Custom"}, "plan_then_answer": {"Custom", "AnswerGenerate"},
                "review_revise": {"AnswerGenerate", "Review", "Revise"}, "program": {"Programmer"},
                "draft_and_test": {"Custom", "Test"}}
    rng = random.Random(0)
    for pattern in PATTERNS:
        for _ in range(10):
            result = validate_workflow(demonstration_workflow(rng, pattern), "code")
            assert result.valid and not result.repairs, (pattern, result.errors)
            if pattern == "ensemble":
                assert "ScEnsemble" in result.operators and result.operators - {"ScEnsemble"} in ({"AnswerGenerate"}, {"Custom"})
            else:
                assert result.operators == expected[pattern], pattern
    # the draw ignores the domain: across many draws every pattern appears
    drawn = {frozenset(validate_workflow(demonstration_workflow(rng), "math").operators) for _ in range(200)}
    assert {frozenset(ops) for ops in expected.values()} <= drawn


def test_demonstrations_use_the_task_prompt_and_hold_out_whole_problems(tmp_path):
    from palaestra.workflows.demonstrations import write_demonstrations

    problems = [Example(f"Tom has {n} apples and buys 1. How many?", str(n + 1), {"domain": "math"}) for n in range(10)]
    task = _task([*problems, problems[0]], [MATH], {})  # a repeated problem is demonstrated once per draw
    folder = write_demonstrations(task, tmp_path / "demos", per_problem=2, val_fraction=0.2)
    rows = {name: [json.loads(line) for line in (folder / name).read_text().splitlines()] for name in ("train.jsonl", "val.jsonl")}
    assert len(rows["train.jsonl"]) == 16 and len(rows["val.jsonl"]) == 4  # 8 + 2 distinct problems, 2 each
    questions = {name: {r["messages"][1]["content"] for r in lines} for name, lines in rows.items()}
    assert not questions["train.jsonl"] & questions["val.jsonl"]
    first = rows["train.jsonl"][0]["messages"]
    shown = next(p for p in problems if p.question in first[1]["content"])
    assert first[:2] == task.prompt(shown) and first[2]["role"] == "assistant"
    assert first[2]["content"].startswith("```python\nclass Workflow:")
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # written through temporary files, renamed
    with pytest.raises(ValueError, match="per_problem must be at least 1"):
        write_demonstrations(task, tmp_path / "none", per_problem=0)
