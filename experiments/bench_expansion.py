"""Benchmark the full Sparse Expansion build on the embedded model.

For each ``--sparsities`` value, in its own subprocess (so that ``ru_maxrss`` is the peak RSS of
that build alone):

* ``se``: :func:`build_sparse_expansion` with ``--experts`` experts (default 16) on the default
  calibration of the ``prune`` command (``--nsamples`` 128 x ``--seqlen`` 512 tokens of the
  ``embedded`` calibration split, seed 0), then its perplexity;
* ``sparsegpt``: the same pipeline with one expert, which is exactly SparseGPT (the k = 1
  control of the builder, bit-identical to ``sequential_prune(..., "sparsegpt")``).

A ``dense`` subprocess gives the reference perplexity.  Perplexity is exp(mean NLL) on
``--eval-tokens`` held-out tokens (non-overlapping windows of the evaluation split).  The script
prints build time, peak RSS and perplexities, the relative gain of SE over SparseGPT
``(ppl_sgpt - ppl_se) / ppl_sgpt``, and writes ``results.csv`` plus the per-linear summaries to
``--out``.

Usage::

    python experiments/bench_expansion.py                          # 0.9 then 0.5, CPU
    python experiments/bench_expansion.py --sparsities 0.9,0.7,0.5 --nsamples 128
    python experiments/bench_expansion.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sparsities", default="0.9,0.5", help="comma-separated, e.g. 0.9,0.7,0.5")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kmeans-restarts", type=int, default=None, help="default: the builder's")
    p.add_argument("--methods", default="se,sparsegpt", help="subset of se,sparsegpt")
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--out", default="runs/bench_expansion")
    p.add_argument("--resume", action="store_true", help="reuse finished settings in --out")
    # internal: run one setting and write its JSON
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sparsity", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def machine_note() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def peak_rss_gb() -> float:
    """Peak resident set size of this process (``ru_maxrss`` is in KiB on Linux)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS
    return kib * scale / 1e9


def cpu_seconds() -> float:
    """User + system CPU time of this process (less sensitive to other jobs than wall time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args) -> None:
    """One setting in this process: build (timed, peak RSS) and perplexity -> JSON."""
    import warnings

    from wasserstein_neurons import (
        calibration_windows,
        evaluation_windows,
        load_model,
        load_tokens,
        perplexity,
    )
    from wasserstein_neurons.expansion import (
        ExpansionConfig,
        build_sparse_expansion,
        mlp_cost,
    )

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    ev = evaluation_windows(
        load_tokens(model.tokenizer, args.dataset, "evaluation"), args.seqlen, args.eval_tokens
    )
    load_s = time.perf_counter() - t0
    row = {"method": args.worker, "sparsity": args.sparsity, "experts": 0, "load_s": load_s}
    load0 = os.getloadavg()[0]
    if args.worker != "dense":
        cal = calibration_windows(
            load_tokens(model.tokenizer, args.dataset, "calibration"),
            args.nsamples,
            args.seqlen,
            seed=args.seed,
        )
        k = args.experts if args.worker == "se" else 1
        kw = {} if args.kmeans_restarts is None else {"kmeans_restarts": args.kmeans_restarts}
        cfg = ExpansionConfig(
            n_experts=k, sparsity=args.sparsity, seed=args.seed, batch_size=args.batch_size, **kw
        )
        t0 = time.perf_counter()
        cpu0 = cpu_seconds()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = build_sparse_expansion(model, cal, cfg, progress=False)
        row.update(
            experts=k,
            build_s=time.perf_counter() - t0,
            build_cpu_s=cpu_seconds() - cpu0,
            build_peak_rss_gb=peak_rss_gb(),
            kmeans_restarts=cfg.kmeans_restarts,
            calib_tokens=int(cal.numel()),
            warnings=" | ".join(str(w.message)[:300] for w in caught),
            small_clusters=int(summary["small_clusters"].sum()),
            fallbacks=int(summary["fallbacks"].sum()),
            rel_error_gate_up=float(summary.loc[summary.role != "down", "rel_error"].mean()),
            rel_error_down=float(summary.loc[summary.role == "down", "rel_error"].mean()),
        )
        summary.to_csv(Path(args.result).with_suffix(".layers.csv"), index=False)
    row.update(mlp_cost(model))
    res = perplexity(model, ev, batch_size=args.batch_size, progress=False)
    row.update(
        perplexity=res.perplexity,
        eval_tokens=res.n_tokens,
        eval_s=res.seconds,
        eval_backend=res.backend,
        peak_rss_gb=peak_rss_gb(),
        load_avg_start=load0,
        load_avg_end=os.getloadavg()[0],
    )
    Path(args.result).write_text(json.dumps(row, indent=2))


def run_worker(args, kind: str, sparsity: float, out: Path) -> dict:
    result = out / f"{kind}_{sparsity:g}.json"
    if args.resume and result.is_file():
        return json.loads(result.read_text())
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--sparsity",
        str(sparsity),
        "--result",
        str(result),
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--device",
        args.device,
        "--experts",
        str(args.experts),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--seed",
        str(args.seed),
        "--eval-tokens",
        str(args.eval_tokens),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.kmeans_restarts is not None:
        cmd += ["--kmeans-restarts", str(args.kmeans_restarts)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"worker {kind} at {sparsity} failed (exit {proc.returncode})")
    row = json.loads(result.read_text())
    row["wall_s"] = time.perf_counter() - t0
    result.write_text(json.dumps(row, indent=2))
    return row


def describe(row: dict) -> str:
    if row["method"] == "dense":
        return (
            f"  dense: perplexity {row['perplexity']:.3f} "
            f"(eval {row['eval_s']:.0f} s, {row['eval_backend']}), peak RSS "
            f"{row['peak_rss_gb']:.2f} GB"
        )
    name = "SE" if row["method"] == "se" else "SparseGPT"
    return (
        f"  {name} k={row['experts']}: build {row['build_s'] / 60:.1f} min "
        f"({row.get('build_cpu_s', float('nan')) / 60:.1f} CPU-min), peak RSS "
        f"{row['build_peak_rss_gb']:.2f} GB (build) / {row['peak_rss_gb']:.2f} GB (with eval), "
        f"perplexity {row['perplexity']:.3f} (eval {row['eval_s']:.0f} s), "
        f"MLP FLOPs/token {row['flops_per_token'] / 1e6:.1f} M, "
        f"params {row['params'] / 1e6:.1f} M, "
        f"small clusters {row['small_clusters']}, fallbacks {row['fallbacks']}, "
        f"rel. error gate/up {row['rel_error_gate_up']:.3f} down {row['rel_error_down']:.3f}, "
        f"load avg {row['load_avg_start']:.1f} -> {row['load_avg_end']:.1f}"
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print("bench_expansion —", machine_note())
    print("NOTE: the CPU is shared with other jobs; wall-clock times are indicative only.")
    print(
        f"model {args.model}, {args.nsamples} x {args.seqlen} calibration tokens (seed "
        f"{args.seed}), {args.experts} experts, perplexity on {args.eval_tokens} held-out tokens"
    )
    rows = []
    if not args.skip_dense:
        rows.append(run_worker(args, "dense", 0.0, out))
        print(describe(rows[-1]), flush=True)
    for s in sparsities:
        print(f"\nsparsity {s:g}", flush=True)
        for kind in methods:
            rows.append(run_worker(args, kind, s, out))
            print(describe(rows[-1]), flush=True)
        by = {r["method"]: r for r in rows if r["sparsity"] == s}
        if "se" in by and "sparsegpt" in by:
            gain = (by["sparsegpt"]["perplexity"] - by["se"]["perplexity"]) / by["sparsegpt"][
                "perplexity"
            ]
            print(f"  relative perplexity gain of SE over SparseGPT: {gain:+.2%}", flush=True)
        pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    table = pd.DataFrame(rows)
    cols = [
        c
        for c in (
            "method",
            "experts",
            "sparsity",
            "perplexity",
            "build_s",
            "build_peak_rss_gb",
            "peak_rss_gb",
            "flops_per_token",
            "params",
        )
        if c in table
    ]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print("\n" + table[cols].to_string(index=False))
    print("\nend —", machine_note())


if __name__ == "__main__":
    main()
