"""``wasserstein-neurons`` command line: one subcommand per workflow.

Every subcommand turns its flags into the workflow's dataclass config, runs it, prints a short
summary and exits 0; a bad input prints one ``error: …`` line and exits 2, leaving earlier
results untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import pandas as pd

from .models import DEFAULT_MODEL, ModelLoadError

# Errors we expect from bad input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileExistsError,
    FileNotFoundError,
    KeyError,
    ImportError,
    ModelLoadError,
)


def _add_common(p: argparse.ArgumentParser, *, seqlen: int, default_out: str | None) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="embedded 'smollm2-135m' (default), a Hugging Face id or a local folder",
    )
    p.add_argument(
        "--dataset",
        default="embedded",
        help="'embedded' (default), 'wikitext2' or the path of a text file",
    )
    p.add_argument("--seqlen", type=int, default=seqlen, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16, bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=default_out, help=f"run folder (default {default_out})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in --out instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _rank(args: argparse.Namespace) -> int:
    from .rank_run import RankConfig, run_rank

    cfg = RankConfig(
        out=args.out,
        model=args.model,
        dataset=args.dataset,
        tokens=args.tokens,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        hooks=args.hooks,
        top_percent=args.top_percent,
        method=args.method,
        device=args.device,
        dtype=args.dtype,
        store_dtype=args.store_dtype,
        seed=args.seed,
        keep_activations=not args.no_keep_activations,
        overwrite=args.overwrite,
    )
    result = run_rank(cfg, progress=not args.no_progress)
    top = result.top.sort_values("wd", ascending=False).groupby("hook", sort=False).head(3)
    top = top.sort_values(["layer", "wd"], ascending=[True, False])
    cols = ["layer", "hook", "neuron", "wd", "mean", "std", "skew", "kurtosis"]
    with pd.option_context("display.width", 120, "display.max_rows", 200):
        print(f"Top Wasserstein neurons (3 per hook; top {cfg.top_percent:g}% saved):")
        print(top[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    n_const = int(result.table["constant"].sum())
    print(
        f"\n{len(result.table)} neurons over {result.table['hook'].nunique()} hooks, "
        f"{int(result.table['n_tokens'].iloc[0])} tokens each"
        + (f"; {n_const} constant neurons (WD = NaN)" if n_const else "")
    )
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    print(f"results in {result.out}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=32768,
        help="evaluation tokens scored (non-overlapping windows of --seqlen)",
    )


def _eval_settings(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        dataset=args.dataset,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
    )


def _eval(args: argparse.Namespace) -> int:
    from .prune_run import EvalSettings, run_eval

    row = run_eval(EvalSettings(**_eval_settings(args)), progress=not args.no_progress)
    print(
        f"{row['model']} on {row['dataset']} (seqlen {row['seqlen']}, "
        f"{row['eval_tokens']} scored tokens): perplexity {row['perplexity']:.3f}"
    )
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .prune_run import PruneConfig, run_prune

    cfg = PruneConfig(
        **_eval_settings(args),
        out=args.out,
        method=args.method,
        sparsity=args.sparsity,
        prunen=args.prunen,
        prunem=args.prunem,
        wbits=args.wbits,
        nsamples=args.nsamples,
        seed=args.seed,
        targets=args.targets,
        save=args.save,
        overwrite=args.overwrite,
    )
    row = run_prune(cfg, progress=not args.no_progress)
    pattern = f"{cfg.prunen}:{cfg.prunem}" if cfg.prunem else f"{row['sparsity']:.0%}"
    print(
        f"{cfg.method} {pattern} ({cfg.targets} linears, {cfg.nsamples} x {cfg.seqlen} "
        f"calibration tokens): perplexity {row['perplexity_before']:.3f} -> "
        f"{row['perplexity_after']:.3f} (achieved sparsity {row['achieved_sparsity']:.3f})"
    )
    print(f"results in {cfg.out}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .ablation import AblationConfig, summarize
    from .ablation_run import AblateConfig, run_ablate

    study = AblationConfig(
        strategies=args.strategies,
        top_percent=args.top_percent,
        neuron_sparsities=args.neuron_sparsity,
        method=args.method,
        seeds=args.seeds,
        include_down=args.include_down,
    )
    cfg = AblateConfig(
        **_eval_settings(args),
        out=args.out,
        study=study,
        ranking=args.ranking,
        rank_tokens=args.tokens,
        nsamples=args.nsamples,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    results = run_ablate(cfg, progress=not args.no_progress)
    table = summarize(results)
    with pd.option_context("display.width", 120):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"results in {cfg.out}")
    return 0


def _expand(args: argparse.Namespace) -> int:
    from .expansion.grid import ExpandRunConfig, run_expand, run_grid

    extra = {}
    if args.grid_sparsities:
        extra["grid_sparsities"] = tuple(s.strip() for s in args.grid_sparsities.split(","))
    if args.grid_experts:
        extra["grid_experts"] = tuple(int(k) for k in args.grid_experts.split(","))
    if args.kmeans_restarts is not None:
        extra["kmeans_restarts"] = args.kmeans_restarts
    cfg = ExpandRunConfig(
        **_eval_settings(args),
        out=args.out,
        experts=args.experts,
        sparsity=args.sparsity,
        prunen=args.prunen,
        prunem=args.prunem,
        wbits=args.wbits,
        pca_factor=args.pca_factor,
        nsamples=args.nsamples,
        seed=args.seed,
        save=args.save,
        overwrite=args.overwrite,
        resume=args.resume,
        **extra,
    )
    run = run_grid if args.grid else run_expand
    results = run(cfg, progress=not args.no_progress)
    cols = [
        c
        for c in ("method", "experts", "sparsity", "perplexity", "flops_per_token", "params")
        if c in results.columns
    ]
    with pd.option_context("display.width", 140, "display.max_rows", 200):
        print(results[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"results in {cfg.out}")
    return 0


def _disentangle(args: argparse.Namespace) -> int:
    from .disentangle import DisentangleConfig, run_disentangle

    cfg = DisentangleConfig(
        out=args.out,
        model=args.model,
        dataset=args.dataset,
        layer=args.layer,
        role=args.role,
        sparsity=args.sparsity,
        prunen=args.prunen,
        prunem=args.prunem,
        experts=args.experts,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_tokens=args.eval_tokens,
        pca_factor=args.pca_factor,
        kmeans_restarts=args.kmeans_restarts,
        top_percent=args.top_percent,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    result = run_disentangle(cfg, progress=not args.no_progress)
    cols = [
        "experts",
        "layer_err",
        "spearman_ri_wd",
        "spearman_ri_mean",
        "spearman_ri_variance",
        "median_ri",
        "median_ri_top",
        "median_w1_top",
        "median_w1_all",
    ]
    with pd.option_context("display.width", 140):
        print(result.per_k[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"results in {cfg.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wasserstein-neurons",
        description="Neuron entanglement in LLMs: rank Wasserstein neurons, sparsify, expand.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rank", help="rank every MLP neuron by W1 to a Gaussian")
    _add_common(p, seqlen=512, default_out="runs/rank")
    p.add_argument("--tokens", type=int, default=32768, help="tokens to capture")
    p.add_argument(
        "--hooks",
        default="blocks.*.mlp.hook_pre",
        help="hook names, patterns or kinds, comma-separated (e.g. hook_pre,hook_pre_linear)",
    )
    p.add_argument(
        "--top-percent",
        type=float,
        default=3.0,
        help="share of each layer's neurons called Wasserstein neurons",
    )
    p.add_argument("--method", default="exact", help="exact | sample | pot")
    p.add_argument("--store-dtype", default="float16", help="activation store: float16|float32")
    p.add_argument(
        "--no-keep-activations",
        action="store_true",
        help="delete the activation store once the tables and plots are written",
    )
    p.set_defaults(func=_rank)

    p = sub.add_parser("eval", help="perplexity of a model on the evaluation split")
    _add_common(p, seqlen=512, default_out=None)
    _add_eval(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("prune", help="one-shot pruning baseline: perplexity before and after")
    _add_common(p, seqlen=512, default_out="runs/prune")
    _add_eval(p)
    p.add_argument("--method", default="sparsegpt", help="magnitude | wanda | sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity in [0, 1)")
    p.add_argument("--prunen", type=int, default=0, help="n of n:m (e.g. 2 of 2:4)")
    p.add_argument("--prunem", type=int, default=0, help="m of n:m (e.g. 4 of 2:4)")
    p.add_argument("--wbits", type=int, default=16, help="quantize kept weights (sparsegpt)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--targets", default="mlp", help="mlp (default) or all linears")
    p.add_argument("--save", default=None, help="write the pruned model to this folder")
    p.set_defaults(func=_prune)

    p = sub.add_parser("ablate", help="sparsify neuron sets (WD top vs controls)")
    _add_common(p, seqlen=512, default_out="runs/ablate")
    _add_eval(p)
    p.add_argument(
        "--strategies",
        default="wd-top,random,wd-bottom",
        help="comma-separated: wd-top, wd-bottom, random, mean, variance, norm",
    )
    p.add_argument("--top-percent", type=float, default=3.0, help="neurons per layer (percent)")
    p.add_argument(
        "--neuron-sparsity",
        type=_floats,
        default=[0.9],
        help="per-row sparsity of the selected neurons, comma-separated sweep",
    )
    p.add_argument("--method", default="sparsegpt", help="magnitude | wanda | sparsegpt")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random strategy")
    p.add_argument(
        "--include-down",
        action="store_true",
        help="also sparsify the neurons' down-projection columns (magnitude)",
    )
    p.add_argument("--ranking", default=None, help="reuse the neurons.csv of this rank run")
    p.add_argument(
        "--tokens",
        type=int,
        default=32768,
        help="tokens for the ranking made when --ranking is not given",
    )
    p.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    p.set_defaults(func=_ablate)

    p = sub.add_parser("expand", help="Sparse Expansion: mixture of sparse experts per linear")
    _add_common(p, seqlen=512, default_out="runs/expand")
    _add_eval(p)
    p.add_argument("--experts", type=int, default=16, help="experts per MLP linear")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of every expert")
    p.add_argument("--prunen", type=int, default=0)
    p.add_argument("--prunem", type=int, default=0)
    p.add_argument("--wbits", type=int, default=16, help="quantize kept weights")
    p.add_argument("--pca-factor", type=int, default=32, help="route in d_in / factor dims")
    p.add_argument(
        "--kmeans-restarts",
        type=int,
        default=None,
        help="k-means++ initialisations per router (default: the builder's, 5)",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--save", default=None, help="write the expanded model to this folder")
    p.add_argument(
        "--grid",
        action="store_true",
        help="run the grid: sparsities x experts next to magnitude and Wanda",
    )
    p.add_argument("--grid-sparsities", default=None, help="e.g. 0.5,0.7,0.9,2:4")
    p.add_argument("--grid-experts", default=None, help="e.g. 1,2,4,8,16")
    p.add_argument("--resume", action="store_true", help="--grid: keep finished cells")
    p.set_defaults(func=_expand)

    p = sub.add_parser("disentangle", help="why Sparse Expansion helps: one layer's neurons")
    _add_common(p, seqlen=512, default_out="runs/disentangle")
    _add_eval(p)
    p.add_argument("--layer", type=int, default=5, help="decoder layer to study")
    p.add_argument("--role", default=None, help="gate | up | down (default: first projection)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--prunen", type=int, default=0)
    p.add_argument("--prunem", type=int, default=0)
    p.add_argument("--experts", default="1,2,4,8,16", help="numbers of experts, comma-separated")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--pca-factor", type=int, default=32, help="PCA to d_in / factor dims")
    p.add_argument("--kmeans-restarts", type=int, default=10)
    p.add_argument("--top-percent", type=float, default=3.0)
    p.set_defaults(func=_disentangle)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files, never shown
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
