"""The ``disentangle`` workflow: run_disentangle() on a tiny model, its run folder and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model

from wasserstein_neurons import wasserstein_to_gaussian
from wasserstein_neurons.disentangle import (
    BASE_COLUMNS,
    PER_K_COLUMNS,
    NeuronOutputs,
    collect_linear_inputs,
    linear_outputs,
)
from wasserstein_neurons.workflows import eval_windows_for
from wasserstein_neurons.workflows.disentangle import DisentangleConfig, run_disentangle


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="sparsity must be in"):
        DisentangleConfig(sparsity=1.0).validate()
    with pytest.raises(ValueError, match="eval.tokens"):
        DisentangleConfig(eval_tokens=10, seqlen=32).validate()


def test_run_disentangle_writes_table_and_plots(corpus, tmp_path):
    model = make_tiny_model("llama")
    cfg = DisentangleConfig(
        out=str(tmp_path / "run"),
        model="tiny",
        dataset=str(corpus),
        layer=1,
        experts="1,2,4",
        sparsity=0.5,
        nsamples=12,
        seqlen=32,
        eval_tokens=128,
        kmeans_restarts=2,
        mapping_pairs=500,
        plot_neurons=3,
    )
    with pytest.warns(UserWarning, match="fewer than"):  # 384 calibration tokens are few
        res = run_disentangle(cfg, model=model, progress=False)
    out = tmp_path / "run"
    table = pd.read_csv(out / "neurons.csv")
    want = {"layer", "hook", *BASE_COLUMNS}
    want |= {f"{c}_k{k}" for c in PER_K_COLUMNS for k in (1, 2, 4)}
    assert want <= set(table.columns)
    assert len(table) == model.adapter.d_mlp
    assert (table["hook"] == "blocks.1.mlp.hook_pre").all()
    assert table["is_top"].sum() == 4  # 3% of 128, rounded
    for name in (
        "ri_vs_wd.png",
        "w1_vs_k.png",
        f"neuron_{int(res.outputs.neurons[0])}_sparse_vs_dense.png",
        f"neuron_{int(res.outputs.neurons[0])}_by_expert.png",
        f"neuron_{int(res.outputs.neurons[0])}_expansion.png",
    ):
        assert (out / name).stat().st_size > 0, name
    per_k = pd.read_csv(out / "per_k.csv")
    assert per_k["experts"].tolist() == [1, 2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == 1 and summary["role"] == "gate"
    assert summary["n_calibration_tokens"] == 12 * 32 and summary["n_eval_tokens"] == 128
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["config"]["experts"] == [1, 2, 4]
    saved = NeuronOutputs.load(out / "top_neuron_outputs.npz")
    assert sorted(saved.se) == [1, 2, 4] and saved.dense.shape == (128, 3)
    np.testing.assert_array_equal(saved.labels[4], res.outputs.labels[4])


def test_bad_layer_is_a_clear_error(tmp_path):
    model = make_tiny_model("llama")
    cfg = DisentangleConfig(out=str(tmp_path / "run"), layer=7, seqlen=32, eval_tokens=64)
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        run_disentangle(cfg, model=model, progress=False)
    assert not (tmp_path / "run").exists()  # nothing written
    with pytest.raises(ValueError, match="valid layers are 0..1"):
        collect_linear_inputs(model, torch.zeros(1, 4, dtype=torch.long), layer=-1)
    with pytest.raises(ValueError, match="roles are"):
        run_disentangle(
            DisentangleConfig(
                out=str(tmp_path / "r2"), layer=0, role="proj", seqlen=32, eval_tokens=64
            ),
            model=model,
            progress=False,
        )


def test_excluded_positions_leave_the_held_out_metrics(corpus, tmp_path):
    model = make_tiny_model("llama")
    cfg = DisentangleConfig(
        out=str(tmp_path / "run"),
        model="tiny",
        dataset=str(corpus),
        layer=0,
        experts="1",
        nsamples=4,
        seqlen=32,
        eval_tokens=128,
        mapping_pairs=200,
        exclude_positions=3,
    )
    res = run_disentangle(cfg, model=model, progress=False)
    assert res.summary["n_eval_tokens"] == 128 - 3 * 4
    assert res.summary["n_calibration_tokens"] == 4 * 32  # calibration keeps every token
    windows = eval_windows_for(model, cfg)
    x = collect_linear_inputs(model, windows, layer=0)
    keep = torch.arange(x.shape[0]) % 32 >= 3
    weight = model.adapter.weight(model.hf_model, 0, "gate").detach()
    wd = wasserstein_to_gaussian(linear_outputs(x[keep], weight)).numpy()
    np.testing.assert_array_equal(res.table["wd"].to_numpy(), wd)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["exclude_positions"] == 3
