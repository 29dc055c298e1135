"""AFlow's own workflow files (graph.py with its prompt.py, in the form AFlow publishes) validate as clean and run
unchanged, their cost being the executor's real usage."""

from __future__ import annotations

import pytest

from palaestra.workflows import Executor, Problem, ScriptedBackend, WorkflowRunner, validate_workflow
from palaestra.workflows.aflow_form import load_aflow_workflow, read_prompts

HEADER = '''from typing import Literal
import workspace.{dataset}.workflows.template.operator as operator
import workspace.{dataset}.workflows.round_{round}.prompt as prompt_custom
from metagpt.provider.llm_provider_registry import create_llm_instance
from metagpt.utils.cost_manager import CostManager

DatasetType = Literal["HumanEval", "MBPP", "GSM8K", "MATH", "HotpotQA", "DROP"]
'''

CUSTOM = HEADER.format(dataset="MATH", round=1) + '''
class Workflow:
    def __init__(
        self,
        name: str,
        llm_config,
        dataset: DatasetType,
    ) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.custom = operator.Custom(self.llm)

    async def __call__(self, problem: str):
        """
        Implementation of the workflow
        """
        solution = await self.custom(input=problem, instruction="")
        return solution['response'], self.llm.get_usage_summary()["total_cost"]
'''

ENSEMBLE = HEADER.format(dataset="GSM8K", round=5) + '''
class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.llm.cost_manager = CostManager()
        self.custom = operator.Custom(self.llm)
        self.sc_ensemble = operator.ScEnsemble(self.llm)

    async def __call__(self, problem: str):
        solutions = []
        for _ in range(3):
            solution = await self.custom(input=problem, instruction=prompt_custom.SOLVE_PROMPT)
            solutions.append(solution['response'])
        final = await self.sc_ensemble(solutions=solutions, problem=problem)
        return final['response'], self.llm.cost_manager.total_cost
'''

REVIEWED = HEADER.format(dataset="HotpotQA", round=3) + '''
class Workflow:
    def __init__(self, name: str, llm_config, dataset: DatasetType) -> None:
        self.name = name
        self.dataset = dataset
        self.llm = create_llm_instance(llm_config)
        self.answer_generate = operator.AnswerGenerate(self.llm)
        self.review = operator.Review(self.llm)
        self.revise = operator.Revise(self.llm)

    async def __call__(self, problem: str):
        draft = await self.answer_generate(input=prompt_custom.CONTEXT_PROMPT + problem)
        review = await self.review(problem=problem, solution=draft['answer'])
        if review['review_result']:
            return draft['answer'], self.llm.get_usage_summary()["total_cost"]
        revised = await self.revise(problem=problem, solution=draft['answer'], feedback=review['feedback'])
        return revised['solution'], self.llm.get_usage_summary()["total_cost"]
'''

PROMPTS = '''SOLVE_PROMPT = """Solve the problem step by step. End with 'Answer: <number>'."""

CONTEXT_PROMPT = """Answer the question in a few words.
"""
'''


def _write(folder, graph: str):
    folder.mkdir(parents=True)
    (folder / "graph.py").write_text(graph)
    (folder / "prompt.py").write_text(PROMPTS)
    return folder


@pytest.mark.parametrize("graph, domain", [(CUSTOM, "math"), (ENSEMBLE, "math"), (REVIEWED, "qa")],
                         ids=["custom", "sc_ensemble", "review_revise"])
def test_aflow_workflow_files_validate_as_clean(tmp_path, graph, domain):
    code, prompts = load_aflow_workflow(_write(tmp_path / "round_1", graph))
    assert prompts["SOLVE_PROMPT"].startswith("Solve the problem") and prompts["CONTEXT_PROMPT"].endswith("words.\n")
    result = validate_workflow(code, domain, prompts)
    assert result.valid and not result.repaired and not result.fallback and result.dialect == "aflow", result.errors
    assert "self." not in result.code.replace("self,", "").replace("(self)", "")  # operators and prompts are bound
    assert "UsageSummary()" in result.code


def test_aflow_workflows_run_and_report_the_executors_real_usage_as_their_cost(tmp_path):
    backend = ScriptedBackend({"Is the solution correct": "It names the capital. Verdict: correct",
                               "Solve the problem": "6 times 7 is 42. Answer: 42", "few words": "Answer: Paris"},
                              default="Answer: 42")
    runner = WorkflowRunner(Executor(backend, cost_per_million_tokens=2.0))  # $2 per million tokens
    graphs = [load_aflow_workflow(_write(tmp_path / name, graph)) for name, graph in
              (("custom", CUSTOM), ("ensemble", ENSEMBLE), ("reviewed", REVIEWED))]
    problems = [Problem("What is 6 times 7?", "math"), Problem("What is 6 times 7?", "math"),
                Problem("What is the capital of France?", "qa")]
    outcomes = [runner.run([code], [problem], prompts)[0] for (code, prompts), problem in zip(graphs, problems)]
    for outcome in outcomes:
        assert outcome.kind == "clean" and outcome.credited, outcome.runtime_error
        assert outcome.tokens > 0 and outcome.cost == pytest.approx(outcome.tokens * 2.0 / 1e6)  # what the executor used
    assert "Answer: 42" in outcomes[0].answer  # Custom's response, as the workflow returns it
    assert outcomes[1].calls == 3 and "42" in outcomes[1].answer  # three solutions; ScEnsemble votes among them
    assert outcomes[2].answer == "Paris" and outcomes[2].calls == 2  # the review passed it: no revision
    # the prompt file's text reached the executor, as AFlow's prompt_custom.SOLVE_PROMPT
    assert any("Solve the problem step by step" in message for request in backend.seen for _, message in request.messages)


def test_code_outside_aflows_form_is_not_taken_for_it(tmp_path):
    # an __init__ that does more than AFlow's (here: reads a file) is the ordinary path: repaired, not clean
    odd = CUSTOM.replace("        self.custom = operator.Custom(self.llm)\n",
                         "        self.custom = operator.Custom(self.llm)\n        self.notes = open('notes.txt').read()\n")
    result = validate_workflow(odd, "math")
    assert result.dialect == "palaestra" and not result.valid
    # a prompt the prompt file does not define falls to the ordinary checks too
    missing = CUSTOM.replace('instruction=""', "instruction=prompt_custom.NOWHERE")
    assert validate_workflow(missing, "math", {}).dialect == "palaestra"
    # without the cost or the name, a workflow in palaestra's own form is unaffected
    assert validate_workflow("class Workflow:\n    async def __call__(self, problem):\n"
                             "        return (await AnswerGenerate(input=problem))['answer']\n", "math").valid
    with pytest.raises(FileNotFoundError, match="no AFlow workflow"):
        load_aflow_workflow(tmp_path)
    assert read_prompts(_write(tmp_path / "p", CUSTOM) / "prompt.py") == {
        "SOLVE_PROMPT": "Solve the problem step by step. End with 'Answer: <number>'.",
        "CONTEXT_PROMPT": "Answer the question in a few words.\n"}
