"""The pruner registry and the one home of the sparsity rules (PruneSpec)."""

from __future__ import annotations

import pytest
import torch

from wasserstein_neurons.pruning import (
    METHODS,
    PRUNERS,
    PruneSpec,
    WeightSnapshot,
    check_method,
    make_pruner,
)
from wasserstein_neurons.workflows.expand import BASELINES


def test_method_lists_derive_from_the_registry():
    assert METHODS == tuple(PRUNERS) == ("magnitude", "wanda", "sparsegpt")
    assert BASELINES == ("magnitude", "wanda")
    assert check_method(" SparseGPT ") == "sparsegpt"
    with pytest.raises(ValueError, match="valid methods: magnitude, sparsegpt, wanda"):
        check_method("obs")
    with pytest.raises(ValueError, match="unknown pruning method"):
        make_pruner("obs", 8)
    assert isinstance(make_pruner("Wanda", 8), PRUNERS["wanda"])


@pytest.mark.parametrize(
    ("pattern", "sparsity", "n", "m", "target"),
    [
        ("2:4", 0.0, 2, 4, 0.5),
        ("4:8", 0.0, 4, 8, 0.5),
        ("0.9", 0.9, 0, 0, 0.9),
        (0.7, 0.7, 0, 0, 0.7),
    ],
)
def test_from_pattern_and_label_round_trip(pattern, sparsity, n, m, target):
    spec = PruneSpec.from_pattern(pattern)
    assert (spec.sparsity, spec.prunen, spec.prunem) == (sparsity, n, m)
    assert spec.target_sparsity == pytest.approx(target)
    again = PruneSpec.from_pattern(spec.label)
    assert (again.sparsity, again.prunen, again.prunem) == (sparsity, n, m)


@pytest.mark.parametrize("bad", ["2-4", "a:b", "0.5x", "1.5", "4:2", "0:4"])
def test_from_pattern_rejects_malformed(bad):
    with pytest.raises(ValueError):
        PruneSpec.from_pattern(bad)


def test_from_settings_nm_overrides_sparsity():
    spec = PruneSpec.from_settings(0.9, 2, 4, wbits=4)
    assert (spec.sparsity, spec.prunen, spec.prunem, spec.wbits) == (0.0, 2, 4, 4)
    assert spec.target_sparsity == 0.5 and spec.label == "2:4"
    assert PruneSpec.from_settings(0.7).label == "0.7"
    for n, m in ((2, 0), (0, 4)):
        with pytest.raises(ValueError, match="give both --prunen and --prunem"):
            PruneSpec.from_settings(0.5, n, m)


def test_snapshot_rows_and_columns_restore_bit_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    before = w.clone()
    snap = WeightSnapshot()
    snap.add(w, torch.tensor([1, 4]))
    snap.add(w, torch.tensor([0, 2]), columns=True)
    assert snap.nbytes == (2 * 5 + 6 * 2) * 4
    w[[1, 4]] = 0.0
    w[:, [0, 2]] = 7.0
    snap.restore()
    assert torch.equal(w, before)
    assert snap.entries[0].rows is not None and snap.entries[1].rows is None


def test_per_row_flag_reaches_the_specs():
    from wasserstein_neurons.workflows import ExpandConfig, PruneConfig

    assert PruneConfig().spec().per_row is None  # each method's reference rule
    assert PruneConfig(per_row=True).spec().per_row is True
    cell = ExpandConfig(per_row=True).expansion_config(4, 0.5)
    assert cell.per_row and cell.spec().per_row is True
    assert ExpandConfig().expansion_config(4, 0.5).spec().per_row is None
