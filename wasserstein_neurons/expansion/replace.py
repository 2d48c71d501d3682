"""Swap an MLP linear of a :class:`~wasserstein_neurons.models.LoadedModel` for another module.

After a TransformerLens 4.x bridge is booted, the HF MLP attribute (``mlp.gate_proj``,
``mlp.dense_h_to_4h``, ``mlp.c_fc`` ...) *is* a ``LinearBridge`` that wraps the original
``nn.Linear``/``Conv1D`` and fires ``hook_in``/``hook_out`` around it; the same object is
``bridge.blocks[l].mlp.<bridge_attr>`` (``gate``/``in``/``out``).  :func:`replace_linear` therefore
calls ``LinearBridge.set_original_component(new_module)``: the HF forward and the bridge forward
both run the new module, and every hook on that linear (``blocks.{l}.mlp.hook_pre``,
``blocks.{l}.mlp.gate.hook_out``, ...) reports the new module's real output.

Assigning the new module to the HF attribute instead would bypass the wrapper: outputs change
but the hooks keep reporting nothing (or stale dense values) — a silent analysis bug.  When the
attribute is not a bridge wrapper (a plain HF model), it is replaced by ``setattr``.

The new module must map ``[..., in] -> [..., out]`` like ``nn.Linear``.  This also holds for
GPT-2's ``Conv1D`` (``y = x W + b`` with ``W: [in, out]``): only its *weight layout* is
transposed, which matters when building the replacement (use
``model.adapter.weight(hf, layer, role)`` for the ``[out, in]`` view), not when calling it.
"""

from __future__ import annotations

from torch import nn

from ..models import LoadedModel, unwrap

__all__ = ["linear_features", "replace_linear", "restore_linear"]


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear``-like or ``Conv1D`` module, if known."""
    module = unwrap(module)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return int(module.nx), int(module.nf)
    return None


def replace_linear(model: LoadedModel, layer: int, role: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` in place of the ``role`` linear of MLP ``layer``.

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
    hf_mlp = adapter.mlp(model.hf_model, layer)
    holder = getattr(hf_mlp, spec.hf_attr)
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
        setattr(unwrap(hf_mlp), spec.hf_attr, new_module)
    bridge_mlp = _bridge_mlp(model, layer)
    if bridge_mlp is not None:
        bridge_lin = getattr(bridge_mlp, spec.bridge_attr, None)
        if (
            bridge_lin is not None
            and bridge_lin is not holder
            and hasattr(bridge_lin, "set_original_component")
        ):  # a bridge that does not share the HF module (not expected in TL 4.x default mode)
            bridge_lin.set_original_component(new_module)
    return old


def restore_linear(model: LoadedModel, layer: int, role: str, old_module: nn.Module) -> nn.Module:
    """Undo :func:`replace_linear`: put ``old_module`` back and return the module removed."""
    return replace_linear(model, layer, role, old_module)


def _bridge_mlp(model: LoadedModel, layer: int) -> nn.Module | None:
    bridge = model.bridge
    blocks = getattr(bridge, "blocks", None)
    if blocks is None:
        return None
    return getattr(blocks[layer], "mlp", None)
