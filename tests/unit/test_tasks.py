"""Tasks: reasoning-gym splits and verifiers, the GSM8K loader, prompts and reward columns."""

import hashlib
import json

import pytest

from palaestra.tasks import (
    TASK_BUILDERS,
    Example,
    Task,
    build_gsm8k_task,
    build_reasoning_gym_task,
)
from palaestra.tasks.reasoning_gym_tasks import extract_expression

# Small parameters keep generation fast (countdown is the slow one: about 10 ms an item).
DATASETS = {
    "chain_sum": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "basic_arithmetic": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    "countdown": {"min_numbers": 3, "max_numbers": 4},
    "gsm_symbolic": {},
}


def _rg_task(dataset, seed=0, train_size=30, test_size=10, params=None):
    return build_reasoning_gym_task(
        dataset, dataset=dataset, params=DATASETS[dataset] if params is None else params,
        train_size=train_size, test_size=test_size, seed=seed,
        instruction="Put the answer in <answer></answer>.", system_prompt=None,
    )


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_reasoning_gym_sizes_no_overlap_and_reproducible(dataset):
    task = _rg_task(dataset)
    assert (len(task.train), len(task.test)) == (30, 10)
    assert not {e.question for e in task.train} & {e.question for e in task.test}
    assert task.dataset_version.startswith("reasoning_gym-")
    assert f":{dataset}:seed=0" in task.dataset_version
    again = _rg_task(dataset)
    assert again.train == task.train and again.test == task.test
    other_seed = _rg_task(dataset, seed=1)
    assert [e.question for e in other_seed.train] != [e.question for e in task.train]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_reasoning_gym_verifier(dataset):
    task = _rg_task(dataset, train_size=5, test_size=5)
    for example in task.train + task.test:
        assert task.is_correct(f"so the answer is <answer>{example.answer}</answer>", example)
        assert not task.is_correct("so the answer is <answer>123456789</answer>", example)
        assert not task.is_correct("I don't know", example)


@pytest.mark.parametrize("dataset", ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
def test_numeric_verifier_is_lenient(dataset):
    task = _rg_task(dataset, train_size=3, test_size=1)
    example = task.train[0]
    assert task.is_correct(f"Working... the result is {example.answer}.", example)  # last number
    assert task.is_correct(f"<answer>{example.answer}.0</answer>", example)  # "12.0" == "12"


def test_countdown_accepts_any_valid_expression():
    params = {"min_numbers": 3, "max_numbers": 3}
    task = _rg_task("countdown", train_size=3, test_size=1, params=params)
    example = task.train[0]
    entry = example.meta["entry"]["metadata"]
    a, b, c = entry["numbers"]
    # The reference expression, written on the last line with "= target" appended.
    assert task.is_correct(f"Let me see.\n{example.answer} = {entry['target']}", example)
    # Just the target number is not an expression using the numbers.
    assert not task.is_correct(f"<answer>{entry['target']}</answer>", example)
    # Using the numbers but missing the target.
    assert not task.is_correct(f"<answer>{a} + {b} + {c} + 1000</answer>", example)


def test_extract_expression():
    assert extract_expression("<answer>(3 + 5) * 2</answer>") == "(3 + 5) * 2"
    assert extract_expression("So: 16 = (3 + 5) * 2") == "(3 + 5) * 2"
    assert extract_expression("Answer: 6 × 7") == "6 * 7"
    assert extract_expression("") is None


def test_reasoning_gym_test_split_is_topped_up_after_dropping_duplicates():
    # 2 one-digit terms: at most 10 * 10 * 2 = 200 distinct questions; 150 train items cover many,
    # so many test candidates are dropped and replaced.
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = _rg_task("chain_sum", train_size=150, test_size=20, params=params)
    test_questions = [e.question for e in task.test]
    assert len(test_questions) == 20 == len(set(test_questions))
    assert not set(test_questions) & {e.question for e in task.train}


def test_reasoning_gym_rejects_seed_in_params():
    with pytest.raises(ValueError, match="seed"):
        _rg_task("chain_sum", params={"seed": 3})


def test_prompt_and_columns():
    task = _rg_task("chain_sum", train_size=2, test_size=1)
    messages = task.prompt(task.train[0])
    user = task.train[0].question + "\n\nPut the answer in <answer></answer>."
    assert messages == [{"role": "user", "content": user}]
    task.system_prompt = "Be brief."
    assert task.prompt(task.train[0])[0] == {"role": "system", "content": "Be brief."}
    columns = task.columns(task.train)
    assert columns["answer"] == [e.answer for e in task.train]
    assert columns["entry"][0]["metadata"]["source_dataset"] == "chain_sum"


def test_columns_fill_missing_meta_keys():
    task = Task("t", [], [], instruction="", system_prompt=None, dataset_version="v")
    columns = task.columns([Example("q1", "1", {"pass_rate": 0.5}), Example("q2", "2")])
    assert columns == {"answer": ["1", "2"], "pass_rate": [0.5, None],
                       "prompt": [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]}
    assert task.prompt(Example("q", "1")) == [{"role": "user", "content": "q"}]  # no instruction


def test_task_builders_table():
    assert TASK_BUILDERS == {"reasoning_gym": build_reasoning_gym_task, "gsm8k": build_gsm8k_task}


# --- GSM8K ---------------------------------------------------------------------------------------

def _write_gsm8k(path, n, start=0):
    with path.open("w") as handle:
        for i in range(start, start + n):
            gold = f"{i},234" if i % 2 else str(i)  # odd lines have a thousands comma
            handle.write(json.dumps({"question": f"Question {i}?",
                                     "answer": f"Work {i}.\n#### {gold}"}) + "\n")
    return path


def _gsm8k(path, **overrides):
    kwargs = dict(train_size=None, test_size=4, seed=0, instruction="", system_prompt=None)
    return build_gsm8k_task(path, **{**kwargs, **overrides})


def test_gsm8k_gold_answers(tmp_path):
    path = _write_gsm8k(tmp_path / "gsm8k.jsonl", 20)
    task = _gsm8k(path)
    golds = {e.question: e.answer for e in task.train + task.test}
    assert golds["Question 2?"] == "2" and golds["Question 1?"] == "1234"  # "1,234" -> "1234"
    example = next(e for e in task.train + task.test if e.question == "Question 3?")
    assert example.meta["solution"] == "Work 3.\n#### 3,234"
    assert task.is_correct("<answer>3,234</answer>", example)
    assert task.is_correct("So the total is 3234.", example)
    assert not task.is_correct("<answer>3233</answer>", example)


def test_gsm8k_split_no_overlap_and_deterministic(tmp_path):
    path = _write_gsm8k(tmp_path / "gsm8k.jsonl", 20)
    task = _gsm8k(path, train_size=10)
    assert (len(task.train), len(task.test)) == (10, 4)
    assert not {e.question for e in task.train} & {e.question for e in task.test}
    assert _gsm8k(path, train_size=10).train == task.train
    # The test split is taken first, so it does not depend on train_size.
    assert _gsm8k(path, train_size=3).test == task.test
    assert _gsm8k(path, seed=1).test != task.test
    # dataset_version is the file's sha256, first 12 hex characters.
    assert task.dataset_version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_gsm8k_separate_test_file(tmp_path):
    train_path = _write_gsm8k(tmp_path / "train.jsonl", 10)
    test_path = _write_gsm8k(tmp_path / "test.jsonl", 6, start=8)  # questions 8, 9 repeat
    task = _gsm8k(train_path, test_path=test_path, test_size=5)
    assert [e.question for e in task.test] == [f"Question {i}?" for i in range(8, 13)]
    assert len(task.train) == 8  # 10 minus the two questions that are also in the test file
    assert not {e.question for e in task.train} & {e.question for e in task.test}


def test_gsm8k_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as error:
        _gsm8k(missing)
    message = str(error.value)
    assert "\n" not in message and f"task.path={missing}" in message and "GSM8K" in message
    with pytest.raises(FileNotFoundError, match="task.test_path="):
        _gsm8k(_write_gsm8k(tmp_path / "ok.jsonl", 5), test_path=missing)


@pytest.mark.parametrize("bad_line", [
    "{not json",
    json.dumps({"question": "q", "answer": "no marker"}),
    json.dumps({"question": "q"}),
    json.dumps(["a", "list"]),
])
def test_gsm8k_malformed_line(tmp_path, bad_line):
    path = _write_gsm8k(tmp_path / "gsm8k.jsonl", 3)
    with path.open("a") as handle:
        handle.write("\n" + bad_line + "\n")  # a blank line 4 is skipped; the bad one is line 5
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl:5"):
        _gsm8k(path)


# --- QA: open-book (the passage in the question) and closed-book (the question alone) --------------

def _write_qa(path, rows=3):
    path.write_text("".join(json.dumps({"context": f"Passage {i} says the answer is word{i}.", "question": f"Q{i}?",
                                        "answers": [f"word{i}", f"the word{i}"]}) + "\n" for i in range(rows)))
    return path


def test_qa_closed_book_asks_the_question_alone_and_keeps_passage_and_spans(tmp_path):
    from palaestra.tasks.qa import load_qa

    path = _write_qa(tmp_path / "qa.jsonl")
    open_book, closed_book = load_qa(path), load_qa(path, show_passage=False)
    assert open_book[1].question == "Passage: Passage 1 says the answer is word1.\n\nQuestion: Q1?"
    assert closed_book[1].question == "Q1?"
    for example in (open_book[1], closed_book[1]):
        assert example.answer == "word1"
        assert example.meta == {"answers": ["word1", "the word1"], "passage": "Passage 1 says the answer is word1."}


def test_docs_qa_config_builds_the_closed_book_python_docs_task():
    from palaestra.jobs import compose_jobs, to_config
    from palaestra.tasks.build import build_task

    (_, cfg), = compose_jobs(["task=docs_qa"])
    config = to_config(cfg).task
    assert (config.source, config.show_passage) == ("qa", False)
    assert (config.rewards, config.format_reward) == (["qa_f1"], "answer_format")
    task = build_task(config)
    assert (len(task.train), len(task.test)) == (26, 12)  # the 38 shipped questions
    example = task.test[0]
    assert "Passage:" not in example.question and example.question.endswith("?")
    assert example.answer in example.meta["passage"]  # the passage travels as a column (for a search tool's check)
    assert task.columns([example])["passage"] == [example.meta["passage"]]


def test_large_sum_config_asks_for_two_five_digit_terms():
    import re

    from palaestra.jobs import compose_jobs, to_config
    from palaestra.tasks.build import build_task

    (_, cfg), = compose_jobs(["task=large_sum", "task.train_size=5", "task.test_size=5"])
    config = to_config(cfg).task
    assert (config.rewards, config.format_reward) == (["correctness"], "answer_format")
    for example in build_task(config).test:
        terms = re.findall(r"\d+", example.question)
        assert len(terms) == 2 and all(len(term) == 5 for term in terms), example.question
