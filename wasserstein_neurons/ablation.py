"""Neuron-set sparsification studies: do Wasserstein neurons matter more than others?

In every MLP, pick ``k = round(p% · d_mlp)`` neurons with a *strategy*, sparsify their rows to a
per-row ``neuron_sparsity`` with magnitude, Wanda or SparseGPT, measure perplexity, and restore
the weights bit-exactly before the next setting. The paper's causal test: the ``wd-top``
neurons hurt far more than the same number of ``random`` ones.

Strategies (same ``k`` per layer for each):

``wd-top`` / ``wd-bottom``   highest / lowest WD of the neuron's output (ranking table)
``random``                   uniform without replacement, one draw per seed
``mean``                     highest mean output
``variance``                 highest output variance
``norm``                     highest L2 norm of the neuron's first-projection weight row

What a neuron's "rows" are: Llama — row ``j`` of ``gate_proj`` and of ``up_proj``; GPT-NeoX /
GPT-2 — row ``j`` of the first projection. With ``include_down`` column ``j`` of the down
projection is sparsified too, always by magnitude (for one column Wanda's score reduces to
magnitude and SparseGPT's row-wise updates do not apply).

Calibration: Wanda and SparseGPT statistics come from *one* pass of the dense model over the
calibration windows and are reused for every setting. Each setting perturbs only ``p``% of the
rows, so the sequential re-calibration of one-shot pruning would change the inputs very little;
this keeps a whole sweep to one calibration pass plus one perplexity evaluation per setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .capture import run_hooked
from .evaluate import perplexity
from .pruning import PRUNERS, Pruner, PruneSpec, WeightSnapshot, check_method, make_pruner
from .ranking import count_for_percent

STRATEGIES = ("wd-top", "wd-bottom", "random", "mean", "variance", "norm")


def parse_strategies(strategies: str | Sequence[str]) -> list[str]:
    """Validate strategy names (comma-separated string or list)."""
    if isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(
            f"unknown strategy {', '.join(bad) or '(none)'}; valid: {', '.join(STRATEGIES)}"
        )
    return list(dict.fromkeys(strategies))


def select_neurons(
    strategy: str, table: pd.DataFrame | None, model, layer: int, k: int, seed: int = 0
) -> np.ndarray:
    """Indices ``[k]`` of the neurons of ``layer`` chosen by ``strategy`` (sorted).

    ``table`` is a ranking table (``layer, hook, neuron, wd, mean, std``) of the layer's
    first-projection hook; it is needed by every strategy except ``random`` and ``norm``.
    """
    d_mlp = model.adapter.d_mlp
    if strategy == "random":
        rng = np.random.default_rng([seed, layer])
        return np.sort(rng.choice(d_mlp, size=k, replace=False))
    if strategy == "norm":
        w = model.adapter.weight(model.hf_model, layer, model.adapter.first_role)
        scores = w.float().norm(dim=1).cpu().numpy()
        return np.sort(np.argsort(-scores, kind="stable")[:k])
    if table is None:
        raise ValueError(f"strategy {strategy!r} needs a ranking table")
    hook = model.adapter.hook_name(layer, model.adapter.first_role)
    rows = table[table["hook"] == hook]
    if len(rows) != d_mlp:
        raise ValueError(
            f"the ranking table has {len(rows)} rows for {hook}, expected {d_mlp}; "
            "was it made with another model or hook?"
        )
    rows = rows.set_index("neuron").sort_index()
    column, largest = {
        "wd-top": ("wd", True),
        "wd-bottom": ("wd", False),
        "mean": ("mean", True),
        "variance": ("std", True),
    }[strategy]
    values = rows[column].to_numpy(dtype=np.float64)
    order = np.argsort(-values if largest else values, kind="stable")
    order = order[~np.isnan(values[order])]  # constant neurons are never chosen
    return np.sort(order[:k])


@dataclass
class CalibrationCache:
    """Pruning statistics of the dense model, keyed by ``(layer, role)``.

    For Llama, ``gate`` and ``up`` read the same input, so they share one pruner (one Hessian).
    """

    method: str
    pruners: dict[tuple[int, str], Pruner] = field(default_factory=dict)
    n_tokens: int = 0


@torch.no_grad()
def collect_calibration(
    model, windows: torch.Tensor, method: str, batch_size: int = 8, progress: bool = True
) -> CalibrationCache:
    """One dense forward pass over ``windows`` feeding every neuron-role pruner's statistics."""
    method = check_method(method)
    adapter = model.adapter
    cache = CalibrationCache(method=method)
    roles = adapter.neuron_roles
    hooks = []
    for layer in range(adapter.n_layers):
        shared = make_pruner(method, adapter.d_model, device=model.device)
        for role in roles:
            cache.pruners[(layer, role)] = shared
        hooks.append(
            (
                adapter.input_hook_name(layer, roles[0]),
                lambda x, hook, p=shared: p.add_batch(x.detach()),
            )
        )
    if PRUNERS[method].needs_calibration:
        run_hooked(
            model,
            windows,
            hooks,
            batch_size=batch_size,
            progress=progress,
            desc=f"calibrate ({method})",
        )
        cache.n_tokens = int(windows.numel())
    return cache


@torch.no_grad()
def sparsify_neurons(
    model,
    selection: dict[int, np.ndarray],
    neuron_sparsity: float,
    cache: CalibrationCache,
    include_down: bool = False,
) -> WeightSnapshot:
    """Prune the selected neurons' rows in place; returns the snapshot that undoes it.

    ``selection`` maps layer → neuron indices. Every other weight stays bit-identical.
    """
    adapter = model.adapter
    snapshot = WeightSnapshot()
    for layer, neurons in selection.items():
        index = torch.as_tensor(neurons, dtype=torch.long)
        spec = PruneSpec(sparsity=neuron_sparsity, rows=index, per_row=True)
        for role in adapter.neuron_roles:
            weight = adapter.weight(model.hf_model, layer, role)
            snapshot.add(weight, index.to(weight.device), layer=layer, role=role)
            result = cache.pruners[(layer, role)].prune(weight, spec)
            weight[index] = result.weight[index]
        if include_down:
            down = adapter.weight(model.hf_model, layer, "down")  # [d_model, d_mlp]
            snapshot.add(down, index.to(down.device), columns=True, layer=layer, role="down")
            pruned = make_pruner("magnitude", down.shape[0]).prune(
                down.T.contiguous(), PruneSpec(sparsity=neuron_sparsity, rows=index, per_row=True)
            )
            down[:, index] = pruned.weight[index].T.to(down.dtype)
    return snapshot


@dataclass
class AblationConfig:
    strategies: Sequence[str] = ("wd-top", "random", "wd-bottom")
    top_percent: float = 3.0
    neuron_sparsities: Sequence[float] = (0.9,)
    method: str = "magnitude"
    seeds: int = 3
    include_down: bool = False

    def validate(self) -> None:
        self.strategies = parse_strategies(self.strategies)
        check_method(self.method)
        for s in self.neuron_sparsities:
            PruneSpec(sparsity=s)  # raises a clear ValueError outside [0, 1)
        count_for_percent(1, self.top_percent)
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")


def run_ablation(
    model,
    table: pd.DataFrame | None,
    cfg: AblationConfig,
    eval_windows: torch.Tensor,
    cache: CalibrationCache,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Every (strategy, seed, sparsity) setting → one perplexity; weights restored after each.

    The first row is the dense model (``strategy="dense"``, ``neuron_sparsity=0``).
    Deterministic strategies run once (``seed`` 0); ``random`` runs ``cfg.seeds`` times.
    """
    cfg.validate()
    k = count_for_percent(model.adapter.d_mlp, cfg.top_percent)
    base = dict(
        top_percent=cfg.top_percent,
        method=cfg.method,
        neurons_per_layer=k,
        include_down=cfg.include_down,
    )
    dense = perplexity(model, eval_windows, batch_size=batch_size, progress=False)
    rows = [
        dict(strategy="dense", seed=0, neuron_sparsity=0.0, perplexity=dense.perplexity, **base)
    ]
    settings = [
        (s, seed, sp)
        for s in cfg.strategies
        for seed in (range(cfg.seeds) if s == "random" else [0])
        for sp in cfg.neuron_sparsities
    ]
    for strategy, seed, sparsity in tqdm(settings, desc="ablation", disable=not progress):
        selection = {
            layer: select_neurons(strategy, table, model, layer, k, seed)
            for layer in range(model.adapter.n_layers)
        }
        snapshot = sparsify_neurons(model, selection, sparsity, cache, cfg.include_down)
        try:
            ppl = perplexity(model, eval_windows, batch_size=batch_size, progress=False)
        finally:
            snapshot.restore()
        rows.append(
            dict(
                strategy=strategy,
                seed=seed,
                neuron_sparsity=sparsity,
                perplexity=ppl.perplexity,
                **base,
            )
        )
    return pd.DataFrame(rows)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max perplexity over seeds per (strategy, neuron_sparsity)."""
    grouped = results.groupby(["strategy", "neuron_sparsity"], sort=False)["perplexity"]
    return grouped.agg(["mean", "min", "max", "count"]).reset_index()
