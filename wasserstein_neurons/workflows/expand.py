r"""Evaluate Sparse Expansion against one-shot pruning: one setting (``expand``) or a grid.

Every row of a results table is one model: the dense reference, a baseline (magnitude, Wanda)
or SparseGPT / Sparse Expansion (SE) with :math:`k` experts, pruned to a target sparsity
(unstructured or n:m) in all MLP linears, with

* ``perplexity`` — :math:`\exp(\text{mean NLL})` on the evaluation windows
  (:func:`~wasserstein_neurons.evaluate.perplexity`);
* ``flops_per_token`` — multiply-adds :math:`\times 2` of the MLP linears per token with ideal
  sparse kernels: :math:`2\,\mathrm{nnz}(W)` for a pruned linear; for SE the expected
  :math:`\sum_e f_e\, 2\,\mathrm{nnz}(W_e)` over the calibration routing frequencies
  :math:`f_e` plus the router (PCA projection and centroid distances), a router shared by
  Llama's gate and up counted once (:func:`~wasserstein_neurons.expansion.mlp_cost`);
* ``params`` — stored MLP parameters: nonzero weights of every expert, biases and routers.
  SE keeps the per-token FLOPs of one sparse layer while its parameters grow about
  :math:`k\times`.

SparseGPT is the builder with one expert (:func:`build_sparse_expansion` with ``n_experts=1``,
bit-identical to ``sequential_prune(..., "sparsegpt")``), so SE and SparseGPT differ only in
:math:`k`.  Wanda runs through :func:`~wasserstein_neurons.pruning.sequential_prune` with the
same calibration windows and within-layer order; magnitude pruning needs no calibration and is
applied directly to every MLP weight (the same result as ``sequential_prune(...,
"magnitude")`` without its forward passes).  All calibration passes use the native HF modules
with sdpa attention (see :mod:`~wasserstein_neurons.expansion.builder`).

Every cell starts from a freshly loaded dense model (``load_model(name)``, ~3 s for the cached
embedded model); the calibration and evaluation windows are drawn once and shared by all cells.
The grid writes ``results.csv`` after every cell, so ``resume=True`` continues an interrupted
grid in the same folder.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .. import plotting
from ..bridge import native_sdpa
from ..evaluate import perplexity
from ..expansion import (
    DEFAULT_KMEANS_RESTARTS,
    ExpansionConfig,
    build_sparse_expansion,
    mlp_cost,
    save_expanded,
)
from ..pruning import METHODS, PruneSpec, sequential_prune
from ..runs import check_save_folder, save_table, write_csv
from ..trials import EngineSettings, run_trials
from .common import (
    CalibrationSettings,
    EvalSettings,
    SparsitySettings,
    config_from,
    eval_windows_for,
    plan_for,
)

__all__ = [
    "BASELINES",
    "EXPERT_GRID",
    "RESULT_COLUMNS",
    "SPARSITY_GRID",
    "ExpandConfig",
    "parse_sparsity",
    "run_expand",
    "run_grid",
    "save_grid_figure",
]

#: Default grid: unstructured sparsities and n:m patterns (as strings, ``"2:4"``).
SPARSITY_GRID = ("0.5", "0.7", "0.9", "2:4")
#: Default numbers of experts (1 = SparseGPT).
EXPERT_GRID = (1, 2, 4, 8, 16)
#: One-shot baselines run next to SparseGPT / SE: every registered pruner but SparseGPT (which
#: is the builder with one expert).
BASELINES = tuple(m for m in METHODS if m != "sparsegpt")
GRID_COMMAND = "expand --grid"
DENSE_CELL = ("dense", 1, "dense")
#: Settings a resumed grid may change: they only add (or leave out) cells.
GRID_CELLS = ("grid_sparsities", "grid_experts", "baselines")

#: Columns of ``results.csv``.
RESULT_COLUMNS = (
    "method",
    "experts",
    "sparsity",
    "prunen",
    "prunem",
    "pattern",
    "perplexity",
    "flops_per_token",
    "params",
    "nbytes",
    "relative_flops",
    "relative_params",
    "build_seconds",
    "eval_seconds",
    "eval_tokens",
    "nsamples",
    "seqlen",
)


def parse_sparsity(value: str | float) -> tuple[float, int, int]:
    """``"0.7"`` -> ``(0.7, 0, 0)``; ``"2:4"`` -> ``(0.5, 2, 4)`` (see
    :meth:`~wasserstein_neurons.pruning.PruneSpec.from_pattern`, which validates).

    Raises
    ------
    ValueError
        For a malformed value, a sparsity outside ``[0, 1)`` or a bad n:m pattern.
    """
    spec = PruneSpec.from_pattern(value)
    return spec.target_sparsity, spec.prunen, spec.prunem


@dataclass
class ExpandConfig(EngineSettings, SparsitySettings, CalibrationSettings, EvalSettings):
    """Settings of :func:`run_expand` (one setting) and :func:`run_grid`.

    Attributes
    ----------
    out : str
        Run folder (``results.csv``, ``layers.csv``, ``config.json``).
    experts : int
        Experts of the SE model of :func:`run_expand`.
    sparsity, prunen, prunem, wbits :
        Target of :func:`run_expand` (n:m, when set, overrides ``sparsity``).
    pca_factor, kmeans_restarts, min_cluster_tokens, within_layer_sequential, batched_experts :
        Passed to :class:`~wasserstein_neurons.expansion.ExpansionConfig`.
    nsamples, seed :
        Calibration windows (``nsamples`` x ``seqlen``, seeded; the same seed seeds k-means).
    grid_sparsities, grid_experts, baselines :
        The grid of :func:`run_grid` (sparsities as strings such as ``"0.5"`` or ``"2:4"``).
    save : str or None
        :func:`run_expand`: also write the SE model with
        :func:`~wasserstein_neurons.expansion.save_expanded` to this folder.
    overwrite : bool
        Replace a finished run in ``out``.
    resume : bool
        :func:`run_grid`: keep the rows already in ``out/results.csv`` and run only the
        missing cells.
    engine, ray_address, trial_cpus, trial_gpus :
        :func:`run_grid`: run the cells here one after another (``"local"``) or as Ray Tune
        trials (``"ray"``, :mod:`wasserstein_neurons.trials`).
    """

    out: str = "runs/expand"
    experts: int = 16
    pca_factor: int = 32
    kmeans_restarts: int = DEFAULT_KMEANS_RESTARTS
    min_cluster_tokens: int | None = None
    within_layer_sequential: bool = False
    batched_experts: bool | None = None
    grid_sparsities: tuple[str, ...] = SPARSITY_GRID
    grid_experts: tuple[int, ...] = EXPERT_GRID
    baselines: tuple[str, ...] = BASELINES
    save: str | None = None
    overwrite: bool = False
    resume: bool = False

    def expansion_config(
        self, experts: int, sparsity: float, prunen: int = 0, prunem: int = 0
    ) -> ExpansionConfig:
        """The builder config of one cell (the routing and calibration settings are ours)."""
        cell = dict(n_experts=experts, sparsity=sparsity, prunen=prunen, prunem=prunem)
        return config_from(ExpansionConfig, self, **cell)

    def validate(self, grid: bool = False) -> None:
        """Raise ``ValueError`` with a one-line message for any invalid setting."""
        self.spec()  # sparsity range, n:m shape (both --prunen and --prunem), wbits
        if isinstance(self.experts, bool) or self.experts < 1:
            raise ValueError(f"--experts must be a positive integer, got {self.experts}")
        self.expansion_config(self.experts, self.sparsity, self.prunen, self.prunem)
        self.validate_calibration()
        if self.resume and not grid:
            raise ValueError("--resume continues an interrupted grid: pass it with --grid")
        if self.engine != "local" and not grid:
            raise ValueError("--engine ray runs the cells of a grid: pass it with --grid")
        self.validate_engine()
        if grid:
            if not self.grid_sparsities or not self.grid_experts:
                raise ValueError("the grid needs at least one sparsity and one expert count")
            for s in self.grid_sparsities:
                parse_sparsity(s)
            bad = [k for k in self.grid_experts if isinstance(k, bool) or int(k) < 1]
            if bad:
                raise ValueError(f"expert counts must be positive integers, got {bad}")
            unknown = [b for b in self.baselines if b not in BASELINES]
            if unknown:
                raise ValueError(f"unknown baseline(s) {unknown}; valid: {', '.join(BASELINES)}")
        self.validate_eval()


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


class _Models:
    """Hands out dense models: the current one while unmodified, else a fresh load."""

    def __init__(self, cfg: ExpandConfig) -> None:
        self.cfg = cfg
        self.model = None
        self.dirty = False

    def fresh(self):
        if self.model is None or self.dirty:
            self.model = None
            gc.collect()
            self.model = self.cfg.load()
        self.dirty = True
        return self.model

    def peek(self):
        """The current model without marking it modified (loads one if needed)."""
        if self.model is None:
            self.fresh()
            self.dirty = False
        return self.model


def _row(
    model, method: str, experts: int, sparsity: float, prunen: int, prunem: int, **extra
) -> dict[str, Any]:
    cost = mlp_cost(model)
    return {
        "method": method,
        "experts": experts,
        "sparsity": sparsity,
        "prunen": prunen,
        "prunem": prunem,
        "pattern": _pattern(method, sparsity, prunen, prunem),
        "flops_per_token": cost["flops_per_token"],
        "params": cost["params"],
        "nbytes": cost["nbytes"],
        **extra,
    }


def _evaluate(model, eval_windows, cfg: ExpandConfig, progress: bool) -> dict[str, Any]:
    res = perplexity(model, eval_windows, batch_size=cfg.batch_size, progress=progress)
    return {
        "perplexity": res.perplexity,
        "eval_seconds": res.seconds,
        "eval_tokens": res.n_tokens,
    }


def _pattern(method: str, sparsity: float, prunen: int, prunem: int) -> str:
    """The ``pattern`` column: ``"dense"``, ``"2:4"`` or ``"0.5"``."""
    if method == "dense":
        return "dense"
    return PruneSpec.from_settings(sparsity, prunen, prunem).label


def _cell(
    models: _Models,
    method: str,
    experts: int,
    pattern: str,
    cal_windows,
    eval_windows,
    cfg: ExpandConfig,
    progress: bool,
    keep: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame, ExpansionConfig | None]:
    """Build one model from a fresh dense one, evaluate it; returns row, layer table, config."""
    sparsity, n, m = parse_sparsity(pattern)
    model = models.fresh()
    exp_cfg = None
    t0 = time.perf_counter()
    if method in ("sparsegpt", "sparse_expansion"):
        exp_cfg = cfg.expansion_config(experts, sparsity, n, m)
        layers = build_sparse_expansion(model, cal_windows, exp_cfg, progress=progress)
    else:
        spec = PruneSpec.from_settings(sparsity, n, m)
        with native_sdpa(model.hf_model):
            layers = sequential_prune(
                model,
                cal_windows,
                method,
                spec,
                within_layer_sequential=cfg.within_layer_sequential,
                batch_size=cfg.batch_size,
                progress=progress,
            )
    build_s = time.perf_counter() - t0
    row = _row(model, method, experts, sparsity, n, m, build_seconds=build_s)
    row.update(_evaluate(model, eval_windows, cfg, progress))
    layers = layers.assign(method=method, experts=experts, pattern=row["pattern"])
    if not keep:
        models.model = None  # free the expanded model before the next load
    return row, layers, exp_cfg


def _windows(model, cfg: ExpandConfig):
    return cfg.calibration_windows(model), eval_windows_for(model, cfg)


def save_grid_figure(table: pd.DataFrame, out: str | Path, model: str) -> Path:
    """Write ``grid.png``: perplexity vs sparsity, one line per method / number of experts.

    The title gives the calibration and evaluation sizes recorded in ``table`` itself.
    """
    row = table.iloc[0]
    title = (
        f"{model}: MLP linears pruned, {int(row['nsamples'])} x {int(row['seqlen'])} "
        f"calibration tokens, perplexity on {int(row['eval_tokens'])} tokens"
    )
    fig = plotting.plot_expansion_grid(table, title=title)
    return plotting.save_figure(fig, Path(out) / "grid.png")


def _finish_table(rows: list[dict[str, Any]], cfg: ExpandConfig) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    dense = df[df["method"] == "dense"]
    if len(dense):
        ref = dense.iloc[0]
        df["relative_flops"] = df["flops_per_token"] / ref["flops_per_token"]
        df["relative_params"] = df["params"] / ref["params"]
    else:
        df["relative_flops"] = math.nan
        df["relative_params"] = math.nan
    df["nsamples"] = cfg.nsamples
    df["seqlen"] = cfg.seqlen
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = math.nan
    return df[list(RESULT_COLUMNS)]


# --------------------------------------------------------------------------------------------
# Workflows
# --------------------------------------------------------------------------------------------


def run_expand(cfg: ExpandConfig, progress: bool = True) -> pd.DataFrame:
    """One setting: the dense model, SparseGPT (k = 1) and SE with ``cfg.experts`` experts.

    Writes ``results.csv`` (columns :data:`RESULT_COLUMNS`, one row per model: ``dense``,
    ``sparsegpt``, ``sparse_expansion``), ``layers.csv`` (the builders' per-linear summaries)
    and ``config.json`` to ``cfg.out``; with ``cfg.save``, also the SE model
    (:func:`~wasserstein_neurons.expansion.save_expanded`).  With ``experts == 1``
    only the SparseGPT row is built.

    Returns
    -------
    pandas.DataFrame
        The results table.
    """
    cfg.validate()
    plan = plan_for(cfg, "expand")
    check_save_folder(cfg.save)
    models = _Models(cfg)
    model = models.peek()
    name = model.name
    cal_w, eval_w = _windows(model, cfg)
    del model  # the cells reuse / free it through `models`
    with plan.start() as run:
        rows = [_local_cell(models, DENSE_CELL, cal_w, eval_w, cfg, progress)[0]]
        pattern = cfg.spec().label
        tables = []
        cells = [("sparse_expansion", cfg.experts)] if cfg.experts > 1 else []
        cells.append(("sparsegpt", 1))
        for method, k in cells:
            keep = bool(cfg.save) and (k == cfg.experts)
            row, layers, exp_cfg = _cell(
                models, method, k, pattern, cal_w, eval_w, cfg, progress, keep=keep
            )
            rows.append(row)
            tables.append(layers)
            if keep:
                extra = {"perplexity": row["perplexity"], "run": str(run.path)}
                save_expanded(models.model, cfg.save, exp_cfg, extra=extra)
                models.model = None
        table = _finish_table(rows, cfg)
        save_table(table, run.path, "results")
        write_csv(pd.concat(tables, ignore_index=True), run.path / "layers.csv")
        run.finish(
            {
                "command": "expand",
                "config": asdict(cfg),
                "model": name,
                "results": table.to_dict(orient="records"),
            }
        )
    return table


def run_grid(cfg: ExpandConfig, progress: bool = True) -> pd.DataFrame:
    """The evaluation grid: sparsities x (baselines, SparseGPT and SE with each k).

    One row per (method, experts, sparsity pattern) plus the dense reference: ``magnitude``
    and ``wanda`` (``experts = 1``), ``sparsegpt`` (k = 1) and ``sparse_expansion`` (k > 1)
    for every entry of ``cfg.grid_sparsities`` and ``cfg.grid_experts``.  ``results.csv``
    (columns :data:`RESULT_COLUMNS`) and the figure ``grid.png`` (perplexity vs sparsity, one
    line per method / k, :func:`save_grid_figure`) are rewritten after every cell and
    ``config.json`` is marked finished at the end; ``layers.csv`` holds the per-linear
    summaries.  With ``cfg.resume`` the cells already in ``results.csv`` are skipped.

    Cost on the embedded model (2-core CPU): one 16-expert build is about 9 min, a SparseGPT
    build about 4 and one evaluation a few minutes, so the default grid (4 sparsities x 7
    models) takes hours; use
    ``grid_sparsities`` / ``grid_experts`` / ``nsamples`` to shrink it.

    Returns
    -------
    pandas.DataFrame
    """
    cfg.validate(grid=True)
    plan = plan_for(cfg, GRID_COMMAND, resume=cfg.resume, resumable=True, cells=GRID_CELLS)
    order = {cell: i for i, cell in enumerate([DENSE_CELL, *_grid_cells(cfg)])}
    if cfg.engine == "local":
        models = _Models(cfg)
        cal_w, eval_w = _windows(models.peek(), cfg)
    with plan.start() as run:
        rows, tables = _finished_cells(run.path) if plan.action == "resume" else ([], [])
        done = {_cell_key(r) for r in rows}
        todo = [cell for cell in order if cell not in done]

        def add(row: dict, layers: pd.DataFrame) -> None:
            rows.append(row)
            rows.sort(key=lambda r: order.get(_cell_key(r), len(order)))
            tables.append(layers)
            _save_grid(run.path, _finish_table(rows, cfg), tables, cfg)

        if cfg.engine == "local":
            for cell in todo:
                add(*_local_cell(models, cell, cal_w, eval_w, cfg, progress))
        else:
            trials = [{"config": asdict(cfg), "cell": list(cell)} for cell in todo]
            run_trials(
                f"{__name__}:grid_cell",
                trials,
                lambda _, res: add(res["row"], pd.DataFrame(res["layers"])),
                cfg,
                storage=run.path / ".ray",
            )
        table = _finish_table(rows, cfg)
        _save_grid(run.path, table, tables, cfg)
        record = {"command": GRID_COMMAND, "config": asdict(cfg), "model": cfg.model}
        run.finish({**record, "results": table.to_dict(orient="records")})
    return table


def _cell_key(row: dict) -> tuple[str, int, str]:
    return row["method"], int(row["experts"]), str(row["pattern"])


def _local_cell(models: _Models, cell, cal_w, eval_w, cfg: ExpandConfig, progress: bool):
    """Row and layer table of one grid cell, built in this process (``DENSE_CELL``: the
    dense model, evaluated)."""
    method, k, label = cell
    if cell == DENSE_CELL:
        model = models.peek()
        row = _row(model, "dense", 1, 0.0, 0, 0, build_seconds=0.0)
        row.update(_evaluate(model, eval_w, cfg, progress))
        return row, pd.DataFrame()
    row, layers, _ = _cell(models, method, k, label, cal_w, eval_w, cfg, progress)
    return row, layers


def grid_cell(config: dict, cell: list) -> dict[str, Any]:
    """One grid cell as a trial (:mod:`wasserstein_neurons.trials`): the run's ``config``
    (``asdict(ExpandConfig)``) and the cell ``[method, experts, pattern]`` in, its
    ``results.csv`` row and ``layers.csv`` rows out. Loads its own model and makes the same
    seeded windows as the local engine."""
    cfg = ExpandConfig(**config)
    models = _Models(cfg)
    cal_w, eval_w = _windows(models.peek(), cfg)
    method, k, label = cell
    row, layers = _local_cell(models, (method, int(k), label), cal_w, eval_w, cfg, False)
    return {"row": row, "layers": layers.to_dict(orient="records")}


def _grid_cells(cfg: ExpandConfig) -> list[tuple[str, int, str]]:
    """``(method, experts, pattern)`` of every grid cell, in the order they run."""
    cells = []
    for pattern in cfg.grid_sparsities:
        label = PruneSpec.from_pattern(pattern).label
        cells += [(b, 1, label) for b in cfg.baselines]
        for k in cfg.grid_experts:
            cells.append(("sparsegpt" if int(k) == 1 else "sparse_expansion", int(k), label))
    return cells


def _finished_cells(out: Path) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """The rows of ``results.csv`` and the ``layers.csv`` summaries of those cells, from a
    run being resumed (nothing when it finished no cell yet)."""
    results_path, layers_path = out / "results.csv", out / "layers.csv"
    if not results_path.is_file():
        return [], []
    rows = pd.read_csv(results_path, dtype={"pattern": str}).to_dict(orient="records")
    done = {_cell_key(r) for r in rows}
    try:
        old = pd.read_csv(layers_path, dtype={"pattern": str})
    except (FileNotFoundError, pd.errors.EmptyDataError):  # no cell with layers finished
        return rows, []
    cell = zip(old["method"], old["experts"].astype(int), old["pattern"], strict=True)
    return rows, [old[[c in done for c in cell]]]


def _save_grid(out: Path, table: pd.DataFrame, tables: list[pd.DataFrame], cfg) -> None:
    """Rewrite ``results.csv``, ``grid.png`` and ``layers.csv`` (after every cell)."""
    save_table(table, out, "results")
    save_grid_figure(table, out, cfg.model)
    tables = [t for t in tables if len(t)]  # the dense cell has no layers
    if tables:
        write_csv(pd.concat(tables, ignore_index=True), out / "layers.csv")
