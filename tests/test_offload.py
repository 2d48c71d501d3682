"""Layer-wise offloaded execution (``load_model(..., offload="cpu" | "disk")``): one decoder
layer materialised at a time, and every result equal to the in-memory run bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_config, make_tokenizer

from wasserstein_neurons.ablation import AblationConfig
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.models import ModelLoadError, load_model
from wasserstein_neurons.offload import OffloadError, layer_resident
from wasserstein_neurons.pruning import sequential_prune
from wasserstein_neurons.workflows import (
    AblateConfig,
    ExpandConfig,
    RankConfig,
    run_ablate,
    run_expand,
    run_rank,
)
from wasserstein_neurons.workflows.prune import save_pruned

FAMILIES = ("llama", "gpt_neox", "gpt2")  # gated; fused QKV split by the bridge; Conv1D + QKV
TIMING = ("seconds", "time", "build_", "eval_s")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tok = make_tokenizer()
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"offload-{family}")
        torch.manual_seed(0)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_config(make_config(family, len(tok))).save_pretrained(path)
        tok.save_pretrained(path)
        out[family] = path
    return out


def windows(n=4, seed=0):
    return torch.randint(0, 300, (n, 32), generator=torch.Generator().manual_seed(seed))


def layer_weights(model) -> dict[tuple[int, str], torch.Tensor]:
    """Every MLP weight (materialising offloaded layers one at a time)."""
    out, adapter = {}, model.adapter
    for layer in range(adapter.n_layers):
        with layer_resident(model.offload, layer, keep_edits=False), torch.no_grad():
            for role in adapter.roles:
                out[layer, role] = adapter.weight(model.hf_model, layer, role).clone()
    return out


def layer_params_are_placeholders(model) -> bool:
    """Every decoder-layer parameter, and an untied input embedding's and LM head's, is a
    placeholder."""
    layers = model.adapter.decoder_layers(model.hf_model)
    if model.offload.head_index is not None:
        hf = model.hf_model
        layers = [*layers, hf.get_input_embeddings(), hf.get_output_embeddings()]
    return all(p.is_meta for layer in layers for p in layer.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["disk", "cpu"])
def test_offloaded_prune_equals_in_memory(folders, family, mode):
    ids = windows()
    results = {}
    for offload in (None, mode):
        model = load_model(str(folders[family]), offload=offload)
        if offload:
            assert layer_params_are_placeholders(model)
            # an untied embedding and LM head are offloaded too (GPT-2 ties them)
            ends = set() if family == "gpt2" else {"embed", "head"}
            assert set(model.offload.end_index) == ends
        with torch.no_grad():
            logits = model.bridge(ids[:2])
        before = perplexity(model, ids, progress=False).perplexity
        sequential_prune(model, ids, "sparsegpt", 0.5, batch_size=2, progress=False)
        after = perplexity(model, ids, progress=False).perplexity
        if offload:
            assert layer_params_are_placeholders(model)  # nothing left resident
        results[offload] = (logits, before, after, layer_weights(model))
    ref, got = results[None], results[mode]
    assert torch.equal(ref[0], got[0])
    assert ref[1] == got[1] and ref[2] == got[2] and ref[2] != ref[1]
    for key, w in ref[3].items():
        assert torch.equal(w, got[3][key]), key
        assert (w == 0).float().mean() == 0.5


def test_offloaded_head_is_loaded_once_per_batch(folders, monkeypatch):
    """Perplexity keeps an offloaded LM head resident over a batch's chunks: one load per
    batch (not one per ``nll_chunk`` positions), the same perplexity, released afterwards."""
    ids = windows(n=4)
    kw = dict(batch_size=2, nll_chunk=5, verify=False, progress=False)
    ref = perplexity(load_model(str(folders["llama"])), ids, **kw)
    model = load_model(str(folders["llama"]), offload="disk")
    head, loads = model.offload.head_index, []
    onload = model.offload.onload
    monkeypatch.setattr(model.offload, "onload", lambda i: (loads.append(i), onload(i))[1])
    got = perplexity(model, ids, **kw)
    assert got.perplexity == ref.perplexity
    assert loads.count(head) == 2  # 2 batches of 2 x 31 positions, 13 chunks each
    assert layer_params_are_placeholders(model)


def test_capture_stopped_after_the_last_block_leaves_no_layer_resident(folders, tmp_path):
    """The capture forward ends by an exception after the final block (no LM head): every
    layer is still released, and the store equals the in-memory one."""
    from wasserstein_neurons.capture import capture_activations

    arrays = {}
    for offload in (None, "disk"):
        model = load_model(str(folders["llama"]), offload=offload)
        store = capture_activations(model, windows(), tmp_path / str(offload), progress=False)
        if offload:
            assert layer_params_are_placeholders(model)
        arrays[offload] = {h: store.array(h) for h in store.hook_names}
    assert arrays[None].keys() == arrays["disk"].keys()
    for hook, values in arrays[None].items():
        assert np.array_equal(values, arrays["disk"][hook]), hook


def test_disk_offload_keeps_edits_in_a_scratch_file_removed_on_close(folders):
    """Edits go to a pid-tagged scratch folder, removed on close; a scratch folder left by
    a killed process is removed by the next one that needs scratch space."""
    import subprocess
    import sys

    from wasserstein_neurons.offload import SCRATCH_ROOT

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = SCRATCH_ROOT.with_name(f".{SCRATCH_ROOT.name}.scratch-{dead}-x")
    stale.mkdir(parents=True)
    (stale / "edited-00000.safetensors").write_bytes(b"left by a killed run")
    model = load_model(str(folders["llama"]), offload="disk")
    sequential_prune(model, windows(), "magnitude", 0.5, progress=False)
    scratch = model.offload._scratch
    assert scratch is not None and len(list(scratch.glob("*.safetensors"))) == 2
    assert not stale.exists() and f"scratch-{os.getpid()}-" in scratch.name
    model.offload.close()
    assert not scratch.exists()


def test_offloaded_prune_saves_a_loadable_folder(folders, tmp_path):
    ids, saved = windows(), {}
    for offload in (None, "disk"):
        model = load_model(str(folders["gpt_neox"]), offload=offload)
        sequential_prune(model, ids, "sparsegpt", 0.5, batch_size=2, progress=False)
        save_pruned(model, tmp_path / str(offload))
        saved[offload] = load_model(str(tmp_path / str(offload)))
    a, b = saved[None], saved["disk"]
    for key, w in layer_weights(a).items():
        assert torch.equal(w, layer_weights(b)[key]), key
    assert (
        perplexity(a, ids, progress=False).perplexity
        == perplexity(b, ids, progress=False).perplexity
    )


def _table(path, name):
    table = pd.read_csv(path / f"{name}.csv")
    return table[[c for c in table.columns if not any(t in c for t in TIMING)]]


def test_rank_and_expand_workflows_equal_with_offload(folders, corpus, tmp_path):
    base = dict(model=str(folders["llama"]), dataset=str(corpus), seqlen=32)
    for offload in (None, "disk"):
        run_rank(
            RankConfig(out=str(tmp_path / f"rank-{offload}"), tokens=512, offload=offload, **base),
            progress=False,
        )
        cfg = ExpandConfig(
            out=str(tmp_path / f"expand-{offload}"),
            experts=2,
            sparsity=0.5,
            nsamples=8,
            eval_tokens=512,
            offload=offload,
            **base,
        )
        run_expand(cfg, progress=False)
    for run, name in (("rank", "neurons"), ("expand", "results"), ("expand", "layers")):
        pd.testing.assert_frame_equal(
            _table(tmp_path / f"{run}-None", name), _table(tmp_path / f"{run}-disk", name)
        )


def test_disentangle_equals_with_offload(folders, corpus, tmp_path):
    """The one-layer study reads the same inputs and weights through the offloaded model."""
    from wasserstein_neurons.workflows import DisentangleConfig, run_disentangle

    base = dict(model=str(folders["llama"]), dataset=str(corpus), seqlen=32, layer=1)
    base.update(experts="1,2", sparsity=0.5, nsamples=8, eval_tokens=256, kmeans_restarts=2)
    for offload in (None, "disk"):
        cfg = DisentangleConfig(out=str(tmp_path / f"dis-{offload}"), offload=offload, **base)
        run_disentangle(cfg, progress=False)
    for name in ("neurons", "per_k"):
        pd.testing.assert_frame_equal(
            _table(tmp_path / "dis-None", name), _table(tmp_path / "dis-disk", name)
        )


@pytest.mark.parametrize("mode", ["disk", "cpu"])
def test_ablate_workflow_equals_with_offload(folders, corpus, tmp_path, mode):
    """Weight ablations (SparseGPT rows, with the down columns; every strategy, norm reads the
    weights) and activation interventions give the same perplexities offloaded, and the
    offloaded model's stored weights are untouched afterwards."""
    base = dict(model=str(folders["llama"]), dataset=str(corpus), seqlen=32, rank_tokens=512)
    study = dict(
        strategies="wd-top,random,wd-bottom,mean,variance,norm",
        seeds=2,
        neuron_sparsities=(0.5, 0.9),
        method="sparsegpt",
        top_percent=25.0,
    )
    tables = {}
    for offload in (None, mode):
        for modes, down in ((("weights",), True), (("zero", "mean"), False)):
            cfg = AblateConfig(
                out=str(tmp_path / f"ablate-{offload}-{modes[0]}"),
                study=AblationConfig(modes=modes, include_down=down, **study),
                nsamples=4,
                eval_tokens=256,
                offload=offload,
                **base,
            )
            tables[offload, modes[0]] = run_ablate(cfg, progress=False)
    for kind in ("weights", "zero"):
        ref, got = tables[None, kind], tables[mode, kind]
        pd.testing.assert_frame_equal(ref, got)
        assert ref["perplexity"].nunique() > 3  # the settings really differ


def test_patched_layers_are_temporary(folders):
    """``LayerOffload.patch``: applied on every load, never written back, gone on restore."""
    model = load_model(str(folders["llama"]), offload="cpu")
    ids = windows(2)
    with torch.no_grad():
        before = model.bridge(ids)
        weight = lambda: model.adapter.weight(model.hf_model, 0, "down")  # noqa: E731
        handle = model.offload.patch({0: lambda: weight().zero_()})
        patched = model.bridge(ids)
        with model.offload.resident(0, keep_edits=False):
            assert (weight() == 0).all()
        with pytest.raises(OffloadError, match="patched"), model.offload.resident(0):
            pass
        handle.restore()
        with model.offload.resident(0, keep_edits=False):
            assert (weight() != 0).any()
        assert torch.equal(model.bridge(ids), before) and not torch.equal(patched, before)


def test_offload_errors_are_clear(folders, tmp_path):
    with pytest.raises(ValueError, match="unknown offload 'tape'"):
        load_model(str(folders["llama"]), offload="tape")
    (tmp_path / "config.json").write_text((folders["llama"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path), offload="disk")
    with pytest.raises(ModelLoadError, match="local model folder"):
        load_model("no-such-org/no-such-model", offload="disk")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_offload_to_a_gpu_equals_the_model_on_the_gpu(folders, mode):
    """One layer on the GPU at a time gives the weights and perplexity of the whole model
    on the GPU."""
    ids = windows()
    results = {}
    for offload in (None, mode):
        model = load_model(str(folders["llama"]), device="cuda", offload=offload)
        assert model.device.type == "cuda"
        sequential_prune(model, ids, "sparsegpt", 0.5, batch_size=2, progress=False)
        ppl = perplexity(model, ids, progress=False).perplexity
        results[offload] = (ppl, {k: w.cpu() for k, w in layer_weights(model).items()})
    assert results[None][0] == results[mode][0]
    for key, w in results[None][1].items():
        assert torch.equal(w, results[mode][1][key]), key
