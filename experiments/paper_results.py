"""Regenerate the paper's figures on the embedded model: ``RESULTS.md`` and its small files.

Every number comes from one CLI command (a *step*); each writes a run folder under ``--runs``
(default ``runs/paper``), and its small tables are then copied to ``experiments/results/paper/``.
A step whose copied files exist is done, so the script can be stopped at any point, the
files committed, and the rest run later, in another session::

    python experiments/paper_results.py                  # every missing step (hours on CPU)
    python experiments/paper_results.py --steps w1,grid-0.9
    python experiments/paper_results.py --collect-only   # rewrite RESULTS.md from the files
    python experiments/paper_results.py --list           # the steps and their commands

The steps run in an order that answers every claim early (the cheapest first):

``w1``
    ``disentangle``: layer 5's ``gate_proj`` pruned to 0.9 by SparseGPT and expanded with
    k = 1, 2, 4, 8, 16 experts; W1(sparse, dense) of the top Wasserstein neuron as k grows (the
    paper's Pythia-1.4B figure: 0.27 -> 0.08).
``grid-S``
    ``expand --grid`` at sparsity S (0.9, 0.5, 0.7, 2:4): every MLP linear pruned by magnitude,
    Wanda, SparseGPT (k = 1) and Sparse Expansion with 4 and 16 experts (128 x 512 calibration
    windows).  ``grid-0.5`` holds the three baselines at 50%.
``rank``, ``ablate-S``
    the neuron ranking (a prerequisite, nothing copied), then ``ablate`` at neuron sparsity S
    (0.5, 0.8, 0.9, 0.95, 0.99) with the six strategies: wd-top, random (3 seeds), wd-bottom,
    mean, variance, norm.

After every step ``RESULTS.md`` (repository root) is rewritten from the copied files alone: the
tables, the command behind each, whether each of the paper's claims holds on what has been
measured, and which steps are still missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from wasserstein_neurons import plotting
from wasserstein_neurons.runs import folder_state

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "paper"
REPORT = ROOT / "RESULTS.md"

EVAL_TOKENS = 16384
GRID_SPARSITIES = ("0.9", "0.5", "0.7", "2:4")
GRID_EXPERTS = "1,16,4"
W1_EXPERTS = "1,2,4,8,16"
ABLATION_SPARSITIES = ("0.5", "0.9", "0.99", "0.8", "0.95")
STRATEGIES = "wd-top,random,wd-bottom,mean,variance,norm"


@dataclass
class Step:
    """One CLI command; ``files`` maps a file of its run folder to its copied name."""

    name: str
    argv: list[str]
    files: dict[str, str] = field(default_factory=dict)
    #: CSV columns kept when a file is copied (by prefix; files not named here are copied whole)
    keep: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def copy(self) -> None:
        """Copy the step's files from its run folder to :data:`RESULTS`."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        for src, name in self.files.items():
            if src in self.keep:
                df = pd.read_csv(self.out / src)
                cols = [c for c in df.columns if c.startswith(self.keep[src])]
                df[cols].to_csv(RESULTS / name, index=False, float_format="%.6g")
            else:
                shutil.copyfile(self.out / src, RESULTS / name)

    @property
    def out(self) -> Path:
        return ROOT / self.argv[self.argv.index("--out") + 1]

    @property
    def command(self) -> str:
        return "wasserstein-neurons " + " ".join(self.argv)

    def done(self) -> bool:
        if not self.files:  # a prerequisite: done when its run folder is finished
            return folder_state(self.out).kind == "finished"
        return all((RESULTS / name).is_file() for name in self.files.values())


def steps(runs: str) -> list[Step]:
    """Every step, in the order they run."""
    ev = ["--eval-tokens", str(EVAL_TOKENS), "--no-progress"]
    w1 = Step(
        "w1",
        ["disentangle", "--layer", "5", "--sparsity", "0.9", "--experts", W1_EXPERTS,
         "--out", f"{runs}/w1", *ev],
        {"per_k.csv": "w1_per_k.csv", "neurons.csv": "w1_neurons.csv",
         "w1_vs_k.png": "w1_vs_k.png"},
        keep={"neurons.csv": ("neuron", "wd", "is_top", "w1_", "w1z_", "ri_k")},
    )  # fmt: skip
    grid = {
        s: Step(
            f"grid-{s}",
            [
                "expand",
                "--grid",
                "--grid-sparsities",
                s,
                "--grid-experts",
                GRID_EXPERTS,
                "--out",
                f"{runs}/grid-{s.replace(':', '_')}",
                *ev,
            ],
            {"results.csv": f"grid-{s.replace(':', '_')}.csv"},
        )  # fmt: skip
        for s in GRID_SPARSITIES
    }
    rank = Step("rank", ["rank", "--out", f"{runs}/rank", "--no-progress"])
    ablate = {
        s: Step(
            f"ablate-{s}",
            [
                "ablate",
                "--strategies",
                STRATEGIES,
                "--seeds",
                "3",
                "--neuron-sparsity",
                s,
                "--ranking",
                f"{runs}/rank",
                "--out",
                f"{runs}/ablate-{s}",
                *ev,
            ],
            {"ablation.csv": f"ablation-{s}.csv"},
        )  # fmt: skip
        for s in ABLATION_SPARSITIES
    }
    a, g = ablate, grid
    return [w1, g["0.9"], g["0.5"], rank, a["0.5"], a["0.9"], a["0.99"], g["0.7"], a["0.8"],
            a["0.95"], g["2:4"]]  # fmt: skip


def run_step(step: Step, all_steps: list[Step]) -> None:
    """Run ``step`` (its prerequisite ``rank`` first for an ablation) and copy its files."""
    if step.name.startswith("ablate"):
        rank = next(s for s in all_steps if s.name == "rank")
        if not rank.done():
            run_step(rank, all_steps)
    argv = list(step.argv)
    state = folder_state(step.out).kind
    if state == "finished":  # made by an earlier session, not copied yet
        step.copy()
        return
    if state == "unfinished":  # interrupted: a grid continues its finished cells
        argv.append("--resume" if "--grid" in argv else "--overwrite")
    print(f"+ {step.command}", flush=True)
    subprocess.run([sys.executable, "-m", "wasserstein_neurons.cli", *argv], check=True, cwd=ROOT)
    step.copy()


# ============================================================================================
# RESULTS.md, from the copied files only
# ============================================================================================


def _md(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        cells = [format(v, floatfmt) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _footer(done: list[Step], missing: list[Step]) -> list[str]:
    lines = ["", "Commands:", "", "```", *(s.command for s in done), "```"]
    if missing:
        lines.append("*Still to run: " + ", ".join(s.name for s in missing) + ".*")
    return lines


def w1_section(step: Step) -> list[str]:
    """W1(sparse, dense) of the layer's top Wasserstein neuron and of the top-3% set, per k."""
    if not step.done():
        return ["*Not run yet* (`" + step.name + "`)."]
    per_k = pd.read_csv(RESULTS / "w1_per_k.csv")
    top = pd.read_csv(RESULTS / "w1_neurons.csv").sort_values("wd", ascending=False).iloc[0]
    df = pd.DataFrame(
        {
            "experts": per_k["experts"].astype(int),
            "W1 top neuron": [float(top[f"w1_sparse_dense_k{k}"]) for k in per_k["experts"]],
            "W1/std top neuron": [float(top[f"w1z_sparse_dense_k{k}"]) for k in per_k["experts"]],
            "median W1 top-3%": per_k["median_w1_top"],
            "median W1 all": per_k["median_w1_all"],
        }
    )
    w, m = df["W1 top neuron"].to_numpy(), df["median W1 top-3%"].to_numpy()
    shrinks = {True: "shrinks at every step", False: "does not shrink at every step"}
    lines = [f"Top Wasserstein neuron of the layer: {int(top['neuron'])} (WD {top['wd']:.3f}).", ""]
    lines += [_md(df, ".4f"), ""]
    k_max = df["experts"].iloc[-1]
    lines.append(
        "**Claim: W1(sparse, dense) of a Wasserstein neuron shrinks as k grows.** The top "
        f"neuron's W1 {shrinks[bool((w[1:] <= w[:-1]).all())]} ({w[0]:.4f} at k = 1, "
        f"{w.min():.4f} at best, {w[-1]:.4f} at k = {k_max}); the median over the top-3% "
        f"neurons {shrinks[bool((m[1:] <= m[:-1]).all())]} ({m[0]:.4f} -> {m[-1]:.4f})."
    )
    lines += ["", "Figure: `experiments/results/paper/w1_vs_k.png`", *_footer([step], [])]
    return lines


def _joined(steps: list[Step], key: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The copied tables of ``steps`` as one, with a single ``dense`` row (``key`` names it)."""
    res = pd.concat([pd.read_csv(RESULTS / next(iter(s.files.values()))) for s in steps])
    dense = res[res[key] == "dense"]
    return pd.concat([dense.iloc[:1], res[res[key] != "dense"]], ignore_index=True), dense


def grid_section(grid_steps: list[Step]) -> list[str]:
    """The baselines at 50% and the SE grid, with SE's gain over SparseGPT."""
    done = [s for s in grid_steps if s.done()]
    missing = [s for s in grid_steps if not s.done()]
    if not done:
        return ["*Not run yet.*"]
    res, dense = _joined(done, "method")
    res["pattern"] = res["pattern"].astype(str)
    res.to_csv(RESULTS / "grid.csv", index=False)
    fig = plotting.plot_expansion_grid(res, title="smollm2-135m: every MLP linear pruned")
    plotting.save_figure(fig, RESULTS / "grid.png")
    res["name"] = [
        m if m in ("magnitude", "wanda") else ("sparsegpt" if k == 1 else f"SE k={k}")
        for m, k in zip(res["method"], res["experts"], strict=True)
    ]
    table = res[res["method"] != "dense"].pivot_table(
        index="name", columns="pattern", values="perplexity", aggfunc="first"
    )
    order = [n for n in ("magnitude", "wanda", "sparsegpt") if n in table.index]
    order += sorted((n for n in table.index if n.startswith("SE")), key=lambda n: int(n[5:]))
    table = table.loc[order]
    lines = [f"Dense perplexity: **{float(dense['perplexity'].iloc[0]):.3f}**.", ""]
    lines += [_md(table.reset_index()), ""]
    if "sparsegpt" in table.index:
        gain = (table.loc["sparsegpt"] - table) / table.loc["sparsegpt"]
        gain = gain.loc[[n for n in order if n.startswith("SE")]]
        shown = gain.apply(lambda col: col.map(lambda v: f"{100 * v:+.1f}%"))
        lines += ["Gain of SE over SparseGPT, (ppl_SparseGPT - ppl_SE) / ppl_SparseGPT:", ""]
        lines += [_md(shown.reset_index()), "", *_se_claim(gain), ""]
    lines += ["Files: `experiments/results/paper/grid.csv`, `experiments/results/paper/grid.png`"]
    return lines + _footer(done, missing)


def _se_claim(gain: pd.DataFrame) -> list[str]:
    """SE beats SparseGPT, the gap growing with sparsity and with k: read off the gain table
    (rows ``SE k=K`` in increasing K, columns the sparsity patterns)."""
    if gain.empty:
        return []
    beats = bool((gain > 0).all().all())
    numeric = sorted((c for c in gain.columns if c.replace(".", "", 1).isdigit()), key=float)
    by_s = [bool(gain.loc[n, numeric].is_monotonic_increasing) for n in gain.index]
    by_k = [bool(gain[c].is_monotonic_increasing) for c in gain.columns]
    yes = {True: "yes", False: "no"}
    with_s = (
        ", ".join(f"{n}: {yes[b]}" for n, b in zip(gain.index, by_s, strict=True))
        if len(numeric) > 1
        else "not testable yet (one sparsity measured)"
    )
    with_k = (
        ", ".join(f"{c}: {yes[b]}" for c, b in zip(gain.columns, by_k, strict=True))
        if len(gain.index) > 1
        else "not testable yet (one k measured)"
    )
    return [
        f"**Claim: SE beats SparseGPT**: {yes[beats]} in every measured "
        f"cell. **The gap grows with sparsity** ({', '.join(numeric)}): {with_s}. "
        f"**The gap grows with k**: {with_k}."
    ]


def ablation_section(ablate_steps: list[Step], rank: Step) -> list[str]:
    """The ablation over every finished neuron sparsity, and the WD-top claim."""
    done = [s for s in ablate_steps if s.done()]
    missing = [s for s in ablate_steps if not s.done()]
    if not done:
        return ["*Not run yet.*"]
    res, dense = _joined(done, "strategy")
    res.to_csv(RESULTS / "ablation.csv", index=False)
    title = "smollm2-135m: top 3% neurons per layer, rows pruned by sparsegpt"
    plotting.save_figure(plotting.plot_ablation(res, title), RESULTS / "ablation.png")
    table = (
        res[res["strategy"] != "dense"]
        .pivot_table(index="strategy", columns="neuron_sparsity", values="perplexity")
        .sort_index(axis=1)
    )
    lines = [f"Dense perplexity: **{float(dense['perplexity'].iloc[0]):.3f}**; "]
    lines[0] += "random is the mean of 3 seeds."
    lines += ["", _md(table.reset_index()), ""]
    if "wd-top" in table.index:
        verdicts = []
        for col in table.columns:
            others = table[col].drop("wd-top")
            holds = bool((table.loc["wd-top", col] > others).all())
            verdicts.append(
                f"{col:g}: " + ("yes" if holds else f"no ({others.idxmax()} hurts more)")
            )
        lines.append("**Claim: sparsifying WD neurons hurts more than every control**: ")
        lines[-1] += "; ".join(verdicts) + "."
    lines += [
        "",
        "Files: `experiments/results/paper/ablation.csv`, `experiments/results/paper/ablation.png`",
    ]
    return lines + _footer([rank, *done], missing)


def collect(all_steps: list[Step]) -> Path:
    """Write RESULTS.md from the copied files."""
    by = {s.name: s for s in all_steps}
    grid = [s for s in all_steps if s.name.startswith("grid")]
    ablate = [s for s in all_steps if s.name.startswith("ablate")]
    text = [
        "# Results on the embedded model (SmolLM2-135M, embedded Wikipedia)",
        "",
        "Written by `python experiments/paper_results.py` from the files in",
        "`experiments/results/paper/`; each section lists the commands that made its numbers.",
        f"Perplexity = exp(mean NLL) on {EVAL_TOKENS} held-out tokens; SparseGPT is the",
        "reference's whole-matrix rule; Sparse Expansion uses 5 k-means restarts.",
        "",
        "## W1(sparse, dense) of a Wasserstein neuron vs the number of experts",
        "",
        *w1_section(by["w1"]),
        "",
        "## The baselines at 50% and the Sparse Expansion grid (every MLP linear)",
        "",
        *grid_section(grid),
        "",
        "## Ablation: sparsifying the top-3% neurons of each layer vs control sets",
        "",
        *ablation_section(ablate, by["rank"]),
        "",
    ]
    REPORT.write_text("\n".join(text))
    return REPORT


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/paper", help="folder of the run folders")
    p.add_argument("--steps", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--collect-only", action="store_true", help="only rewrite RESULTS.md")
    p.add_argument("--list", action="store_true", help="print the steps and exit")
    args = p.parse_args(argv)
    all_steps = steps(args.runs)
    names = [s.name for s in all_steps]
    chosen = names if args.steps is None else [n for n in args.steps.split(",") if n]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {', '.join(names)}")
    if args.list:
        for s in all_steps:
            print(f"{s.name:12} {'done ' if s.done() else 'to do'}  {s.command}")
        return
    if not args.collect_only:
        for step in all_steps:
            if step.name in chosen and step.files and not step.done():
                run_step(step, all_steps)
                collect(all_steps)
    print(f"wrote {collect(all_steps)}")


if __name__ == "__main__":
    main()
