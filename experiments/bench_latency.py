"""Real CPU latency of pruned MLPs: dense vs sparse kernels, SparseGPT-pruned vs Sparse Expansion.

With threads pinned (``--threads``, default 1: ``torch.set_num_threads`` and the
``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS`` of this process), prints:

1. ``--kernels``: one matrix product ``x W^T`` per kernel (dense GEMM, scipy CSR, torch CSR) for
   the embedded model's MLP shapes and Llama-2-7B's, at sparsities 0.5 / 0.7 / 0.8 / 0.9 / 0.95 and
   1 / 256 tokens, and the break-even sparsity of each sparse kernel (the lowest measured
   sparsity from which it beats dense);
2. per-token MLP latency (gate, up, SiLU, down) of the embedded model's layer ``--layer``: dense,
   pruned at each sparsity (one matrix per linear, as SparseGPT leaves it) and Sparse Expansion
   with ``--experts`` experts (a router fitted on that layer's real inputs, one pruned copy per
   expert), each with dense kernels and with the automatic kernel choice
   (:mod:`wasserstein_neurons.sparse_kernels`), at 1 and 256 tokens;
3. the same for a Llama-2-7B-shaped MLP (4096 -> 11008, random weights);
4. end-to-end tokens/s of the embedded model's forward pass (one 256-token window, and 16 single
   tokens), dense and with every MLP linear pruned to ``--e2e-sparsity`` and run with the
   automatic kernels.

Latency depends on how many weights are kept and where, not on their values, so the matrices are
pruned by magnitude to the target sparsity (unstructured, the mask family SparseGPT produces);
Sparse Expansion's experts are the weight plus a small per-expert perturbation, pruned the same
way, so each expert has its own mask.

Usage::

    python experiments/bench_latency.py                 # everything, 1 thread
    python experiments/bench_latency.py --kernels-only
    python experiments/bench_latency.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--e2e-sparsity", type=float, default=0.9)
    p.add_argument("--kernels-only", action="store_true")
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    return p.parse_args(argv)


def _pin_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def magnitude_prune(w, sparsity: float):
    import torch

    k = int(round(sparsity * w.numel()))
    if k == 0:
        return w.clone()
    threshold = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() > threshold, w, torch.zeros_like(w))


def bench_kernels(sparsities, repeats: int):
    import pandas as pd
    import torch

    from wasserstein_neurons.sparse_kernels import SparseMatrix

    rows = []
    for out, d_in in ((1536, 576), (576, 1536), (11008, 4096)):
        w = torch.randn(out, d_in)
        reps = max(3, repeats // 5) if out > 5000 else repeats
        for s in sparsities:
            ws = magnitude_prune(w, s)
            mats = {k: SparseMatrix(ws, k) for k in ("dense", "scipy_csr", "torch_csr")}
            for n in (1, 256):
                x = torch.randn(n, d_in)
                row = {"shape": f"{out}x{d_in}", "sparsity": s, "tokens": n}
                for k, m in mats.items():
                    row[f"{k}_us"] = 1e6 * timed(lambda m=m, x=x: m.matmul_t(x), reps)
                rows.append(row)
    table = pd.DataFrame(rows)
    for k in ("scipy_csr", "torch_csr"):
        table[f"{k}_speedup"] = table["dense_us"] / table[f"{k}_us"]
    return table


def break_even(table):
    out = []
    for (shape, n), g in table.groupby(["shape", "tokens"], sort=False):
        row = {"shape": shape, "tokens": n}
        for k in ("scipy_csr", "torch_csr"):
            wins = g[g[f"{k}_speedup"] > 1.0]["sparsity"]
            row[k] = float(wins.min()) if len(wins) else None
        out.append(row)
    import pandas as pd

    return pd.DataFrame(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    _pin_threads(args.threads)
    import pandas as pd
    from latency_mlp import bench_e2e, bench_mlps

    sparsities = [float(s) for s in args.sparsities.split(",")]
    pd.set_option("display.width", 160)
    print(f"threads: {args.threads}")
    kernels = bench_kernels(sparsities, args.repeats)
    print("\n1. one product x W^T, microseconds (speedup = dense / sparse)\n")
    print(kernels.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\nbreak-even sparsity (lowest measured sparsity where the kernel beats dense):\n")
    print(break_even(kernels).to_string(index=False))
    if args.kernels_only:
        return 0
    print("\n2-3. per-token MLP latency, microseconds per token\n")
    mlps = bench_mlps(sparsities, args)
    print(mlps.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("\n4. end-to-end forward of the embedded model, tokens/s\n")
    print(bench_e2e(args).to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
