"""Reproduce the paper's disentanglement analysis of one layer: why Sparse Expansion works.

One MLP linear (default: layer 5's first projection, Llama ``gate_proj``) is pruned once by
SparseGPT and expanded into k SparseGPT experts routed by PCA + k-means; every metric is taken
on held-out tokens with the layer's inputs from the dense model (a single-layer study). Prints

* Spearman rho of SE's relative improvement (RI) over SparseGPT with WD, output mean and
  output variance, for each k;
* the median W1 between sparse and dense output distributions of the top-3% WD neurons and of
  all neurons, for each k (k = 1 is SparseGPT);
* the cluster-size-weighted WD of the per-expert output distributions vs the neurons' own WD
  (medians), with a random-partition control of the same cluster sizes;
* mapping difficulty of the top-WD neurons vs all neurons;

and writes the figures (the paper's second central figure is ``neuron_<j>_expansion.png`` and
``w1_vs_k.png``) with the per-neuron table to ``--out``.

    python experiments/disentangle_figure.py --out runs/disentangle_figure
    python experiments/disentangle_figure.py --layer 1 --experts 1,4,16 --kmeans-restarts 100 \\
        --model EleutherAI/pythia-1.4b-deduped --dataset wikitext2 --seqlen 2048 --nsamples 128
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from wasserstein_neurons.expansion import DEFAULT_KMEANS_RESTARTS
from wasserstein_neurons.workflows import DisentangleConfig, run_disentangle


def _fmt(v: float) -> str:
    return "nan" if pd.isna(v) else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--role", default=None, help="gate / up / down (default: first projection)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--experts", default="1,2,4,8,16")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--pca-factor", type=int, default=32)
    p.add_argument("--kmeans-restarts", type=int, default=DEFAULT_KMEANS_RESTARTS)
    p.add_argument("--top-percent", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/disentangle_figure")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    cfg = DisentangleConfig(
        out=args.out,
        model=args.model,
        dataset=args.dataset,
        layer=args.layer,
        role=args.role,
        sparsity=args.sparsity,
        experts=args.experts,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        pca_factor=args.pca_factor,
        kmeans_restarts=args.kmeans_restarts,
        top_percent=args.top_percent,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
    )
    t0 = time.perf_counter()
    res = run_disentangle(cfg, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    s, per_k = res.summary, res.per_k
    top = f"top-{args.top_percent:g}% WD"
    print(
        f"{s['hook']} ({s['role']}), sparsity {s['spec']['sparsity']:g}: "
        f"{s['n_calibration_tokens']} calibration / {s['n_eval_tokens']} held-out tokens, "
        f"{s['d_out']} neurons, {s['n_top']} in the {top} set"
    )
    print(
        f"median WD: {top} {_fmt(s['median_wd_top'])}, all {_fmt(s['median_wd_all'])}; "
        f"SparseGPT layer error {_fmt(s['sparsegpt']['layer_err'])}"
    )
    print("\nSpearman rho of RI (SE k vs SparseGPT, per neuron) with:")
    cols = ["experts", "spearman_ri_wd", "spearman_ri_mean", "spearman_ri_variance"]
    multi = per_k[per_k["experts"] > 1]
    print(
        multi[cols + ["median_ri", "median_ri_top", "layer_err"]]
        .rename(
            columns={
                "spearman_ri_wd": "rho(RI,WD)",
                "spearman_ri_mean": "rho(RI,mean)",
                "spearman_ri_variance": "rho(RI,var)",
                "median_ri_top": "median_ri_topWD",
            }
        )
        .to_string(index=False, float_format=_fmt)
    )
    print("\nW1(sparse, dense) medians (output units; w1z = divided by the dense std):")
    w1 = per_k[["experts", "median_w1_top", "median_w1_all", "median_w1z_top", "median_w1z_all"]]
    print(w1.to_string(index=False, float_format=_fmt))
    print(
        "\nWD of per-expert output distributions, size-weighted (medians); "
        "random = tokens split at random into groups of the same sizes:"
    )
    wd = per_k[
        [
            "experts",
            "median_weighted_wd_top",
            "median_weighted_random_wd_top",
            "median_weighted_wd_all",
            "median_weighted_random_wd_all",
            "min_cluster_calibration_tokens",
        ]
    ].rename(
        columns={
            "median_weighted_wd_top": "expert_wd_top",
            "median_weighted_random_wd_top": "random_wd_top",
            "median_weighted_wd_all": "expert_wd_all",
            "median_weighted_random_wd_all": "random_wd_all",
            "min_cluster_calibration_tokens": "min_cluster_cal",
        }
    )
    print(f"(own WD: {top} {_fmt(s['median_wd_top'])}, all {_fmt(s['median_wd_all'])})")
    print(wd.to_string(index=False, float_format=_fmt))
    md = s["mapping_difficulty"]
    print(
        f"\nmapping difficulty (median, {md['pairs']} pairs): {top} {_fmt(md['median_top'])}, "
        f"all {_fmt(md['median_all'])}; Spearman rho(MD, WD) = {_fmt(md['spearman_md_wd'])}"
    )
    steps = ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items() if k != "total")
    print(f"\nwall time {wall:.0f} s ({steps})")
    print(f"figures and tables: {res.out}")


if __name__ == "__main__":
    main()
