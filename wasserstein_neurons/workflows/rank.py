"""The ``rank`` workflow: capture → W1 per neuron → tables, contexts and plots in a run folder.

Outputs in ``cfg.out``:

``neurons.csv`` / ``.parquet``   one row per (hook, neuron): ``layer, hook, neuron, wd, mean, std,
                                 skew, kurtosis, n_tokens, constant, first_pos_share,
                                 position_artefact, wd_rank, is_top``
``top_neurons.csv``              the top-p% WD neurons of every hook (``position_artefact``:
                                 their tail is mostly window-start tokens)
``top_contexts.csv``             top-activating tokens (both tails) of each hook's strongest
                                 Wasserstein neurons, with their window and position in it
``wd_by_layer.png``, ``layer_<l>_grid.png``, ``top_neuron.png``
``activations/``                 the activation store (reopen with ``ActivationStore.open``)
``config.json``                  this config, model, corpus, token count, versions; written last

Token positions (:class:`~wasserstein_neurons.workflows.common.PositionSettings`): with
``exclude_positions = N`` every statistic, table, context and plot leaves out the first ``N``
positions of each window, with ``exclude_special`` the special tokens; the capture itself is
unchanged (the store keeps every token, so another exclusion can be computed from it later).
``bos`` captures windows that start with the tokenizer's BOS (same ``tokens``, same ``seqlen``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import plotting
from ..capture import ActivationStore, capture_activations, remove_store, resolve_hook_names
from ..data import load_tokens, sample_windows
from ..ranking import check_percent, rank_store, top_activating_contexts, top_neurons
from ..runs import save_table
from ..wasserstein import METHODS
from .common import ModelSettings, PositionSettings, check_seed, plan_for


@dataclass
class RankConfig(PositionSettings, ModelSettings):
    """Knobs of a ``rank`` run (CLI flags of the same names)."""

    out: str = "runs/rank"
    tokens: int = 32768
    hooks: str = "blocks.*.mlp.hook_pre"
    top_percent: float = 3.0
    method: str = "exact"
    store_dtype: str = "float16"
    seed: int = 0
    contexts_per_hook: int = 3
    keep_activations: bool = True
    overwrite: bool = False

    def validate(self) -> None:
        self.validate_model()
        check_seed(self.seed)
        check_percent(self.top_percent)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.tokens < self.seqlen:
            raise ValueError(f"--tokens ({self.tokens}) must be at least --seqlen ({self.seqlen})")
        self.validate_positions(self.seqlen)


@dataclass
class RankResult:
    out: Path
    table: pd.DataFrame
    top: pd.DataFrame
    contexts: pd.DataFrame
    store: ActivationStore | None
    seconds: dict


def run_rank(cfg: RankConfig, model=None, progress: bool = True) -> RankResult:
    """Run the whole ranking workflow; ``model`` (a ``LoadedModel``) skips loading.

    Every setting, the model, the corpus and the hooks are checked before ``cfg.out`` is
    touched (:mod:`wasserstein_neurons.runs`)."""
    cfg.validate()
    plan = plan_for(cfg, "rank")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model = cfg.load(model)
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tokens = load_tokens(model.tokenizer, cfg.dataset, "calibration")
    windows = cfg.with_bos(model, sample_windows(tokens, cfg.tokens, cfg.seqlen, seed=cfg.seed))
    resolve_hook_names(model.bridge, cfg.hooks)
    with plan.start() as run:
        out = run.path
        store = capture_activations(
            model,
            windows,
            out / "activations",
            hooks=cfg.hooks,
            batch_size=cfg.batch_size,
            dtype=cfg.store_dtype,
            overwrite=True,
            progress=progress,
            bos=cfg.bos,
        )
        seconds["capture"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        table, top = _rank_table(store, cfg, progress)
        seconds["rank"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        contexts = _report(out, store, model.tokenizer, table, top, cfg)
        seconds["report"] = time.perf_counter() - t0

        if not cfg.keep_activations:
            remove_store(out / "activations")
            store = None
        run.finish(_run_record(cfg, model, len(tokens), int(windows.numel()), table, seconds))
    return RankResult(
        out=out, table=table, top=top, contexts=contexts, store=store, seconds=seconds
    )


def _run_record(cfg: RankConfig, model, split_tokens: int, n_tokens: int, table, seconds) -> dict:
    """What ``config.json`` records: config, model, corpus, token counts, hooks, timings."""
    return {
        "command": "rank",
        "config": asdict(cfg),
        "model": {
            "name": model.name,
            "family": model.adapter.family,
            "n_layers": model.adapter.n_layers,
            "d_mlp": model.adapter.d_mlp,
        },
        "corpus": {"name": cfg.dataset, "split": "calibration", "split_tokens": split_tokens},
        "n_tokens": n_tokens,
        "n_tokens_kept": int(table["n_tokens"].iloc[0]),
        "hooks": table["hook"].unique().tolist(),
        "seconds": seconds,
    }


def _rank_table(
    store: ActivationStore, cfg: RankConfig, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-neuron table (with ``is_top``) and its top-p% rows per hook."""
    table = rank_store(
        store,
        method=cfg.method,
        progress=progress,
        exclude_positions=cfg.exclude_positions,
        exclude_special=cfg.exclude_special,
    )
    top = top_neurons(table, cfg.top_percent)
    key = ["hook", "neuron"]
    table["is_top"] = pd.MultiIndex.from_frame(table[key]).isin(pd.MultiIndex.from_frame(top[key]))
    return table, top


def _report(out: Path, store, tokenizer, table, top, cfg: RankConfig) -> pd.DataFrame:
    """Write the tables, the top contexts and the plots; returns the contexts table."""
    selection = store.select(cfg.exclude_positions, cfg.exclude_special)
    contexts = pd.concat(
        [
            top_activating_contexts(
                store,
                tokenizer,
                hook,
                group.nlargest(cfg.contexts_per_hook, "wd")["neuron"].to_numpy(),
                selection=selection,
            )
            for hook, group in top.groupby("hook", sort=False)
        ],
        ignore_index=True,
    )
    save_table(table, out, "neurons")
    save_table(top, out, "top_neurons")
    contexts.to_csv(out / "top_contexts.csv", index=False)
    _save_plots(out, store, table, cfg.top_percent, selection.rows)
    return contexts


def _plot_layers(hooks: list[str]) -> list[str]:
    if len(hooks) <= 3:
        return hooks
    return [hooks[0], hooks[len(hooks) // 2], hooks[-1]]


def _save_plots(
    out: Path, store: ActivationStore, table: pd.DataFrame, top_percent: float, rows=None
) -> None:
    """The WD-by-layer figure, three layer grids and the top neuron's histogram (kept rows)."""
    plotting.save_figure(plotting.plot_wd_by_layer(table, top_percent), out / "wd_by_layer.png")
    hooks = list(dict.fromkeys(table.sort_values("layer")["hook"]))
    for hook in _plot_layers(hooks):
        fig = plotting.plot_layer_grid(store.array(hook), table, hook, token_rows=rows)
        plotting.save_figure(fig, out / f"{hook.replace('.', '_')}_grid.png")
    best = table.loc[table["wd"].idxmax()]
    values = store.array(best["hook"])[:, int(best["neuron"])]
    values = np.asarray(values if rows is None else values[rows], dtype=np.float64)
    fig = plotting.plot_neuron_histogram(
        values, wd=best["wd"], title=f"{best['hook']} neuron {int(best['neuron'])}"
    )
    plotting.save_figure(fig, out / "top_neuron.png")
