r"""Neuron-set sparsification studies: do Wasserstein neurons matter more than others?

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

Modes (``AblationConfig.modes``): ``weights`` (the above, the default) or an activation-level
intervention through the TransformerLens hook ``blocks.{l}.mlp.<hook>``
(:mod:`wasserstein_neurons.interventions`): ``zero`` (optionally only the negative / positive
part), ``mean``, ``resample`` the selected neurons' outputs, or ``threshold`` them (zero
:math:`|a_j| < \tau_j`, the calibration quantile ``activation_sparsity`` of each channel, or
one threshold per layer with ``rule="uniform"``).  A threshold ``scope`` says which neurons of
each layer are thresholded: ``selected`` (the strategy's set), ``all`` (every neuron; no
strategy, the rows say ``strategy="all"``) or ``complement`` (every neuron except the
strategy's set, which stays dense: the CHESS-style selective rule).  No weight changes in the
activation modes; their hooks are removed after each setting.

Calibration: Wanda and SparseGPT statistics come from *one* pass of the dense model over the
calibration windows and are reused for every setting. Each setting perturbs only ``p``% of the
rows, so the sequential re-calibration of one-shot pruning would change the inputs very little;
this keeps a whole sweep to one calibration pass plus one perplexity evaluation per setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .capture import run_hooked
from .evaluate import perplexity
from .interventions import (
    HOOKS,
    MODES,
    RULES,
    SIGNS,
    ActivationStats,
    Intervention,
    check_activation_sparsity,
    intervened,
    intervention_hooks,
)
from .offload import LayerPatches, layer_resident
from .pruning import PRUNERS, Pruner, PruneSpec, WeightSnapshot, check_method, make_pruner
from .ranking import count_for_percent

STRATEGIES = ("wd-top", "wd-bottom", "random", "mean", "variance", "norm")
SCOPES = ("selected", "all", "complement")


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


def _norm_scores(model, layer: int, hook: str) -> np.ndarray:
    """``[d_mlp]`` L2 norms of each neuron's weights at ``hook``: the row of the linear whose
    output the hook carries (``hook_pre`` / ``hook_pre_linear``), or the neuron's column of the
    down projection (``hook_post``, the down projection's input)."""
    adapter = model.adapter
    role = next(s.role for s in adapter.linears if s.neuron_hook == hook)
    with layer_resident(getattr(model, "offload", None), layer, keep_edits=False):
        w = adapter.weight(model.hf_model, layer, role).float()
        return (w.norm(dim=0) if role == "down" else w.norm(dim=1)).cpu().numpy()


def select_neurons(
    strategy: str,
    table: pd.DataFrame | None,
    model,
    layer: int,
    k: int,
    seed: int = 0,
    hook: str | None = None,
) -> np.ndarray:
    """Indices ``[k]`` of the neurons of ``layer`` chosen by ``strategy`` (sorted).

    ``hook`` is the hook kind whose neurons are chosen (default: the first projection's,
    ``hook_pre``). ``table`` is a ranking table (``layer, hook, neuron, wd, mean, std``) that
    holds that hook; it is needed by every strategy except ``random`` and ``norm``.
    """
    adapter = model.adapter
    d_mlp = adapter.d_mlp
    hook = hook or adapter.spec(adapter.first_role).neuron_hook
    if strategy == "random":
        rng = np.random.default_rng([seed, layer])
        return np.sort(rng.choice(d_mlp, size=k, replace=False))
    if strategy == "norm":
        scores = _norm_scores(model, layer, hook)
        return np.sort(np.argsort(-scores, kind="stable")[:k])
    if table is None:
        raise ValueError(f"strategy {strategy!r} needs a ranking table")
    name = f"blocks.{layer}.mlp.{hook}"
    rows = table[table["hook"] == name]
    if len(rows) != d_mlp:
        raise ValueError(
            f"the ranking table has {len(rows)} rows for {name}, expected {d_mlp}; "
            f"was it made with another model, or without {hook} in its --hooks?"
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


@dataclass
class _RowEdit:
    """New values of some rows (or, with ``columns``, columns) of one linear's ``[out, in]``
    weight."""

    role: str
    index: Tensor
    values: Tensor
    columns: bool = False


def _neuron_edits(
    model, layer: int, index: Tensor, neuron_sparsity: float, cache, include_down: bool
) -> list[_RowEdit]:
    """The pruned rows of the neurons ``index`` of ``layer``: each neuron role's rows by the
    cache's pruner, and with ``include_down`` their input columns of ``down`` by magnitude."""
    adapter, edits = model.adapter, []
    spec = PruneSpec(sparsity=neuron_sparsity, rows=index, per_row=True)
    for role in adapter.neuron_roles:
        weight = adapter.weight(model.hf_model, layer, role)
        rows = cache.pruners[(layer, role)].prune(weight, spec).weight[index]
        edits.append(_RowEdit(role, index.to(weight.device), rows.to(weight.dtype)))
    if include_down:
        down = adapter.weight(model.hf_model, layer, "down")  # [d_model, d_mlp]
        pruned = make_pruner("magnitude", down.shape[0]).prune(down.T.contiguous(), spec)
        values = pruned.weight[index].T.to(down.dtype)
        edits.append(_RowEdit("down", index.to(down.device), values, columns=True))
    return edits


def _write_edits(model, layer: int, edits: list[_RowEdit], snapshot=None) -> None:
    """Write ``edits`` into ``layer``'s weights (saving the old values in ``snapshot``)."""
    for e in edits:
        weight = model.adapter.weight(model.hf_model, layer, e.role)
        if snapshot is not None:
            snapshot.add(weight, e.index, columns=e.columns, layer=layer, role=e.role)
        if e.columns:
            weight[:, e.index] = e.values
        else:
            weight[e.index] = e.values


@torch.no_grad()
def sparsify_neurons(
    model,
    selection: dict[int, np.ndarray],
    neuron_sparsity: float,
    cache: CalibrationCache,
    include_down: bool = False,
) -> WeightSnapshot | LayerPatches:
    """Prune the selected neurons' rows; returns the handle whose ``restore()`` undoes it.

    ``selection`` maps layer → neuron indices. Every other weight stays bit-identical. In
    memory the rows are edited in place and a :class:`WeightSnapshot` keeps the old ones; with
    offload each layer is materialised to compute its rows, which then become
    :meth:`~wasserstein_neurons.offload.LayerOffload.patch` edits applied on every load.
    """
    offload = getattr(model, "offload", None)
    snapshot, patches = WeightSnapshot(), {}
    for layer, neurons in selection.items():
        index = torch.as_tensor(neurons, dtype=torch.long)
        with layer_resident(offload, layer, keep_edits=False):
            edits = _neuron_edits(model, layer, index, neuron_sparsity, cache, include_down)
        if offload is None:
            _write_edits(model, layer, edits, snapshot)
        else:
            patches[layer] = partial(_write_edits, model, layer, edits)
    return snapshot if offload is None else offload.patch(patches)


def _names(value: str | Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    """Validate a comma-separated string or list of names against ``valid`` (order kept)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in value if v not in valid]
    if bad or not value:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none)'}; valid: {', '.join(valid)}")
    return list(dict.fromkeys(value))


@dataclass
class AblationConfig:
    """Knobs of a study; :meth:`validate` checks them and fills the mode-dependent defaults.

    ``sign`` (``None`` → ``"both"``) applies only to mode ``zero``; ``activation_sparsities``
    (``None`` → ``(0.5,)``), ``threshold_scopes`` and ``threshold_rules`` only to ``threshold``;
    ``stats_tokens`` bounds the calibration pool of the activation modes
    (:func:`~wasserstein_neurons.interventions.collect_activation_stats`).
    """

    strategies: Sequence[str] = ("wd-top", "random", "wd-bottom")
    top_percent: float = 3.0
    neuron_sparsities: Sequence[float] = (0.9,)
    method: str = "magnitude"
    seeds: int = 3
    include_down: bool = False
    modes: Sequence[str] = ("weights",)
    hook: str = "hook_pre"
    sign: str | None = None
    activation_sparsities: Sequence[float] | None = None
    threshold_scopes: Sequence[str] = ("selected",)
    threshold_rules: Sequence[str] = ("channel",)
    stats_tokens: int = 4096

    def validate(self) -> None:
        self.strategies = parse_strategies(self.strategies)
        self.modes = _names(self.modes, MODES, "mode")
        check_method(self.method)
        for s in self.neuron_sparsities:
            PruneSpec(sparsity=s)  # raises a clear ValueError outside [0, 1)
        count_for_percent(1, self.top_percent)
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if self.hook not in HOOKS:
            raise ValueError(f"unknown hook {self.hook!r}; valid: {', '.join(HOOKS)}")
        self._validate_activation()

    def _validate_activation(self) -> None:
        if self.sign is not None:
            if "zero" not in self.modes:
                raise ValueError("--sign applies only to --mode zero")
            _names([self.sign], SIGNS, "sign")
        threshold = "threshold" in self.modes
        if self.activation_sparsities is None:
            self.activation_sparsities = (0.5,) if threshold else ()
        elif len(self.activation_sparsities) and not threshold:
            raise ValueError("--activation-sparsity applies only to --mode threshold")
        for q in self.activation_sparsities:
            check_activation_sparsity(q)
        self.threshold_scopes = _names(self.threshold_scopes, SCOPES, "threshold scope")
        self.threshold_rules = _names(self.threshold_rules, RULES, "threshold rule")
        if self.stats_tokens < 1:
            raise ValueError(f"stats_tokens must be at least 1, got {self.stats_tokens}")

    @property
    def needs_stats(self) -> bool:
        """Whether a mode reads calibration activation statistics (mean, resample, threshold)."""
        return any(m in ("mean", "resample", "threshold") for m in self.modes)


@dataclass(frozen=True)
class Setting:
    """One cell of the sweep (one perplexity). Fields not used by ``mode`` hold ``nan`` / ``""``."""

    mode: str
    strategy: str
    seed: int = 0
    neuron_sparsity: float = float("nan")
    activation_sparsity: float = float("nan")
    scope: str = ""
    rule: str = ""
    sign: str = ""


def _seeds(cfg: AblationConfig, strategy: str) -> range:
    return range(cfg.seeds) if strategy == "random" else range(1)


def ablation_settings(cfg: AblationConfig) -> list[Setting]:
    """Every setting of a validated ``cfg``, mode by mode in ``cfg.modes`` order.

    ``weights``: strategy × seed × neuron sparsity; ``zero`` / ``mean`` / ``resample``:
    strategy × seed; ``threshold``: scope × rule × strategy × seed × activation sparsity, with
    scope ``all`` run once per rule and sparsity (``strategy="all"``, seed 0).
    """
    out: list[Setting] = []
    for mode in cfg.modes:
        if mode == "threshold":
            for scope in cfg.threshold_scopes:
                for rule in cfg.threshold_rules:
                    strategies = ["all"] if scope == "all" else cfg.strategies
                    out += [
                        Setting(mode, s, seed, activation_sparsity=float(q), scope=scope, rule=rule)
                        for s in strategies
                        for seed in _seeds(cfg, s)
                        for q in cfg.activation_sparsities
                    ]
        elif mode == "weights":
            out += [
                Setting(mode, s, seed, neuron_sparsity=float(sp))
                for s in cfg.strategies
                for seed in _seeds(cfg, s)
                for sp in cfg.neuron_sparsities
            ]
        else:
            sign = (cfg.sign or "both") if mode == "zero" else ""
            out += [
                Setting(mode, s, seed, sign=sign) for s in cfg.strategies for seed in _seeds(cfg, s)
            ]
    return out


def _scoped(setting: Setting, chosen: np.ndarray, d_mlp: int) -> np.ndarray | None:
    """The channels a setting intervenes on: the chosen set, every channel (``None``), or every
    channel outside the chosen set."""
    if setting.scope == "all":
        return None
    if setting.scope == "complement":
        return np.setdiff1d(np.arange(d_mlp), chosen)
    return chosen


@dataclass
class _Sweep:
    """What every setting of one :func:`run_ablation` call reads."""

    model: object
    table: pd.DataFrame | None
    cfg: AblationConfig
    k: int
    eval_windows: torch.Tensor
    cache: CalibrationCache | None
    stats: ActivationStats | None
    batch_size: int

    def selection(self, strategy: str, seed: int) -> dict[int, np.ndarray]:
        n_layers = self.model.adapter.n_layers
        if strategy == "all":
            return {layer: np.arange(self.model.adapter.d_mlp) for layer in range(n_layers)}
        return {
            layer: select_neurons(
                strategy, self.table, self.model, layer, self.k, seed, self.cfg.hook
            )
            for layer in range(n_layers)
        }

    def measure(self, s: Setting) -> float:
        """Perplexity under setting ``s``; weights restored / hooks removed afterwards."""
        selection = self.selection(s.strategy, s.seed)
        if s.mode == "weights":
            if self.cache is None:
                raise ValueError("mode 'weights' needs a CalibrationCache")
            snapshot = sparsify_neurons(
                self.model, selection, s.neuron_sparsity, self.cache, self.cfg.include_down
            )
            try:
                return self.ppl()
            finally:
                snapshot.restore()
        iv = Intervention(
            s.mode,
            sign=s.sign or "both",
            activation_sparsity=0.0 if s.mode != "threshold" else s.activation_sparsity,
            rule=s.rule or "channel",
            seed=s.seed,
        )
        d_mlp = self.model.adapter.d_mlp
        neurons = {layer: _scoped(s, chosen, d_mlp) for layer, chosen in selection.items()}
        hooks = intervention_hooks(self.model, neurons, iv, self.stats, hook=self.cfg.hook)
        with intervened(self.model, hooks):
            return self.ppl(use_sdpa=False)  # the native sdpa path would bypass the hooks

    def ppl(self, use_sdpa: bool = True) -> float:
        return perplexity(
            self.model,
            self.eval_windows,
            batch_size=self.batch_size,
            use_sdpa=use_sdpa,
            progress=False,
        ).perplexity


def run_ablation(
    model,
    table: pd.DataFrame | None,
    cfg: AblationConfig,
    eval_windows: torch.Tensor,
    cache: CalibrationCache | None,
    batch_size: int = 8,
    progress: bool = True,
    stats: ActivationStats | None = None,
    only: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Every setting (:func:`ablation_settings`) → one row with its perplexity; with ``only``,
    just the settings of those indices, in that order (a trial's share of a sweep).

    The first row is the dense model (``strategy="dense"``, ``mode="dense"``, both sparsities
    0).  Deterministic strategies run once (``seed`` 0); ``random`` runs ``cfg.seeds`` times.
    ``cache`` (pruning statistics) is needed by mode ``weights``, ``stats`` (activation
    statistics of ``cfg.hook``) by ``mean``, ``resample`` and ``threshold``.  After each setting
    the weights are restored bit-exactly and the hooks removed.
    """
    cfg.validate()
    if cfg.needs_stats and (stats is None or stats.hook != cfg.hook):
        raise ValueError(f"modes {', '.join(cfg.modes)} need activation statistics of {cfg.hook}")
    sweep = _Sweep(
        model,
        table,
        cfg,
        count_for_percent(model.adapter.d_mlp, cfg.top_percent),
        eval_windows,
        cache,
        stats,
        batch_size,
    )
    base = dict(top_percent=cfg.top_percent, hook=cfg.hook, neurons_per_layer=sweep.k)
    dense = Setting("dense", "dense", neuron_sparsity=0.0, activation_sparsity=0.0)
    rows = [_row(dense, sweep.ppl(), cfg, base)]
    settings = ablation_settings(cfg)
    chosen = [settings[i] for i in (range(len(settings)) if only is None else only)]
    for setting in tqdm(chosen, desc="ablation", disable=not progress):
        rows.append(_row(setting, sweep.measure(setting), cfg, base))
    return pd.DataFrame(rows)


def _row(s: Setting, ppl: float, cfg: AblationConfig, base: dict) -> dict:
    weights = s.mode == "weights" or (s.mode == "dense" and "weights" in cfg.modes)
    return dict(
        strategy=s.strategy,
        seed=s.seed,
        mode=s.mode,
        neuron_sparsity=s.neuron_sparsity,
        activation_sparsity=s.activation_sparsity,
        scope=s.scope,
        rule=s.rule,
        sign=s.sign,
        method=cfg.method if weights else "",
        include_down=cfg.include_down if weights else False,
        perplexity=ppl,
        **base,
    )


SUMMARY_KEYS = (
    "mode",
    "strategy",
    "scope",
    "rule",
    "sign",
    "neuron_sparsity",
    "activation_sparsity",
)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, min and max perplexity over seeds per setting (:data:`SUMMARY_KEYS` present in
    ``results``; tables written before the activation modes have only ``strategy`` and
    ``neuron_sparsity``)."""
    keys = [k for k in SUMMARY_KEYS if k in results.columns]
    grouped = results.groupby(keys, sort=False, dropna=False)["perplexity"]
    return grouped.agg(["mean", "min", "max", "count"]).reset_index()
