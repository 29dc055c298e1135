"""A user environment in one small file (``env.name=tests.recipes.envs:CountingEnv``).

Two agents, a proposer then a checker, each answers once per turn; the reward is the share of
digits in the answer, so even a tiny random model's answers differ in reward (recipe tests need a
learning signal). The team succeeds when the checker's answer starts with a digit.
"""

from __future__ import annotations

import copy
import os
import time

from palaestra.envs import MultiAgentEnv, StepResult


class CountingEnv(MultiAgentEnv):
    turn_order = ("proposer", "checker")

    def __init__(self, max_turns: int = 2):
        self.max_turns = max_turns
        self.turn, self.solved, self.target = 0, False, 0

    def reset(self, seed: int) -> None:
        self.turn, self.solved, self.target = 0, False, seed % 10

    def observation(self, agent: str) -> list[dict]:
        return [{"role": "user", "content": f"{agent}: say {self.target}"}]

    def step(self, agent: str, action: str) -> StepResult:
        share = sum(ch.isdigit() for ch in action) / max(1, len(action))
        team = 0.0
        if agent == "checker":
            self.turn += 1
            self.solved = action[:1].isdigit()
            team = 1.0 if self.solved else 0.0
        return StepResult(local_reward=share, team_reward=team, done=self.done, info={"share": share})

    def copy(self) -> "CountingEnv":
        return copy.deepcopy(self)

    @property
    def success(self) -> bool:
        return self.solved

    @property
    def done(self) -> bool:
        return self.solved or self.turn >= self.max_turns


class FlakyEnv(CountingEnv):
    """CountingEnv whose checker step fails by the episode's seed: seed % 4 == 1 hangs, 2 kills its process,
    3 raises (``env.name=tests.recipes.envs:FlakyEnv``; 0 behaves)."""

    def step(self, agent: str, action: str) -> StepResult:
        if agent == "checker":
            failure = self.target % 4
            if failure == 1:
                time.sleep(3600)
            elif failure == 2:
                os._exit(3)
            elif failure == 3:
                raise ValueError("the board is broken")
        return super().step(agent, action)
