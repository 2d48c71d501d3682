"""Activation-level interventions on tiny random models: exactly the selected channels change,
with the values each mode promises, the statistics come from the calibration tokens, and the
hooks are gone afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wasserstein_neurons.capture import run_hooked
from wasserstein_neurons.evaluate import perplexity
from wasserstein_neurons.interventions import (
    Intervention,
    check_hook,
    collect_activation_stats,
    intervened,
    intervention_hooks,
)
from wasserstein_neurons.pruning import WeightSnapshot

HOOK = "blocks.0.mlp.hook_pre"
CHOSEN = np.array([1, 4, 7, 30, 99])


def _windows(model, n=4, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(model.tokenizer), (n, seqlen), generator=g)


def _capture(model, windows, hooks=(), name=HOOK) -> torch.Tensor:
    """``[tokens, d]`` values seen at ``name`` after ``hooks`` (the intervention) ran."""
    seen = []
    with intervened(model, hooks):
        run_hooked(
            model,
            windows,
            [(name, lambda x, hook: seen.append(x.detach().clone()))],
            batch_size=2,
            progress=False,
        )
    return torch.cat(seen).reshape(-1, seen[0].shape[-1])


def _n_hooks(model) -> int:
    points = {id(hp): hp for hp in model.bridge.hook_dict.values()}  # aliases share a point
    return sum(len(hp.fwd_hooks) for hp in points.values())


def _after(model, iv, stats=None, windows=None, chosen=CHOSEN):
    windows = _windows(model) if windows is None else windows
    hooks = intervention_hooks(model, {0: chosen}, iv, stats)
    return _capture(model, windows), _capture(model, windows, hooks)


def _others_identical(dense, after, chosen=CHOSEN):
    others = np.setdiff1d(np.arange(dense.shape[1]), chosen)
    assert torch.equal(dense[:, others], after[:, others])


@pytest.mark.parametrize(
    "sign, expected",
    [
        ("both", lambda a: torch.zeros_like(a)),
        ("negative", lambda a: a.clamp(min=0)),
        ("positive", lambda a: a.clamp(max=0)),
    ],
)
def test_zero_changes_exactly_the_selected_channels(tiny_model, sign, expected):
    dense, after = _after(tiny_model, Intervention("zero", sign=sign))
    _others_identical(dense, after)
    assert torch.equal(after[:, CHOSEN], expected(dense[:, CHOSEN]))
    assert not torch.equal(after[:, CHOSEN], dense[:, CHOSEN])
    assert _n_hooks(tiny_model) == 0


def test_mean_is_the_calibration_mean(tiny_model):
    calib = _windows(tiny_model, n=6, seed=1)
    stats = collect_activation_stats(tiny_model, calib, "hook_pre", batch_size=4, progress=False)
    reference = _capture(tiny_model, calib).double().mean(dim=0)  # independent pass, float64
    torch.testing.assert_close(stats.mean[0].double(), reference, rtol=1e-6, atol=1e-6)
    assert stats.n_tokens == calib.numel()
    dense, after = _after(tiny_model, Intervention("mean"), stats)
    _others_identical(dense, after)
    assert torch.equal(after[:, CHOSEN], stats.mean[0][CHOSEN].expand(len(after), -1))


def test_resample_is_seeded_and_draws_calibration_tokens(tiny_llama):
    model = tiny_llama
    calib = _windows(model, n=6, seed=1)
    stats = collect_activation_stats(model, calib, "hook_pre", progress=False)
    pool = _capture(model, calib)[:, CHOSEN]  # every calibration token: the whole pool
    assert stats.pool[0].shape == (calib.numel(), model.adapter.d_mlp)
    dense, after = _after(model, Intervention("resample", seed=3), stats)
    _others_identical(dense, after)
    # each token's selected values are one calibration token's values (a whole row of the pool)
    match = (after[:, CHOSEN][:, None, :] == pool[None, :, :]).all(dim=-1)
    assert match.any(dim=1).all()
    assert match.any(dim=0).sum() > len(after) // 2  # many different donors
    _, again = _after(model, Intervention("resample", seed=3), stats)
    _, other = _after(model, Intervention("resample", seed=4), stats)
    assert torch.equal(after, again) and not torch.equal(after, other)


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.9])
def test_channel_threshold_zeroes_the_requested_share(tiny_model, q):
    windows = _windows(tiny_model, n=5)
    stats = collect_activation_stats(tiny_model, windows, "hook_pre", progress=False)
    iv = Intervention("threshold", activation_sparsity=q)
    dense, after = _after(tiny_model, iv, stats, windows)  # evaluated on the calibration tokens
    _others_identical(dense, after)
    n = len(dense)
    for j in CHOSEN:
        a, b = dense[:, j], after[:, j]
        zeroed = (b == 0) & (a != 0)
        assert abs(int(zeroed.sum()) - q * n) <= 1, (j, int(zeroed.sum()), q * n)
        kept = b != 0
        assert torch.equal(b[kept], a[kept])  # survivors untouched
        tau = np.sort(np.abs(a.numpy()))[int(np.floor(q * n))]  # independent numpy quantile
        assert np.abs(a[zeroed].numpy()).max(initial=-1.0) < tau <= float(a.abs()[kept].min())


def test_uniform_threshold_is_one_per_layer(tiny_llama):
    windows = _windows(tiny_llama, n=5)
    stats = collect_activation_stats(tiny_llama, windows, "hook_pre", progress=False)
    q = 0.5
    dense, after = _after(
        tiny_llama, Intervention("threshold", activation_sparsity=q, rule="uniform"), stats, windows
    )
    sub, new = dense[:, CHOSEN], after[:, CHOSEN]
    zeroed = new == 0
    assert abs(int(zeroed.sum()) - q * sub.numel()) <= 1
    assert float(sub.abs()[zeroed].max()) < float(sub.abs()[~zeroed].min())  # one threshold
    per_channel = zeroed.float().mean(dim=0)
    assert per_channel.max() - per_channel.min() > 0.1  # not a per-channel rule


def test_every_channel_and_other_hooks(tiny_llama):
    model = tiny_llama
    windows = _windows(model)
    stats = collect_activation_stats(model, windows, "hook_post", progress=False)
    iv = Intervention("threshold", activation_sparsity=0.5)
    hooks = intervention_hooks(model, {0: None}, iv, stats)
    name = "blocks.0.mlp.hook_post"
    dense, after = _capture(model, windows, name=name), _capture(model, windows, hooks, name=name)
    share = ((after == 0) & (dense != 0)).float().mean(dim=0)
    assert torch.all((share - 0.5).abs() <= 1 / len(dense) + 1e-6)
    with pytest.raises(ValueError, match="needs calibration statistics of hook_pre"):
        intervention_hooks(model, {0: None}, iv, stats, hook="hook_pre")


def test_zero_at_hook_post_equals_zeroed_down_columns(tiny_model):
    """Through the perplexity path: zeroing the down projection's inputs = zeroing its columns."""
    model = tiny_model
    windows = _windows(model)
    chosen = {0: CHOSEN, 1: np.array([0, 5, 64])}
    hooks = intervention_hooks(model, chosen, Intervention("zero"), hook="hook_post")
    with intervened(model, hooks):
        hooked = perplexity(model, windows, use_sdpa=False, progress=False).perplexity
    snapshot = WeightSnapshot()
    for layer, neurons in chosen.items():
        down = model.adapter.weight(model.hf_model, layer, "down")
        index = torch.as_tensor(neurons)
        snapshot.add(down, index, columns=True, layer=layer, role="down")
        down[:, index] = 0
    try:
        pruned = perplexity(model, windows, use_sdpa=False, progress=False).perplexity
    finally:
        snapshot.restore()
    dense = perplexity(model, windows, use_sdpa=False, progress=False).perplexity
    assert hooked == pytest.approx(pruned, rel=1e-5) and hooked != pytest.approx(dense, rel=1e-7)


def test_hooks_removed_on_error_and_weights_untouched(tiny_llama):
    model = tiny_llama
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    hooks = intervention_hooks(model, {0: CHOSEN, 1: None}, Intervention("zero"))
    with pytest.raises(RuntimeError, match="boom"):
        with intervened(model, hooks):
            assert _n_hooks(model) == 2
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    after = model.hf_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_pool_is_a_seeded_bounded_sample(tiny_llama):
    model = tiny_llama
    windows = _windows(model, n=6)
    every = _capture(model, windows)
    a = collect_activation_stats(model, windows, max_rows=50, seed=0, progress=False)
    b = collect_activation_stats(model, windows, max_rows=50, seed=1, progress=False)
    assert a.pool[0].shape == (50, model.adapter.d_mlp) and set(a.pool) == {0, 1}
    rows = (a.pool[0][:, None, :] == every[None]).all(dim=-1)
    assert (rows.sum(dim=1) == 1).all()  # each pooled row is one calibration token ...
    assert len(set(rows.float().argmax(dim=1).tolist())) == 50  # ... drawn without replacement
    assert not torch.equal(a.pool[0], b.pool[0])
    torch.testing.assert_close(a.mean[0], b.mean[0])  # the mean reads every token


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mode="shuffle"), "unknown activation mode 'shuffle'"),
        (dict(mode="mean", sign="negative"), "sign applies only to mode zero"),
        (dict(mode="zero", sign="left"), "unknown sign 'left'"),
        (
            dict(mode="threshold", activation_sparsity=1.0),
            r"activation sparsity must be in \[0, 1\)",
        ),
        (dict(mode="threshold", activation_sparsity=-0.1), r"must be in \[0, 1\)"),
        (dict(mode="threshold", rule="teal"), "unknown threshold rule 'teal'"),
    ],
)
def test_bad_intervention(kw, message):
    with pytest.raises(ValueError, match=message):
        Intervention(**kw)


def test_bad_hook(tiny_model):
    with pytest.raises(ValueError, match="unknown hook 'hook_mid'"):
        check_hook(tiny_model, "hook_mid")
    if tiny_model.adapter.family != "llama":
        with pytest.raises(ValueError, match="have no hook_pre_linear hook point"):
            check_hook(tiny_model, "hook_pre_linear")
