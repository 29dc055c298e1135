"""Sokoban: push the box onto the goal, with the reference's reward and a reverse-play generator.

Generation (solvable by construction): carve a room by a random walk inside the border walls,
put the box on its goal and the player on another floor cell, then play *backwards* (the player
walks and may pull the box) with a breadth-first search over the reachable states; one state with
every box off its goal (at least ``min_box_distance`` away, as in the reference) is the puzzle.
The reversed, direction-flipped pull path is a solution (``reverse_play_solution``); ``solve()``
finds a shortest one.

Each move of an action list such as ``['U', 'L']`` earns, as in the reference:

    r = (-0.01 if the move is valid else -0.05, and an invalid move stays put)
        + 1.0 when it pushes a box onto a goal, -0.5 when it pushes one off a goal
        + 0.1 * (0.99 * phi(boxes') - phi(boxes))    phi = -sum over boxes of the distance to the nearest goal
        + 10.0 when every box is on a goal (win)
        - 5.0 when the move budget ``max_moves`` (reference 200) runs out first

The step's reward is the sum over the list's moves; moves after the win are ignored.
"""

from __future__ import annotations

import random
from collections import deque

from palaestra.envs.plan_path import MOVES, _WORDS, MoveGameEnv

__all__ = ["SokobanEnv"]

_FLIP = {"U": "D", "D": "U", "L": "R", "R": "L"}
# Shapes stamped around the random walk's position when carving the room.
_STAMPS = (((0, 0),), ((0, -1), (0, 0), (0, 1)), ((-1, 0), (0, 0), (1, 0)),
           ((0, 0), (0, 1), (1, 0), (1, 1)), ((0, -1), (0, 0), (1, 0)))

Cell = tuple[int, int]


class SokobanEnv(MoveGameEnv):
    """Sokoban with the tool + plan protocol.

    Args:
        size: room side including the border walls (reference 6).
        num_boxes: boxes (and goals); the reference uses 1.
        walk_steps: length of the random walk that carves the floor (default 1.5 x interior cells).
        min_box_distance: the boxes start at least this far (summed Manhattan) from the goals.
        r_step, r_invalid, r_box_on_goal, r_box_off_goal, r_win, r_fail: reference reward terms.
        gamma, shaping_coef: potential shaping on the box-to-goal distance.
        max_moves: move budget over the whole episode (reference 200).
        **protocol: ``ToolPlanEnv`` arguments (max_turns, turn_order, invalid_action_penalty, ...).
    """

    name = "sokoban"
    action_example = "['U', 'L']"

    def __init__(
        self,
        size: int = 6,
        *,
        num_boxes: int = 1,
        walk_steps: int | None = None,
        min_box_distance: int = 2,
        r_step: float = -0.01,
        r_invalid: float = -0.05,
        r_box_on_goal: float = 1.0,
        r_box_off_goal: float = -0.5,
        r_win: float = 10.0,
        r_fail: float = -5.0,
        gamma: float = 0.99,
        shaping_coef: float = 0.1,
        max_moves: int = 200,
        **protocol,
    ):
        if size < 4:
            raise ValueError(f"size must be >= 4 (border walls + a 2x2 floor), got {size}")
        self.size, self.num_boxes, self.min_box_distance = size, num_boxes, min_box_distance
        self.walk_steps = walk_steps if walk_steps is not None else (3 * (size - 2) ** 2) // 2
        self.r_step, self.r_invalid = r_step, r_invalid
        self.r_box_on_goal, self.r_box_off_goal = r_box_on_goal, r_box_off_goal
        self.r_win, self.r_fail = r_win, r_fail
        self.gamma, self.shaping_coef, self.max_moves = gamma, shaping_coef, max_moves
        self.reverse_play_solution: list[str] | None = None
        """Moves that solve the generated puzzle: the reverse play undone (None for a fixed layout)."""
        super().__init__(**protocol)

    @classmethod
    def from_layout(cls, rows: list[str], **kwargs) -> SokobanEnv:
        """A fixed room: ``#`` wall, ``_`` or space floor, ``.`` goal, ``$`` box, ``@`` player,
        ``*`` box on goal, ``+`` player on goal."""
        env = cls(size=max(len(rows), 4), **kwargs)
        cells = {(r, c): ch for r, row in enumerate(rows) for c, ch in enumerate(row)}
        floor = {p for p, ch in cells.items() if ch != "#"}
        goals = {p for p, ch in cells.items() if ch in ".*+"}
        boxes = {p for p, ch in cells.items() if ch in "$*"}
        player = next(p for p, ch in cells.items() if ch in "@+")
        env.num_boxes = len(boxes)
        env._set_puzzle(len(rows), max(len(row) for row in rows), floor, goals, boxes, player)
        env._ready = True
        env._start_episode()
        return env

    # -- puzzle --------------------------------------------------------------------------------

    def _generate(self, rng: random.Random) -> None:
        n, found, fallback = self.size, None, None
        for _ in range(100):
            floor = _carve(rng, n, self.walk_steps)
            if len(floor) < 2 * self.num_boxes + 1:
                continue
            cells = sorted(floor)
            rng.shuffle(cells)
            goals, player = set(cells[:self.num_boxes]), cells[self.num_boxes]
            parent = _reverse_search(floor, frozenset(goals), player)
            states = [s for s in parent if not (s[1] & goals)]  # every box off its goal
            far = [s for s in states if _distance(s[1], goals) >= self.min_box_distance]
            if far:
                found = (floor, goals, parent, far)
                break
            if states and fallback is None:
                fallback = (floor, goals, parent, states)
        found = found or fallback  # no room had a box far enough: take a nearer one
        if found is None:
            raise RuntimeError(f"could not generate a {n}x{n} Sokoban room with {self.num_boxes} boxes")
        floor, goals, parent, chosen = found
        state = rng.choice(sorted(chosen, key=lambda s: (s[0], sorted(s[1]))))
        self._set_puzzle(n, n, floor, goals, set(state[1]), state[0])
        # Undo the reverse play: its moves backwards, each direction flipped, solve the puzzle
        # (cut where the boxes first reach the goals; the rest only walks the player back).
        solution = []
        while parent[state] is not None and not state[1] <= goals:
            state, move = parent[state]
            solution.append(_FLIP[move])
        self.reverse_play_solution = solution

    def _set_puzzle(self, height, width, floor, goals, boxes, player) -> None:
        self.height, self.width = height, width
        self.floor, self.goals = frozenset(floor), frozenset(goals)
        self.boxes: set[Cell] = set(boxes)
        self.player: Cell = tuple(player)
        self.moves = 0
        self.invalid_moves = 0
        self._out_of_moves = False

    def solve(self, max_states: int = 200_000) -> list[str] | None:
        """A shortest move list from the current state to a win (BFS), or None."""
        start = (self.player, frozenset(self.boxes))
        parent: dict = {start: None}
        queue = deque([start])
        while queue and len(parent) < max_states:
            state = queue.popleft()
            player, boxes = state
            if boxes <= self.goals:
                path = []
                while parent[state] is not None:
                    state, move = parent[state]
                    path.append(move)
                return path[::-1]
            for move, (dr, dc) in MOVES.items():
                nxt = (player[0] + dr, player[1] + dc)
                if nxt not in self.floor:
                    continue
                new_boxes = boxes
                if nxt in boxes:
                    behind = (nxt[0] + dr, nxt[1] + dc)
                    if behind not in self.floor or behind in boxes:
                        continue
                    new_boxes = (boxes - {nxt}) | {behind}
                if (nxt, new_boxes) not in parent:
                    parent[(nxt, new_boxes)] = (state, move)
                    queue.append((nxt, new_boxes))
        return None

    @property
    def success(self) -> bool:
        return bool(getattr(self, "boxes", None)) and self.boxes <= self.goals

    # -- dynamics ------------------------------------------------------------------------------

    def _phi(self) -> float:
        return -float(_distance(self.boxes, self.goals))

    def _move(self, move: str) -> float:
        """One move; returns its reward."""
        key = move.strip().upper()
        delta = MOVES.get(_WORDS.get(key, key))
        valid, change, phi_before = False, 0, self._phi()
        if delta is not None:
            nxt = (self.player[0] + delta[0], self.player[1] + delta[1])
            if nxt in self.floor and nxt not in self.boxes:
                valid = True
            elif nxt in self.boxes:
                behind = (nxt[0] + delta[0], nxt[1] + delta[1])
                if behind in self.floor and behind not in self.boxes:
                    valid = True
                    self.boxes.remove(nxt)
                    self.boxes.add(behind)
                    change = (behind in self.goals) - (nxt in self.goals)
            if valid:
                self.player = nxt
        reward = self.r_step if valid else self.r_invalid
        if not valid:
            self.invalid_moves += 1
        if change > 0:
            reward += self.r_box_on_goal
        elif change < 0:
            reward += self.r_box_off_goal
        reward += self.shaping_coef * (self.gamma * self._phi() - phi_before)
        self.moves += 1
        return reward + self._end_reward(self.success, self.r_win)

    def _position(self) -> dict:
        return {"boxes_on_goals": len(self.boxes & self.goals), "invalid_moves": self.invalid_moves}

    # -- text ----------------------------------------------------------------------------------

    def _board(self) -> str:
        rows = []
        for r in range(self.height):
            row = ""
            for c in range(self.width):
                p = (r, c)
                if p not in self.floor:
                    row += "#"
                elif p == self.player:
                    row += "+" if p in self.goals else "@"
                elif p in self.boxes:
                    row += "*" if p in self.goals else "$"
                else:
                    row += "." if p in self.goals else "_"
            rows.append(row)
        return "\n".join(rows)

    def _render(self) -> str:
        where = lambda cells: ", ".join(str(p) for p in sorted(cells))  # noqa: E731
        return (
            "Sokoban: push the box $ onto the goal . (# wall, _ floor, @ you, * box on goal, "
            "+ you on goal).\n"
            "Moves: U, D, L, R (up, down, left, right). Walk into a box to push it; the cell "
            "behind it must be free. You cannot pull.\n"
            f"{self._board()}\n"
            f"(row, col) with row 0 at the top: you {self.player}, box {where(self.boxes)}, "
            f"goal {where(self.goals)}."
        )

    def _summary(self) -> str:
        if self.success:
            return "solved"
        return f"{len(self.boxes & self.goals)}/{len(self.boxes)} on goal"


def _distance(boxes, goals) -> int:
    """Sum over boxes of the Manhattan distance to the nearest goal."""
    return sum(min(abs(b[0] - g[0]) + abs(b[1] - g[1]) for g in goals) for b in boxes)


def _carve(rng: random.Random, n: int, steps: int, p_turn: float = 0.35) -> set[Cell]:
    """Floor cells of an ``n x n`` room: a random walk stamping small shapes inside the border."""
    directions = list(MOVES.values())
    pos, direction, floor = (rng.randint(1, n - 2), rng.randint(1, n - 2)), rng.choice(directions), set()
    for _ in range(steps):
        if rng.random() < p_turn:
            direction = rng.choice(directions)
        pos = (min(max(pos[0] + direction[0], 1), n - 2), min(max(pos[1] + direction[1], 1), n - 2))
        for dr, dc in rng.choice(_STAMPS):
            r, c = pos[0] + dr, pos[1] + dc
            if 1 <= r <= n - 2 and 1 <= c <= n - 2:
                floor.add((r, c))
    return floor


def _reverse_search(floor, goals: frozenset, player: Cell, max_states: int = 50_000) -> dict:
    """Breadth-first reverse play from the solved state: ``state -> (previous state, move)``.

    A reverse move walks the player one cell; if a box is right behind the player it may come
    along (a pull). A state is ``(player, frozenset(boxes))``.
    """
    start = (player, goals)
    parent: dict = {start: None}
    queue = deque([start])
    while queue and len(parent) < max_states:
        state = queue.popleft()
        cur, boxes = state
        for move, (dr, dc) in MOVES.items():
            nxt = (cur[0] + dr, cur[1] + dc)
            if nxt not in floor or nxt in boxes:
                continue
            options = [(nxt, boxes)]
            behind = (cur[0] - dr, cur[1] - dc)
            if behind in boxes:
                options.append((nxt, (boxes - {behind}) | {cur}))
            for option in options:
                if option not in parent:
                    parent[option] = (state, move)
                    queue.append(option)
    return parent
