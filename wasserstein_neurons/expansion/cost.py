r"""Per-token FLOPs, stored parameters and bytes of MLP linears (plain or expanded).

* a plain (pruned) linear :math:`y = W x + b`: :math:`2\,\mathrm{nnz}(W)` FLOPs per token,
  :math:`\mathrm{nnz}(W) + |b|` parameters, every stored element in bytes;
* an :class:`~wasserstein_neurons.expansion.ExpertRoutedLinear`: its own
  :meth:`~ExpertRoutedLinear.flops_per_token` (expected over the calibration routing
  frequencies), :meth:`~ExpertRoutedLinear.num_parameters` and
  :meth:`~ExpertRoutedLinear.nbytes`, the router counted once when shared (Llama gate/up).
"""

from __future__ import annotations

from torch import Tensor, nn

from .expert_linear import ExpertRoutedLinear

__all__ = ["expanded_modules", "mlp_cost"]


def _nnz(t: Tensor | None) -> int:
    return 0 if t is None else int((t != 0).sum())


def _plain_cost(module: nn.Module) -> tuple[int, float, int]:
    """(params, flops_per_token, nbytes) of a plain linear: nonzeros, ``2 nnz(W)``, storage."""
    w, b = module.weight, getattr(module, "bias", None)
    params = _nnz(w) + (0 if b is None else b.numel())
    nbytes = w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
    return params, 2.0 * _nnz(w), nbytes


def expanded_modules(model) -> dict[tuple[int, str], ExpertRoutedLinear]:
    """Every :class:`ExpertRoutedLinear` in the MLPs of ``model``, keyed ``(layer, role)``."""
    adapter, hf = model.adapter, model.hf_model
    out = {}
    for layer in range(adapter.n_layers):
        for role in adapter.roles:
            module = adapter.linear(hf, layer, role)
            if isinstance(module, ExpertRoutedLinear):
                out[(layer, role)] = module
    return out


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
    adapter, hf = model.adapter, model.hf_model
    flops = 0.0
    params = 0
    nbytes = 0
    dense = 0
    seen: set[int] = set()
    for layer in range(adapter.n_layers):
        for role in adapter.roles:
            module = adapter.linear(hf, layer, role)
            if isinstance(module, ExpertRoutedLinear):
                first = id(module.router) not in seen
                seen.add(id(module.router))
                flops += module.flops_per_token(include_router=first)
                params += module.num_parameters(include_router=first)
                nbytes += module.nbytes(include_router=first)
                dense += module.in_features * module.out_features
                dense += 0 if module.bias is None else module.bias.numel()
            else:
                p, f, b = _plain_cost(module)
                params += p
                flops += f
                nbytes += b
                bias = getattr(module, "bias", None)
                dense += module.weight.numel() + (0 if bias is None else bias.numel())
    return {
        "flops_per_token": flops,
        "params": int(params),
        "nbytes": int(nbytes),
        "dense_params": int(dense),
    }
