"""Plan-Path: walk from S to G on a grid with walls, with the reference's shaped reward.

The grid (reference: 10x10, 22% walls; conf/env/plan_path.yaml: 4x4, 10%) is drawn from the seed
until the goal is reachable from the start (BFS). Each move of an action list such as
``['R', 'D']`` earns, as in the reference:

    r = (-0.01 if the move is valid else -0.10, and an invalid move stays put)
        + shaping_coef * (gamma * phi(s') - phi(s))      phi = -Manhattan distance to the goal
        + 1.0 on reaching the goal (+0.5 more if the moves so far equal the BFS optimum)
        - 1.0 if the move budget ``max_moves`` runs out first (10000: effectively never)

The step's reward is the sum over the list's moves; moves after reaching the goal are ignored.
Unknown move strings count as invalid moves; a list with non-strings is malformed (penalty).
"""

from __future__ import annotations

import random
import re
from collections import deque

from palaestra.envs.base import ToolPlanEnv, _short

__all__ = ["MoveGameEnv", "PlanPathEnv", "read_moves"]

MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
_WORDS = {"UP": "U", "DOWN": "D", "LEFT": "L", "RIGHT": "R"}
_MOVE_TOKEN = re.compile(r"\b(up|down|left|right|[UDLR])\b", flags=re.IGNORECASE)


def read_moves(text: str, limit: int = 40) -> list[str]:
    """Moves named in free text, in order: direction words, or single U/D/L/R letters.

    >>> read_moves("Move right twice, then go down: R, R, D")
    ['R', 'D', 'R', 'R', 'D']
    >>> read_moves("I think the answer is 42")
    []
    """
    moves = []
    for match in _MOVE_TOKEN.finditer(text or ""):
        token = match.group(1)
        if len(token) == 1 and token != token.upper():  # a lone lowercase letter is a word, not a move
            continue
        moves.append(_WORDS.get(token.upper(), token.upper()))
    return moves[:limit]


class MoveGameEnv(ToolPlanEnv):
    """A grid game played with U/D/L/R moves on a board of side ``self.size`` (plan_path, sokoban)."""

    size: int

    def _lenient_actions(self, text: str) -> list | None:
        """Moves named in free text: direction words or U/D/L/R letters, in order (at most 4 x size)."""
        return read_moves(text, limit=4 * self.size) or super()._lenient_actions(text)

    def _format_actions(self, actions) -> str:
        if actions and all(isinstance(a, str) and len(a) == 1 for a in actions):
            return "moves " + _short("".join(actions), 30)  # 'RRD' costs a few tokens, a list many
        return super()._format_actions(actions)

    @property
    def _game_over(self) -> bool:
        return self._out_of_moves

    def _end_reward(self, won: bool, win_reward: float) -> float:
        """What the move just counted earns at the game's end: win_reward once won, r_fail (and the game over)
        when it spent the move budget, else nothing."""
        if won:
            return win_reward
        if self.moves >= self.max_moves:
            self._out_of_moves = True
            return self.r_fail
        return 0.0

    def _apply(self, actions: list) -> tuple[float, dict] | None:
        played = self._play_moves(actions, self._move)
        if played is None:
            return None
        total, applied = played
        return total, {"moves_applied": applied, **self._position()}

    def _move(self, move: str) -> float:
        """One move; returns its reward."""
        raise NotImplementedError

    def _position(self) -> dict:
        """The state after a turn's moves, for the turn's info."""
        raise NotImplementedError


class PlanPathEnv(MoveGameEnv):
    """Grid path planning with the tool + plan protocol.

    Args:
        size: grid side (rows = cols); the reference uses 10.
        wall_ratio: chance that a cell is a wall (reference 0.22).
        r_step, r_invalid, r_goal, r_optimal, r_fail: the reference reward terms.
        gamma, shaping_coef: potential shaping ``shaping_coef * (gamma * phi(s') - phi(s))``.
        max_moves: move budget over the whole episode (reference 10000).
        **protocol: ``ToolPlanEnv`` arguments (max_turns, turn_order, invalid_action_penalty, ...).
    """

    name = "plan_path"
    action_example = "['R', 'D']"

    def __init__(
        self,
        size: int = 5,
        *,
        wall_ratio: float = 0.22,
        r_step: float = -0.01,
        r_invalid: float = -0.10,
        r_goal: float = 1.0,
        r_optimal: float = 0.5,
        r_fail: float = -1.0,
        gamma: float = 0.99,
        shaping_coef: float = 1.0,
        max_moves: int = 10_000,
        **protocol,
    ):
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        self.size, self.wall_ratio = size, wall_ratio
        self.r_step, self.r_invalid, self.r_goal = r_step, r_invalid, r_goal
        self.r_optimal, self.r_fail = r_optimal, r_fail
        self.gamma, self.shaping_coef, self.max_moves = gamma, shaping_coef, max_moves
        super().__init__(**protocol)

    @classmethod
    def from_layout(cls, rows: list[str], **kwargs) -> PlanPathEnv:
        """An environment on a fixed grid: ``'.'`` free, ``'#'`` wall, ``'S'`` start, ``'G'`` goal."""
        env = cls(size=max(len(rows), 2), **kwargs)
        cells = {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}
        start = next(p for p, ch in cells.items() if ch == "S")
        goal = next(p for p, ch in cells.items() if ch == "G")
        env._set_puzzle([row.replace("S", ".").replace("G", ".") for row in rows], start, goal)
        env._ready = True
        env._start_episode()
        return env

    # -- puzzle --------------------------------------------------------------------------------

    def _generate(self, rng: random.Random) -> None:
        n = self.size
        for _ in range(2000):
            grid = ["".join("#" if rng.random() < self.wall_ratio else "." for _ in range(n)) for _ in range(n)]
            free = [(r, c) for r in range(n) for c in range(n) if grid[r][c] == "."]
            if len(free) < 2:
                continue
            start, goal = rng.sample(free, 2)
            if _bfs(grid, start, goal) is not None:
                self._set_puzzle(grid, start, goal)
                return
        self._set_puzzle(["." * n] * n, (0, 0), (n - 1, n - 1))  # practically unreachable

    def _set_puzzle(self, grid: list[str], start: tuple[int, int], goal: tuple[int, int]) -> None:
        self.grid, self.start, self.goal = list(grid), tuple(start), tuple(goal)
        path = _bfs(self.grid, self.start, self.goal)
        if path is None:
            raise ValueError("the goal is not reachable from the start")
        self.optimal_length = len(path)
        self.pos = self.start
        self.moves = 0  # every attempted move, valid or not (the reference's step counter)
        self.invalid_moves = 0
        self._out_of_moves = False

    def optimal_path(self, start: tuple[int, int] | None = None) -> list[str] | None:
        """A shortest move list from ``start`` (default: the episode's start) to the goal (BFS)."""
        return _bfs(self.grid, tuple(start) if start is not None else self.start, self.goal)

    @property
    def success(self) -> bool:
        return getattr(self, "pos", None) is not None and self.pos == self.goal


    # -- dynamics ------------------------------------------------------------------------------

    def _phi(self, pos: tuple[int, int]) -> float:
        return -float(abs(pos[0] - self.goal[0]) + abs(pos[1] - self.goal[1]))

    def _move(self, move: str) -> float:
        """One move; returns its reward."""
        delta = MOVES.get(_WORDS.get(move.strip().upper(), move.strip().upper()))
        nxt = None
        if delta is not None:
            r, c = self.pos[0] + delta[0], self.pos[1] + delta[1]
            if 0 <= r < len(self.grid) and 0 <= c < len(self.grid[0]) and self.grid[r][c] != "#":
                nxt = (r, c)
        reward = self.r_step if nxt is not None else self.r_invalid
        if nxt is None:
            self.invalid_moves += 1
        new = nxt if nxt is not None else self.pos
        reward += self.shaping_coef * (self.gamma * self._phi(new) - self._phi(self.pos))
        self.pos = new
        self.moves += 1
        reward += self._end_reward(self.pos == self.goal, self.r_goal)
        if self.pos == self.goal and self.moves == self.optimal_length:
            reward += self.r_optimal
        return reward

    def _position(self) -> dict:
        return {"pos": self.pos, "invalid_moves": self.invalid_moves}

    # -- text ----------------------------------------------------------------------------------

    def _render(self) -> str:
        cells = [list(row) for row in self.grid]
        cells[self.goal[0]][self.goal[1]] = "G"
        cells[self.pos[0]][self.pos[1]] = "S"  # drawn over G once the goal is reached
        board = "\n".join("".join(row) for row in cells)
        return (
            "Move S to G. S = you, G = goal, # = wall, . = free.\n"
            "Moves: U, D, L, R (up, down, left, right); blocked moves do nothing. Use few moves.\n"
            f"{board}\n"
            f"(row, col) with row 0 at the top: you {self.pos}, G {self.goal}."
        )

    def _summary(self) -> str:
        if self.success:
            return "reached G"
        return f"you at {self.pos}"


def _bfs(grid: list[str], start: tuple[int, int], goal: tuple[int, int]) -> list[str] | None:
    """Shortest move list from ``start`` to ``goal`` on ``grid`` ('#' blocks), or None."""
    rows, cols = len(grid), len(grid[0])
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cur = queue.popleft()
        if cur == goal:
            path = []
            while parent[cur] is not None:
                cur, move = parent[cur][0], parent[cur][1]
                path.append(move)
            return path[::-1]
        for move, (dr, dc) in MOVES.items():
            nxt = (cur[0] + dr, cur[1] + dc)
            if 0 <= nxt[0] < rows and 0 <= nxt[1] < cols and grid[nxt[0]][nxt[1]] != "#" and nxt not in parent:
                parent[nxt] = (cur, move)
                queue.append(nxt)
    return None
