"""Architecture adapters, loading paths and their errors (tiny random models, no downloads)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer

from wasserstein_neurons import models
from wasserstein_neurons.models import ModelLoadError, load_model


def test_adapter_names_real_modules_and_hooks(tiny_model):
    m = tiny_model
    adapter = m.adapter
    assert adapter.n_layers == 2 and adapter.d_mlp == 128 and adapter.d_model == 64
    for layer in range(adapter.n_layers):
        for role in adapter.roles:
            w = adapter.weight(m.hf_model, layer, role)
            expected = (
                (adapter.d_model, adapter.d_mlp)
                if role == "down"
                else (adapter.d_mlp, adapter.d_model)
            )
            assert tuple(w.shape) == expected
            assert adapter.hook_name(layer, role) in m.bridge.hook_dict
            assert adapter.input_hook_name(layer, role) in m.bridge.hook_dict
            # the unwrapped module is the one the bridge runs
            bridge_linear = getattr(m.bridge.blocks[layer].mlp, adapter.spec(role).bridge_attr)
            assert bridge_linear.original_component is adapter.linear(m.hf_model, layer, role)


def test_neuron_hook_reports_first_projection_output(tiny_model):
    """hook_pre is x @ W.T (+ b) of the first projection, with W from the adapter's view."""
    m = tiny_model
    role = m.adapter.first_role
    ids = torch.randint(0, len(m.tokenizer), (2, 12))
    seen = {}

    def grab_in(x, hook):
        seen["x"] = x.detach().clone()

    def grab_out(y, hook):
        seen["y"] = y.detach().clone()

    m.bridge.run_with_hooks(
        ids,
        fwd_hooks=[
            (m.adapter.input_hook_name(1, role), grab_in),
            (m.adapter.hook_name(1, role), grab_out),
        ],
    )
    module = m.adapter.linear(m.hf_model, 1, role)
    w = m.adapter.weight(m.hf_model, 1, role)
    expected = seen["x"] @ w.T + (module.bias if module.bias is not None else 0)
    torch.testing.assert_close(seen["y"], expected, rtol=1e-5, atol=1e-5)


def test_weight_view_writes_through_to_bridge(tiny_model):
    m = tiny_model
    w = m.adapter.weight(m.hf_model, 0, "down")
    w[3, :] = 0.0
    ids = torch.randint(0, len(m.tokenizer), (1, 8))
    torch.testing.assert_close(m.bridge(ids), m.hf_model(ids).logits, rtol=0, atol=0)
    assert torch.count_nonzero(m.adapter.weight(m.hf_model, 0, "down")[3]) == 0


def test_unknown_model_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="smollm2-135m.*HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")


def test_local_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_directory_round_trip(tmp_path):
    m = make_tiny_model("gpt_neox")
    hf = m.hf_model
    # save the plain HF model (the bridge wraps modules in place, so rebuild a clean copy)
    from transformers import AutoModelForCausalLM

    clean = AutoModelForCausalLM.from_config(hf.config)
    clean.load_state_dict({k: v for k, v in hf.state_dict().items()}, strict=False)
    clean.save_pretrained(tmp_path)
    m.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(0, len(m.tokenizer), (1, 10))
    torch.testing.assert_close(loaded.hf_model(ids).logits, clean.eval()(ids).logits)
    assert loaded.adapter.family == "gpt_neox"


def test_hf_model_needs_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        load_model("x", hf_model=make_tiny_model("llama").hf_model)


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            models.resolve_device("cuda")


def test_interrupted_cache_build_leaves_nothing(tmp_path, monkeypatch):
    """A failure while writing the cache leaves neither the target nor a temporary folder."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    tok = make_tokenizer()
    from conftest import make_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = AutoModelForCausalLM.from_config(make_config("llama", len(tok)))

    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", classmethod(lambda cls, *a, **k: tiny)
    )
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: tok))

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir("smollm2-135m")
    assert list(tmp_path.iterdir()) == []
