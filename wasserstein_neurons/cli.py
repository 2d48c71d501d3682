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


def _add_common(p: argparse.ArgumentParser, *, seqlen: int, default_out: str) -> None:
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
