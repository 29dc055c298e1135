"""``palaestra data planner``: write a dated planner dataset folder (chat splits and preference pairs).

A dated folder is a dataset version that runs and replays name (``dataset_version``): writing the same
date again is refused unless ``--overwrite`` says to replace it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
from pathlib import Path

from palaestra.config.errors import ConfigError, check_writable
from palaestra.planner.data import make_planner_dataset


def _count(minimum: int):
    """An argparse type: a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give a count of examples >= {minimum}")
        return value

    return parse


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="palaestra data", description="Generate a dataset folder.")
    parser.add_argument("dataset", choices=["planner"], help="which dataset to generate")
    parser.add_argument("--root", default=".", help="the folder that holds datasets/ (default: .)")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="dataset version, YYYY-MM-DD (default: today)")
    parser.add_argument("--train", type=_count(1), default=400, help="training examples")
    parser.add_argument("--val", type=_count(1), default=50, help="validation examples")
    parser.add_argument("--test", type=_count(1), default=50, help="test examples")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--overwrite", action="store_true", help="replace the dataset of --date if it exists")
    args = parser.parse_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        parser.error(f"--date {args.date!r} is not a date; use YYYY-MM-DD")
    check_writable("--root", args.root)
    folder = Path(args.root) / "datasets" / "planner" / args.date
    if folder.exists() and not args.overwrite:
        raise ConfigError(f"{folder} already exists (dataset version {args.date}); pass --overwrite to replace it, "
                          "or write another version with --date YYYY-MM-DD")
    # written whole beside the destination, then swapped in: an interrupted write leaves the old version
    # as it was, and the new version keeps no file of the old one
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".staging-{args.date}-{os.getpid()}"
    retired = folder.parent / f".replaced-{args.date}-{os.getpid()}"
    try:
        written = make_planner_dataset(staging, date=args.date, n_train=args.train, n_val=args.val, n_test=args.test,
                                       seed=args.seed)
        if folder.exists():
            os.replace(folder, retired)
        os.replace(written, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    print(f"wrote {folder} (train {args.train}, val {args.val}, test {args.test}); use it with data.path={folder}")
    return 0
