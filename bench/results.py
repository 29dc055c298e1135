"""Where every bench records what it measured: ``bench/RESULTS.md``, one dated entry per run."""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(text: str) -> None:
    """Append one entry (a dated heading, the command, the figures) to RESULTS.md after a blank line."""
    with open(RESULTS, "a") as handle:
        handle.write("\n" + text.strip("\n") + "\n")


def cpu_kind() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (AMX or AVX-512 bf16) or not (AVX2 only): every
    figure a bench records names it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    kind = "AMX" if "amx_bf16" in info else "AVX-512 bf16" if "avx512_bf16" in info else "no native bf16"
    return f"{name}, {kind}"
