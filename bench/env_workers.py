"""What stepping a team's environments in worker processes gains: the code environment's coder turn, stepped in the
trainer's process against ``env.workers=1`` and ``2``.

    .venv/bin/python bench/env_workers.py                   # 16 environments x 4 answers, 3 repeats
    .venv/bin/python bench/env_workers.py --envs 32 --workers 0 1 2 4

The environment-heavy half of an AT-GRPO step without the model: every environment of the step (the built-in
code problems) gets K coder answers (the problem's reference program, and K - 1 wrong ones), and each answer is
stepped on its own copy, which runs the ground-truth tests in palaestra's sandbox; a tree rollout hands them
over together, as here. Prints (and appends to ``bench/RESULTS.md``) the seconds per turn of answers with
each setting and the speed-up against the trainer's process; the rewards must agree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

from results import cpu_kind, record  # bench/results.py, beside this script

from palaestra.envs import CodeEnv
from palaestra.envs.workers import EnvWorkerPool, step_in_process


def answers(env: CodeEnv, k: int) -> list[str]:
    """K coder answers: the reference program, then programs that print a wrong answer."""
    right = f"```python\n{env.problem.solution}\n```"
    return [right] + [f"```python\nprint({i})\n```" for i in range(k - 1)]


def one_turn(envs: list[CodeEnv], k: int, step) -> tuple[float, list[float]]:
    items = [(env.copy(), "coder", answer) for env in envs for answer in answers(env, k)]
    started = time.perf_counter()
    results = step(items)
    return time.perf_counter() - started, [result.local_reward for _, result in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--answers", type=int, default=4, help="K: answers per environment")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    envs = []
    for seed in range(args.envs):
        env = CodeEnv()
        env.reset(seed)
        envs.append(env)
    rows, reference = [], None
    for workers in args.workers:
        pool = EnvWorkerPool(workers, step_timeout_s=60) if workers else None
        step = pool or step_in_process
        one_turn(envs[:2], args.answers, step)  # warm: the workers start, the sandbox's first run
        times = []
        for _ in range(args.repeats):
            seconds, rewards = one_turn(envs, args.answers, step)
            times.append(seconds)
            reference = reference or rewards
            if rewards != reference:
                raise SystemExit(f"env.workers={workers} gave other rewards than the trainer's process")
        if pool:
            pool.close()
        rows.append((workers, min(times)))
        print(f"env.workers={workers}: {min(times):.2f} s per turn of {args.envs * args.answers} answers", flush=True)
    base = rows[0][1]
    lines = [
        f"### {date.today().isoformat()}: a code-environment turn stepped in worker processes ({cpu_kind()}, "
        f"{os.cpu_count()} CPU cores)",
        f"`{' '.join(['python bench/env_workers.py', *sys.argv[1:]])}`: {args.envs} code environments x {args.answers} coder "
        "answers (the reference program and wrong ones), each stepped on its own copy (the ground-truth tests in the "
        f"sandbox), as a tree rollout hands them over; the best of {args.repeats} repeats; the rewards agree.", "",
        "| env.workers | seconds per turn | vs the trainer's process |", "|---|---|---|",
    ]
    lines += [f"| {workers} | {seconds:.2f} | {base / seconds:.2f}x |" for workers, seconds in rows]
    text = "\n".join(lines)
    print(text)
    record(text)


if __name__ == "__main__":
    main()
