r"""Activation-level interventions on MLP neurons through TransformerLens hook points.

The weights never change: every intervention is a forward hook on ``blocks.{l}.mlp.<hook>``
(``hook_pre`` — gate / first projection output, ``hook_pre_linear`` — Llama up projection,
``hook_post`` — input of the down projection) that rewrites the selected channels of the
activation ``a`` (``[batch, pos, d_mlp]``) and leaves every other channel bit-identical.
:func:`intervened` attaches the hooks in a TransformerLens hook context, so they are removed when
the block exits, also on error.

Modes (``j`` a selected channel, ``t`` a token)
-----------------------------------------------
``zero``        :math:`a_{tj} \to 0`; with ``sign="negative"`` only the negative part is
                zeroed (:math:`a \to \max(a, 0)`), with ``"positive"`` only the positive part
                (:math:`a \to \min(a, 0)`), ``"both"`` (default) zeroes the whole value.
``mean``        :math:`a_{tj} \to \mu_j`, the channel's mean over *all* calibration tokens.
``resample``    :math:`a_{tj} \to p_{s(t) j}`, with :math:`p` the calibration pool (below) and
                :math:`s(t)` one pool row drawn uniformly per token (shared by the layer's
                selected channels, so their joint values come from one real token) with a
                generator seeded by ``(seed, layer)``: a rerun with the same seed gives the
                same draws.
``threshold``   activation sparsification (CHESS / CATS): :math:`a_{tj} \to 0` where
                :math:`|a_{tj}| < \tau_j`.  ``rule="channel"``: :math:`\tau_j` is the
                ``q``-quantile of channel ``j``'s :math:`|a|` over the calibration pool,
                :math:`\tau_j = |p|_{(\lfloor q n \rfloor + 1), j}` (the
                :math:`\lfloor q n\rfloor + 1`-th smallest of ``n`` pooled values), so exactly
                :math:`\lfloor q n \rfloor` of the pool's values fall below it (fewer at ties):
                a share ``q`` of the calibration activations, to within one token.
                ``rule="uniform"`` (TEAL-style): one :math:`\tau` per layer, the same quantile of
                :math:`|a|` pooled over all the intervened channels of that layer.

Calibration statistics (:func:`collect_activation_stats`), memory-bounded
-------------------------------------------------------------------------
One pass of the dense model over the calibration windows: the per-channel mean is exact, a
float64 running sum over every token; the *pool* is a uniform sample without replacement of at
most ``max_rows`` token rows (seeded, drawn before the pass, gathered as the batches go by).
Quantile thresholds and resample draws read the pool, so memory is
``n_layers x max_rows x d_mlp`` float32 (30 x 4096 x 1536 x 4 B = 755 MB for SmolLM2) however
many calibration tokens are used.  The sampling error of a quantile from ``n`` rows is
:math:`\sqrt{q(1-q)/n}` in probability (0.005 at ``q = 0.9``, ``n = 4096``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import torch
from torch import Tensor

from .capture import run_hooked

MODES = ("weights", "zero", "mean", "resample", "threshold")
ACTIVATION_MODES = MODES[1:]
SIGNS = ("both", "negative", "positive")
RULES = ("channel", "uniform")
HOOKS = ("hook_pre", "hook_pre_linear", "hook_post")

__all__ = [
    "ACTIVATION_MODES",
    "HOOKS",
    "MODES",
    "RULES",
    "SIGNS",
    "ActivationStats",
    "Intervention",
    "collect_activation_stats",
    "intervened",
    "intervention_hooks",
]


def check_hook(model, hook: str) -> None:
    """``ValueError`` unless ``blocks.{l}.mlp.<hook>`` is one of :data:`HOOKS` and exists."""
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}; valid: {', '.join(HOOKS)}")
    if f"blocks.0.mlp.{hook}" not in model.bridge.hook_dict:
        raise ValueError(f"{model.adapter.family} models have no {hook} hook point")


@dataclass(frozen=True)
class Intervention:
    """One activation intervention: ``mode`` with its knobs, given by keyword (see the module
    docstring)."""

    mode: str
    _: KW_ONLY
    sign: str = "both"
    activation_sparsity: float = 0.0
    rule: str = "channel"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ACTIVATION_MODES:
            raise ValueError(
                f"unknown activation mode {self.mode!r}; valid: {', '.join(ACTIVATION_MODES)}"
            )
        if self.sign not in SIGNS:
            raise ValueError(f"unknown sign {self.sign!r}; valid: {', '.join(SIGNS)}")
        if self.sign != "both" and self.mode != "zero":
            raise ValueError(f"sign applies only to mode zero, not {self.mode!r}")
        check_activation_sparsity(self.activation_sparsity)
        if self.rule not in RULES:
            raise ValueError(f"unknown threshold rule {self.rule!r}; valid: {', '.join(RULES)}")


def check_activation_sparsity(q: float) -> None:
    """``ValueError`` unless ``0 <= q < 1``."""
    if not 0.0 <= float(q) < 1.0:
        raise ValueError(f"activation sparsity must be in [0, 1), got {q}")


@dataclass
class ActivationStats:
    """Calibration statistics of one hook kind, per layer.

    Attributes
    ----------
    hook : str
        The hook kind (``hook_pre`` ...).
    mean : dict layer -> Tensor ``[d]``
        Exact mean over all ``n_tokens`` calibration tokens (float32, summed in float64).
    pool : dict layer -> Tensor ``[n_pool, d]``
        A seeded uniform sample of calibration token rows (float32, in token order).
    n_tokens : int
        Calibration tokens seen.
    """

    hook: str
    mean: dict[int, Tensor] = field(default_factory=dict)
    pool: dict[int, Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    _thresholds: dict = field(default_factory=dict, repr=False)

    def channel_thresholds(self, layer: int, q: float) -> Tensor:
        r"""``[d]`` per-channel thresholds :math:`\tau_j`: the
        :math:`(\lfloor q n \rfloor + 1)`-th smallest pooled :math:`|a_j|` (cached)."""
        key = (layer, float(q))
        if key not in self._thresholds:
            pool = self.pool[layer]
            k = int(np.floor(q * pool.shape[0])) + 1
            self._thresholds[key] = pool.abs().kthvalue(k, dim=0).values
        return self._thresholds[key]

    def uniform_threshold(self, layer: int, q: float, neurons: Tensor | None) -> Tensor:
        r"""Scalar :math:`\tau`: the same quantile of :math:`|a|` pooled over ``neurons``
        (``None``: every channel) and the pool's tokens."""
        pool = self.pool[layer] if neurons is None else self.pool[layer][:, neurons]
        flat = pool.abs().reshape(-1)
        return flat.kthvalue(int(np.floor(q * flat.numel())) + 1).values


class _StatsCollector:
    """Hook callback of one layer: running float64 sum and the pooled rows."""

    def __init__(self, keep: Tensor) -> None:
        self.keep = keep  # sorted global row indices to pool
        self.offset = 0
        self.total: Tensor | None = None
        self.rows: list[Tensor] = []

    def __call__(self, x: Tensor, hook) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        start, self.offset = self.offset, self.offset + flat.shape[0]
        part = flat.double().sum(dim=0)
        self.total = part if self.total is None else self.total + part
        lo, hi = torch.searchsorted(self.keep, torch.tensor([start, self.offset]))
        if hi > lo:
            local = (self.keep[lo:hi] - start).to(flat.device)
            self.rows.append(flat.index_select(0, local).float().cpu())


@torch.no_grad()
def collect_activation_stats(
    model,
    windows: Tensor,
    hook: str = "hook_pre",
    *,
    max_rows: int = 4096,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> ActivationStats:
    """One dense pass over ``windows`` ``[n, seqlen]``: per-channel means and a row pool.

    ``max_rows`` bounds the pool (:class:`ActivationStats`); with ``max_rows >= n · seqlen``
    every calibration token is pooled, so the thresholds are exact calibration quantiles.
    """
    check_hook(model, hook)
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    n_tokens = int(windows.numel())
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(n_tokens, size=min(max_rows, n_tokens), replace=False))
    layers = range(model.adapter.n_layers) if layers is None else layers
    collectors = {layer: _StatsCollector(torch.as_tensor(keep)) for layer in layers}
    run_hooked(
        model,
        windows,
        [(f"blocks.{layer}.mlp.{hook}", c) for layer, c in collectors.items()],
        batch_size=batch_size,
        progress=progress,
        desc=f"activation statistics ({hook})",
    )
    stats = ActivationStats(hook=hook, n_tokens=n_tokens)
    for layer, c in collectors.items():
        stats.mean[layer] = (c.total / n_tokens).float()
        stats.pool[layer] = torch.cat(c.rows)
    return stats


def _rewrite(a: Tensor, iv: Intervention, value: Tensor | None) -> Tensor:
    """The intervened values of the selected channels ``a`` ``[..., k]``.

    ``value``: ``[k]`` means or thresholds, or ``[..., k]`` resampled values.
    """
    if iv.mode == "zero":
        if iv.sign == "negative":
            return a.clamp(min=0)
        if iv.sign == "positive":
            return a.clamp(max=0)
        return torch.zeros_like(a)
    if iv.mode == "threshold":
        return a.masked_fill(a.abs() < value, 0.0)
    return value.to(a.dtype).expand_as(a)  # mean, resample


def _layer_hook(iv: Intervention, index: Tensor | None, value, pool, generator):
    """Forward hook ``fn(a [batch, pos, d], hook) -> a'`` rewriting channels ``index``
    (``None``: all) of one layer; the input tensor itself is never written."""

    def fn(a: Tensor, hook) -> Tensor:
        sub = a if index is None else a[..., index]
        val = value
        if iv.mode == "resample":
            draws = torch.randint(
                pool.shape[0], a.shape[:-1], generator=generator, device=generator.device
            )
            val = pool[draws.to(pool.device)].to(a.device)
        new = _rewrite(sub, iv, val)
        if index is None:
            return new.contiguous()
        out = a.clone()
        out[..., index] = new
        return out

    return fn


def intervention_hooks(
    model,
    neurons: Mapping[int, np.ndarray | Tensor | None],
    iv: Intervention,
    stats: ActivationStats | None = None,
    hook: str | None = None,
) -> list[tuple[str, object]]:
    """``(hook name, fn)`` pairs applying ``iv`` to ``neurons[layer]`` of each listed layer.

    ``neurons`` maps layer → channel indices (``None``: every channel); layers not listed are
    left alone.  ``stats`` (calibration statistics of ``hook``, default ``stats.hook`` or
    ``hook_pre``) is needed by ``mean``, ``resample`` and ``threshold``.
    """
    hook = hook or (stats.hook if stats is not None else "hook_pre")
    check_hook(model, hook)
    if iv.mode != "zero" and (stats is None or stats.hook != hook):
        raise ValueError(f"mode {iv.mode!r} needs calibration statistics of {hook}")
    device = model.device
    hooks = []
    for layer, chosen in neurons.items():
        index = None if chosen is None else torch.as_tensor(chosen, dtype=torch.long).to(device)
        value, pool, generator = None, None, None
        if iv.mode == "mean":
            value = stats.mean[layer] if index is None else stats.mean[layer][index.cpu()]
        elif iv.mode == "resample":
            pool = stats.pool[layer] if index is None else stats.pool[layer][:, index.cpu()]
            pool = pool.to(device)
            generator = torch.Generator(device=device).manual_seed(
                int(np.random.SeedSequence([iv.seed, layer]).generate_state(1)[0])
            )
        elif iv.mode == "threshold":
            q = iv.activation_sparsity
            if iv.rule == "uniform":
                value = stats.uniform_threshold(layer, q, None if index is None else index.cpu())
            else:
                value = stats.channel_thresholds(layer, q)
                value = value if index is None else value[index.cpu()]
        if value is not None:
            value = value.to(device)
        hooks.append((f"blocks.{layer}.mlp.{hook}", _layer_hook(iv, index, value, pool, generator)))
    return hooks


@contextmanager
def intervened(model, hooks: Sequence[tuple[str, object]]) -> Iterator[None]:
    """Attach ``hooks`` to ``model.bridge`` for the ``with`` block; they are removed on exit
    (also on error).  Run the model through its bridge modules inside (e.g.
    ``perplexity(..., use_sdpa=False)``: the native sdpa path bypasses the hooks)."""
    with model.bridge.hooks(fwd_hooks=list(hooks)):
        yield
