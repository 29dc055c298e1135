"""Extractive question answering: a passage and a question whose answer is a span of the passage.

The shipped set (``datasets/qa/python_docs``) is real text: paragraphs of the Python Language
Reference as the standard library carries them (``pydoc_data.topics``, the text behind
``help("topic")``), with questions written by hand from that text (:data:`QUESTIONS`); every gold
answer is a span of its passage. It is rebuilt from the standard library when palaestra runs from
an install without the ``datasets/`` folder. Any SQuAD-format JSONL (``context``, ``question``,
``answers`` as a list of strings or SQuAD's ``{"text": [...]}``) can be used instead. Closed-book
(``task.show_passage=false``, ``task=docs_qa``) asks the question alone: the model answers from memory or
by searching (``palaestra.retrieval.docs_index``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from palaestra.config.errors import ConfigError
from palaestra.data.jsonl import read_jsonl, write_jsonl
from palaestra.tasks.base import Example, Task, split_examples

__all__ = ["QUESTIONS", "build_qa_task", "load_qa", "write_python_docs_qa"]

log = logging.getLogger(__name__)

QUESTIONS: tuple[tuple[str, str, str], ...] = (
    ("assert", "What is the built-in variable __debug__ under normal circumstances?", "True"),
    ("assert", "Which command line option requests optimization?", "-O"),
    ("continue", "What does continue continue with?", "the next cycle of the nearest enclosing loop"),
    ("del", "Which exception is raised when deleting an unbound name?", "NameError"),
    ("for", "How many times is the starred_list expression evaluated?", "once"),
    ("for", "What kind of object should the starred_list expression yield?", "iterable"),
    ("global", "For how much code does the global statement's declaration hold?", "the entire current code block"),
    ("if", "How many of the suites does the if statement select?", "exactly one"),
    ("lambda", "What kind of functions do lambda expressions create?", "anonymous functions"),
    ("lambda", "What are lambda expressions sometimes called?", "lambda forms"),
    ("nonlocal", "Which scope does nonlocal exclude when looking for previously bound variables?", "globals"),
    ("pass", "What kind of operation is pass?", "a null operation"),
    ("raise", "What is the exception that is currently being handled called?", "active exception"),
    ("raise", "Which exception does a bare raise give when there is no active exception?", "RuntimeError"),
    ("return", "Which exception is raised when a generator function returns?", "StopIteration"),
    ("with", "What defines the methods that the with statement wraps a block with?", "a context manager"),
    ("booleans", "Which method lets user-defined objects customize their truth value?", "__bool__()"),
    ("imaginary", "What is the real part of the complex number an imaginary literal yields?", "0.0"),
    ("imaginary", "How are complex numbers represented?", "as a pair of floating point numbers"),
    ("slicings", "What does a slicing select in a sequence object?", "a range of items"),
    ("class", "What kind of statement is a class definition?", "an executable statement"),
    ("class", "Which base class do classes without an inheritance list inherit from by default?", "object"),
    ("lists", "In which order are the elements of a comma-separated list display evaluated?", "from left to right"),
    ("in", "Which operators test for membership?", '"in" and "not in"'),
    ("in", "For a dictionary, what does the in operator test?", "whether the dictionary has a given key"),
    ("comparisons", "Unlike which language do all of Python's comparison operations have the same priority?", "C"),
    ("power", "What does -1**2 result in?", "-1"),
    ("power", "In which direction are power and unary operators evaluated in an unparenthesized sequence?",
     "from right to left"),
    ("unary", "How is the bitwise inversion of x defined?", "-(x+1)"),
    ("unary", "Which special method can custom objects override to support the ~ operator?", "__invert__()"),
    ("shifting", "What type of arguments do the shifting operators accept?", "integers"),
    ("bitwise", "What does the & operator yield?", "the bitwise AND of its arguments"),
    ("exceptions", "What are exceptions a means of breaking out of?", "the normal flow of control of a code block"),
    ("naming", "Which names does from ... import * not bind?", "those beginning with an underscore"),
    ("naming", "At which level may the from ... import * form be used?", "the module level"),
    ("yield", "What is a yield statement semantically equivalent to?", "a yield expression"),
    ("truth", "Which method returning zero makes an object false by default?", "__len__()"),
    ("exceptions", "Where is an exception raised?", "at the point where the error is detected"),
)
"""(pydoc topic, question, answer): each answer is a span of the first prose paragraph of the topic that holds it."""


def _passage(topic: str, answer: str) -> str | None:
    """The first prose paragraph (no grammar rules) of a pydoc topic that contains ``answer``."""
    import pydoc_data.topics

    for paragraph in pydoc_data.topics.topics.get(topic, "").split("\n\n"):
        text = " ".join(paragraph.split())
        if len(text.split()) > 20 and "::=" not in text and answer in text:
            return text
    return None


def write_python_docs_qa(folder: Path) -> Path:
    """Write ``folder/questions.jsonl`` from :data:`QUESTIONS` and the standard library's pydoc topics."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, (topic, question, answer) in enumerate(QUESTIONS):
        passage = _passage(topic, answer)
        if passage is None:  # another Python version worded the paragraph differently
            log.warning("qa: no passage of topic %r holds %r; question skipped", topic, answer)
            continue
        rows.append({"id": f"pydoc-{number:02d}-{topic}", "title": topic, "context": passage, "question": question,
                     "answers": [answer]})
    return write_jsonl(folder / "questions.jsonl", rows)  # atomically: a reader never sees half the set


def load_qa(path: str | Path, show_passage: bool = True) -> list[Example]:
    """Examples from a SQuAD-format JSONL file: the question shows the passage (``show_passage``; else it is
    the question alone, closed-book), the answer is the first span.

    ``meta["answers"]`` keeps every accepted span and ``meta["passage"]`` the passage. A bad line is a
    one-line ConfigError naming the file and line.
    """
    examples = []
    for where, record in read_jsonl(path, "QA"):
        answers = record.get("answers")
        answers = answers.get("text") if isinstance(answers, dict) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"{where}: 'answers' needs at least one answer string (a list, or SQuAD's {{\"text\": [...]}})")
        if not isinstance(record.get("context"), str) or not isinstance(record.get("question"), str):
            raise ConfigError(f"{where}: a QA line needs 'context' and 'question' strings")
        question = record["question"]
        if show_passage:
            question = f"Passage: {record['context']}\n\nQuestion: {question}"
        examples.append(Example(question=question, answer=answers[0],
                                meta={"answers": list(answers), "passage": record["context"]}))
    return examples


def build_qa_task(path: str | None, *, train_size: int | None, test_size: int, seed: int, instruction: str,
                  system_prompt: str | None, name: str = "qa", show_passage: bool = True) -> Task:
    """The shipped Python-docs set (``path`` None) or a SQuAD-format JSONL, split train/test by a seeded shuffle;
    ``show_passage`` False asks each question without its passage (closed-book: answered by searching).

    Correct means the answer matches a gold span after normalisation (QA tier 1.0).
    """
    if path is None:
        from palaestra.data.shipped import shipped_dataset

        path = shipped_dataset("qa/python_docs", write_python_docs_qa) / "questions.jsonl"
    if not Path(path).is_file():
        raise FileNotFoundError(f"path={path} does not exist; point it at a SQuAD-format JSONL file")
    examples = load_qa(path, show_passage)
    train, test = split_examples(examples, test_size, train_size, seed, "QA examples")
    return Task(name=name, train=train, test=test, instruction=instruction, system_prompt=system_prompt,
                dataset_version=hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12], verifier=qa_correct)


def qa_correct(completion: str, example: Example) -> bool:
    """Exact match (normalised) with any accepted span; the answer is the tagged one, else the whole text."""
    from palaestra.rewards.tiered import tiered_qa_reward

    spans = example.meta.get("answers") or [example.answer]
    return any(tiered_qa_reward([completion], [span])[0] >= 1.0 for span in spans)
