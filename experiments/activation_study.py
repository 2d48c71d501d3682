"""Do Wasserstein neurons resist activation-level interventions worse than other neurons?

Three ``ablate`` runs on one ranking (the first makes it; the others reuse it):

1. ``neurons``: the top ``--top-percent`` % WD neurons of every layer vs the same count of
   random (``--seeds``), bottom-WD and high-variance neurons, under each activation mode:
   ``zero``, ``mean``, ``resample``, and per-channel ``threshold`` (CHESS / CATS) at every
   ``--activation-sparsities`` applied to *only* that set.
2. ``layer``: whole-layer per-channel thresholding (every neuron), and the CHESS-style
   selective rule that keeps the set dense (``complement`` scope) for the WD set and for random
   sets of the same size.
3. ``uniform``: whole-layer thresholding with one threshold per layer (TEAL-style).

    python experiments/activation_study.py --out runs/activation_study \\
        --table experiments/results/activation_study.csv
    python experiments/activation_study.py --hook hook_post --parts layer,uniform \\
        --out runs/activation_study_post --table experiments/results/activation_study_hook_post.csv

Writes the three run folders under ``--out`` and the joined table (one row per setting, with a
``part`` column) to ``--table``; prints perplexity per mode x strategy x sparsity with the dense
model alongside, whether the WD set is more sensitive than every control under each mode, and
whether exempting it makes whole-layer thresholding cheaper.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from wasserstein_neurons.ablation import AblationConfig
from wasserstein_neurons.workflows import AblateConfig, run_ablate


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    p.add_argument("--stats-tokens", type=int, default=4096, help="pooled calibration rows")
    p.add_argument("--rank-tokens", type=int, default=32768)
    p.add_argument("--ranking", default=None, help="reuse a rank run folder")
    p.add_argument("--top-percent", type=float, default=3.0)
    p.add_argument("--strategies", default="wd-top,random,wd-bottom,variance")
    p.add_argument("--seeds", type=int, default=2, help="seeds of the random sets")
    p.add_argument("--activation-sparsities", type=_floats, default=[0.25, 0.5, 0.7, 0.9])
    p.add_argument("--hook", default="hook_pre", help="hook_pre | hook_pre_linear | hook_post")
    p.add_argument("--parts", default="neurons,layer,uniform", help="which runs, comma-separated")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--out", default="runs/activation_study")
    p.add_argument("--table", default=None, help="also write the joined table here")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _parts(args) -> dict[str, AblationConfig]:
    common = dict(
        top_percent=args.top_percent,
        seeds=args.seeds,
        activation_sparsities=args.activation_sparsities,
        stats_tokens=args.stats_tokens,
        hook=args.hook,
    )
    return {
        "neurons": AblationConfig(
            strategies=args.strategies,
            modes=("zero", "mean", "resample", "threshold"),
            threshold_scopes=("selected",),
            **common,
        ),
        "layer": AblationConfig(
            strategies=("wd-top", "random"),
            modes=("threshold",),
            threshold_scopes=("all", "complement"),
            **common,
        ),
        "uniform": AblationConfig(
            strategies=("wd-top",),
            modes=("threshold",),
            threshold_scopes=("all",),
            threshold_rules=("uniform",),
            **common,
        ),
    }


def run_study(args, model=None) -> pd.DataFrame:
    """The three runs; returns their joined ``ablation.csv`` tables with a ``part`` column."""
    from wasserstein_neurons import load_model

    parts = _parts(args)
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := [p for p in chosen if p not in parts]:
        raise SystemExit(f"error: unknown part {', '.join(bad)}; valid: {', '.join(parts)}")
    model = model or load_model(args.model, device=args.device)
    ranking, tables = args.ranking, []
    for part in chosen:
        study = parts[part]
        cfg = AblateConfig(
            model=args.model,
            dataset=args.dataset,
            seqlen=args.seqlen,
            eval_tokens=args.eval_tokens,
            batch_size=args.batch_size,
            device=args.device,
            nsamples=args.nsamples,
            rank_tokens=args.rank_tokens,
            ranking=ranking,
            study=study,
            out=str(Path(args.out) / part),
            overwrite=args.overwrite,
        )
        tables.append(run_ablate(cfg, model=model, progress=not args.no_progress).assign(part=part))
        ranking = ranking or str(Path(args.out) / part / "ranking")
    return pd.concat(tables, ignore_index=True)


def _label(row) -> str:
    if row["scope"] == "all":
        return "all neurons" + (" (uniform)" if row["rule"] == "uniform" else "")
    if row["scope"] == "complement":
        return f"all but {row['strategy']}"
    return row["strategy"]


def study_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean perplexity (over seeds) per mode x neurons (rows) and activation sparsity (columns;
    ``-`` for the modes without one); the dense model is the first row."""
    df = results.assign(
        neurons=results.apply(_label, axis=1),
        sparsity=results["activation_sparsity"].map(lambda q: "-" if q != q else f"{q:g}"),
    )
    df.loc[df["mode"] == "dense", "sparsity"] = "-"
    dense = df[df["mode"] == "dense"].iloc[:1]
    df = pd.concat([dense, df[df["mode"] != "dense"]])
    table = df.pivot_table(
        index=["mode", "neurons"], columns="sparsity", values="perplexity", sort=False
    )
    return table


def verdicts(results: pd.DataFrame) -> list[str]:
    """Plain-sentence answers to the study's two questions, from ``results``."""
    lines = []
    sel = results[(results["mode"] != "dense") & (results["scope"].isin(["", "selected"]))]
    for (mode, q), group in sel.groupby(["mode", "activation_sparsity"], sort=False, dropna=False):
        ppl = group.groupby("strategy")["perplexity"].mean()
        if "wd-top" not in ppl:
            continue
        controls = ppl.drop("wd-top")
        worst = controls.idxmax()
        more = bool((ppl["wd-top"] > controls).all())
        name = mode + ("" if q != q else f" @ {q:g}")
        lines.append(
            f"{name}: wd-top {ppl['wd-top']:.3f} vs worst control {worst} {controls.max():.3f}"
            f" -> WD neurons {'MORE' if more else 'NOT more'} sensitive than every control"
        )
    layer = results[(results["mode"] == "threshold") & (results["rule"] == "channel")]
    full = layer[layer["scope"] == "all"].set_index("activation_sparsity")["perplexity"]
    comp = layer[layer["scope"] == "complement"]
    for q, ppl_all in full.items():
        wd = comp[(comp["strategy"] == "wd-top") & (comp["activation_sparsity"] == q)]
        rnd = comp[(comp["strategy"] == "random") & (comp["activation_sparsity"] == q)]
        if len(wd):
            extra = f", exempting random sets {rnd['perplexity'].mean():.3f}" if len(rnd) else ""
            lines.append(
                f"whole layer @ {q:g}: all neurons {ppl_all:.3f}, exempting WD neurons "
                f"{wd['perplexity'].iloc[0]:.3f}{extra}"
            )
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_study(args)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        results.to_csv(args.table, index=False)
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(study_table(results).to_string(float_format=lambda v: f"{v:.3f}"))
    print("\n".join(verdicts(results)))


if __name__ == "__main__":
    main()
