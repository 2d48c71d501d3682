"""Tests of the one layer loop (layerwise.py) on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import layer_input

from wasserstein_neurons.layerwise import (
    layer_linears,
    resolve_targets,
    sequential_layerwise,
    target_weight,
)

N_WINDOWS, SEQLEN, BATCH = 6, 32, 4  # last batch smaller: exercises per-size layer arguments


def windows(n=N_WINDOWS, seqlen=SEQLEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (n, seqlen), generator=g)


def test_layer_linears_names(tiny_model):
    names = layer_linears(tiny_model, 0)
    for role in tiny_model.adapter.roles:
        assert names[role] is tiny_model.adapter.linear(tiny_model.hf_model, 0, role)
    # unwrapped modules, each once
    assert len({id(m) for m in names.values()}) == len(names)
    assert all(type(m).__name__ in ("Linear", "Conv1D") for m in names.values())
    assert len(names) > len(tiny_model.adapter.roles)  # attention linears found too
    with pytest.raises(ValueError, match="unknown target"):
        resolve_targets(tiny_model, 0, ["nope"])
    w = target_weight(tiny_model, 0, tiny_model.adapter.first_role)
    assert w.shape == (tiny_model.adapter.d_mlp, tiny_model.adapter.d_model)


def test_call_groups_llama(tiny_llama):
    groups = {}

    def process(ctx):
        groups["mlp"] = ctx.call_groups(ctx.targets("mlp"))
        groups["all"] = ctx.call_groups(ctx.targets("all"))

    sequential_layerwise(tiny_llama, windows(), process, layers=[0], progress=False)
    assert groups["mlp"] == [["gate", "up"], ["down"]]
    assert groups["all"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["gate", "up"],
        ["down"],
    ]


class _Scaled(torch.nn.Module):
    """Stand-in for an expert-routed layer: ``0.5 * linear(x)``."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return 0.5 * self.linear(x)


def test_replace_linear_hooks_and_propagation(tiny_model):
    """Modules swapped by the callback are seen by hooks and used for propagation."""
    adapter, role = tiny_model.adapter, tiny_model.adapter.first_role
    ids = windows()
    seen = {}

    def process(ctx):
        if ctx.index == 0:
            old = ctx.targets([role])[role]
            y_old = ctx.collect_outputs({role: old})[role]
            assert ctx.replace_linear(role, _Scaled(old)) is old
            new = ctx.targets([role])[role]
            assert isinstance(new, _Scaled)
            torch.testing.assert_close(ctx.collect_outputs({role: new})[role], 0.5 * y_old)
        else:
            seen[ctx.index] = ctx.hidden_states().clone()

    sequential_layerwise(tiny_model, ids, process, batch_size=BATCH, progress=False)
    torch.testing.assert_close(seen[1], layer_input(tiny_model, 1, ids), rtol=0, atol=0)
    names = (adapter.hook_name(0, role), adapter.input_hook_name(0, role))
    _, cache = tiny_model.bridge.run_with_cache(ids[:2], names_filter=lambda n: n in names)
    module = adapter.linear(tiny_model.hf_model, 0, role)
    with torch.no_grad():
        expected = module(cache[names[1]])
        torch.testing.assert_close(cache[names[0]], expected, rtol=0, atol=0)
        assert torch.equal(tiny_model.bridge(ids[:2]), tiny_model.hf_model(ids[:2]).logits)
