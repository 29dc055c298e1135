"""Where every bench records what it measured: ``bench/RESULTS.md``, one dated entry per run."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(text: str) -> None:
    """Append one entry (a dated heading, the command, the figures) to RESULTS.md after a blank line."""
    with open(RESULTS, "a") as handle:
        handle.write("\n" + text.strip("\n") + "\n")


AVX2_EMULATION = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""The environment that makes PyTorch, oneDNN and MKL use AVX2 kernels only on a newer CPU: how a bench measures the
path of an AVX2-only CPU (no native bf16) on a CPU that has more, when none is at hand."""


def cpu_kind() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (AMX or AVX-512 bf16) or not (AVX2 only), and
    whether this process runs restricted to AVX2 (:data:`AVX2_EMULATION`): every figure a bench records names it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    kind = "AMX" if "amx_bf16" in info else "AVX-512 bf16" if "avx512_bf16" in info else "no native bf16"
    if all(os.environ.get(key, "").lower() == value.lower() for key, value in AVX2_EMULATION.items()):
        kind += ", restricted to AVX2 kernels (" + " ".join(f"{k}={v}" for k, v in AVX2_EMULATION.items()) + ")"
    return f"{name}, {kind}"


def budgeted_run(name: str, keys: list[str], budget_s: float, out_dir: Path) -> tuple[float, list[dict], list[dict]]:
    """``palaestra run keys`` for ``budget_s`` seconds of training (``train.max_seconds``) into a fresh ``out_dir``:
    (wall seconds, the evaluations' figures in order, each training step's record). A failed run stops the bench."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    import time

    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: its log and metrics are this run's alone
    command = [sys.executable, "-m", "palaestra.cli", "run", *keys, f"train.max_seconds={budget_s}", "train.time_budget_s=0", "train.save_interval=0",
               "tracking.enabled=false", f"train.output_dir={out_dir}"]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=RESULTS.parent.parent, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    evals = [line for line in (out_dir / "train.log").read_text().splitlines() if " eval (" in line]
    figures = [dict(item.split("=") for item in line.split(": ", 1)[1].split()) for line in evals]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, figures, [r for r in records if "time/step" in r]
