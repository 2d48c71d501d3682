r"""The ``disentangle`` workflow: one layer's disentanglement analysis, written to a run folder.

:func:`run_disentangle` loads a model, collects the inputs of one MLP linear on calibration and
held-out tokens from the **dense** model and hands them to
:func:`~wasserstein_neurons.disentangle.disentangle_linear` (the analysis and its metrics are
documented in :mod:`wasserstein_neurons.disentangle`); :class:`DisentangleConfig` holds its
settings (the CLI flags of the same names) and :func:`save_disentangle_plots` its figures.

Outputs of :func:`run_disentangle` (in ``cfg.out``)
---------------------------------------------------
``neurons.csv`` (+ ``.parquet`` with pyarrow)   one row per neuron: ``layer``, ``hook`` and the
                                                columns of :func:`disentangle_linear`'s table
``per_k.csv``                                   one row per number of experts: layer error,
                                                medians, Spearman correlations
``summary.json``                                the summary dict (also inside ``config.json``)
``top_neuron_outputs.npz``                      dense / SparseGPT / SE outputs of the plotted
                                                neurons on the held-out tokens, and the routing
``*.png``                                       the figures (see :func:`save_disentangle_plots`)
``config.json``                                 config, model, token counts, timings; written last
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data import load_tokens
from ..disentangle import (
    DEFAULT_EXPERTS,
    DisentangleResult,
    check_layer,
    collect_linear_inputs,
    disentangle_linear,
    resolve_experts,
    resolve_role,
)
from ..expansion import DEFAULT_KMEANS_RESTARTS
from ..offload import layer_resident
from ..ranking import check_percent
from ..runs import save_table
from .common import (
    CalibrationSettings,
    EvalSettings,
    PositionSettings,
    SparsitySettings,
    eval_windows_for,
    plan_for,
)

__all__ = ["DisentangleConfig", "run_disentangle", "save_disentangle_plots"]

#: Settings passed unchanged from :class:`DisentangleConfig` to ``disentangle_linear``.
_ANALYSIS_SETTINGS = (
    "experts",
    "pca_factor",
    "kmeans_restarts",
    "seed",
    "top_percent",
    "plot_neurons",
    "mapping_pairs",
)


@dataclass
class DisentangleConfig(PositionSettings, SparsitySettings, CalibrationSettings, EvalSettings):
    """Knobs of a ``disentangle`` run (CLI flags of the same names).

    Attributes
    ----------
    out : str
        Run folder.
    model, dataset : str
        Model name / folder and corpus (``"embedded"``, ``"wikitext2"`` or a text file).
    layer : int
        Decoder layer studied.
    role : str or None
        Linear studied (``"gate"``, ``"up"``, ``"down"``); default the first projection.
    sparsity : float
        Per-row sparsity of every sparse copy (paper's analysis: 0.9).
    prunen, prunem : int
        n:m sparsity instead of ``sparsity`` when set (``sparsity`` is then ignored).
    experts : sequence of int or comma-separated str
        Numbers of experts ``K`` (``1`` = SparseGPT).
    nsamples, seqlen : int
        Calibration windows (random, seeded) and their length: 128 x 512 = 64k tokens, i.e.
        about 4k per expert at ``K = 16`` (SE needs thousands per expert: ARCHITECTURE.md,
        "Science notes").
    eval_tokens : int
        Held-out tokens (consecutive windows of the evaluation split).
    exclude_positions, exclude_special : int, bool
        Held-out tokens left out of every metric: each window's first ``exclude_positions``
        positions and (``exclude_special``) its special tokens. Calibration (the Hessians and
        routers) always uses every token.
    bos : bool
        Every calibration and held-out window starts with the tokenizer's BOS.
    pca_factor, kmeans_restarts : int
        Router settings (paper: 32 and 100). ``kmeans_restarts`` defaults to the Sparse
        Expansion builder's :data:`~wasserstein_neurons.expansion.DEFAULT_KMEANS_RESTARTS`.
    top_percent : float
        Wasserstein neurons = top ``top_percent``% by WD.
    plot_neurons : int
        Top-WD neurons whose outputs are kept and plotted.
    mapping_pairs : int
        Random pairs for the mapping difficulty.
    batch_size : int
        Windows per forward pass when collecting inputs.
    seed : int
        Calibration windows, routers, pairs.
    device, dtype : str
        Model device / dtype (the analysis itself runs in float32 on ``device``).
    overwrite : bool
        Replace a finished run in ``out``.
    """

    out: str = "runs/disentangle"
    layer: int = 5
    role: str | None = None
    sparsity: float = 0.9
    experts: Sequence[int] | str = DEFAULT_EXPERTS
    pca_factor: int = 32
    kmeans_restarts: int = DEFAULT_KMEANS_RESTARTS
    top_percent: float = 3.0
    plot_neurons: int = 4
    mapping_pairs: int = 32768
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` for settings that cannot work (before any model is loaded)."""
        self.spec()
        resolve_experts(self.experts)
        check_percent(self.top_percent)
        self.validate_eval()
        self.validate_calibration()
        self.validate_positions(self.seqlen)
        for name in ("kmeans_restarts", "mapping_pairs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.plot_neurons < 1:
            raise ValueError(f"plot_neurons must be at least 1, got {self.plot_neurons}")


def _expansion_ks(ks: Sequence[int]) -> list[int]:
    """Up to three numbers of experts for the panel figure: smallest, middle, largest."""
    ks = list(ks)
    return ks if len(ks) <= 3 else [ks[0], ks[len(ks) // 2], ks[-1]]


def save_disentangle_plots(result: DisentangleResult, out: str | Path) -> list[Path]:
    """Write the figures of a disentanglement result to ``out``; returns their paths.

    * ``neuron_{j}_sparse_vs_dense.png`` — the top-WD neuron: dense vs SparseGPT vs SE (largest
      ``K``) output histograms, W1 to dense in the legend;
    * ``neuron_{j}_by_expert.png`` — its dense outputs split by expert (largest ``K``);
    * ``ri_vs_wd.png`` — RI vs WD for every ``K > 1``, Spearman ρ in the titles;
    * ``neuron_{j}_expansion.png`` — dense / sparse / per-expert distributions for a few ``K``
      with W1(sparse, dense) in the panel titles;
    * ``w1_vs_k.png`` — W1(sparse, dense) vs ``K`` for the top-WD neurons and all neurons.
    """
    from .. import plotting

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    o = result.outputs
    ks = sorted(o.se)
    paths: list[Path] = []
    if len(o.neurons):
        j, col = int(o.neurons[0]), 0
        k_max = ks[-1]
        sparse = {"SparseGPT": o.sparsegpt[:, col]}
        if k_max > 1:
            sparse[f"SE k={k_max}"] = o.se[k_max][:, col]
        fig = plotting.plot_sparse_vs_dense(
            o.dense[:, col], sparse, title=f"neuron {j} (WD={o.wd[col]:.3f})"
        )
        paths.append(plotting.save_figure(fig, out / f"neuron_{j}_sparse_vs_dense.png"))
        fig = plotting.plot_outputs_by_expert(
            o.dense[:, col], o.labels[k_max], title=f"neuron {j}: dense outputs, {k_max} experts"
        )
        paths.append(plotting.save_figure(fig, out / f"neuron_{j}_by_expert.png"))
        sel = _expansion_ks(ks)
        fig = plotting.plot_expansion_panels(
            o.dense[:, col],
            {k: o.se[k][:, col] for k in sel},
            {k: o.labels[k] for k in sel},
            title=f"neuron {j} (WD={o.wd[col]:.3f})",
        )
        paths.append(plotting.save_figure(fig, out / f"neuron_{j}_expansion.png"))
    multi = [k for k in ks if k > 1]
    if multi:
        fig = plotting.plot_ri_vs_wd(result.table, multi)
        paths.append(plotting.save_figure(fig, out / "ri_vs_wd.png"))
    fig = plotting.plot_w1_vs_k(result.table, ks)
    paths.append(plotting.save_figure(fig, out / "w1_vs_k.png"))
    return paths


def run_disentangle(cfg: DisentangleConfig, model=None, progress: bool = True) -> DisentangleResult:
    """Run the disentanglement analysis of one layer end to end and write its run folder.

    1. load the model (unless ``model``, a ``LoadedModel``, is given);
    2. draw ``nsamples`` calibration windows (seeded) and ``eval_tokens`` held-out tokens
       (consecutive windows of the evaluation split) and collect the studied linear's inputs
       from the **dense** model (:func:`collect_linear_inputs`);
    3. :func:`disentangle_linear`;
    4. write ``neurons.csv``, ``per_k.csv``, ``summary.json``, ``top_neuron_outputs.npz``, the
       figures (:func:`save_disentangle_plots`) and ``config.json`` (last).

    Parameters
    ----------
    cfg : DisentangleConfig
    model : LoadedModel, optional
    progress : bool
        tqdm bars.

    Returns
    -------
    DisentangleResult
        With ``out`` set and ``layer``/``hook`` columns in ``table``.

    Raises
    ------
    ValueError
        Bad settings, a layer outside ``0..n_layers-1`` or an unknown role (before anything is
        written).
    RunExistsError
        ``cfg.out`` holds a finished run and ``cfg.overwrite`` is False.
    """
    cfg.validate()
    plan = plan_for(cfg, "disentangle")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = cfg.load(model)
    seconds["load"] = time.perf_counter() - t0
    layer = check_layer(model.adapter, cfg.layer)
    role = resolve_role(model.adapter, cfg.role)

    t0 = time.perf_counter()
    x_cal, x_eval, corpus = _collect_inputs(cfg, model, layer, role, progress)
    seconds["collect"] = time.perf_counter() - t0
    with plan.start() as run:
        out = run.path
        result = _analyse(cfg, model, layer, role, x_cal, x_eval, progress)
        del x_cal, x_eval
        seconds.update(result.summary["seconds"])
        result.summary["seconds"] = seconds

        t0 = time.perf_counter()
        save_table(result.table, out, "neurons")
        result.per_k.to_csv(out / "per_k.csv", index=False)
        result.outputs.save(out / "top_neuron_outputs.npz")
        save_disentangle_plots(result, out)
        seconds["report"] = time.perf_counter() - t0
        summary = _jsonable(result.summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        run.finish(_run_record(cfg, model, corpus, summary))
    result.out = out
    return result


def _collect_inputs(
    cfg: DisentangleConfig, model, layer: int, role: str, progress: bool
) -> tuple[Tensor, Tensor, dict]:
    """Inputs of the studied linear from the dense model on calibration and held-out tokens.

    Returns ``x_cal`` ``[nsamples * seqlen, d_in]`` (seeded random windows), ``x_eval``
    ``[<= eval_tokens, d_in]`` (consecutive windows of the evaluation split, without the
    tokens ``cfg`` excludes) and the corpus record of ``config.json``.
    """
    kw = dict(layer=layer, role=role, batch_size=cfg.batch_size, progress=progress)
    cal_tokens = load_tokens(model.tokenizer, cfg.dataset, "calibration")
    eval_tokens = load_tokens(model.tokenizer, cfg.dataset, "evaluation")
    x_cal = collect_linear_inputs(model, cfg.calibration_windows(model, cal_tokens), **kw)
    eval_windows = eval_windows_for(model, cfg, eval_tokens)
    x_eval = collect_linear_inputs(model, eval_windows, **kw)
    rows = cfg.selection(model, eval_windows).rows
    if rows is not None:
        x_eval = x_eval[torch.from_numpy(rows)]
    corpus = {
        "name": cfg.dataset,
        "calibration_split_tokens": len(cal_tokens),
        "evaluation_split_tokens": len(eval_tokens),
    }
    return x_cal, x_eval, corpus


def _analyse(
    cfg: DisentangleConfig, model, layer: int, role: str, x_cal: Tensor, x_eval: Tensor, progress
) -> DisentangleResult:
    """:func:`disentangle_linear` of the studied linear, its rows labelled with layer and hook."""
    adapter = model.adapter
    weight, bias = _linear_params(model, layer, role)
    result = disentangle_linear(
        x_cal,
        x_eval,
        weight,
        bias,
        spec=cfg.spec(),
        device=model.device,
        progress=progress,
        **{name: getattr(cfg, name) for name in _ANALYSIS_SETTINGS},
    )
    if role in adapter.neuron_roles:
        hook = adapter.hook_name(layer, role)
    else:  # the down projection's outputs have no MLP alias; name the linear's own hook
        hook = f"blocks.{layer}.mlp.{adapter.spec(role).bridge_attr}.hook_out"
    result.table.insert(0, "hook", hook)
    result.table.insert(0, "layer", layer)
    result.summary.update({"layer": layer, "role": role, "hook": hook})
    return result


def _linear_params(model, layer: int, role: str) -> tuple[Tensor, Tensor | None]:
    """Copies of the studied linear's ``[out, in]`` weight and bias (with ``--offload`` its
    layer is materialised for the copy and released unchanged)."""
    adapter, hf = model.adapter, model.hf_model
    with layer_resident(model.offload, layer, keep_edits=False), torch.no_grad():
        bias = getattr(adapter.linear(hf, layer, role), "bias", None)
        weight = adapter.weight(hf, layer, role).detach().clone()
        return weight, None if bias is None else bias.detach().clone()


def _run_record(cfg: DisentangleConfig, model, corpus: dict, summary: dict) -> dict:
    """What ``config.json`` records: command, config, model, corpus and summary."""
    config = asdict(cfg)
    config["experts"] = resolve_experts(cfg.experts)
    adapter = model.adapter
    return {
        "command": "disentangle",
        "config": config,
        "model": {
            "name": model.name,
            "family": adapter.family,
            "n_layers": adapter.n_layers,
            "d_model": adapter.d_model,
            "d_mlp": adapter.d_mlp,
        },
        "corpus": corpus,
        "summary": summary,
    }


def _jsonable(obj):
    """Plain JSON types, with NaN / inf written as ``null`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj
