"""A model in bfloat16 / float16 (``--dtype``, issue 9): the numbers agree with float32, and
what is accumulated stays in float32 / float64 whatever the activations' dtype.

Every comparison holds the model and the tokens fixed and changes only the dtype: the tiny
random models of ``conftest.make_tiny_model`` are drawn in float32 and then cast.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_tiny_model, module_inputs, saved_expansion_tensors
from safetensors.torch import load_file
from scipy.stats import spearmanr

from wasserstein_neurons import capture_activations, perplexity
from wasserstein_neurons.bridge import native_sdpa
from wasserstein_neurons.cli import main
from wasserstein_neurons.pruning import PruneSpec, SparseGPTPruner, make_pruner, sequential_prune
from wasserstein_neurons.ranking import rank_store

HALF = (torch.bfloat16, torch.float16)
SPECS = {"0.5": PruneSpec(sparsity=0.5), "0.9": PruneSpec(sparsity=0.9), "2:4": None}


def token_windows(n: int = 32, seqlen: int = 64, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, seqlen), generator=gen)


def spec_of(name: str) -> PruneSpec:
    return SPECS[name] or PruneSpec.from_pattern(name)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_tiny_model_has_the_dtype(dtype):
    model = make_tiny_model("llama", dtype=dtype)
    assert model.dtype == dtype
    assert {p.dtype for p in model.hf_model.parameters()} == {dtype}
    ref = make_tiny_model("llama")  # the same random draw, in float32
    w, w32 = (m.adapter.weight(m.hf_model, 1, "gate") for m in (model, ref))
    assert torch.equal(w, w32.to(dtype))


# ----------------------------------------------------------------------- Wasserstein ranks


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_wd_ranks_agree_with_fp32(family, tmp_path):
    """The same model in float32 (float32 store) and in bfloat16 (the default float16 store,
    which holds bfloat16 values exactly): Spearman >= 0.99 between the per-neuron WDs of
    every layer."""
    windows = token_windows()
    tables = {}
    for dtype, store_dtype in ((torch.float32, "float32"), (torch.bfloat16, "float16")):
        model = make_tiny_model(family, dtype=dtype)
        store = capture_activations(
            model, windows, tmp_path / str(dtype), dtype=store_dtype, progress=False
        )
        tables[dtype] = rank_store(store, progress=False)
    a, b = tables[torch.float32], tables[torch.bfloat16]
    assert (a["neuron"].to_numpy() == b["neuron"].to_numpy()).all()
    assert not np.allclose(a["wd"], b["wd"], rtol=1e-6, atol=0)  # bf16 did change the values
    for layer in sorted(a["layer"].unique()):
        rows = (a["layer"] == layer).to_numpy()
        assert np.isfinite(b["wd"][rows]).all()
        rho = spearmanr(a["wd"][rows], b["wd"][rows]).statistic
        assert rho >= 0.99, (family, layer, rho)


def test_float16_store_holds_bf16_activations_exactly(tmp_path):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    windows = token_windows(4)
    seen = []
    hook = ("blocks.1.mlp.hook_pre", lambda a, hook: seen.append(a.reshape(-1, a.shape[-1])))
    with model.bridge.hooks(fwd_hooks=[hook]):
        store = capture_activations(model, windows, tmp_path / "s", hooks=hook[0], progress=False)
    stored = torch.from_numpy(np.array(store.array(hook[0]))).float()
    assert torch.equal(stored, torch.cat(seen).float())


def test_float16_store_refuses_values_beyond_its_range(tmp_path):
    """Values above 65504 would be stored as inf (a NaN distance): refused, with the fix."""
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.adapter.weight(model.hf_model, 0, "gate").mul_(1e7)
    windows = token_windows(2)
    with pytest.raises(ValueError, match="blocks.0.mlp.hook_pre: .* --store-dtype float32"):
        capture_activations(model, windows, tmp_path / "f16", progress=False)
    store = capture_activations(model, windows, tmp_path / "f32", dtype="float32", progress=False)
    values = np.asarray(store.array("blocks.0.mlp.hook_pre"))
    assert np.isfinite(values).all() and np.abs(values).max() > 65504


def test_capture_refuses_nan_activations(tmp_path):
    model = make_tiny_model("llama", dtype=torch.float16)
    with torch.no_grad():
        model.adapter.weight(model.hf_model, 1, "gate")[3, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.1.mlp.hook_pre: .*NaN or inf"):
        capture_activations(model, token_windows(2), tmp_path / "s", progress=False)


# ----------------------------------------------------------------------- pruning


@pytest.fixture(scope="module")
def gate_inputs():
    """Layer 1 ``gate`` of the float32 tiny Llama: its weight and 4096 input rows (the first
    2048 calibrate, the rest are held out)."""
    model = make_tiny_model("llama")
    linear = model.adapter.linear(model.hf_model, 1, "gate")
    x = module_inputs(model, linear, token_windows(64))
    return model.adapter.weight(model.hf_model, 1, "gate").detach().clone(), x[:2048], x[2048:]


def held_out_error(x: torch.Tensor, w: torch.Tensor, w_p: torch.Tensor) -> float:
    """``||X W_p^T - X W^T|| / ||X W^T||`` in float64."""
    x, w, w_p = x.double(), w.double(), w_p.double()
    y = x @ w.T
    return float((x @ w_p.T - y).norm() / y.norm())


@pytest.mark.parametrize("name", SPECS)
def test_sparsegpt_bf16_reconstruction_within_one_percent(gate_inputs, name):
    w, x_cal, x_eval = gate_inputs
    spec = spec_of(name)
    fp32 = SparseGPTPruner(w.shape[1])
    fp32.add_batch(x_cal)
    e32 = held_out_error(x_eval, w, fp32.prune(w, spec).weight)

    bf16 = SparseGPTPruner(w.shape[1])
    bf16.add_batch(x_cal.bfloat16())
    # the Hessian is accumulated in float32 from the upcast inputs, not in bfloat16
    assert bf16.H.dtype == torch.float32
    x_up = x_cal.bfloat16().float()
    torch.testing.assert_close(bf16.H, 2.0 / len(x_up) * x_up.T @ x_up, rtol=1e-5, atol=1e-7)
    result = bf16.prune(w.bfloat16(), spec)
    assert result.weight.dtype == torch.bfloat16  # written back in the model dtype
    e16 = held_out_error(x_eval, w, result.weight)
    assert abs(e16 / e32 - 1) < 0.01, (name, e32, e16)


@pytest.mark.parametrize("dtype", HALF)
def test_wanda_and_magnitude_score_in_full_precision(gate_inputs, dtype):
    """Wanda's norms accumulate in float64 and both methods score in float32+: the 16-bit
    weight and inputs give exactly the mask that their float32 copies give."""
    w, x_cal, _ = gate_inputs
    w16, x16 = w.to(dtype), x_cal.to(dtype)
    for method in ("wanda", "magnitude"):
        low, full = make_pruner(method, d_in=w.shape[1]), make_pruner(method, d_in=w.shape[1])
        for i in range(0, len(x16), 512):
            low.add_batch(x16[i : i + 512])
        full.add_batch(x16.float())
        if method == "wanda":
            assert low.sq_mean.dtype == torch.float64
            torch.testing.assert_close(
                low.sq_mean, x16.double().square().mean(0), rtol=1e-12, atol=0
            )
        res16 = low.prune(w16, sparsity=0.5)
        res32 = full.prune(w16.float(), sparsity=0.5)
        assert res16.weight.dtype == dtype and torch.equal(res16.mask, res32.mask)


def test_sequential_prune_of_a_bf16_model(gate_inputs):
    """The whole driver on a bfloat16 model: weights stay bfloat16, the sparsity is reached
    and each matrix's calibration error is within 2% of the float32 model's."""
    windows = token_windows(16)
    summaries = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_tiny_model("llama", dtype=dtype)
        summaries[dtype] = sequential_prune(model, windows, "sparsegpt", 0.5, progress=False)
        assert {p.dtype for p in model.hf_model.parameters()} == {dtype}
        w = model.adapter.weight(model.hf_model, 1, "down")
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    a, b = summaries[torch.float32], summaries[torch.bfloat16]
    ratio = b["rel_error"].to_numpy() / a["rel_error"].to_numpy()
    assert np.all(np.abs(ratio - 1) < 0.02), ratio


# ----------------------------------------------------------------------- perplexity


def direct_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL, log-softmax in float32 of the (bf16) logits, mean in float64."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(-picked.double().mean())


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_bf16_perplexity_is_float32_nll_of_bf16_logits(use_sdpa):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    ids = token_windows(8)
    hf = model.hf_model
    with torch.no_grad(), native_sdpa(hf) if use_sdpa else nullcontext():
        logits = hf(ids, use_cache=False).logits
    assert logits.dtype == torch.bfloat16
    ref = direct_nll(logits, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sdpa probe passes: nothing falls back
        res = perplexity(model, ids, batch_size=3, use_sdpa=use_sdpa, progress=False)
    assert res.backend == ("sdpa" if use_sdpa else "bridge")
    assert res.nll_mean == pytest.approx(ref, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(ref), rel=1e-6)
    # the tolerance sees the difference a bfloat16 log-softmax would make
    t = ids[:, 1:].reshape(-1)
    nll16 = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t))
    assert abs(math.exp(nll16) / math.exp(ref) - 1) > 1e-4


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", FAMILIES)
def test_half_model_uses_sdpa_without_warning(family, dtype):
    """sdpa and eager attention differ by rounding in 16 bits (above the probe's tolerance
    here), but the probe compares the two eager paths, which agree exactly."""
    model = make_tiny_model(family, dtype=dtype)
    ids = token_windows(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = perplexity(model, ids, progress=False)
    assert res.backend == "sdpa" and math.isfinite(res.perplexity)


@pytest.mark.parametrize("dtype", HALF)
def test_half_model_disagreements_still_fall_back(dtype):
    """Edits the native path cannot see are still caught in 16 bits: an activation-editing
    hook, and GPT-NeoX attention pruned through the bridge's split q/k/v copies."""
    ids = token_windows(2)
    llama = make_tiny_model("llama", dtype=dtype)
    kill = ("blocks.0.mlp.hook_post", lambda x, hook: torch.zeros_like(x))
    with llama.bridge.hooks(fwd_hooks=[kill]), pytest.warns(RuntimeWarning, match="disagree"):
        assert perplexity(llama, ids, progress=False).backend == "bridge"
    neox = make_tiny_model("gpt_neox", dtype=dtype)
    sequential_prune(neox, token_windows(4), "magnitude", 0.9, targets=["attention.q"])
    with pytest.warns(RuntimeWarning, match="disagree"):
        assert perplexity(neox, ids, progress=False).backend == "bridge"


# ----------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def cli_runs(tiny_dir, corpus, tmp_path_factory):
    """``rank`` in float32, ``rank`` / ``prune --save`` / ``expand --save`` in bfloat16 and
    float16, ``ablate`` and ``disentangle`` in bfloat16, on the tiny Llama folder (float32 on
    disk)."""
    root = tmp_path_factory.mktemp("dtype-cli")
    base = ["--model", str(tiny_dir), "--dataset", str(corpus), "--seqlen", "32"]
    base += ["--no-progress"]
    small = ["--nsamples", "8", "--eval-tokens", "256"]
    codes = {}
    runs = [("rank", "float32", ["--tokens", "1024"])]
    for dtype in ("bfloat16", "float16"):
        runs += [
            ("rank", dtype, ["--tokens", "1024"]),
            ("prune", dtype, [*small, "--save", str(root / f"pruned-{dtype}")]),
            ("expand", dtype, [*small, "--experts", "2", "--save", str(root / f"se-{dtype}")]),
        ]
    ablate = ["--mode", "weights,threshold", "--seeds", "1", "--neuron-sparsity", "0.9"]
    runs += [
        ("ablate", "bfloat16", [*small, *ablate]),
        ("disentangle", "bfloat16", [*small, "--layer", "1", "--experts", "1,2"]),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration tokens per expert
        for command, dtype, extra in runs:
            out = str(root / f"{command}-{dtype}")
            argv = [command, *base, "--dtype", dtype, "--out", out, *extra]
            codes[command, dtype] = main(argv)
    return root, codes


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_rank_in_half_precision(cli_runs, dtype):
    root, codes = cli_runs
    assert codes["rank", dtype] == 0 and codes["rank", "float32"] == 0
    assert _config(root / f"rank-{dtype}")["config"]["dtype"] == dtype
    a = pd.read_csv(root / "rank-float32" / "neurons.csv")
    b = pd.read_csv(root / f"rank-{dtype}" / "neurons.csv")
    assert np.isfinite(b["wd"]).all() and len(a) == len(b)
    for layer in (0, 1):
        rows = (a["layer"] == layer).to_numpy()
        assert spearmanr(a["wd"][rows], b["wd"][rows]).statistic >= 0.99


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_prune_in_half_precision(cli_runs, dtype):
    root, codes = cli_runs
    assert codes["prune", dtype] == 0
    row = pd.read_csv(root / f"prune-{dtype}" / "prune.csv").iloc[0]
    assert math.isfinite(row["perplexity_after"]) and row["perplexity_after"] > 1
    saved = load_file(str(root / f"pruned-{dtype}" / "model.safetensors"))
    mlp = {k: v for k, v in saved.items() if ".mlp." in k}
    assert len(mlp) == 6 and {str(v.dtype) for v in mlp.values()} == {f"torch.{dtype}"}
    for name, w in mlp.items():
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cli_expand_in_half_precision(cli_runs, dtype):
    root, codes = cli_runs
    assert codes["expand", dtype] == 0
    table = pd.read_csv(root / f"expand-{dtype}" / "results.csv")
    assert set(table["method"]) == {"dense", "sparse_expansion", "sparsegpt"}
    assert np.isfinite(table["perplexity"]).all() and (table["perplexity"] > 1).all()
    meta = json.loads((root / f"se-{dtype}" / "expansion.json").read_text())
    assert meta["dtype"] == dtype
    tensors = saved_expansion_tensors(root / f"se-{dtype}")
    floats = {k: str(v.dtype) for k, v in tensors.items() if v.is_floating_point()}
    router = {k for k in floats if k.split(".")[-1] in ("mean", "components", "centroids")}
    assert router and {floats[k] for k in router} == {"torch.float32"}  # routing in float32
    experts = set(floats) - router
    assert experts and {floats[k] for k in experts} == {f"torch.{dtype}"}  # model dtype


def test_cli_ablate_and_disentangle_in_bf16(cli_runs):
    root, codes = cli_runs
    assert codes["ablate", "bfloat16"] == 0 and codes["disentangle", "bfloat16"] == 0
    table = pd.read_csv(root / "ablate-bfloat16" / "ablation.csv")
    assert {"weights", "threshold"} <= set(table["mode"])
    assert np.isfinite(table["perplexity"]).all() and (table["perplexity"] > 1).all()
    per_k = pd.read_csv(root / "disentangle-bfloat16" / "per_k.csv")
    assert per_k["experts"].tolist() == [1, 2] and np.isfinite(per_k["layer_err"]).all()
