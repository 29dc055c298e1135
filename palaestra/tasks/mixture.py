"""A mixture of tasks by ratio: e.g. math 0.4, QA 0.3, code 0.3, each with its own train/test split.

``task.source=mixture`` with ``task.components`` (name -> source, ratio, ...) builds every component
as the single-source task it is (reasoning_gym, gsm8k, code, qa), then takes ``ratio / sum(ratios)``
of ``train_size`` training and of ``test_size`` held-out examples from each (at least one test
example per component). A component with fewer distinct training problems than its share repeats
them, so the mixture keeps its ratios; a warning says so.

Each example remembers its component (``meta["component"]``) and domain (``meta["domain"]``: math,
qa or code), so prompts, the verifier and :func:`domain_tier_reward` follow the component. Any GRPO
run can train on a mixture; the workflow task (:mod:`palaestra.workflows.task`) wraps one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from palaestra.tasks.base import Example, Task

__all__ = ["DOMAINS", "MixtureTask", "domain_of", "domain_tier_reward", "mix"]

log = logging.getLogger(__name__)

DOMAINS = ("math", "qa", "code")
_SOURCE_DOMAINS = {"code": "code", "qa": "qa"}


def domain_of(source: str, domain: str | None = None) -> str:
    """A component's domain: the one given, else code / qa for those sources, else math."""
    return domain or _SOURCE_DOMAINS.get(source, "math")


@dataclass
class MixtureTask(Task):
    """A :class:`Task` whose examples come from several component tasks; prompts and verdicts follow the component."""

    components: dict[str, Task] = field(default_factory=dict)
    """Component name -> its task (for its prompt format and verifier)."""

    def prompt(self, example: Example) -> list[dict]:
        return self.components[example.meta["component"]].prompt(example)

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.components[example.meta["component"]].is_correct(completion, example)


def _tag(examples: list[Example], component: str, domain: str) -> list[Example]:
    return [Example(e.question, e.answer, {**e.meta, "component": component, "domain": domain}) for e in examples]


def _share(total: int, ratios: dict[str, float], minimum: int = 0) -> dict[str, int]:
    """``total`` split by ``ratios`` (largest remainders), each at least ``minimum``.

    >>> _share(10, {"math": 0.4, "qa": 0.3, "code": 0.3})
    {'math': 4, 'qa': 3, 'code': 3}
    """
    weight = sum(ratios.values())
    exact = {name: total * ratio / weight for name, ratio in ratios.items()}
    counts = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[: total - sum(counts.values())]:
        counts[name] += 1
    return {name: max(minimum, count) for name, count in counts.items()}


def mix(name: str, components: dict[str, tuple[Task, float, str]], *, train_size: int, test_size: int,
        system_prompt: str | None) -> MixtureTask:
    """Mix built component tasks: ``components[name] = (task, ratio, domain)``.

    Training examples are laid out component by component (the trainer shuffles them); a component
    short of its share repeats its problems in order.
    """
    ratios = {key: ratio for key, (_, ratio, _) in components.items()}
    train_counts, test_counts = _share(train_size, ratios), _share(test_size, ratios, minimum=1)
    train: list[Example] = []
    test: list[Example] = []
    for key, (task, _, domain) in components.items():
        pool = _tag(task.train, key, domain)
        if not pool:
            raise ValueError(f"component {key!r} has no training examples")
        if len(pool) < train_counts[key]:
            log.warning("mixture: component %s has %d training problems for a share of %d; they repeat",
                        key, len(pool), train_counts[key])
        train += [pool[i % len(pool)] for i in range(train_counts[key])]
        if len(task.test) < test_counts[key]:
            log.warning("mixture: component %s has only %d test problems (share %d)", key, len(task.test), test_counts[key])
        test += _tag(task.test[: test_counts[key]], key, domain)
    version = ";".join(f"{key}={ratio:g}:{components[key][0].dataset_version}" for key, ratio in ratios.items())
    return MixtureTask(name=name, train=train, test=test, instruction="", system_prompt=system_prompt,
                       dataset_version=f"mixture[{version}]", components={k: c[0] for k, c in components.items()})


def domain_tier_reward(completions: list[str], answer: list[str], domain: list[str], *, sandbox_seconds: float = 5.0,
                       **columns) -> list[float]:
    """The 5-tier reward of each completion by its example's domain (math relative error, QA exact match /
    F1 against the best accepted span, code test pass rate in the sandbox, ``sandbox_seconds`` per test), then
    the penalty columns.

    >>> domain_tier_reward(["<answer>10</answer>", "<answer>Paris</answer>"], ["10", "paris"], ["math", "qa"])
    [1.0, 1.0]
    """
    from palaestra.rewards.tiered import _apply_penalties, _code_tier, _math_tier, _qa_tier
    from palaestra.tasks.code import code_pass_rate

    tiers = []
    for i, (completion, gold, kind) in enumerate(zip(completions, answer, domain, strict=True)):
        if kind == "code":
            meta = {key: columns[key][i] for key in ("tests", "asserts", "entry_point", "public") if key in columns}
            tiers.append(_code_tier(code_pass_rate(completion, meta, wall_seconds=sandbox_seconds)[0]))
        elif kind == "qa":
            spans = (columns.get("answers") or [None] * len(completions))[i] or [gold]
            tiers.append(max(_qa_tier(completion, span) for span in spans))
        else:
            tiers.append(_math_tier(completion, gold))
    return _apply_penalties(tiers, columns)
