r"""TransformerLens plumbing: the one place that knows how a bridge wraps a ``transformers`` model.

A TransformerLens 4.x ``TransformerBridge`` booted on a ``transformers`` model replaces, *in
place*, each HF submodule it maps by a wrapper (a ``GeneralizedComponent``: ``BlockBridge``,
``LinearBridge`` ...) that holds the original module as ``original_component`` and fires the
hook points around it.  Parameters are shared, so the HF model and the bridge compute the same
logits and a weight edited through one is seen by the other.  This module holds every helper
that depends on that arrangement:

* :func:`unwrap`, :func:`clean_module_path` — from a wrapper (or its path) to the HF module;
* :func:`is_linear`, :func:`linear_weight`, :func:`linear_features` — ``nn.Linear`` and
  GPT-2's ``Conv1D`` (``y = x W + b``, ``W: [in, out]``) seen through one ``[out, in]`` view;
* :func:`replace_linear` / :func:`restore_linear` — put another module in a linear's place so
  that the HF forward, the bridge forward *and the hooks* use it;
* :func:`has_bridge_modules`, :func:`native_modules`, :func:`native_sdpa` — run the plain HF
  modules with scaled-dot-product attention when no hook is needed (≈35% faster on CPU).

Why replace through the wrapper: assigning a new module to the HF attribute instead
(``mlp.gate_proj = new``) bypasses the ``LinearBridge``: the outputs change while
``blocks.{l}.mlp.hook_pre`` keeps reporting nothing or stale dense values, a silent analysis
bug.  ``LinearBridge.set_original_component(new)`` swaps what the wrapper runs.

See ``ARCHITECTURE.md`` (section "TransformerLens") for where these helpers are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from itertools import chain
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel

__all__ = [
    "attn_implementation",
    "clean_module_path",
    "has_bridge_modules",
    "hf_model_of",
    "is_linear",
    "linear_features",
    "linear_weight",
    "module_paths",
    "native_modules",
    "native_sdpa",
    "replace_linear",
    "restore_linear",
    "unwrap",
]

#: Attribute names under which TransformerLens wrappers hold the module they wrap.
WRAPPER_ATTRS = ("_original_component", "original_component")


# --------------------------------------------------------------------------------------------
# From wrappers to HF modules
# --------------------------------------------------------------------------------------------


def unwrap(module: nn.Module) -> nn.Module:
    """Return the original module inside a TransformerLens bridge wrapper (or ``module``)."""
    inner = getattr(module, "original_component", None)
    return module if inner is None else inner


def clean_module_path(path: str) -> str:
    """A module path with the wrapper levels removed (``self_attn.q_proj.original_component``
    -> ``self_attn.q_proj``)."""
    return ".".join(p for p in path.split(".") if p not in WRAPPER_ATTRS)


def hf_model_of(model) -> nn.Module:
    """The ``transformers`` model inside a LoadedModel / TransformerBridge, or ``model``."""
    for attr in ("hf_model", "original_model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected a LoadedModel or a transformers model, got {type(model).__name__}")


def compute_device(hf: nn.Module) -> torch.device:
    """The device ``hf`` computes on: that of its first materialised parameter or buffer (an
    offloaded model's placeholders are on ``meta``; its final norm, buffers and any layer
    being run are on the compute device)."""
    for tensor in chain(hf.parameters(), hf.buffers()):  # stops at the first real one
        if not tensor.is_meta:
            return tensor.device
    raise ValueError("the model has no materialised parameter or buffer to take a device from")


def module_paths(root: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(module) → ``(path, module)`` for every module below ``root``, preferring a *native*
    path: one that enters every TransformerLens wrapper through the module it wraps
    (``_original_component``), so it also resolves while the wrappers are detached
    (:func:`native_modules`) and, cleaned, is the module's HF state-dict name."""
    native: dict[int, tuple[str, nn.Module]] = {}
    other: dict[int, tuple[str, nn.Module]] = {}
    stack = [(root, "", True)]
    seen: set[tuple[int, bool]] = set()
    while stack:
        module, path, is_native = stack.pop()
        if (id(module), is_native) in seen:
            continue
        seen.add((id(module), is_native))
        (native if is_native else other).setdefault(id(module), (path, module))
        wrapper = any(a in module._modules for a in WRAPPER_ATTRS)
        for name, child in reversed(list(module._modules.items())):
            if child is not None:
                keep = is_native and (not wrapper or name in WRAPPER_ATTRS)
                stack.append((child, f"{path}.{name}" if path else name, keep))
    return {**other, **native}


# --------------------------------------------------------------------------------------------
# Linear modules
# --------------------------------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a ``transformers`` ``Conv1D``."""
    return isinstance(module, nn.Linear | Conv1D)


def linear_weight(module: nn.Module) -> Tensor:
    """``[out, in]`` view of a linear's weight data (writes go through to the parameter).

    ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]`` and is returned
    transposed (a view, not a copy).
    """
    module = unwrap(module)
    w = module.weight.data
    return w.T if isinstance(module, Conv1D) else w


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear``-like or ``Conv1D`` module, if known."""
    module = unwrap(module)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return int(module.nx), int(module.nf)
    return None


# --------------------------------------------------------------------------------------------
# Replacing a linear
# --------------------------------------------------------------------------------------------


def replace_linear(model: LoadedModel, layer: int, role: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` in place of the ``role`` linear of MLP ``layer``.

    On a bridged model this calls ``LinearBridge.set_original_component(new_module)``, so the
    HF forward, the bridge forward and every hook on that linear (``blocks.{l}.mlp.hook_pre``,
    ``blocks.{l}.mlp.gate.hook_out`` ...) use the new module; on a plain HF model the attribute
    is set.

    Parameters
    ----------
    model : LoadedModel
        Its ``hf_model`` and ``bridge`` share modules; both use ``new_module`` afterwards.
    layer : int
        Decoder layer index.
    role : str
        ``"gate"``, ``"up"`` or ``"down"`` (see ``model.adapter.roles``).
    new_module : nn.Module
        Maps ``[..., in] -> [..., out]`` (e.g. an
        :class:`~wasserstein_neurons.expansion.ExpertRoutedLinear`).  When it exposes
        ``in_features``/``out_features`` they must match the module it replaces.  It is used
        as is (not moved to the model's device or dtype).

    Returns
    -------
    nn.Module
        The module that was there before (the unwrapped ``nn.Linear``/``Conv1D``, or an earlier
        replacement); pass it to :func:`restore_linear` to undo.

    Raises
    ------
    ValueError
        For a layer out of range, an unknown role, or mismatched feature sizes.
    """
    adapter = model.adapter
    if not 0 <= layer < adapter.n_layers:
        raise ValueError(f"layer {layer} out of range [0, {adapter.n_layers})")
    spec = adapter.spec(role)
    if isinstance(new_module, nn.Module) and getattr(new_module, "original_component", None):
        raise ValueError("pass the replacement module itself, not a bridge wrapper")
    holder = adapter.holder(model.hf_model, layer, role)
    old = unwrap(holder)
    old_feat, new_feat = linear_features(old), linear_features(new_module)
    if old_feat is not None and new_feat is not None and old_feat != new_feat:
        raise ValueError(
            f"layer {layer} {role!r} maps {old_feat[0]} -> {old_feat[1]} features but the new "
            f"module maps {new_feat[0]} -> {new_feat[1]}"
        )
    if holder is not old:  # a TransformerLens wrapper: swap what it wraps
        holder.set_original_component(new_module)
    else:
        adapter.set_holder(model.hf_model, layer, role, new_module)
    _replace_in_unshared_bridge(model, layer, spec.bridge_attr, holder, new_module)
    return old


def _replace_in_unshared_bridge(model, layer: int, attr: str, holder, new_module) -> None:
    """Also swap the bridge's linear when it does not share the HF wrapper (not expected in
    TransformerLens 4.x default mode, where ``holder`` is the bridge's own ``LinearBridge``)."""
    blocks = getattr(getattr(model, "bridge", None), "blocks", None)
    bridge_mlp = None if blocks is None else getattr(blocks[layer], "mlp", None)
    bridge_lin = None if bridge_mlp is None else getattr(bridge_mlp, attr, None)
    if (
        bridge_lin is not None
        and bridge_lin is not holder
        and hasattr(bridge_lin, "set_original_component")
    ):
        bridge_lin.set_original_component(new_module)


def restore_linear(model: LoadedModel, layer: int, role: str, old_module: nn.Module) -> nn.Module:
    """Undo :func:`replace_linear`: put ``old_module`` back and return the module removed."""
    return replace_linear(model, layer, role, old_module)


# --------------------------------------------------------------------------------------------
# Native HF forward (sdpa) on a bridged model
# --------------------------------------------------------------------------------------------


def _bridge_base():
    try:
        from transformer_lens.model_bridge.generalized_components.base import (
            GeneralizedComponent,
        )
    except ImportError:  # pragma: no cover - transformer_lens is a dependency
        return None
    return GeneralizedComponent


def _wrapped(module: nn.Module, base) -> nn.Module | None:
    if base is None or not isinstance(module, base):
        return None
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Module) else None


def has_bridge_modules(hf: nn.Module) -> bool:
    """Whether any module of ``hf`` is a TransformerLens bridge wrapper."""
    base = _bridge_base()
    return base is not None and any(isinstance(m, base) for m in hf.modules())


@contextmanager
def native_modules(hf: nn.Module) -> Iterator[nn.Module]:
    """Temporarily replace every TransformerLens wrapper in ``hf`` by the module it wraps.

    Inside the block ``hf`` is a plain ``transformers`` model again (e.g.
    ``hf.model.layers[0]`` is a ``LlamaDecoderLayer`` and ``.mlp.gate_proj`` an ``nn.Linear``):
    no bridge hook fires and HF's own attention implementations are used.  Parameters are
    shared, so pruned weights and modules installed with ``set_original_component`` are
    used.  Not thread-safe: the bridge is unusable until the block exits.
    """
    base = _bridge_base()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            inner = _wrapped(child, base)
            while inner is not None:
                swaps.append((module, name, module._modules[name]))
                module._modules[name] = inner
                child = inner
                inner = _wrapped(child, base)
            visit(child)

    try:
        visit(hf)
        yield hf
    finally:
        for module, name, wrapper in reversed(swaps):
            module._modules[name] = wrapper


@contextmanager
def attn_implementation(hf: nn.Module, name: str) -> Iterator[None]:
    """Set ``hf.config._attn_implementation`` to ``name`` for the duration of the block."""
    cfg = hf.config
    old = getattr(cfg, "_attn_implementation", None)
    try:
        cfg._attn_implementation = name
        yield
    finally:
        cfg._attn_implementation = old


@contextmanager
def native_sdpa(hf: nn.Module) -> Iterator[bool]:
    """Native HF modules with sdpa attention for the duration; yields whether it is active.

    A bridged model's wrappers ignore ``config._attn_implementation`` (they run the bridge's
    eager attention), so on a bridged model the wrappers are detached (:func:`native_modules`)
    as well.  Models whose class does not support sdpa are left as they are (yields False).
    Only valid when no hook needs to fire inside the block.
    """
    if not getattr(hf, "_supports_sdpa", False):
        yield False
        return
    detach = native_modules(hf) if has_bridge_modules(hf) else nullcontext()
    with detach, attn_implementation(hf, "sdpa"):
        yield True
