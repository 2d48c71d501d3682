"""Tests of the expert-routed linear layer: forward, neuron rows, compact storage, costs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import manual_forward

from wasserstein_neurons.expansion import (
    ExpertRoutedLinear,
    PackedSparseStack,
    Router,
    fit_router,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fit(x, k, **kw):
    kw.setdefault("min_cluster_tokens", 0)
    kw.setdefault("restarts", 3)
    return fit_router(x, k, **kw)


def routed_layer(k=4, d_in=24, d_out=10, bias="shared", sparsity=0.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(600, d_in, generator=g)
        + 4 * torch.randn(k, d_in, generator=g)[torch.randint(k, (600,), generator=g)]
    )
    router = fit(x, k, pca_dim=4)
    w = torch.randn(k, d_out, d_in, generator=g)
    if sparsity:
        w[torch.rand(w.shape, generator=g) < sparsity] = 0
    b = {
        "shared": torch.randn(d_out, generator=g),
        "expert": torch.randn(k, d_out, generator=g),
        None: None,
    }[bias]
    layer = ExpertRoutedLinear(w, router, b)
    return layer.to(device), x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", ["shared", "expert", None])
def test_routed_forward_matches_per_token_computation(bias, device):
    layer, x = routed_layer(bias=bias, device=device)
    x3 = x[:120].reshape(4, 30, -1)
    with torch.no_grad():
        y = layer(x3)
    assert y.shape == (4, 30, 10) and y.dtype == x.dtype and y.device == x.device
    want, ids = manual_forward(layer, x[:120])
    assert len(set(ids.tolist())) == 4  # every expert used
    np.testing.assert_allclose(y.reshape(120, -1).double().cpu().numpy(), want, atol=1e-4)
    assert torch.equal(layer.last_routing.cpu(), torch.as_tensor(ids).reshape(4, 30))
    layer.store_routing = False
    layer.last_routing = None
    layer(x3)
    assert layer.last_routing is None


def test_dense_copies_equal_dense_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 10)
    x = torch.randn(300, 24, generator=g)
    layer = ExpertRoutedLinear.from_dense(lin.weight, fit(x, 4, pca_dim=4), lin.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), atol=1e-6, rtol=0)
    assert len(torch.unique(layer.last_routing)) == 4


def test_neuron_level_rows():
    g = torch.Generator().manual_seed(1)
    d_in, d_out, k = 24, 12, 3
    x = torch.randn(400, d_in, generator=g)
    router = fit(x, k, pca_dim=4)
    rows = torch.tensor([7, 2, 10])  # unsorted on purpose
    experts = torch.randn(k, 3, d_in, generator=g)
    shared = torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g)
    layer = ExpertRoutedLinear(experts, router, bias, rows=rows, shared_weight=shared)
    assert layer.rows.tolist() == [2, 7, 10]
    assert layer.out_features == d_out and layer.shared_weight.shape == (d_out - 3, d_in)
    with torch.no_grad():
        y = layer(x)
    ids = router.route(x)
    want = x @ shared.T + bias
    for i, r in enumerate(rows.tolist()):
        want[:, r] = (x[:, None, :] @ experts[ids, i, :, None])[:, 0, 0] + bias[r]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    w1 = layer.expert_weight(1)
    assert torch.equal(w1[rows], experts[1]) and torch.equal(w1[0], shared[0])
    # from_dense with rows: equals the dense layer
    dense = ExpertRoutedLinear.from_dense(shared, router, bias, rows=rows)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), x @ shared.T + bias, atol=1e-5, rtol=1e-6)
    with pytest.raises(ValueError, match="shared_weight"):
        ExpertRoutedLinear(experts, router, rows=rows)
    with pytest.raises(ValueError, match="duplicate"):
        ExpertRoutedLinear(experts, router, rows=[1, 1, 2], shared_weight=shared)


@pytest.mark.parametrize("with_rows", [False, True])
def test_compact_storage_identical_outputs(with_rows):
    layer, x = routed_layer(sparsity=0.9, bias="shared")
    if with_rows:
        w = layer.dense_weights()
        shared = w[0].clone()
        shared[torch.rand(shared.shape, generator=torch.Generator().manual_seed(0)) < 0.5] = 0
        layer = ExpertRoutedLinear(
            w[:, [1, 4]], layer.router, layer.bias, rows=[1, 4], shared_weight=shared
        )
    with torch.no_grad():
        ref = layer(x)
        weights = layer.dense_weights()
        nnz = layer.nnz_per_expert()
        dense_bytes = layer.nbytes()
        flops = layer.flops_per_token()
        params = layer.num_parameters()
        layer.compact()
        assert layer.is_compact and layer.weights is None
        assert torch.equal(layer(x), ref)  # decompress + dense GEMM: bit-identical
        assert torch.equal(layer.dense_weights(), weights)
        assert torch.equal(layer.nnz_per_expert(), nnz)
        assert layer.flops_per_token() == flops and layer.num_parameters() == params
        if not with_rows:
            assert layer.nbytes() < 0.5 * dense_bytes
        layer.densify()
        assert not layer.is_compact and torch.equal(layer(x), ref)
    # gradients reach the packed values
    layer.compact()
    layer(x[:50]).sum().backward()
    assert layer.weights_packed.values.grad is not None


def test_packed_stack_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 13, generator=g)  # 13 columns: a partial last byte
    w[torch.rand(w.shape, generator=g) < 0.6] = 0
    w[1, 2] = 0  # an empty row
    s = PackedSparseStack.from_dense(w)
    assert s.bits.shape == (3, 5, 2) and s.bits.dtype == torch.uint8
    assert torch.equal(s.to_dense(), w)
    assert torch.equal(s.mask(2), w[2] != 0)
    assert s.nnz().tolist() == (w != 0).sum((1, 2)).tolist()
    clone = PackedSparseStack.from_state_dict(s.state_dict())
    assert torch.equal(clone.to_dense(), w)
    assert torch.equal(s.to_dense(torch.float64), w.double())


def test_counts_match_hand_computation():
    # d_in=4, p=2, k=2, out=3; expert 0 has 5 nonzeros, expert 1 has 3
    router = Router(
        torch.zeros(4),
        torch.eye(4)[:, :2],
        torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
        counts=torch.tensor([3, 1]),
    )
    w = torch.zeros(2, 3, 4)
    w[0, 0, :3] = 1.0
    w[0, 2, 1:3] = 2.0
    w[1, 1, 0] = 3.0
    w[1, 2, [1, 3]] = 4.0
    layer = ExpertRoutedLinear(w, router, torch.ones(3))
    assert layer.nnz_per_expert().tolist() == [5, 3]
    router_flops = 2 * 4 * 2 + 2 * 2 * 2 + 2  # projection + cross terms + ||c||^2
    assert router.flops_per_token() == router_flops == 26
    # frequencies 3/4, 1/4 from the router's calibration counts
    assert layer.flops_per_token() == pytest.approx(2 * (0.75 * 5 + 0.25 * 3) + 26)
    assert layer.flops_per_token(torch.ones(2)) == pytest.approx(2 * 4 + 26)
    assert layer.flops_per_token(include_router=False) == pytest.approx(2 * 4.5)
    router_params = 4 + 4 * 2 + 2 * 2  # mean, components, centroids
    assert layer.num_parameters() == 5 + 3 + 3 + router_params
    assert layer.num_parameters(nonzero_only=False) == 2 * 3 * 4 + 3 + router_params
    assert layer.num_parameters(include_router=False) == 11
    f32, i64 = 4, 8
    router_bytes = router_params * f32 + 2 * i64  # + counts
    assert layer.nbytes() == 24 * f32 + 3 * f32 + router_bytes
    assert layer.nbytes(include_router=False) == 24 * f32 + 3 * f32
    layer.compact()
    # values + one byte of mask bits per row [2, 3, 1] + int64 offsets [3] + dense_shape [3]
    packed_bytes = 8 * f32 + 2 * 3 * 1 + 3 * i64 + 3 * i64
    assert layer.nbytes() == packed_bytes + 3 * f32 + router_bytes
    # routing: x = (1, 0, 0, 0) -> cluster 0; (-1, ...) -> cluster 1
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(
        layer(x), torch.tensor([[1.0 + 2 + 3 + 1, 1, 2 * 5 + 1], [1, -3 + 1, 4 * 6 + 1]])
    )


@pytest.mark.parametrize("variant", ["dense", "compact", "rows", "expert_bias"])
def test_save_load_identical_outputs(variant):
    layer, x = routed_layer(sparsity=0.7, bias="expert" if variant == "expert_bias" else "shared")
    if variant == "rows":
        shared = layer.dense_weights()[0]
        layer = ExpertRoutedLinear(
            layer.dense_weights()[:, [0, 3, 5]],
            layer.router,
            layer.bias,
            rows=[0, 3, 5],
            shared_weight=shared,
        )
    if variant in ("compact", "rows"):
        layer.compact()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    clone = ExpertRoutedLinear.from_state_dict(sd)
    assert clone.is_compact == layer.is_compact
    with torch.no_grad():
        assert torch.equal(clone(x), layer(x))
    # with a prefix, as inside a model's state dict
    clone2 = ExpertRoutedLinear.from_state_dict(
        {f"mlp.gate.{k}": v for k, v in sd.items()}, prefix="mlp.gate."
    )
    with torch.no_grad():
        assert torch.equal(clone2(x), layer(x))


def test_weight_attribute_fails_clearly():
    layer, _ = routed_layer()
    assert not hasattr(layer, "weight")
    with pytest.raises(AttributeError, match="expert_weight"):
        _ = layer.weight
    with pytest.raises(AttributeError, match="no_such"):
        _ = layer.no_such
    assert layer.in_features == 24 and layer.out_features == 10


def test_constructor_validation():
    layer, _ = routed_layer()
    w = layer.dense_weights()
    with pytest.raises(ValueError, match="clusters"):
        ExpertRoutedLinear(w[:3], layer.router)
    with pytest.raises(ValueError, match="d_in"):
        ExpertRoutedLinear(w[:, :, :5], layer.router)
    with pytest.raises(ValueError, match="bias"):
        ExpertRoutedLinear(w, layer.router, torch.zeros(7))


def test_half_precision_input():
    layer, x = routed_layer()
    layer = layer.to(torch.bfloat16)
    assert layer.router.centroids.dtype == torch.float32
    with torch.no_grad():
        y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
