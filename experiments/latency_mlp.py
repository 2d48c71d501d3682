"""MLP and end-to-end latency parts of ``bench_latency.py`` (see its docstring)."""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from bench_latency import magnitude_prune, timed

from wasserstein_neurons import load_model
from wasserstein_neurons.bridge import native_sdpa, replace_linear
from wasserstein_neurons.data import calibration_windows, load_tokens
from wasserstein_neurons.expansion import ExpertRoutedLinear
from wasserstein_neurons.expansion.router import fit_router
from wasserstein_neurons.sparse_kernels import SparseLinear, SparseMatrix


def _layer_inputs(model, layer: int, n_windows: int = 8) -> torch.Tensor:
    """The real inputs ``[tokens, d_model]`` of MLP ``layer`` on calibration windows."""
    tokens = load_tokens(model.tokenizer, "embedded", "calibration")
    windows = calibration_windows(tokens, n_windows, 512, seed=0)
    caught = []
    hook = (f"blocks.{layer}.mlp.hook_in", lambda act, hook: caught.append(act.detach()))
    with torch.no_grad():
        model.bridge.run_with_hooks(windows, fwd_hooks=[hook])
    return torch.cat(caught).reshape(-1, caught[0].shape[-1])


class _MLP:
    """gate / up / down as three callables ``[n, in] -> [n, out]``."""

    def __init__(self, gate, up, down):
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _pruned(weights, s, kernel):
    mats = [SparseMatrix(magnitude_prune(w, s), kernel) for w in weights]
    return _MLP(*(m.matmul_t for m in mats))


def _expanded(weights, s, x, k, kernel):
    """SE: one router per linear (fitted on its real inputs), ``k`` pruned experts each."""
    g = torch.Generator().manual_seed(0)
    layers = []
    inputs = [x, x, None]
    hidden = F.silu(x @ weights[0].T) * (x @ weights[1].T)
    inputs[2] = hidden
    for w, xin in zip(weights, inputs, strict=True):
        experts = torch.stack(
            [
                magnitude_prune(w + 0.01 * w.std() * torch.randn(w.shape, generator=g), s)
                for _ in range(k)
            ]
        )
        layer = ExpertRoutedLinear(experts, fit_router(xin, k, seed=0), store_routing=False)
        layers.append(layer.use_sparse_kernels(kernel))
    return _MLP(*layers)


def _rows(name, weights, x_all, sparsities, args):
    rows = []
    dense = _MLP(*(SparseMatrix(w, "dense").matmul_t for w in weights))
    variants = [("dense", 0.0, "dense", dense)]
    for s in sparsities:
        for kernel in ("dense", "auto"):
            variants.append(("pruned", s, kernel, _pruned(weights, s, kernel)))
            variants.append(
                (
                    f"se-{args.experts}",
                    s,
                    kernel,
                    _expanded(weights, s, x_all, args.experts, kernel),
                )
            )
    for model, s, kernel, mlp in variants:
        row = {"mlp": name, "model": model, "sparsity": s, "kernels": kernel}
        for n in (1, 256):
            x = x_all[:n]
            with torch.no_grad():
                row[f"us_per_token@{n}"] = (
                    1e6 * timed(lambda x=x, mlp=mlp: mlp(x), args.repeats) / n
                )
        rows.append(row)
    return rows


def bench_mlps(sparsities, args) -> pd.DataFrame:
    model = load_model("smollm2-135m")
    ad = model.adapter
    weights = [
        ad.weight(model.hf_model, args.layer, r).detach().clone() for r in ("gate", "up", "down")
    ]
    x = _layer_inputs(model, args.layer)
    rows = _rows(f"smollm2 layer {args.layer}", weights, x, sparsities, args)
    if not args.skip_7b:
        g = torch.Generator().manual_seed(0)
        big = [
            torch.randn(11008, 4096, generator=g) * 0.02,
            torch.randn(11008, 4096, generator=g) * 0.02,
            torch.randn(4096, 11008, generator=g) * 0.02,
        ]
        x7 = torch.randn(2048, 4096, generator=g)
        slim = argparse_copy(args, repeats=max(3, args.repeats // 5), experts=min(args.experts, 4))
        rows += _rows("llama-2-7b shape", big, x7, [s for s in sparsities if s >= 0.9], slim)
    return pd.DataFrame(rows)


def argparse_copy(args, **changes):
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def bench_e2e(args) -> pd.DataFrame:
    model = load_model("smollm2-135m")
    window = calibration_windows(
        load_tokens(model.tokenizer, "embedded", "calibration"), 1, 256, seed=1
    )
    rows = [_e2e_row(model, window, "dense", args)]
    for layer in range(model.adapter.n_layers):
        for role in ("gate", "up", "down"):
            linear = model.adapter.linear(model.hf_model, layer, role)
            with torch.no_grad():
                linear.weight.copy_(magnitude_prune(linear.weight, args.e2e_sparsity))
            replace_linear(model, layer, role, SparseLinear(linear, "auto"))
    rows.append(_e2e_row(model, window, f"pruned {args.e2e_sparsity:g}, auto kernels", args))
    return pd.DataFrame(rows)


def _e2e_row(model, window, label, args) -> dict:
    hf = model.hf_model
    reps = max(3, args.repeats // 4)
    with torch.no_grad(), native_sdpa(hf):
        t_window = timed(lambda: hf(window), reps)
        t_single = timed(lambda: [hf(window[:, i : i + 1]) for i in range(16)], reps)
    return {
        "model": label,
        "tokens/s (256-token window)": 256 / t_window,
        "tokens/s (16 single tokens)": 16 / t_single,
    }
