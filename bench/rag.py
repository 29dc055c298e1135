"""The RAG target on the shipped FAQ set: build time, index size and retrieval figures per index mode.

    .venv/bin/python bench/rag.py                       # dense, bm25 and hybrid
    .venv/bin/python bench/rag.py --modes dense hybrid

Each mode runs the real CLI (``palaestra train --target=rag algo.mode=...``) in its own process on
the shipped set (621 answers of chatterbot-corpus as documents, 488 judged questions), then reads
the run's figures: build time (the steps' wall time: embedding, indexing, evaluation), the index
folder's size, and recall/MRR/nDCG at 1, 3, 5 and 10. Prints a table and appends it to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KS = (1, 3, 5, 10)


def run(mode: str) -> dict:
    out_dir = HERE / "out" / f"rag-{mode}"
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [sys.executable, "-m", "palaestra.cli", "train", "--target=rag", f"algo.mode={mode}",
               "tracking.enabled=false", f"train.output_dir={out_dir}"]
    print(f"running {mode}: palaestra {' '.join(command[3:])}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = sorted((out_dir / "checkpoints").glob("step-*"))[-1]
    figures = json.loads((last / "trainer_state.json").read_text())["last_eval"]["figures"]
    size = sum(p.stat().st_size for p in (out_dir / "index").rglob("*") if p.is_file())
    return {"mode": mode, "build_s": sum(s["time/step"] for s in steps), "index_mb": size / 2**20, "figures": figures,
            "documents": int(steps[-1]["documents"])}


def render(report: dict) -> str:
    header = " | ".join(f"{m}@{k}" for m in ("recall", "mrr", "ndcg") for k in KS)
    lines = [f"### {report['date']}: RAG target on the shipped FAQ set ({report['machine']})", f"`{report['command']}`", "",
             f"| mode | build (s) | index (MB) | {header} |", "|---" * (3 + 3 * len(KS)) + "|"]
    for row in report["runs"]:
        values = " | ".join(f"{row['figures'][f'{m}@{k}']:.3f}" for m in ("recall", "mrr", "ndcg") for k in KS)
        lines.append(f"| {row['mode']} | {row['build_s']:.1f} | {row['index_mb']:.2f} | {values} |")
    lines += ["", f"{report['runs'][0]['documents']} documents, 488 judged queries; embedder all-MiniLM-L6-v2 "
              "(384 dimensions), FAISS IndexFlatIP; hybrid = reciprocal rank fusion (k=60) of dense and BM25."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["dense", "bm25", "hybrid"])
    args = parser.parse_args()
    report = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "command": " ".join(["python", "bench/rag.py", *sys.argv[1:]]), "runs": [run(mode) for mode in args.modes]}
    (HERE / "out" / "rag.json").write_text(json.dumps(report, indent=2))
    text = render(report)
    print(text)
    from results import record  # bench/results.py, beside this script

    record(text)


if __name__ == "__main__":
    main()
