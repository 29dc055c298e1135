"""The few-shot experience buffer: workflows that earned a reward >= 0.7, shown in later prompts.

Bounded per domain (``capacity`` entries each); when full, a new entry replaces the weakest one
(lowest reward, then oldest), and a workflow already in the buffer only refreshes its entry. Only
training problems may enter (the task decides; held-out problems never leak into prompts). The
whole buffer is a plain dict (:meth:`state_dict`) saved in every checkpoint, so a resumed run shows
the same examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Experience", "ExperienceBuffer"]


@dataclass
class Experience:
    """One good workflow."""

    domain: str
    question: str
    workflow: str
    """The workflow code that earned the reward."""
    reward: float
    step: int
    """When it entered (a counter of additions, so that ties in reward go to the newest)."""
    answer: str = ""
    """The answer it gave."""


class ExperienceBuffer:
    """At most ``capacity`` entries per domain with reward >= ``threshold``.

    >>> buffer = ExperienceBuffer(capacity=1)
    >>> buffer.add("math", "1+1?", "class Workflow: ...", 0.4), buffer.add("math", "2+2?", "code A", 1.0)
    (False, True)
    >>> buffer.add("math", "3+3?", "code B", 0.7), [e.workflow for e in buffer.shots("math", 2)]
    (False, ['code A'])
    """

    def __init__(self, capacity: int = 8, threshold: float = 0.7):
        self.capacity = capacity
        self.threshold = threshold
        self.entries: dict[str, list[Experience]] = {}
        self._added = 0

    def add(self, domain: str, question: str, workflow: str, reward: float, answer: str = "") -> bool:
        """Offer an entry; True when it was kept."""
        if reward < self.threshold or self.capacity <= 0:
            return False
        self._added += 1
        entries = self.entries.setdefault(domain, [])
        for entry in entries:
            if entry.workflow == workflow:  # the same workflow again: keep its best reward, newest problem
                if reward >= entry.reward:
                    entry.reward, entry.question, entry.step, entry.answer = reward, question, self._added, answer
                return True
        new = Experience(domain, question, workflow, float(reward), self._added, answer)
        if len(entries) < self.capacity:
            entries.append(new)
            return True
        weakest = min(range(len(entries)), key=lambda i: (entries[i].reward, entries[i].step))
        if (new.reward, new.step) <= (entries[weakest].reward, entries[weakest].step):
            return False
        entries[weakest] = new
        return True

    def shots(self, domain: str, k: int) -> list[Experience]:
        """The ``k`` best entries of ``domain`` (highest reward, newest first)."""
        entries = sorted(self.entries.get(domain, []), key=lambda e: (e.reward, e.step), reverse=True)
        return entries[:k]

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.entries.values())

    def state_dict(self) -> dict:
        """Everything needed to restore the buffer (plain JSON-able values)."""
        return {"capacity": self.capacity, "threshold": self.threshold, "added": self._added,
                "entries": {domain: [asdict(e) for e in entries] for domain, entries in self.entries.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._added = int(state.get("added", 0))
        self.entries = {domain: [Experience(**e) for e in entries] for domain, entries in state.get("entries", {}).items()}
        for domain, entries in self.entries.items():  # a smaller capacity now: keep the best
            self.entries[domain] = sorted(entries, key=lambda e: (e.reward, e.step), reverse=True)[: self.capacity]
