"""Streaming capture to disk: values, names, reopen, refusal to overwrite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wasserstein_neurons.bridge import unwrap
from wasserstein_neurons.capture import (
    ActivationStore,
    StoreExistsError,
    capture_activations,
    resolve_hook_names,
    run_hooked,
)


def _direct(model, windows, hook):
    seen = []
    model.bridge.run_with_hooks(windows, fwd_hooks=[(hook, lambda x, hook: seen.append(x))])
    return seen[0].reshape(-1, seen[0].shape[-1]).detach().numpy()


def test_capture_matches_direct_hooks(tiny_model, tmp_path):
    windows = torch.randint(0, len(tiny_model.tokenizer), (5, 16))
    store = capture_activations(
        tiny_model,
        windows,
        tmp_path / "store",
        hooks="hook_pre,hook_post",
        batch_size=2,
        dtype="float32",
        progress=False,
    )
    assert store.hook_names == [
        "blocks.0.mlp.hook_post",
        "blocks.0.mlp.hook_pre",
        "blocks.1.mlp.hook_post",
        "blocks.1.mlp.hook_pre",
    ]
    reopened = ActivationStore.open(tmp_path / "store")
    for hook in store.hook_names:
        got = reopened.array(hook)
        assert got.shape == (80, 128)
        np.testing.assert_allclose(got, _direct(tiny_model, windows, hook), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(reopened.tokens(), windows.reshape(-1).numpy())


def test_forward_stops_after_the_last_hooked_block(tiny_llama):
    """run_hooked runs no more of the model than its hooks need: hooks in block 0 skip block
    1, hooks in the final block skip the final norm and the LM head (no logits), and a hook
    outside the blocks keeps the whole forward."""
    hf, windows = tiny_llama.hf_model, torch.randint(0, 300, (3, 8))
    calls = {"lm_head": 0, "layer1": 0}
    counters = [
        hf.lm_head.register_forward_hook(
            lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)
        ),
        unwrap(hf.model.layers[1]).register_forward_hook(  # the HF layer inside its block
            lambda *a: calls.__setitem__("layer1", calls["layer1"] + 1)
        ),
    ]
    seen = []
    try:
        for hooks, expect in (
            (["blocks.0.mlp.hook_pre"], {"lm_head": 0, "layer1": 0}),
            (["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_post"], {"lm_head": 0, "layer1": 2}),
            (["blocks.1.mlp.hook_pre", "ln_final.hook_normalized"], {"lm_head": 2, "layer1": 2}),
        ):
            calls.update(lm_head=0, layer1=0)
            run_hooked(
                tiny_llama,
                windows,
                [(h, lambda x, hook, h=h: seen.append(h)) for h in hooks],
                batch_size=2,
                progress=False,
            )
            assert calls == expect, hooks
            assert sorted(set(seen)) == sorted(hooks) and len(seen) == 2 * len(hooks)
            seen.clear()
    finally:
        for handle in counters:
            handle.remove()


def test_float16_store(tiny_llama, tmp_path):
    windows = torch.randint(0, 300, (3, 8))
    store = capture_activations(tiny_llama, windows, tmp_path / "s", progress=False)
    arr = store.array("blocks.1.mlp.hook_pre")
    assert arr.dtype == np.float16
    np.testing.assert_allclose(
        arr.astype(np.float32),
        _direct(tiny_llama, windows, "blocks.1.mlp.hook_pre"),
        rtol=2e-3,
        atol=2e-3,
    )


def test_resolve_hook_names(tiny_llama):
    b = tiny_llama.bridge
    assert resolve_hook_names(b) == ["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_pre"]
    assert resolve_hook_names(b, ["blocks.1.mlp.hook_pre_linear"]) == [
        "blocks.1.mlp.hook_pre_linear"
    ]
    with pytest.raises(ValueError, match=r"unknown hook 'blocks\.\*\.mlp\.hook_nope'.*hook_pre"):
        resolve_hook_names(b, "hook_nope")


def test_refuses_finished_store(tiny_llama, tmp_path):
    windows = torch.randint(0, 300, (2, 8))
    capture_activations(tiny_llama, windows, tmp_path / "s", progress=False)
    before = (tmp_path / "s" / "blocks.0.mlp.hook_pre.npy").read_bytes()
    with pytest.raises(StoreExistsError, match="overwrite"):
        capture_activations(tiny_llama, windows[:1], tmp_path / "s", progress=False)
    assert (tmp_path / "s" / "blocks.0.mlp.hook_pre.npy").read_bytes() == before
    store = capture_activations(
        tiny_llama, windows[:1], tmp_path / "s", overwrite=True, progress=False
    )
    assert store.n_tokens == 8


def test_incomplete_store_is_not_opened(tmp_path):
    (tmp_path / "meta.json").write_text('{"finished": false, "hooks": {}}')
    with pytest.raises(RuntimeError, match="incomplete"):
        ActivationStore.open(tmp_path)


def test_store_records_positions_bos_and_special_ids(tiny_llama, tmp_path):
    from wasserstein_neurons.data import bos_token_id, prepend_bos

    bos = bos_token_id(tiny_llama.tokenizer)
    windows = prepend_bos(torch.randint(1, 300, (3, 8)), bos)
    store = capture_activations(tiny_llama, windows, tmp_path / "s", progress=False, bos=True)
    reopened = ActivationStore.open(tmp_path / "s")
    assert reopened.bos and reopened.seqlen == 8
    assert reopened.special_ids == sorted(set(tiny_llama.tokenizer.all_special_ids))
    np.testing.assert_array_equal(reopened.window_tokens(), windows.numpy())
    np.testing.assert_array_equal(reopened.positions(), np.tile(np.arange(8), 3))
    np.testing.assert_array_equal(reopened.window_index(), np.repeat(np.arange(3), 8))
    special = reopened.special_mask()
    assert special.dtype == bool and special.shape == (24,)
    assert special[::8].all() and not special.reshape(3, 8)[:, 1:].any()
    # the BOS rows are exactly what --exclude-special and --exclude-positions 1 leave out
    for sel in (reopened.select(exclude_special=True), reopened.select(exclude_positions=1)):
        np.testing.assert_array_equal(sel.rows, np.flatnonzero(reopened.positions() > 0))
        np.testing.assert_array_equal(reopened.positions()[sel.rows][sel.start], np.ones(3))
    assert store.select().rows is None
    plain = capture_activations(tiny_llama, windows, tmp_path / "p", progress=False)
    assert plain.bos is False
