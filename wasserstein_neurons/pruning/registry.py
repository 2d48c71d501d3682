"""The pruner registry: every pruning method by name, and the one list of method names.

Adding a method: subclass :class:`~wasserstein_neurons.pruning.Pruner` in its own module, give
it a ``name``, and add the class to :data:`PRUNERS` below.  Every method list of the library
(the ``prune`` / ``ablate`` CLIs, the expansion grid's baselines) derives from this table.
"""

from __future__ import annotations

import torch

from .base import Pruner
from .magnitude import MagnitudePruner
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

__all__ = ["METHODS", "PRUNERS", "check_method", "make_pruner"]

#: Registered pruning methods by name.
PRUNERS: dict[str, type[Pruner]] = {
    cls.name: cls for cls in (MagnitudePruner, WandaPruner, SparseGPTPruner)
}

#: Method names in registration order (``("magnitude", "wanda", "sparsegpt")``).
METHODS: tuple[str, ...] = tuple(PRUNERS)


def check_method(method: str) -> str:
    """Normalise a method name (case and surrounding blanks) and check it is registered.

    Raises
    ------
    ValueError
        For an unknown method name (the message lists the valid ones).
    """
    key = method.strip().lower() if isinstance(method, str) else method
    if key not in PRUNERS:
        raise ValueError(
            f"unknown pruning method {method!r}; valid methods: {', '.join(sorted(PRUNERS))}"
        )
    return key


def make_pruner(
    method: str,
    d_in: int,
    device: torch.device | str | None = None,
    **kwargs,
) -> Pruner:
    """Build a pruner by name.

    Parameters
    ----------
    method : {"magnitude", "wanda", "sparsegpt"}
        Case-insensitive.
    d_in : int
        Input features of the layer (columns of its ``[out, in]`` weight).
    device : torch.device or str, optional
        Where calibration statistics are accumulated (default CPU).
    **kwargs
        Passed to the class, e.g. ``dtype=torch.float64``.

    Returns
    -------
    Pruner

    Raises
    ------
    ValueError
        For an unknown method name (the message lists the valid ones).
    """
    return PRUNERS[check_method(method)](d_in, device=device, **kwargs)
