"""``palaestra data planner``: write a dated planner dataset folder (chat splits and preference pairs)."""

from __future__ import annotations

import argparse
import datetime

from palaestra.planner.data import make_planner_dataset


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="palaestra data", description="Generate a dataset folder.")
    parser.add_argument("dataset", choices=["planner"], help="which dataset to generate")
    parser.add_argument("--root", default=".", help="the folder that holds datasets/ (default: .)")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="dataset version, YYYY-MM-DD (default: today)")
    parser.add_argument("--train", type=int, default=400, help="training examples")
    parser.add_argument("--val", type=int, default=50, help="validation examples")
    parser.add_argument("--test", type=int, default=50, help="test examples")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        parser.error(f"--date {args.date!r} is not a date; use YYYY-MM-DD")
    folder = make_planner_dataset(args.root, date=args.date, n_train=args.train, n_val=args.val, n_test=args.test, seed=args.seed)
    print(f"wrote {folder} (train {args.train}, val {args.val}, test {args.test}); use it with data.path={folder}")
    return 0
