r"""The pruning driver: magnitude / Wanda / SparseGPT on every decoder layer, sequentially.

Built on the one layer loop, :func:`~wasserstein_neurons.layerwise.sequential_layerwise`: each
layer's target linears are calibrated on the inputs that the already pruned layers produce,
pruned through a :class:`~wasserstein_neurons.pruning.Pruner`, and the layer is re-run to feed
the next one.  :func:`sequential_prune` returns one summary row per pruned matrix.

Example
-------
::

    from wasserstein_neurons.data import calibration_windows, load_tokens
    from wasserstein_neurons.models import load_model
    from wasserstein_neurons.pruning import PruneSpec, sequential_prune

    model = load_model()
    tokens = load_tokens(model.tokenizer, "embedded", "calibration")
    windows = calibration_windows(tokens, nsamples=128, seqlen=512, seed=0)
    summary = sequential_prune(model, windows, "sparsegpt", PruneSpec(sparsity=0.5))
    summary.groupby("role")[["sparsity", "rel_error"]].mean()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from ..bridge import linear_weight
from ..layerwise import LayerContext, resolve_layers, resolve_targets, sequential_layerwise
from ..offload import layer_resident
from .base import Pruner, PruneSpec
from .registry import PRUNERS, check_method, make_pruner

__all__ = ["SUMMARY_COLUMNS", "SpecLike", "sequential_prune"]

#: Columns of the DataFrame returned by :func:`sequential_prune`.
SUMMARY_COLUMNS = (
    "layer",
    "role",
    "method",
    "target_sparsity",
    "sparsity",
    "n_rows",
    "d_in",
    "n_tokens",
    "seconds",
    "error",
    "rel_error",
)

#: What a spec argument may be: one spec (or a bare sparsity) for every target, a mapping
#: ``(layer, role) -> spec`` (missing keys are not pruned) or a callable ``(layer, role) -> spec``.
SpecLike = (
    PruneSpec
    | float
    | Mapping[tuple[int, str], PruneSpec | float | None]
    | Callable[[int, str], PruneSpec | float | None]
)


def _spec_getter(spec: SpecLike) -> Callable[[int, str], PruneSpec | None]:
    def as_spec(value) -> PruneSpec | None:
        if value is None or isinstance(value, PruneSpec):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return PruneSpec(sparsity=float(value))
        raise TypeError(f"expected a PruneSpec, a sparsity or None, got {type(value).__name__}")

    if isinstance(spec, PruneSpec) or isinstance(spec, int | float):
        fixed = as_spec(spec)
        return lambda layer, role: fixed
    if isinstance(spec, Mapping):
        return lambda layer, role: as_spec(spec.get((layer, role)))
    if callable(spec):
        return lambda layer, role: as_spec(spec(layer, role))
    raise TypeError(
        "spec must be a PruneSpec, a sparsity, a mapping (layer, role) -> PruneSpec or a "
        f"callable (layer, role) -> PruneSpec, got {type(spec).__name__}"
    )


def _relative_error(H: Tensor, w0: Tensor, w1: Tensor) -> float:
    r"""Relative output error :math:`\lVert (W_0 - W_1) X \rVert_F / \lVert W_0 X \rVert_F`.

    Computed from :math:`H \propto X^\top X` (``[in, in]``) as
    :math:`\sqrt{\mathrm{tr}(D H D^\top) / \mathrm{tr}(W_0 H W_0^\top)}`, :math:`D = W_0 - W_1`.
    """
    H = H.to(torch.float64)
    w0 = w0.to(H.device, torch.float64)
    d = w0 - w1.to(H.device, torch.float64)
    num = float(((d @ H) * d).sum())
    den = float(((w0 @ H) * w0).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else float("nan")


class _GroupPruner:
    """Calibrate and prune one group of targets that share a calibration pass.

    ``pruners[name]`` accumulates the target's statistics (Wanda norms, SparseGPT Hessian);
    with ``measure_error`` a method that keeps no Hessian also gets ``grams[name]`` (a
    SparseGPT pruner used only for :math:`X^\top X`).
    """

    def __init__(self, method: str, device, pruner_kwargs: Mapping[str, Any], measure_error):
        self.method = method
        self.device = device
        self.kwargs = pruner_kwargs
        self.measure_error = measure_error
        self.pruners: dict[str, Pruner] = {}
        self.grams: dict[str, Pruner] = {}

    def feed(self, name: str) -> Callable[[Tensor], None]:
        """Input hook of target ``name``: ``x: [batch, seqlen, in]``."""

        def fn(x: Tensor) -> None:
            if name not in self.pruners:
                self.pruners[name] = self._make(x.shape[-1])
                if self.measure_error and not hasattr(self.pruners[name], "H"):
                    self.grams[name] = make_pruner("sparsegpt", x.shape[-1], device=self.device)
            self.pruners[name].add_batch(x)
            if name in self.grams:
                self.grams[name].add_batch(x)

        return fn

    def _make(self, d_in: int) -> Pruner:
        return make_pruner(self.method, d_in, device=self.device, **self.kwargs)

    def prune(self, layer: int, name: str, module: nn.Module, spec: PruneSpec) -> dict[str, Any]:
        """Prune ``module``'s weight in place; returns its summary record."""
        w = linear_weight(module)
        pruner = self.pruners.pop(name, None)
        pruner = self._make(w.shape[1]) if pruner is None else pruner
        result = pruner.prune(w, spec)
        rows = result.rows
        rel_error = float("nan")
        gram = self.grams.pop(name, None)
        H = getattr(pruner, "H", None)
        H = gram.H if H is None and gram is not None else H
        if H is not None and pruner.nsamples > 0:
            sel = slice(None) if rows is None else rows
            rel_error = _relative_error(H, w[sel], result.weight[sel])
        w.copy_(result.weight)
        return {
            "layer": layer,
            "role": name,
            "method": self.method,
            "target_sparsity": spec.target_sparsity,
            "sparsity": result.sparsity,
            "n_rows": w.shape[0] if rows is None else int(rows.numel()),
            "d_in": w.shape[1],
            "n_tokens": pruner.nsamples,
            "seconds": result.time_s,
            "error": result.stats.get("error", float("nan")),
            "rel_error": rel_error,
        }


def _prune_group(
    ctx: LayerContext,
    group: Mapping[str, nn.Module],
    specs: Mapping[str, PruneSpec],
    pruner: _GroupPruner,
    records: list[dict[str, Any]],
) -> None:
    """One calibration pass of the layer feeding the group's targets, then prune each."""
    needs_data = PRUNERS[pruner.method].needs_calibration or pruner.measure_error
    calibrate = {n: m for n, m in group.items() if not specs[n].is_identity and needs_data}
    if calibrate:
        ctx.run(input_hooks={m: pruner.feed(n) for n, m in calibrate.items()})
    never_called = [n for n in calibrate if n not in pruner.pruners]
    if never_called:
        raise RuntimeError(
            f"layer {ctx.index}: target {never_called[0]!r} was never called by the layer's "
            "forward, so it received no calibration inputs"
        )
    for name, module in group.items():
        records.append(pruner.prune(ctx.index, name, module, specs[name]))


def _target_groups(ctx: LayerContext, active: Mapping[str, nn.Module], targets, sequential):
    """Targets calibrated together: all in one pass, or (``sequential``) in forward order
    grouped by shared input (:meth:`LayerContext.call_groups`)."""
    if not (sequential or targets == "all"):
        return [list(active)]
    groups = ctx.call_groups(active)  # also drops targets the forward never calls
    return groups if sequential else [[n for g in groups for n in g]]


def sequential_prune(
    model,
    windows: Tensor,
    method: str = "sparsegpt",
    spec: SpecLike = 0.5,
    *,
    targets: str | Sequence[str] = "mlp",
    layers: Iterable[int] | None = None,
    within_layer_sequential: bool = False,
    batch_size: int = 8,
    offload: bool = False,
    pruner_device: torch.device | str | None = None,
    pruner_kwargs: Mapping[str, Any] | None = None,
    measure_error: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    r"""One-shot prune the linears of every decoder layer with sequential calibration.

    For each layer :math:`l` (inputs from the already pruned layers ``0 .. l-1``):

    1. forward pre-hooks on the target linears feed their inputs ``[batch, seqlen, in]`` to
       one :class:`~wasserstein_neurons.pruning.Pruner` per target over all calibration
       windows (Wanda: :math:`\lVert X_j \rVert_2`, SparseGPT: :math:`H = \tfrac2N X^\top X`;
       magnitude needs no pass);
    2. each target is pruned and the new weight is copied into the real parameter (so the HF
       model and every TransformerLens hook see it); its pruner is then freed;
    3. the layer is re-run to produce the next layer's inputs.

    Within a layer, by default (``within_layer_sequential=False``, as in the reference
    SparseGPT / Wanda code) all targets are calibrated in the same pass, *before* any of them
    is pruned: Llama's ``down`` then sees the intermediate activations of the *dense*
    ``gate``/``up``.  With ``within_layer_sequential=True`` the targets are processed in
    forward order, grouped by shared input (:meth:`LayerContext.call_groups`: Llama MLP
    ``[gate, up] -> [down]``; with attention ``[q, k, v] -> [o] -> [gate, up] -> [down]``,
    SparseGPT's ``--true-sequential``), one calibration pass per group, so ``down`` is
    calibrated on the outputs of the pruned ``gate``/``up``.

    Parameters
    ----------
    model : LoadedModel
        Modified in place.
    windows : LongTensor, shape ``[n_windows, seqlen]``
        Calibration token ids (SparseGPT protocol: 128 random windows, seed 0).
    method : {"magnitude", "wanda", "sparsegpt"}
    spec : PruneSpec, float, mapping or callable
        Per-target :class:`~wasserstein_neurons.pruning.PruneSpec`: one spec (or a bare
        sparsity) for every target; a mapping ``(layer, role) -> PruneSpec | None`` (missing
        keys and ``None`` are not pruned, e.g. to prune chosen rows per layer with
        ``PruneSpec(0.9, rows=...)``); or a callable ``(layer, role) -> PruneSpec | None``.
    targets : {"mlp", "all"} or sequence of str
        See :func:`resolve_targets`.  With ``"all"``, linears never called by the forward
        (the fused QKV of bridged GPT-NeoX / GPT-2) are skipped.
    layers : iterable of int, optional
        Layers to prune (default all); the pass stops after the last one.
    within_layer_sequential : bool
        See above.
    batch_size : int
        Windows per forward call.
    offload : bool
        Keep the layer-input buffer on the CPU.
    pruner_device : torch.device or str, optional
        Where calibration statistics accumulate (default: the model's device).
    pruner_kwargs : mapping, optional
        Extra arguments of the pruner class, e.g. ``{"dtype": torch.float64}``.
    measure_error : bool
        Also accumulate :math:`X^\top X` for methods that keep no Hessian (magnitude, Wanda)
        so that ``rel_error`` is reported for them too (SparseGPT always reports it).
    progress : bool
        tqdm progress bar over layers.

    Returns
    -------
    pandas.DataFrame
        One row per pruned target with columns :data:`SUMMARY_COLUMNS`: ``layer``, ``role``,
        ``method``, ``target_sparsity``, ``sparsity`` (achieved, over the pruned rows),
        ``n_rows`` (rows pruned), ``d_in``, ``n_tokens`` (calibration tokens seen),
        ``seconds`` (pruning time of the matrix), ``error`` (SparseGPT's summed OBS loss, NaN
        otherwise) and ``rel_error`` :math:`\lVert (W - \hat W) X \rVert_F / \lVert W X
        \rVert_F` over the pruned rows on the calibration inputs (NaN when no Hessian).
    """
    key = check_method(method)
    get_spec = _spec_getter(spec)
    records: list[dict[str, Any]] = []

    def group_pruner(ctx_device) -> _GroupPruner:
        dev = pruner_device if pruner_device is not None else ctx_device
        return _GroupPruner(key, dev, dict(pruner_kwargs or {}), measure_error)

    if not PRUNERS[key].needs_calibration and not measure_error and targets != "all":
        _prune_without_data(model, get_spec, targets, layers, group_pruner, records)
        return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))

    def process(ctx: LayerContext) -> None:
        modules = ctx.targets(targets)
        specs = {n: get_spec(ctx.index, n) for n in modules}
        active = {n: m for n, m in modules.items() if specs[n] is not None}
        if not active:
            return
        pruner = group_pruner(ctx.device)
        for group in _target_groups(ctx, active, targets, within_layer_sequential):
            _prune_group(ctx, {n: active[n] for n in group}, specs, pruner, records)

    sequential_layerwise(
        model,
        windows,
        process,
        layers=layers,
        batch_size=batch_size,
        offload=offload,
        progress=progress,
        desc=f"{key} pruning",
    )
    return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))


@torch.no_grad()
def _prune_without_data(model, get_spec, targets, layers, group_pruner, records) -> None:
    """Methods that need no calibration (magnitude): prune every target in place, no forward.

    Gives the same weights and summary rows as the layer loop (which would only propagate
    inputs nobody reads).
    """
    pruner = group_pruner(model.device)
    weights = getattr(model, "offload", None)  # an offloaded layer is loaded while it is pruned
    for index in resolve_layers(layers, model.adapter.n_layers):
        with layer_resident(weights, index):
            for name, module in resolve_targets(model, index, targets).items():
                spec = get_spec(index, name)
                if spec is not None:
                    records.append(pruner.prune(index, name, module, spec))
