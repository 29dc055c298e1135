"""Where every bench records what it measured: ``bench/RESULTS.md``, one dated entry per run."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(text: str) -> None:
    """Append one entry (a dated heading, the command, the figures) to RESULTS.md after a blank line."""
    with open(RESULTS, "a") as handle:
        handle.write("\n" + text.strip("\n") + "\n")
