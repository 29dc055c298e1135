"""Sudoku (4x4 by default, 9x9 as an option) with a dense progress reward.

Generation: a full valid grid from the seed (a base pattern with rows, columns, bands, stacks and
digits shuffled), then cells are emptied in random order while the puzzle stays uniquely solvable.

An action is either the full grid (``[[1, 2, 3, 4], ...]``, every row) or a list of fills
``[[row, col, value], ...]`` with rows and columns counted from 0, as in the reference. A full
grid replaces every non-given cell (0 leaves one empty); fills are applied one by one. A fill *breaks a rule* and is
skipped when it is malformed, out of range, changes a given, or repeats a digit already in its row,
column or box. The step reward:

    r = (correct non-given cells after - before) / number of non-given cells    (progress)
        + r_rule * rule breaks                                                 (default -0.1 each)
        + r_solved when the grid is solved                                     (default +2.0)

An answer that is neither a grid nor a fill list (bad format) earns the protocol's
``invalid_action_penalty``.
"""

from __future__ import annotations

import math
import random

from palaestra.envs.base import ToolPlanEnv

__all__ = ["SudokuEnv"]

Grid = list[list[int]]


class SudokuEnv(ToolPlanEnv):
    """Sudoku with the tool + plan protocol.

    Args:
        size: 4 (2x2 boxes, the reference default) or 9 (3x3 boxes); any square number works.
        holes: cells to empty (default: half the grid). Fewer may be emptied when ``unique`` holds
            the puzzle to one solution first.
        unique: keep the puzzle uniquely solvable while emptying cells.
        r_solved, r_rule: the solved bonus and the cost of each rule break.
        **protocol: ``ToolPlanEnv`` arguments (max_turns, turn_order, invalid_action_penalty, ...).
    """

    name = "sudoku"
    action_example = "[[0, 1, 3], [2, 0, 4]]"

    def __init__(
        self,
        size: int = 4,
        *,
        holes: int | None = None,
        unique: bool = True,
        r_solved: float = 2.0,
        r_rule: float = -0.1,
        **protocol,
    ):
        box = math.isqrt(size)
        if size < 4 or box * box != size:
            raise ValueError(f"size must be a square number >= 4 (4, 9, ...), got {size}")
        self.size, self.box = size, box
        self.holes = holes if holes is not None else size * size // 2
        self.unique = unique
        self.r_solved, self.r_rule = r_solved, r_rule
        super().__init__(**protocol)

    @classmethod
    def from_puzzle(cls, puzzle: Grid, **kwargs) -> SudokuEnv:
        """An environment on a fixed puzzle (0 = empty); it must have a solution."""
        env = cls(size=len(puzzle), **kwargs)
        solution = [row[:] for row in puzzle]
        if _count_solutions(solution, env.box, limit=1, fill=True) == 0:
            raise ValueError("the puzzle has no solution")
        env._set_puzzle(puzzle, solution)
        env._ready = True
        env._start_episode()
        return env

    # -- puzzle --------------------------------------------------------------------------------

    def _generate(self, rng: random.Random) -> None:
        n, b = self.size, self.box
        solution = _full_grid(rng, n, b)
        puzzle = [row[:] for row in solution]
        cells = [(r, c) for r in range(n) for c in range(n)]
        rng.shuffle(cells)
        emptied = 0
        for r, c in cells:
            if emptied >= self.holes:
                break
            value, puzzle[r][c] = puzzle[r][c], 0
            if self.unique and _count_solutions([row[:] for row in puzzle], b, limit=2) != 1:
                puzzle[r][c] = value  # emptying this cell would allow a second solution
                continue
            emptied += 1
        self._set_puzzle(puzzle, solution)

    def _set_puzzle(self, puzzle: Grid, solution: Grid) -> None:
        self.puzzle = [list(row) for row in puzzle]
        self.solution = [list(row) for row in solution]
        self.grid = [list(row) for row in puzzle]
        self.givens = {(r, c) for r, row in enumerate(puzzle) for c, v in enumerate(row) if v}
        self.rule_breaks = 0

    def _progress(self) -> float:
        """Fraction of the non-given cells that hold the solution's digit."""
        n = self.size
        open_cells = [(r, c) for r in range(n) for c in range(n) if (r, c) not in self.givens]
        if not open_cells:
            return 1.0
        return sum(self.grid[r][c] == self.solution[r][c] for r, c in open_cells) / len(open_cells)

    @property
    def success(self) -> bool:
        grid = getattr(self, "grid", None)
        return grid is not None and all(all(row) for row in grid) and _is_valid(grid, self.box)

    # -- dynamics ------------------------------------------------------------------------------

    def _apply(self, actions: list) -> tuple[float, dict] | None:
        n = self.size
        if len(actions) == 3 and all(isinstance(x, int) for x in actions):
            actions = [actions]  # one bare fill
        is_grid = len(actions) == n and all(isinstance(row, (list, tuple)) and len(row) == n for row in actions)
        if not is_grid and not all(isinstance(item, (list, tuple)) for item in actions):
            return None
        before, breaks = self._progress(), 0
        if is_grid:
            fills = []
            for r in range(n):
                for c in range(n):
                    value = actions[r][c]
                    if (r, c) in self.givens:
                        breaks += _as_int(value) not in (0, self.grid[r][c])  # a changed given
                    else:
                        self.grid[r][c] = 0  # the grid replaces every non-given cell; 0 leaves it empty
                        if _as_int(value) != 0:
                            fills.append((r, c, value))
        else:
            fills = actions
        for fill in fills:
            breaks += not self._fill(fill)
        self.rule_breaks += breaks
        reward = self._progress() - before + self.r_rule * breaks
        if self.success:
            reward += self.r_solved
        return reward, {"rule_breaks": breaks, "progress": self._progress()}

    def _fill(self, fill) -> bool:
        """Apply one ``[row, col, value]`` fill; False (and no change) if it breaks a rule."""
        if not isinstance(fill, (list, tuple)) or len(fill) != 3:
            return False
        r, c, v = (_as_int(x) for x in fill)
        n = self.size
        if None in (r, c, v) or not (0 <= r < n and 0 <= c < n and 1 <= v <= n):
            return False
        if (r, c) in self.givens:
            return v == self.grid[r][c]  # restating a given is fine
        if self.grid[r][c] == v:
            return True
        br, bc = r - r % self.box, c - c % self.box
        peers = {(r, k) for k in range(n)} | {(k, c) for k in range(n)}
        peers |= {(br + i, bc + j) for i in range(self.box) for j in range(self.box)}
        if any(self.grid[pr][pc] == v for pr, pc in peers - {(r, c)}):
            return False
        self.grid[r][c] = v
        return True

    # -- text ----------------------------------------------------------------------------------

    def _render(self) -> str:
        n, b = self.size, self.box
        board = "\n".join(" ".join(str(v) if v else "." for v in row) for row in self.grid)
        return (
            f"Sudoku: fill the {n}x{n} grid so every row, column and {b}x{b} box has 1-{n} once. "
            "'.' = empty.\n"
            f"{board}\n"
            f"Answer with fills [row, col, digit] (row, col from 0; top-left is [0, 0]) or the "
            f"full grid as a list of {n} rows."
        )

    def _format_actions(self, actions) -> str:
        if not isinstance(actions, list):
            return "no answer"
        n = self.size
        if len(actions) == n and all(isinstance(row, (list, tuple)) and len(row) == n for row in actions):
            return "a full grid"
        return f"{len(actions)} fills"

    def _summary(self) -> str:
        if self.success:
            return "solved"
        empty = sum(row.count(0) for row in self.grid)
        return f"{empty} cells empty, {self.rule_breaks} rule breaks so far"


def _as_int(x) -> int | None:
    if isinstance(x, bool):
        return None
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _full_grid(rng: random.Random, n: int, b: int) -> Grid:
    """A random complete Sudoku: the base pattern with bands, rows, stacks, columns, digits shuffled."""

    def shuffled_lines() -> list[int]:
        bands = rng.sample(range(b), b)
        return [band * b + line for band in bands for line in rng.sample(range(b), b)]

    rows, cols = shuffled_lines(), shuffled_lines()
    digits = rng.sample(range(1, n + 1), n)
    # The pattern (b * (r % b) + r // b + c) % n is a valid Sudoku; shuffles preserve validity.
    return [[digits[(b * (r % b) + r // b + c) % n] for c in cols] for r in rows]


def _is_valid(grid: Grid, b: int) -> bool:
    """No digit repeats in any row, column or box (empty cells ignored)."""
    n = len(grid)
    units = [[(r, c) for c in range(n)] for r in range(n)] + [[(r, c) for r in range(n)] for c in range(n)]
    units += [[(br + i, bc + j) for i in range(b) for j in range(b)] for br in range(0, n, b) for bc in range(0, n, b)]
    for unit in units:
        values = [grid[r][c] for r, c in unit if grid[r][c]]
        if len(values) != len(set(values)):
            return False
    return True


def _count_solutions(grid: Grid, b: int, limit: int = 2, fill: bool = False) -> int:
    """How many solutions ``grid`` has, counting up to ``limit`` (backtracking, fewest candidates
    first). With ``fill``, the first solution found is written into ``grid``."""
    n = len(grid)
    if not _is_valid(grid, b):
        return 0

    def candidates(r: int, c: int) -> set[int]:
        br, bc = r - r % b, c - c % b
        used = set(grid[r]) | {grid[k][c] for k in range(n)}
        used |= {grid[br + i][bc + j] for i in range(b) for j in range(b)}
        return set(range(1, n + 1)) - used

    found = 0

    def search() -> bool:  # True: stop (limit reached)
        nonlocal found
        best = None
        for r in range(n):
            for c in range(n):
                if not grid[r][c]:
                    options = candidates(r, c)
                    if best is None or len(options) < len(best[2]):
                        best = (r, c, options)
        if best is None:
            found += 1
            return found >= limit
        r, c, options = best
        for v in sorted(options):
            grid[r][c] = v
            if search():
                if not fill:
                    grid[r][c] = 0
                return True
        grid[r][c] = 0
        return False

    search()
    return found
