"""Wall time of the Sparse Expansion grid under the local engine and under Ray Tune.

Runs ``wasserstein-neurons expand --grid`` twice on the same settings (default: the embedded
model, sparsities 0.5 and 0.9 x k in {1, 4}, next to magnitude and Wanda: 9 cells), once with
``--engine local`` (one cell after another, all cores) and once with ``--engine ray`` (each
cell a trial of ``--trial-cpus`` CPUs, as many at a time as the cores allow), each in its own
process. It prints both wall times, their ratio, and whether the two ``results.csv`` tables agree
(same rows; perplexities to ``1e-6`` relative), and writes ``bench_sweep.json`` to ``--out``.

Each engine's grid is a normal run folder (``--out/local``, ``--out/ray``), so ``--resume``
continues an interrupted benchmark (a timing is only reported for a grid that ran start to
finish in one go; a resumed one is marked so).

Usage::

    python experiments/bench_sweep.py                              # the issue's grid
    python experiments/bench_sweep.py --nsamples 32 --eval-tokens 8192   # a quicker version
    python experiments/bench_sweep.py --resume
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--sparsities", default="0.5,0.9")
    p.add_argument("--experts", default="1,4")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--trial-cpus", type=float, default=1.0)
    p.add_argument("--engines", default="local,ray")
    p.add_argument("--out", default="runs/bench_sweep")
    p.add_argument("--resume", action="store_true")
    return p.parse_args(argv)


def run_engine(args: argparse.Namespace, engine: str) -> dict:
    """One grid under ``engine`` in a fresh process; its wall time and exit code."""
    out = Path(args.out) / engine
    cmd = [
        sys.executable, "-m", "wasserstein_neurons.cli", "expand", "--grid",
        "--model", args.model, "--dataset", args.dataset,
        "--grid-sparsities", args.sparsities, "--grid-experts", args.experts,
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--eval-tokens", str(args.eval_tokens), "--engine", engine, "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    if engine == "ray":
        cmd += ["--trial-cpus", str(args.trial_cpus)]
    finished = _finished(out)
    if finished and args.resume:
        return json.loads((Path(args.out) / f"{engine}.json").read_text())
    resumed = args.resume and out.exists()
    if resumed:
        cmd.append("--resume")
    t0 = time.perf_counter()
    code = subprocess.call(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    record = {"engine": engine, "seconds": time.perf_counter() - t0, "rc": code, "resumed": resumed}
    (Path(args.out) / f"{engine}.json").write_text(json.dumps(record))
    return record


def _finished(out: Path) -> bool:
    try:
        return json.loads((out / "config.json").read_text()).get("finished", False)
    except (OSError, ValueError):
        return False


def compare(out: Path) -> dict:
    """Whether the two grids' tables have the same rows and perplexities."""
    tables = [
        pd.read_csv(out / e / "results.csv", dtype={"pattern": str}) for e in ("local", "ray")
    ]
    keys = ["method", "experts", "pattern"]
    a, b = (t.sort_values(keys).reset_index(drop=True) for t in tables)
    same_rows = a[keys].values.tolist() == b[keys].values.tolist()
    rel = ((a["perplexity"] - b["perplexity"]).abs() / a["perplexity"]).max() if same_rows else None
    return {"same_rows": same_rows, "max_rel_perplexity_diff": rel, "rows": len(a)}


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    records = {e: run_engine(args, e) for e in args.engines.split(",")}
    for e, r in records.items():
        note = " (resumed: not a clean timing)" if r["resumed"] else ""
        print(f"{e:>5}: {r['seconds'] / 60:.1f} min, rc {r['rc']}{note}")
    summary = {"settings": vars(args), "engines": records, "cpu_count": os.cpu_count()}
    if {"local", "ray"} <= set(records) and all(r["rc"] == 0 for r in records.values()):
        ratio = records["ray"]["seconds"] / records["local"]["seconds"]
        summary.update(ray_over_local=ratio, tables=compare(Path(args.out)))
        print(f"ray / local wall time: {ratio:.2f}; tables: {summary['tables']}")
    (Path(args.out) / "bench_sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
