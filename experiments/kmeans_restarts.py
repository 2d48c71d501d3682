"""Is 5 k-means restarts enough for Sparse Expansion's router?  (issue 10)

The paper fits every router with 100 k-means restarts; the builder's default is
``DEFAULT_KMEANS_RESTARTS``.  Two measurements on the embedded model (SmolLM2-135M, embedded
Wikipedia corpus), both single-threaded:

* ``--part routers``: the dense model's layer loop (no pruning, the builder's sequential
  collection with sdpa) catches the ``gate`` inputs (shared with ``up``) and the ``down``
  inputs of ``--layers`` on ``--nsamples`` x ``--seqlen`` calibration tokens (seed 0, the
  builder's calibration draw).  On each, the k = ``--experts`` router is fitted with every
  ``--restarts`` value (same k-means seed) and compared with the largest: best inertia,
  relative inertia gap, the share of tokens routed to a different expert after matching the
  clusters (Hungarian matching on squared centroid distances; both routers share the same,
  deterministic PCA), cluster sizes and fitting time.  ``--noise-seeds`` refits the smallest
  restart count with other seeds, and also the largest count with the first of them, to show
  the seed-to-seed spread.
* ``--part ppl``: Sparse Expansion (k = ``--experts``, ``--sparsity``) built with each
  ``--ppl-runs`` entry (``restarts:seed``) on ``--ppl-nsamples`` x ``--seqlen`` calibration
  tokens, then the perplexity on the first ``--eval-tokens`` tokens of the evaluation split
  (the same windows for every build).  ``--sparsegpt`` adds the k = 1 (SparseGPT) control.

Every part prints its table and writes a CSV under ``--out`` (rows written as they finish).

Usage::

    OMP_NUM_THREADS=1 python experiments/kmeans_restarts.py --part routers
    OMP_NUM_THREADS=1 python experiments/kmeans_restarts.py --part ppl --ppl-runs 5:0,25:0,100:0
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["routers", "ppl"], required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration draw and k-means seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="experiments/results")
    g = p.add_argument_group("routers")
    g.add_argument("--layers", default="0,8,16,24,29")
    g.add_argument("--roles", default="gate,down", help="gate stands for gate and up")
    g.add_argument("--nsamples", type=int, default=64)
    g.add_argument("--restarts", default="5,25,100", help="the last is the reference")
    g.add_argument("--noise-seeds", default="1,2", help="'' for none")
    g = p.add_argument_group("ppl")
    g.add_argument("--ppl-runs", default="5:0,25:0,5:1,100:0", help="restarts:seed, in order")
    g.add_argument("--ppl-nsamples", type=int, default=32)
    g.add_argument("--sparsity", type=float, default=0.9)
    g.add_argument("--eval-tokens", type=int, default=8192)
    g.add_argument("--sparsegpt", action="store_true", help="also the k = 1 control")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def machine_note() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s), load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def windows(model, args, nsamples: int) -> tuple[torch.Tensor, torch.Tensor]:
    from wasserstein_neurons import calibration_windows, evaluation_windows, load_tokens

    cal = load_tokens(model.tokenizer, args.dataset, "calibration")
    ev = load_tokens(model.tokenizer, args.dataset, "evaluation")
    return (
        calibration_windows(cal, nsamples, args.seqlen, seed=args.seed),
        evaluation_windows(ev, args.seqlen, args.eval_tokens),
    )


# ============================================================================================
# Part a: routers on the dense model's inputs
# ============================================================================================


def matched_disagreement(ref, other, x: torch.Tensor) -> float:
    """Share of tokens of ``x`` routed differently by ``other`` than by ``ref`` after the
    Hungarian matching of their centroids (squared distances; same PCA space)."""
    cost = torch.cdist(ref.centroids.double(), other.centroids.double()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    to_ref = np.empty(len(cols), dtype=np.int64)
    to_ref[cols] = rows  # other's cluster j -> ref's cluster
    a = ref.route(x).numpy()
    b = to_ref[other.route(x).numpy()]
    return float((a != b).mean())


def fit(x: torch.Tensor, k: int, restarts: int, seed: int):
    from wasserstein_neurons.expansion import fit_router

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SmallClusterWarning: reported as cluster_min
        return fit_router(x, k, restarts=restarts, seed=seed, min_cluster_tokens=0)


def router_rows(layer: int, role: str, x: torch.Tensor, args) -> list[dict]:
    """Fit every restart count (and the noise seeds) on ``x``; one row per fit."""
    restarts, k = ints(args.restarts), args.experts
    fits = [(r, args.seed) for r in restarts]
    noise = ints(args.noise_seeds)
    fits += [(restarts[0], s) for s in noise] + [(restarts[-1], s) for s in noise[:1]]
    routers = {key: fit(x, k, *key) for key in fits}
    ref = routers[(restarts[-1], args.seed)]
    rows = []
    for (r, s), router in routers.items():
        info = router.fit_info
        rows.append(
            {
                "layer": layer,
                "role": role,
                "d_in": x.shape[1],
                "tokens": x.shape[0],
                "pca_dim": router.pca_dim,
                "restarts": r,
                "seed": s,
                "inertia": info.inertia,
                "gap_vs_ref": info.inertia / ref.fit_info.inertia - 1.0,
                "assign_diff_vs_ref": matched_disagreement(ref, router, x),
                "restart_inertia_cv": float(np.std(info.restart_inertia))
                / float(np.mean(info.restart_inertia)),
                "n_iter": info.n_iter,
                "converged": info.converged,
                "cluster_min": int(router.counts.min()),
                "cluster_max": int(router.counts.max()),
                "fit_s": info.time_s,
            }
        )
    return rows


def run_routers(args) -> pd.DataFrame:
    from wasserstein_neurons import load_model
    from wasserstein_neurons.bridge import native_sdpa
    from wasserstein_neurons.layerwise import sequential_layerwise

    model = load_model(args.model)
    cal, _ = windows(model, args, args.nsamples)
    roles, rows = args.roles.split(","), []
    out = Path(args.out) / "kmeans_restarts_routers.csv"

    def process(ctx) -> None:
        xs = ctx.collect_inputs(ctx.targets(roles))
        for role in roles:
            new = router_rows(ctx.index, role, xs.pop(role), args)
            rows.extend(new)
            pd.DataFrame(rows).to_csv(out, index=False)
            for row in new:
                print(router_line(row), flush=True)

    print(f"routers: {cal.shape[0]} x {cal.shape[1]} calibration tokens; {machine_note()}")
    with native_sdpa(model.hf_model):
        sequential_layerwise(
            model, cal, process, layers=ints(args.layers), batch_size=args.batch_size,
            progress=False,
        )  # fmt: skip
    return pd.DataFrame(rows)


def router_line(row: dict) -> str:
    return (
        f"layer {row['layer']:2d} {row['role']:<4} restarts {row['restarts']:3d} seed "
        f"{row['seed']}: inertia {row['inertia']:.6g} gap {100 * row['gap_vs_ref']:+.3f}% "
        f"assign diff {100 * row['assign_diff_vs_ref']:5.2f}% clusters "
        f"{row['cluster_min']}-{row['cluster_max']} iters {row['n_iter']} "
        f"fit {row['fit_s']:.1f} s"
    )


def summarize_routers(df: pd.DataFrame) -> None:
    print("\nmean over linears (gap and diff vs the reference fit):")
    agg = df.groupby(["restarts", "seed"]).agg(
        linears=("inertia", "size"),
        gap_mean_pct=("gap_vs_ref", lambda s: 100 * s.mean()),
        gap_max_pct=("gap_vs_ref", lambda s: 100 * s.max()),
        diff_mean_pct=("assign_diff_vs_ref", lambda s: 100 * s.mean()),
        diff_max_pct=("assign_diff_vs_ref", lambda s: 100 * s.max()),
        fit_s_total=("fit_s", "sum"),
    )
    print(agg.round(3).to_string())


# ============================================================================================
# Part b: perplexity of whole builds
# ============================================================================================


def build_row(args, restarts: int, seed: int, k: int, ev: torch.Tensor) -> dict:
    from wasserstein_neurons import load_model, perplexity
    from wasserstein_neurons.expansion import ExpansionConfig, build_sparse_expansion

    model = load_model(args.model)
    cal, _ = windows(model, args, args.ppl_nsamples)
    cfg = ExpansionConfig(
        n_experts=k,
        sparsity=args.sparsity,
        kmeans_restarts=restarts,
        seed=seed,
        batch_size=args.batch_size,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported as small_clusters
        summary = build_sparse_expansion(model, cal, cfg, progress=False)
    build_s = time.perf_counter() - t0
    res = perplexity(model, ev, batch_size=args.batch_size, progress=False)
    return {
        "experts": k,
        "restarts": restarts,
        "seed": seed,
        "sparsity": args.sparsity,
        "calib_tokens": int(cal.numel()),
        "eval_tokens": res.n_tokens,
        "perplexity": res.perplexity,
        "build_s": build_s,
        "router_s": float(summary["router_seconds"].sum()),
        "eval_s": res.seconds,
        "small_clusters": int(summary["small_clusters"].sum()),
        "rel_error_gate_up": float(summary.loc[summary.role != "down", "rel_error"].mean()),
        "rel_error_down": float(summary.loc[summary.role == "down", "rel_error"].mean()),
        "load_avg": os.getloadavg()[0],
    }


def run_ppl(args) -> pd.DataFrame:
    from wasserstein_neurons import load_model

    runs = [tuple(int(v) for v in item.split(":")) for item in args.ppl_runs.split(",")]
    plan = [(r, s, args.experts) for r, s in runs] + ([(1, 0, 1)] if args.sparsegpt else [])
    _, ev = windows(load_model(args.model), args, 1)
    print(
        f"ppl: k={args.experts} sparsity {args.sparsity}, {args.ppl_nsamples} x {args.seqlen} "
        f"calibration tokens, {ev.numel()} evaluation tokens; {machine_note()}",
        flush=True,
    )
    out, rows = Path(args.out) / "kmeans_restarts_ppl.csv", []
    for restarts, seed, k in plan:
        row = build_row(args, restarts, seed, k, ev)
        rows.append(row)
        pd.DataFrame(rows).to_csv(out, index=False)
        print(
            f"k={k:2d} restarts {restarts:3d} seed {seed}: ppl {row['perplexity']:.3f} "
            f"build {row['build_s']:.0f} s (routers {row['router_s']:.0f} s) eval "
            f"{row['eval_s']:.0f} s, rel err gate/up {row['rel_error_gate_up']:.4f} down "
            f"{row['rel_error_down']:.4f}, small clusters {row['small_clusters']}, "
            f"load {row['load_avg']:.2f}",
            flush=True,
        )
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part == "routers":
        summarize_routers(run_routers(args))
    else:
        run_ppl(args)


if __name__ == "__main__":
    main()
