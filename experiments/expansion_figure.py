"""Reproduce the paper's first central figure: perplexity vs sparsity, Sparse Expansion vs
one-shot pruning.

Runs the evaluation grid of :func:`wasserstein_neurons.workflows.run_grid` (every MLP
linear pruned; magnitude, Wanda, SparseGPT = SE with k = 1, and SE with each ``--experts``
value, at each ``--sparsities`` value) on the ``prune`` protocol (``--nsamples`` x ``--seqlen``
random calibration windows, seed 0; perplexity = exp(mean NLL) on ``--eval-tokens`` held-out
tokens), then prints the table, SE's relative perplexity gain over SparseGPT at each sparsity,
``(ppl_SparseGPT - ppl_SE) / ppl_SparseGPT``, and writes ``grid.png`` to ``--out``.

The grid is expensive on CPU (one 16-expert build of the embedded model takes ~15-20 minutes on
2 cores): ``--resume`` continues an interrupted grid in the same folder, and ``--replot`` only
re-reads ``results.csv`` and redraws the figure.

Usage::

    python experiments/expansion_figure.py --sparsities 0.9,0.5,0.7 --experts 16,1 \\
        --eval-tokens 16384 --out runs/grid --resume
    python experiments/expansion_figure.py --out runs/grid --replot
    python experiments/expansion_figure.py --model EleutherAI/pythia-410m-deduped \\
        --dataset wikitext2 --seqlen 2048 --out runs/pythia_grid
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from wasserstein_neurons.workflows import (
    BASELINES,
    EXPERT_GRID,
    SPARSITY_GRID,
    ExpandConfig,
    run_grid,
    save_grid_figure,
)


def relative_gains(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (pattern, k > 1): SE's perplexity, SparseGPT's, and the relative gain."""
    sgpt = table[table["method"] == "sparsegpt"].set_index("pattern")["perplexity"]
    se = table[table["method"] == "sparse_expansion"]
    rows = [
        {
            "pattern": r.pattern,
            "experts": int(r.experts),
            "ppl_sparsegpt": sgpt[r.pattern],
            "ppl_se": r.perplexity,
            "relative_gain": (sgpt[r.pattern] - r.perplexity) / sgpt[r.pattern],
        }
        for r in se.itertuples()
        if r.pattern in sgpt.index
    ]
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--sparsities", default=",".join(SPARSITY_GRID), help="e.g. 0.5,0.7,0.9,2:4")
    p.add_argument("--experts", default=",".join(map(str, EXPERT_GRID)), help="e.g. 1,4,16")
    p.add_argument("--baselines", default=",".join(BASELINES), help="magnitude,wanda or ''")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeans-restarts", type=int, default=None, help="default: the builder's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/expansion_figure")
    p.add_argument("--resume", action="store_true", help="keep the cells already in --out")
    p.add_argument("--replot", action="store_true", help="only redraw from --out/results.csv")
    args = p.parse_args()

    extra = {} if args.kmeans_restarts is None else {"kmeans_restarts": args.kmeans_restarts}
    cfg = ExpandConfig(
        model=args.model,
        dataset=args.dataset,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        device=args.device,
        out=args.out,
        nsamples=args.nsamples,
        seed=args.seed,
        grid_sparsities=tuple(s.strip() for s in args.sparsities.split(",") if s.strip()),
        grid_experts=tuple(int(k) for k in args.experts.split(",") if k.strip()),
        baselines=tuple(b.strip() for b in args.baselines.split(",") if b.strip()),
        resume=args.resume,
        **extra,
    )
    if args.replot:
        results = Path(args.out) / "results.csv"
        if not results.is_file():
            raise SystemExit(f"error: --replot needs {results}; run the grid first")
        table = pd.read_csv(results, dtype={"pattern": str})
        save_grid_figure(table, args.out, args.model)
    else:
        table = run_grid(cfg)
    cols = ["method", "experts", "pattern", "perplexity", "flops_per_token", "params"]
    cols += ["build_seconds"] if "build_seconds" in table else []
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        gains = relative_gains(table)
        if len(gains):
            print("\nrelative perplexity gain of SE over SparseGPT:")
            print(gains.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"figure: {Path(args.out) / 'grid.png'}")


if __name__ == "__main__":
    main()
