r"""Asymmetric per-row min-max quantization (the GPTQ / SparseGPT weight quantizer).

For a row :math:`w \in \mathbb{R}^{d}` and ``bits`` bits, with :math:`q_{max} = 2^{bits} - 1`:

.. math::

    x_{min} = \min(0, \min_i w_i), \quad x_{max} = \max(0, \max_i w_i), \\
    \Delta = (x_{max} - x_{min}) / q_{max}, \quad z = \mathrm{round}(-x_{min} / \Delta), \\
    Q(w_i) = \Delta \, (\mathrm{clamp}(\mathrm{round}(w_i / \Delta) + z, 0, q_{max}) - z).

The grid contains 0 exactly (the integer level ``z``), so pruned weights stay exactly zero and
a row holds at most :math:`2^{bits}` distinct values.  A row that is entirely zero gets the grid
of :math:`[-1, 1]`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["minmax_params", "quantize_dequantize", "quantize_rows"]


def minmax_params(weight: Tensor, bits: int) -> tuple[Tensor, Tensor, int]:
    """Per-row scale and zero point of the asymmetric min-max grid.

    Parameters
    ----------
    weight : Tensor, shape ``[rows, cols]``
        Floating-point weights.
    bits : int
        Bit width, ``>= 1``.

    Returns
    -------
    scale : Tensor, shape ``[rows, 1]``
    zero : Tensor, shape ``[rows, 1]``
        Integer-valued zero point (as a float tensor) in ``[0, maxq]``.
    maxq : int
        ``2**bits - 1``.
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    maxq = 2**bits - 1
    zeros = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    xmin = torch.minimum(weight.amin(dim=1), zeros)
    xmax = torch.maximum(weight.amax(dim=1), zeros)
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -torch.ones_like(xmin), xmin)
    xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1), maxq


def quantize_dequantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Round ``x`` to the grid ``scale * (j - zero)``, ``j = 0..maxq`` (broadcasting).

    Parameters
    ----------
    x : Tensor, shape ``[rows, cols]`` (or ``[rows]`` with ``scale``/``zero`` of shape ``[rows]``)
    scale, zero : Tensor
        From :func:`minmax_params`.
    maxq : int

    Returns
    -------
    Tensor, same shape as ``x``: the dequantized values.
    """
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_rows(weight: Tensor, bits: int) -> Tensor:
    """Round-to-nearest per-row quantization of a weight (no error feedback).

    Parameters
    ----------
    weight : Tensor, shape ``[rows, cols]``
    bits : int

    Returns
    -------
    Tensor, same shape and dtype: dequantized weights.
    """
    w = weight.float() if weight.element_size() < 4 else weight
    scale, zero, maxq = minmax_params(w, bits)
    return quantize_dequantize(w, scale, zero, maxq).to(weight.dtype)
