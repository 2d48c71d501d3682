"""``experiments/position_effects.py`` on a synthetic store with a planted window-start spike."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wasserstein_neurons.capture import ActivationStore

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "position_effects.py"
SEQLEN, N_WINDOWS, D = 50, 60, 40


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("position_effects", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """Two layers; layer 1 neuron 3 spikes at position 0, neuron 8 at position 1."""
    path = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    hooks = {}
    for layer in (0, 1):
        a = rng.standard_normal((N_WINDOWS * SEQLEN, D)).astype(np.float16)
        a[:, 5] = rng.exponential(size=len(a))  # heavy-tailed everywhere: a real Wasserstein neuron
        if layer == 1:
            a[::SEQLEN, 3] += 20
            a[1::SEQLEN, 8] += 20
        name = f"blocks.{layer}.mlp.hook_pre"
        np.save(path / f"{name}.npy", a)
        hooks[name] = {"shape": list(a.shape), "layer": layer}
    np.save(path / "tokens.npy", rng.integers(5, 99, (N_WINDOWS, SEQLEN)).astype(np.int32))
    meta = {"finished": True, "hooks": hooks, "n_tokens": N_WINDOWS * SEQLEN, "seqlen": SEQLEN}
    (path / "meta.json").write_text(json.dumps({**meta, "special_ids": [0], "bos": False}))
    return path


def test_per_layer_table_and_artefacts(script, store_dir):
    summary, artefacts = script.run(ActivationStore.open(store_dir), None, [0, 1, 4], 10.0)
    assert summary["layer"].tolist() == [0, 1] and (summary["n_top"] == 4).all()
    layer1 = summary.set_index("layer").loc[1]
    # position 0 is the window start of neuron 3, position 1 (with position 0 left out) of 8
    assert layer1["artefact_0"] == 1 and layer1["artefact_1"] == 1 and layer1["artefact_4"] == 0
    assert layer1["overlap_1"] <= 3 and layer1["overlap_4"] <= layer1["overlap_1"]
    assert layer1["med_wd_0"] > layer1["med_wd_4"]
    assert artefacts[["layer", "neuron"]].values.tolist() == [[1, 3]]
    row = artefacts.iloc[0]
    assert row["first_pos_share"] == 1.0 and not row["still_top_excl1"]
    assert row["wd_excl1"] < 0.05 and row["wd_rank"] in (0, 1)  # next to neuron 8


def test_cli_prints_the_table(store_dir):
    args = ["--store", str(store_dir), "--layers", "1", "--top-percent", "10"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "overlap_1" in out and "med_wd_4" in out and "artefact_0" in out
    lines = [line.split() for line in out.splitlines()]
    assert lines[1][:2] == ["layer", "n_top"] and lines[2][0] == "1" and lines[3][0] == "overlap_1:"
    assert lines[-2][:2] == ["layer", "neuron"] and lines[-1][:2] == ["1", "3"]  # the planted one
