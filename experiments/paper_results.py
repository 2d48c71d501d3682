"""Regenerate the paper's figures on the embedded model: ``RESULTS.md`` and its small files.

Every number comes from one of the CLI commands below; each writes a run folder under
``--runs`` (default ``runs/paper``).  A finished folder is skipped, the grid continues cell by
cell (``--resume``), so this script can be stopped at any point and started again::

    python experiments/paper_results.py                  # every stage, in order (hours on CPU)
    python experiments/paper_results.py --stages w1,grid # some stages
    python experiments/paper_results.py --collect-only   # rewrite RESULTS.md from what is done

Stages, cheapest first:

``w1``
    ``disentangle``: layer 5's ``gate_proj`` pruned to 0.9 by SparseGPT and expanded with
    k = 1, 2, 4, 8, 16 experts; W1(sparse, dense) of the top Wasserstein neuron as k grows (the
    paper's Pythia-1.4B figure: 0.27 -> 0.08).
``grid``
    ``expand --grid``: every MLP linear pruned at 0.9 / 0.5 / 0.7 / 2:4 by magnitude, Wanda,
    SparseGPT (k = 1) and Sparse Expansion with 16 and 4 experts (128 x 512 calibration
    windows).  Its 0.5 column is the three baselines at 50%.
``rank`` and ``ablate``
    the neuron ranking, then one ``ablate`` run per neuron sparsity 0.5 / 0.8 / 0.9 / 0.95 / 0.99
    with the six strategies (wd-top, random x 3 seeds, wd-bottom, mean, variance, norm).

``collect`` (always run last) copies the tables and figures to ``experiments/results/paper/``
and writes ``RESULTS.md`` at the repository root: the tables, the command behind each, and
whether each of the paper's claims holds on what has been measured; stages not yet finished
are listed as such.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from wasserstein_neurons.runs import folder_state

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "paper"
REPORT = ROOT / "RESULTS.md"

EVAL_TOKENS = 16384
GRID_SPARSITIES = "0.9,0.5,0.7,2:4"
GRID_EXPERTS = "1,16,4"
W1_EXPERTS = "1,2,4,8,16"
ABLATION_SPARSITIES = ("0.5", "0.8", "0.9", "0.95", "0.99")
STRATEGIES = "wd-top,random,wd-bottom,mean,variance,norm"
STAGES = ("w1", "grid", "rank", "ablate")


def commands(runs: str) -> dict[str, list[list[str]]]:
    """The CLI command lines of every stage (``wasserstein-neurons`` arguments)."""
    ev = ["--eval-tokens", str(EVAL_TOKENS), "--no-progress"]
    ablate = [
        [
            "ablate",
            "--strategies", STRATEGIES,
            "--seeds", "3",
            "--neuron-sparsity", s,
            "--ranking", f"{runs}/rank",
            "--out", f"{runs}/ablate-{s}",
            *ev,
        ]
        for s in ABLATION_SPARSITIES
    ]  # fmt: skip
    return {
        "w1": [
            [
                "disentangle", "--layer", "5", "--sparsity", "0.9", "--experts", W1_EXPERTS,
                "--out", f"{runs}/w1", *ev,
            ]
        ],
        "grid": [
            [
                "expand", "--grid", "--grid-sparsities", GRID_SPARSITIES,
                "--grid-experts", GRID_EXPERTS, "--out", f"{runs}/grid", "--resume", *ev,
            ]
        ],
        "rank": [["rank", "--out", f"{runs}/rank", "--no-progress"]],
        "ablate": ablate,
    }  # fmt: skip


def out_of(argv: list[str]) -> Path:
    return Path(argv[argv.index("--out") + 1])


def run_stage(argvs: list[list[str]]) -> None:
    """Run each command unless its folder is finished (a grid resumes its cells)."""
    for argv in argvs:
        state = folder_state(out_of(argv)).kind
        if state == "finished" and "--resume" not in argv:
            print(f"done already: {out_of(argv)}", flush=True)
            continue
        if state == "unfinished" and "--resume" not in argv:
            argv = [*argv, "--overwrite"]  # an interrupted run is redone from the start
        print("+ wasserstein-neurons " + " ".join(argv), flush=True)
        subprocess.run(
            [sys.executable, "-m", "wasserstein_neurons.cli", *argv], check=True, cwd=ROOT
        )


# ============================================================================================
# collect
# ============================================================================================


def _copy(src: Path, name: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, RESULTS / name)
    return f"experiments/results/paper/{name}"


def _cmd(argv: list[str]) -> str:
    return "wasserstein-neurons " + " ".join(argv)


def _md(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_section(runs: str, argv: list[str]) -> list[str]:
    """The baselines at 50% and the perplexity-vs-sparsity grid, with SE's gain over SparseGPT."""
    folder = out_of(argv)
    path = folder / "results.csv"
    if not path.is_file():
        return ["*Not run yet.*"]
    res = pd.read_csv(path)
    res["pattern"] = res["pattern"].astype(str)
    files = [_copy(path, "grid.csv")]
    if (folder / "grid.png").is_file():
        files.append(_copy(folder / "grid.png", "grid.png"))
    res["name"] = [
        m if m in ("dense", "magnitude", "wanda") else ("sparsegpt" if k == 1 else f"SE k={k}")
        for m, k in zip(res["method"], res["experts"], strict=True)
    ]
    dense = res.loc[res["method"] == "dense", "perplexity"]
    table = res[res["method"] != "dense"].pivot_table(
        index="name", columns="pattern", values="perplexity", aggfunc="first"
    )
    order = [n for n in ("magnitude", "wanda", "sparsegpt") if n in table.index]
    order += sorted((n for n in table.index if n.startswith("SE")), key=lambda n: int(n[5:]))
    table = table.loc[order].reset_index()
    lines = [f"Dense perplexity: **{float(dense.iloc[0]):.3f}**." if len(dense) else ""]
    lines += ["", _md(table), ""]
    lines += _se_claim(table)
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), f"Command: `{_cmd(argv)}`"]
    state = folder_state(folder).kind
    if state != "finished":
        lines.append(f"*The grid is {state}: missing cells are still to run (`--resume`).*")
    return lines


def _se_claim(table: pd.DataFrame) -> list[str]:
    """SE beats SparseGPT, the gap growing with sparsity and with k: checked on the table."""
    t = table.set_index("name")
    if "sparsegpt" not in t.index:
        return []
    out = ["Relative gain of SE over SparseGPT, (ppl_SparseGPT - ppl_SE) / ppl_SparseGPT:", ""]
    rows = []
    for name in (n for n in t.index if n.startswith("SE")):
        gain = (t.loc["sparsegpt"] - t.loc[name]) / t.loc["sparsegpt"]
        rows.append({"": name, **{c: f"{100 * v:+.1f}%" for c, v in gain.dropna().items()}})
    if rows:
        out += [_md(pd.DataFrame(rows)), ""]
    return out


def w1_section(argv: list[str]) -> list[str]:
    """W1(sparse, dense) of the layer's top Wasserstein neuron and of the top-3% set, per k."""
    folder = out_of(argv)
    if folder_state(folder).kind != "finished":
        return ["*Not run yet.*"]
    per_k = pd.read_csv(folder / "per_k.csv")
    neurons = pd.read_csv(folder / "neurons.csv")
    files = [
        _copy(folder / "per_k.csv", "w1_per_k.csv"),
        _copy(folder / "neurons.csv", "w1_neurons.csv"),
    ]
    if (folder / "w1_vs_k.png").is_file():
        files.append(_copy(folder / "w1_vs_k.png", "w1_vs_k.png"))
    top = neurons.sort_values("wd", ascending=False).iloc[0]
    rows = [
        {
            "experts": int(k),
            "W1 top neuron": float(top.get(f"w1_sparse_dense_k{int(k)}", float("nan"))),
            "W1/std top neuron": float(top.get(f"w1z_sparse_dense_k{int(k)}", float("nan"))),
            "median W1 top-3%": float(m_top),
            "median W1 all": float(m_all),
        }
        for k, m_top, m_all in zip(
            per_k["experts"], per_k["median_w1_top"], per_k["median_w1_all"], strict=True
        )
    ]
    df = pd.DataFrame(rows)
    lines = [f"Top Wasserstein neuron: {int(top['neuron'])} (WD {float(top['wd']):.3f}).", ""]
    lines += [_md(df, ".4f"), ""]
    w = df["W1 top neuron"].to_numpy()
    shrinks = bool((w[1:] <= w[:-1]).all()) if len(w) > 1 else False
    lines.append(
        f"**Claim: W1(sparse, dense) of a Wasserstein neuron shrinks as k grows** - "
        f"{'holds' if shrinks else 'does not hold monotonically'} for the top neuron "
        f"({w[0]:.4f} at k = 1, {w[-1]:.4f} at k = {int(df['experts'].iloc[-1])})."
    )
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), f"Command: `{_cmd(argv)}`"]
    return lines


def ablation_section(argvs: list[list[str]], rank_argv: list[str]) -> list[str]:
    """The ablation table over every finished neuron sparsity, and the WD-top claim."""
    parts = [
        pd.read_csv(out_of(a) / "ablation.csv")
        for a in argvs
        if folder_state(out_of(a)).kind == "finished"
    ]
    if not parts:
        return ["*Not run yet.*"]
    res = pd.concat(parts, ignore_index=True)
    dense = res[res["strategy"] == "dense"]
    res = pd.concat([dense.iloc[:1], res[res["strategy"] != "dense"]], ignore_index=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res.to_csv(RESULTS / "ablation.csv", index=False)
    from wasserstein_neurons import plotting

    fig = plotting.plot_ablation(res, "smollm2-135m: top 3% neurons per layer, sparsegpt rows")
    plotting.save_figure(fig, RESULTS / "ablation.png")
    rows = res[res["strategy"] != "dense"]
    table = rows.pivot_table(
        index="strategy", columns="neuron_sparsity", values="perplexity", aggfunc="mean"
    ).reset_index()
    lines = [
        f"Dense perplexity: **{float(dense['perplexity'].iloc[0]):.3f}**; random: mean of 3 seeds.",
        "",
    ]
    lines += [_md(table), ""]
    t = table.set_index("strategy")
    if "wd-top" in t.index:
        verdicts = []
        for col in t.columns:
            others = t[col].drop("wd-top")
            ok = bool((t.loc["wd-top", col] > others).all())
            verdicts.append(
                f"{col:g}: {'yes' if ok else 'no (' + others.idxmax() + ' hurts more)'}"
            )
        lines.append(
            "**Claim: sparsifying the WD neurons hurts more than every control** - "
            + "; ".join(verdicts)
            + "."
        )
    cmds = [_cmd(rank_argv)] + [_cmd(a) for a in argvs]
    lines += [
        "",
        "Files: `experiments/results/paper/ablation.csv`, `experiments/results/paper/ablation.png`",
    ]
    lines += ["Commands:", "", "```", *cmds, "```"]
    missing = [
        s
        for s, a in zip(ABLATION_SPARSITIES, argvs, strict=True)
        if folder_state(out_of(a)).kind != "finished"
    ]
    if missing:
        lines.append(f"*Not run yet: neuron sparsity {', '.join(missing)}.*")
    return lines


def collect(runs: str) -> Path:
    """Write RESULTS.md (and copy its files) from the finished runs under ``runs``."""
    cmd = commands(runs)
    text = [
        "# Results on the embedded model (SmolLM2-135M, embedded Wikipedia)",
        "",
        "Written by `python experiments/paper_results.py` (see its docstring); every table below",
        "names the command that made it.  Perplexity = exp(mean NLL) on "
        f"{EVAL_TOKENS} held-out tokens.  SparseGPT is the reference's whole-matrix rule.",
        "",
        "## W1(sparse, dense) of a Wasserstein neuron vs the number of experts",
        "",
        *w1_section(cmd["w1"][0]),
        "",
        "## Baselines at 50% and the Sparse Expansion grid (every MLP linear)",
        "",
        *grid_section(runs, cmd["grid"][0]),
        "",
        "## Ablation: sparsifying the top-3% neurons of each layer vs control sets",
        "",
        *ablation_section(cmd["ablate"], cmd["rank"][0]),
        "",
    ]
    REPORT.write_text("\n".join(text))
    return REPORT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/paper", help="folder of the run folders")
    p.add_argument(
        "--stages", default=",".join(STAGES), help="comma-separated: " + ",".join(STAGES)
    )
    p.add_argument("--collect-only", action="store_true", help="only rewrite RESULTS.md")
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    cmd = commands(args.runs)
    if not args.collect_only:
        for stage in stages:
            run_stage(cmd[stage])
            collect(args.runs)
    print(f"wrote {collect(args.runs)}")


if __name__ == "__main__":
    main()
