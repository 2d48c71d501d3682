r"""Per-token FLOPs, stored parameters and bytes of MLP linears (plain or expanded).

* a plain (pruned) linear :math:`y = W x + b`: :math:`2\,\mathrm{nnz}(W)` FLOPs per token,
  :math:`\mathrm{nnz}(W) + |b|` parameters, every stored element in bytes;
* an :class:`~wasserstein_neurons.expansion.ExpertRoutedLinear`: its own
  :meth:`~ExpertRoutedLinear.flops_per_token` (expected over the calibration routing
  frequencies), :meth:`~ExpertRoutedLinear.num_parameters` and
  :meth:`~ExpertRoutedLinear.nbytes`, the router counted once when shared (Llama gate/up).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor, nn

from ..offload import layer_resident
from .expert_linear import ExpertRoutedLinear

__all__ = ["expanded_modules", "linear_costs", "mlp_cost"]


def _mlp_linears(model) -> Iterator[tuple[int, str, nn.Module]]:
    """``(layer, role, module)`` of every MLP linear of ``model``, layer by layer."""
    for layer, modules in _layer_linears(model):
        for role, module in modules.items():
            yield layer, role, module


def _layer_linears(model) -> Iterator[tuple[int, dict[str, nn.Module]]]:
    """``(layer, {role: module})`` per layer; an offloaded layer is materialised while the
    caller handles it (without keeping anything: costs only read the weights)."""
    adapter, hf = model.adapter, model.hf_model
    weights = getattr(model, "offload", None)
    for layer in range(adapter.n_layers):
        with layer_resident(weights, layer, keep_edits=False):
            yield layer, {role: adapter.linear(hf, layer, role) for role in adapter.roles}


def _nnz(t: Tensor | None) -> int:
    return 0 if t is None else int((t != 0).sum())


def _plain_cost(module: nn.Module) -> tuple[int, float, int]:
    """(params, flops_per_token, nbytes) of a plain linear: nonzeros, ``2 nnz(W)``, storage."""
    w, b = module.weight, getattr(module, "bias", None)
    nnz = _nnz(w)
    params = nnz + (0 if b is None else b.numel())
    nbytes = w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
    return params, 2.0 * nnz, nbytes


def linear_costs(
    modules: Iterable[nn.Module], seen: set[int] | None = None
) -> Iterator[tuple[int, float, int]]:
    """``(params, flops_per_token, nbytes)`` of each MLP linear, plain or expanded.

    A plain linear costs :func:`_plain_cost`; an :class:`ExpertRoutedLinear` its
    :meth:`~ExpertRoutedLinear.num_parameters`, :meth:`~ExpertRoutedLinear.flops_per_token`
    and :meth:`~ExpertRoutedLinear.nbytes`, its router included only at the first module
    that uses that router object (Llama gate/up share one; ``seen`` holds the ids of routers
    already counted, across calls).
    """
    seen: set[int] = set() if seen is None else seen
    for module in modules:
        if not isinstance(module, ExpertRoutedLinear):
            yield _plain_cost(module)
            continue
        first = id(module.router) not in seen
        seen.add(id(module.router))
        yield (
            module.num_parameters(include_router=first),
            module.flops_per_token(include_router=first),
            module.nbytes(include_router=first),
        )


def _dense_params(module: nn.Module) -> int:
    """Weights + bias of the dense linear that ``module`` (plain or expanded) replaces."""
    bias = getattr(module, "bias", None)
    n_bias = 0 if bias is None else bias.numel()
    if isinstance(module, ExpertRoutedLinear):
        return module.in_features * module.out_features + n_bias
    return module.weight.numel() + n_bias


def expanded_modules(model) -> dict[tuple[int, str], ExpertRoutedLinear]:
    """Every :class:`ExpertRoutedLinear` in the MLPs of ``model``, keyed ``(layer, role)``."""
    return {
        (layer, role): module
        for layer, role, module in _mlp_linears(model)
        if isinstance(module, ExpertRoutedLinear)
    }


def mlp_cost(model) -> dict[str, float]:
    r"""Per-token FLOPs, stored parameters and bytes of all MLP linears of ``model``.

    * plain linear: :math:`2\,\mathrm{nnz}(W)` FLOPs, :math:`\mathrm{nnz}(W) + |b|` parameters;
    * :class:`ExpertRoutedLinear`: :meth:`~ExpertRoutedLinear.flops_per_token` (expected over
      the calibration routing frequencies, router included) and
      :meth:`~ExpertRoutedLinear.num_parameters` (nonzeros of all experts + router); a router
      shared by several modules (Llama gate/up) is counted once.

    Returns
    -------
    dict
        ``flops_per_token``, ``params`` (nonzero weights + biases + routers), ``nbytes``
        (actual storage) and ``dense_params`` (weights + biases of the dense MLP linears).
    """
    flops = 0.0
    params = nbytes = dense = 0
    seen: set[int] = set()
    for _, modules in _layer_linears(model):
        for p, f, b in linear_costs(modules.values(), seen):
            params += p
            flops += f
            nbytes += b
        dense += sum(_dense_params(m) for m in modules.values())
    return {
        "flops_per_token": flops,
        "params": int(params),
        "nbytes": int(nbytes),
        "dense_params": int(dense),
    }
