"""``wasserstein-neurons`` command line: one subcommand per workflow.

Every subcommand turns its flags into the workflow's dataclass config, runs it, prints a short
summary and exits 0; a bad input prints one ``error: …`` line and exits 2, leaving earlier
results untouched.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence

import pandas as pd

from .models import DEFAULT_MODEL, ModelLoadError
from .pruning import METHODS

# Errors we expect from bad input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,  # FileExistsError, FileNotFoundError, PermissionError, a full disk ...
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
    p.add_argument(
        "--offload",
        default=None,
        help="none (default), cpu or disk: keep decoder layers off --device and load one at a "
        "time while it runs (for models larger than memory; needs a local safetensors folder)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bos",
        action="store_true",
        help="start every window with the tokenizer's BOS (TransformerLens' to_tokens); "
        "windows keep --seqlen tokens",
    )
    p.add_argument("--out", default=default_out, help=f"run folder (default {default_out})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run in --out instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_positions(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exclude-positions",
        type=int,
        default=0,
        help="leave the first N positions of every window out of the output statistics "
        "(default 0: keep all, the paper's protocol)",
    )
    p.add_argument(
        "--exclude-special",
        action="store_true",
        help="leave special tokens (BOS, EOS, pad) out of the output statistics",
    )


def _config(cls, args: argparse.Namespace, **overrides):
    """The workflow config ``cls`` from the flags of the same names (``--batch-size`` ->
    ``batch_size``); flags left at ``None`` keep the config's default."""
    from .workflows.common import config_from

    return config_from(cls, args, **overrides)


def _print_table(df: pd.DataFrame, fmt: str = ".3f", width: int = 120) -> None:
    with pd.option_context("display.width", width, "display.max_rows", 200):
        print(df.to_string(index=False, float_format=lambda v: f"{v:{fmt}}"))


# --------------------------------------------------------------------------------------------
# rank
# --------------------------------------------------------------------------------------------


def _add_rank(sub) -> None:
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
    _add_positions(p)
    p.add_argument(
        "--no-keep-activations",
        action="store_true",
        help="delete the activation store once the tables and plots are written",
    )
    p.set_defaults(func=_rank)


def _rank(args: argparse.Namespace) -> int:
    from .workflows import RankConfig, run_rank

    cfg = _config(RankConfig, args, keep_activations=not args.no_keep_activations)
    result = run_rank(cfg, progress=not args.no_progress)
    top = result.top.sort_values("wd", ascending=False).groupby("hook", sort=False).head(3)
    top = top.sort_values(["layer", "wd"], ascending=[True, False])
    cols = ["layer", "hook", "neuron", "wd", "mean", "std", "skew", "kurtosis", "first_pos_share"]
    print(f"Top Wasserstein neurons (3 per hook; top {cfg.top_percent:g}% saved):")
    _print_table(top[cols], width=140)
    n_const = int(result.table["constant"].sum())
    print(
        f"\n{len(result.table)} neurons over {result.table['hook'].nunique()} hooks, "
        f"{int(result.table['n_tokens'].iloc[0])} tokens each"
        + (f"; {n_const} constant neurons (WD = NaN)" if n_const else "")
    )
    n_artefact = int(result.top["position_artefact"].sum())
    print(
        f"{n_artefact} of {len(result.top)} Wasserstein neurons have a tail (top 0.1% |z|) "
        "mostly at the window start (position_artefact)"
    )
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    print(f"results in {result.out}")
    return 0


# --------------------------------------------------------------------------------------------
# eval, prune
# --------------------------------------------------------------------------------------------


def _numbers(text: str, kind: type, what: str) -> list:
    """``"1,2, 4"`` -> ``[1, 2, 4]`` as ``kind``; at least one entry."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    return _numbers(text, float, "numbers")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(_numbers(text, int, "integers"))


def _patterns(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated sparsities, got {text!r}")
    return values


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=32768,
        help="evaluation tokens scored (non-overlapping windows of --seqlen)",
    )


def _add_sparsity(p: argparse.ArgumentParser, sparsity: float, help: str) -> None:
    p.add_argument("--sparsity", type=float, default=sparsity, help=help)
    p.add_argument("--prunen", type=int, default=0, help="n of n:m (e.g. 2 of 2:4)")
    p.add_argument("--prunem", type=int, default=0, help="m of n:m (e.g. 4 of 2:4)")
    p.add_argument(
        "--per-row",
        action="store_true",
        help="prune an exact share of every row (default: each method's reference rule)",
    )


def _add_subcommand(sub, name: str, help: str, func, nsamples: int | None = 128):
    """A subparser with the common, evaluation and (``nsamples``) calibration flags."""
    p = sub.add_parser(name, help=help)
    _add_common(p, seqlen=512, default_out=f"runs/{name}")
    _add_eval(p)
    if nsamples is not None:
        p.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
    p.set_defaults(func=func)
    return p


def _add_eval_and_prune(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on the evaluation split")
    _add_common(p, seqlen=512, default_out=None)
    _add_eval(p)
    p.set_defaults(func=_eval)

    p = _add_subcommand(
        sub, "prune", "one-shot pruning baseline: perplexity before and after", _prune
    )
    p.add_argument("--method", default="sparsegpt", help=" | ".join(METHODS))
    _add_sparsity(p, 0.5, "unstructured sparsity in [0, 1)")
    p.add_argument("--wbits", type=int, default=16, help="quantize kept weights (sparsegpt)")
    p.add_argument("--targets", default="mlp", help="mlp (default) or all linears")
    p.add_argument("--save", default=None, help="write the pruned model to this folder")


def _eval(args: argparse.Namespace) -> int:
    from .workflows import EvalSettings, run_eval

    row = run_eval(_config(EvalSettings, args), progress=not args.no_progress)
    print(
        f"{row['model']} on {row['dataset']} (seqlen {row['seqlen']}, "
        f"{row['eval_tokens']} scored tokens): perplexity {row['perplexity']:.3f}"
    )
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .workflows import PruneConfig, run_prune

    cfg = _config(PruneConfig, args)
    row = run_prune(cfg, progress=not args.no_progress)
    pattern = f"{cfg.prunen}:{cfg.prunem}" if cfg.prunem else f"{row['sparsity']:.0%}"
    print(
        f"{cfg.method} {pattern} ({cfg.targets} linears, {cfg.nsamples} x {cfg.seqlen} "
        f"calibration tokens): perplexity {row['perplexity_before']:.3f} -> "
        f"{row['perplexity_after']:.3f} (achieved sparsity {row['achieved_sparsity']:.3f})"
    )
    print(f"results in {cfg.out}")
    return 0


# --------------------------------------------------------------------------------------------
# ablate
# --------------------------------------------------------------------------------------------


def _add_ablate(sub) -> None:
    p = _add_subcommand(sub, "ablate", "sparsify neuron sets (WD top vs controls)", _ablate, 64)
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
    p.add_argument("--method", default="sparsegpt", help=" | ".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random strategy")
    p.add_argument(
        "--include-down",
        action="store_true",
        help="also sparsify the neurons' down-projection columns (magnitude)",
    )
    p.add_argument("--ranking", default=None, help="reuse the neurons.csv of this rank run")
    _add_positions(p)
    p.add_argument(
        "--tokens",
        type=int,
        default=32768,
        help="tokens for the ranking made when --ranking is not given",
    )
    _add_activation_modes(p)


def _add_activation_modes(p: argparse.ArgumentParser) -> None:
    from .interventions import HOOKS, MODES

    p.add_argument(
        "--mode",
        default="weights",
        help=f"comma-separated: {', '.join(MODES)} (default weights: sparsify rows)",
    )
    p.add_argument(
        "--hook",
        default="hook_pre",
        help=f"hook the neurons are selected and intervened on: {' | '.join(HOOKS)}",
    )
    p.add_argument(
        "--sign", default=None, help="--mode zero: zero only the negative | positive | both parts"
    )
    p.add_argument(
        "--activation-sparsity",
        type=_floats,
        default=None,
        help="--mode threshold: share of each channel's calibration |a| zeroed, comma-separated "
        "(default 0.5)",
    )
    p.add_argument(
        "--threshold-scope",
        default="selected",
        help="--mode threshold, comma-separated: selected (the strategy's neurons), all "
        "(every neuron), complement (all but the strategy's neurons)",
    )
    p.add_argument(
        "--threshold-rule",
        default="channel",
        help="--mode threshold: channel (a quantile per neuron, CHESS/CATS) and/or uniform "
        "(one per layer, TEAL)",
    )
    p.add_argument(
        "--stats-tokens",
        type=int,
        default=4096,
        help="calibration tokens pooled for the mean / resample / threshold statistics",
    )
    _add_engine(p)


def _ablate(args: argparse.Namespace) -> int:
    from .ablation import AblationConfig, summarize
    from .workflows import AblateConfig, run_ablate

    study = _config(
        AblationConfig,
        args,
        neuron_sparsities=args.neuron_sparsity,
        modes=args.mode,
        activation_sparsities=args.activation_sparsity,
        threshold_scopes=args.threshold_scope,
        threshold_rules=args.threshold_rule,
    )
    cfg = _config(AblateConfig, args, study=study, rank_tokens=args.tokens)
    results = run_ablate(cfg, progress=not args.no_progress)
    _print_table(summarize(results))
    print(f"results in {cfg.out}")
    return 0


# --------------------------------------------------------------------------------------------
# expand, disentangle
# --------------------------------------------------------------------------------------------


def _add_routing(p: argparse.ArgumentParser, dims_help: str) -> None:
    p.add_argument("--pca-factor", type=int, default=32, help=dims_help)
    p.add_argument(
        "--kmeans-restarts",
        type=int,
        default=None,
        help="k-means++ initialisations per router (default: the builder's, 5)",
    )


def _add_expand(sub) -> None:
    p = _add_subcommand(
        sub, "expand", "Sparse Expansion: mixture of sparse experts per linear", _expand
    )
    p.add_argument("--experts", type=int, default=16, help="experts per MLP linear")
    _add_sparsity(p, 0.5, "sparsity of every expert")
    p.add_argument("--wbits", type=int, default=16, help="quantize kept weights")
    _add_routing(p, "route in d_in / factor dims")
    p.add_argument("--save", default=None, help="write the expanded model to this folder")
    p.add_argument(
        "--batched-experts",
        type=_auto_on_off,
        default=None,
        metavar="{auto,on,off}",
        help="prune a linear's experts together (batched SparseGPT); auto: on CUDA only",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="run the grid: sparsities x experts next to magnitude and Wanda",
    )
    p.add_argument("--grid-sparsities", type=_patterns, default=None, help="e.g. 0.5,0.9,2:4")
    p.add_argument("--grid-experts", type=_ints, default=None, help="e.g. 1,2,4,8,16")
    p.add_argument("--resume", action="store_true", help="--grid: keep finished cells")
    _add_engine(p)


def _auto_on_off(text: str) -> bool | None:
    """``auto`` -> ``None``, ``on`` -> ``True``, ``off`` -> ``False``."""
    choices = {"auto": None, "on": True, "off": False}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return choices[text]


def _add_engine(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--engine --ray-address --trial-cpus --trial-gpus``; without ``defaults`` they are
    ``None`` unless given (a sweep file's values then stand)."""
    p.add_argument(
        "--engine",
        default="local" if defaults else None,
        help="local (default: one trial after another here) or ray (Ray Tune trials; "
        "needs the 'distributed' extra)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="--engine ray: host:port of a running Ray cluster (default: start one here)",
    )
    cpus, gpus = (1.0, 0.0) if defaults else (None, None)
    p.add_argument("--trial-cpus", type=float, default=cpus, help="CPUs per Ray trial (1)")
    p.add_argument("--trial-gpus", type=float, default=gpus, help="GPUs per Ray trial (0)")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="models x workflows x grids from a YAML / JSON file")
    p.add_argument("file", help="the sweep file (see README: Sweeps)")
    p.add_argument("--out", default=None, help="run folder (default: the file's, or runs/sweep)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished sweep in --out")
    p.add_argument("--resume", action="store_true", help="run only the trials not yet done")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_engine(p, defaults=False)
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from .workflows.sweep import load_sweep, run_sweep

    flags = ("out", "engine", "ray_address", "trial_cpus", "trial_gpus")
    sweep = load_sweep(
        args.file,
        overwrite=args.overwrite,
        resume=args.resume,
        **{name: getattr(args, name) for name in flags},
    )
    table = run_sweep(sweep, progress=not args.no_progress)
    _print_table(table.head(40), fmt=".4g", width=160)
    print(f"{len(table)} rows from {table['trial'].nunique()} trials; results in {sweep.out}")
    return 0


def _expand(args: argparse.Namespace) -> int:
    from .workflows import ExpandConfig, run_expand, run_grid

    cfg = _config(ExpandConfig, args)
    run = run_grid if args.grid else run_expand
    results = run(cfg, progress=not args.no_progress)
    cols = [
        c
        for c in ("method", "experts", "sparsity", "perplexity", "flops_per_token", "params")
        if c in results.columns
    ]
    _print_table(results[cols], fmt=".4g", width=140)
    print(f"results in {cfg.out}")
    return 0


def _add_disentangle(sub) -> None:
    p = _add_subcommand(
        sub, "disentangle", "why Sparse Expansion helps: one layer's neurons", _disentangle
    )
    p.add_argument("--layer", type=int, default=5, help="decoder layer to study")
    p.add_argument("--role", default=None, help="gate | up | down (default: first projection)")
    _add_sparsity(p, 0.9, "sparsity of SparseGPT and of every expert")
    p.add_argument("--experts", default="1,2,4,8,16", help="numbers of experts, comma-separated")
    _add_routing(p, "PCA to d_in / factor dims")
    p.add_argument("--top-percent", type=float, default=3.0)
    _add_positions(p)


def _disentangle(args: argparse.Namespace) -> int:
    from .workflows import DisentangleConfig, run_disentangle

    result = run_disentangle(_config(DisentangleConfig, args), progress=not args.no_progress)
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
    _print_table(result.per_k[cols], width=140)
    print(f"results in {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="static HTML dashboard of a rank run's Wasserstein neurons")
    p.add_argument("run", help="rank run folder (with its activations/ store)")
    p.add_argument("--expand", default=None, help="an expand run folder to show with it")
    p.add_argument("--disentangle", default=None, help="a disentangle run folder to show with it")
    p.add_argument(
        "--neurons", default="", help="extra pages, layer:neuron comma-separated (5:123,29:1397)"
    )
    p.add_argument("--top-k", type=int, default=8, help="contexts per tail")
    p.add_argument("--per-quantile", type=int, default=2, help="contexts per quantile bin")
    p.add_argument("--context-before", type=int, default=12, help="tokens before the token")
    p.add_argument("--context-after", type=int, default=4, help="tokens after the token")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the run's model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/site", help="site folder (default runs/site)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing site folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from .workflows.report import ReportConfig, build_report

    result = build_report(_config(ReportConfig, args), progress=not args.no_progress)
    print(
        f"{result.pages} neuron pages, {result.bytes / 1e6:.1f} MB, "
        f"{result.seconds['total']:.1f} s; open {result.out / 'index.html'}"
    )
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="the architectures load_model supports, and how tested")
    p.add_argument("--tested", action="store_true", help="only those of the test matrix")
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> int:
    from .architectures import architecture_table

    rows = [r for r in architecture_table() if r["status"] == "tested" or not args.tested]
    width = max(len(r["architecture"]) for r in rows)
    for r in sorted(rows, key=lambda r: (r["status"] != "tested", r["architecture"])):
        print(f"{r['architecture']:<{width}}  {r['status']}  [{r['model_type']}]")
    print(
        f"{sum(r['status'] == 'tested' for r in rows)} tested of {len(rows)} listed. Any model is "
        "checked when loaded: every block must have a dense MLP (gate/up/down or up/down)."
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one ``error: …`` line (no usage block), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog.split()[-1]}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``wasserstein-neurons`` parser: one subcommand per workflow."""
    parser = _Parser(
        prog="wasserstein-neurons",
        description="Neuron entanglement in LLMs: rank Wasserstein neurons, sparsify, expand.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_rank,
        _add_eval_and_prune,
        _add_ablate,
        _add_expand,
        _add_disentangle,
        _add_sweep,
    ):
        add(sub)
    _add_report(sub)
    _add_models(sub)
    return parser


def _error_message(err: BaseException) -> str:
    """One line for an expected error: an OS error as ``reason: path``, a ``KeyError``
    without quotes, anything else as its message."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and err.errno is not None:
        reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror
        return f"{reason}: {err.filename}" if err.filename else str(reason)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command left in its ``--out`` (for the one line printed)."""
    from .runs import RunFolderError, folder_state

    out = getattr(args, "out", None)
    try:
        kind = folder_state(out).kind if out else "absent"
    except RunFolderError:
        kind = "absent"
    if kind == "finished":
        return f"interrupted; {out} still holds its finished run"
    if kind == "unfinished":
        resumable = getattr(args, "grid", False) or args.command == "sweep"
        how = "--resume to continue it, or " if resumable else ""
        return f"interrupted; {out} is marked unfinished: rerun with {how}--overwrite"
    return "interrupted before anything was written"


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files, never shown
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a bad flag (already reported in one line)
        return int(done.code or 0)
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as err:
        print(f"error: {_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {_interrupted(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
