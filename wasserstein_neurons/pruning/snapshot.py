"""Snapshot and bit-exact restore of the weights (or some rows / columns) a study will modify.

The one snapshot class of the library: the pruning driver, the neuron-set ablation and the
Sparse Expansion tests all save what they change with :func:`snapshot_weights` (or
:meth:`WeightSnapshot.add`) and undo it with :func:`restore_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..layerwise import target_weight
from .base import PruneSpec

__all__ = ["SnapshotEntry", "WeightSnapshot", "restore_weights", "snapshot_weights"]


@dataclass
class SnapshotEntry:
    """Saved values of one weight, or of some of its rows (or columns).

    Attributes
    ----------
    layer, role : int, str
        Which target (``-1`` / ``""`` when saved without a name, by :meth:`WeightSnapshot.add`).
    weight : Tensor, shape ``[out, in]``
        Live view of the parameter (restored in place).
    index : LongTensor of shape ``[r]`` or None
        Saved rows (or columns, with ``columns=True``); ``None`` for the whole matrix.
    saved : Tensor, shape ``[r, in]``, ``[out, r]`` or ``[out, in]``
        The saved values.
    columns : bool
        Whether ``index`` selects columns (e.g. a neuron's input column of ``down``).
    """

    layer: int
    role: str
    weight: Tensor
    index: Tensor | None
    saved: Tensor
    columns: bool = False

    @property
    def rows(self) -> Tensor | None:
        """The saved rows (``None`` for the whole matrix or a column selection)."""
        return None if self.columns else self.index

    def restore(self) -> None:
        """Write the saved values back (bit-exact)."""
        saved = self.saved.to(self.weight.device)
        if self.index is None:
            self.weight.copy_(saved)
        elif self.columns:
            self.weight[:, self.index] = saved
        else:
            self.weight[self.index] = saved


@dataclass
class WeightSnapshot:
    """Saved weights, restored bit-exactly by :meth:`restore` / :func:`restore_weights`."""

    entries: list[SnapshotEntry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Memory held by the saved values."""
        return sum(e.saved.numel() * e.saved.element_size() for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SnapshotEntry]:
        return iter(self.entries)

    def add(
        self,
        weight: Tensor,
        index: Tensor | None = None,
        *,
        columns: bool = False,
        layer: int = -1,
        role: str = "",
        device: torch.device | str | None = None,
    ) -> SnapshotEntry:
        """Save ``weight`` (``[out, in]`` live view), or its rows / columns ``index``."""
        if index is None:
            saved = weight.clone()
        else:
            saved = weight[:, index] if columns else weight[index]  # advanced index: a copy
        saved = saved.to(device) if device is not None else saved
        entry = SnapshotEntry(int(layer), role, weight, index, saved, columns)
        self.entries.append(entry)
        return entry

    @torch.no_grad()
    def restore(self) -> None:
        """Write every saved value back into its parameter (bit-exact), newest first."""
        for entry in reversed(self.entries):
            entry.restore()


def snapshot_weights(
    model,
    targets: Mapping[tuple[int, str], Any] | Iterable[tuple[int, str]],
    *,
    device: torch.device | str | None = None,
) -> WeightSnapshot:
    """Save the weights that a pruning run will modify.

    Parameters
    ----------
    model : LoadedModel
    targets : mapping or iterable
        ``(layer, role)`` pairs (whole matrices), or a mapping ``(layer, role) -> value``
        where the value is a :class:`~wasserstein_neurons.pruning.PruneSpec` (its ``rows`` are
        saved; the same mapping can be passed to :func:`sequential_prune`), a row selection
        (LongTensor / sequence of int / bool mask ``[out]``) or ``None`` (whole matrix).
        Roles are MLP roles or names from :func:`layer_linears`.
    device : torch.device or str, optional
        Where to keep the copies (default: the weight's device; ``"cpu"`` saves GPU memory).

    Returns
    -------
    WeightSnapshot
        Holds live views of the parameters, so restore works as long as the parameters are
        modified in place (as :func:`sequential_prune` does), not replaced.
    """
    items = targets.items() if isinstance(targets, Mapping) else ((t, None) for t in targets)
    snap = WeightSnapshot()
    for (layer, role), value in items:
        w = target_weight(model, layer, role)
        if isinstance(value, PruneSpec):
            rows = value.resolve_rows(w.shape[0], w.device)
        elif value is None:
            rows = None
        else:
            rows = PruneSpec(rows=value).resolve_rows(w.shape[0], w.device)
        snap.add(w, rows, layer=layer, role=role, device=device)
    return snap


def restore_weights(snapshot: WeightSnapshot) -> None:
    """Write the saved values back into the parameters (bit-exact)."""
    snapshot.restore()
