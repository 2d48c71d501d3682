"""``experiments/paper_results.py``: RESULTS.md's tables and claim verdicts from synthetic
step files (no model runs), and which steps count as done."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper_results.py"


@pytest.fixture
def paper(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("paper_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paper_results", module)  # its dataclass needs the module
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(module, "REPORT", tmp_path / "RESULTS.md")
    (tmp_path / "results").mkdir()
    return module


def _grid(paper, pattern: str, sparsegpt: float, se4: float, se16: float) -> None:
    def row(method, k, ppl, pat=pattern):
        return dict(method=method, experts=k, sparsity=0.5, prunen=0, prunem=0, pattern=pat,
                    perplexity=ppl)  # fmt: skip

    rows = [row("dense", 1, 13.5, "dense"), row("magnitude", 1, 10 * sparsegpt),
            row("wanda", 1, 2 * sparsegpt), row("sparsegpt", 1, sparsegpt),
            row("sparse_expansion", 4, se4), row("sparse_expansion", 16, se16)]  # fmt: skip
    name = f"grid-{pattern.replace(':', '_')}.csv"
    pd.DataFrame(rows).to_csv(paper.RESULTS / name, index=False)


def _ablation(paper, s: float, wd_top: float) -> None:
    rows = [dict(strategy="dense", neuron_sparsity=0.0, seed=0, perplexity=13.5)]
    for strategy, ppl, seed in (("wd-top", wd_top, 0), ("random", 14, 0), ("random", 16, 1),
                                ("wd-bottom", 13.6, 0), ("mean", 20, 0), ("variance", 25, 0),
                                ("norm", 18, 0)):  # fmt: skip
        rows.append(dict(strategy=strategy, neuron_sparsity=s, seed=seed, perplexity=ppl))
    pd.DataFrame(rows).to_csv(paper.RESULTS / f"ablation-{s:g}.csv", index=False)


def test_verdicts_follow_the_tables(paper):
    steps = paper.steps("runs/paper")
    grid = [s for s in steps if s.name.startswith("grid")]
    assert "Not run yet" in paper.grid_section(grid)[0]
    _grid(paper, "0.5", 22.0, 20.0, 19.0)  # gains 9% / 14%
    one = "\n".join(paper.grid_section(grid))
    assert "not testable yet (one sparsity measured)" in one and "0.5: yes" in one
    _grid(paper, "0.9", 5000.0, 3000.0, 4000.0)  # gains 40% / 20%: k = 16 worse than k = 4
    text = "\n".join(paper.grid_section(grid))
    assert "**Claim: SE beats SparseGPT**: yes" in text
    assert "SE k=4: yes, SE k=16: yes" in text  # the gap grows with sparsity for both k
    assert "0.5: yes, 0.9: no" in text  # ... but not with k at 0.9
    assert "Still to run: grid-0.7, grid-2:4" in text
    assert (paper.RESULTS / "grid.png").is_file()

    ablate = [s for s in steps if s.name.startswith("ablate")]
    rank = next(s for s in steps if s.name == "rank")
    _ablation(paper, 0.5, wd_top=30.0)
    _ablation(paper, 0.9, wd_top=19.0)  # below mean / variance / norm
    text = "\n".join(paper.ablation_section(ablate, rank))
    assert "0.5: yes; 0.9: no (variance hurts more)" in text
    assert "| random | 15.00 | 15.00 |" in text  # the mean over seeds
    assert all(s.done() for s in ablate[:2]) and not ablate[2].done()
