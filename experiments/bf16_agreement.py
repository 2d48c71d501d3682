"""How much a bfloat16 (or float16) model changes the project's numbers (embedded model).

The same model is loaded in float32 and in each of ``--dtypes`` (``load_model(dtype=...)``,
default bfloat16 and float16), and every copy sees the same token windows:

1. **Wasserstein distances.** ``blocks.{l}.mlp.hook_pre`` of every layer on ``--tokens``
   evaluation-split tokens (``sample_windows``), kept in memory as float32 copies; the exact
   W1 to N(0, 1) of every neuron in each dtype; per layer the Spearman correlation with
   float32 and the overlap of the top ``--top-percent`` sets (the Wasserstein neurons).
2. **SparseGPT.** Layer ``--layer`` ``gate`` (``up`` ...) inputs of the same pass; the first
   ``--calib-tokens`` rows calibrate, the others are held out. Held-out relative error
   ``||X W_p^T - X W^T|| / ||X W^T||`` (float64) of

   * ``fp32``: float32 weight and inputs;
   * ``same X``: the float32 model's inputs and weight rounded to the dtype (what a 16-bit
     run of the same layer sees), error against the float32 dense output;
   * ``own X``: the 16-bit model's own inputs and weight, error against its own dense
     16-bit layer;

   and the ratio of each to ``fp32``.
3. **Perplexity** of the dense model in each dtype on ``--eval-tokens`` tokens, and which
   attention backend :func:`~wasserstein_neurons.perplexity` used; the time of one bridged
   (eager, as ``rank`` runs it) and one native sdpa forward of 4 windows.

Usage::

    OMP_NUM_THREADS=1 python experiments/bf16_agreement.py \
        | tee experiments/results/bf16_agreement.txt
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext

import numpy as np
import torch
from scipy.stats import spearmanr

from wasserstein_neurons import (
    evaluation_windows,
    load_model,
    load_tokens,
    perplexity,
    wasserstein_to_gaussian,
)
from wasserstein_neurons.bridge import native_sdpa
from wasserstein_neurons.capture import run_hooked
from wasserstein_neurons.data import sample_windows
from wasserstein_neurons.evaluate import window_nll
from wasserstein_neurons.pruning import PruneSpec, SparseGPTPruner


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="bfloat16,float16", help="compared with float32")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-percent", type=float, default=3.0)
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--role", default="gate")
    p.add_argument("--calib-tokens", type=int, default=12288)
    p.add_argument("--sparsities", default="0.5,0.7,0.9,2:4")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def capture(model, windows, layer: int, role: str, batch_size: int):
    """Every layer's ``hook_pre`` ``[tokens, d_mlp]`` (float32 copies) and the inputs
    ``[tokens, d_in]`` of linear ``role`` of ``layer`` (the model's dtype)."""
    n_layers, n_tokens = model.adapter.n_layers, windows.numel()
    acts: dict[int, torch.Tensor] = {}
    offset = {layer_: 0 for layer_ in range(n_layers)}

    def hook(layer_):
        def fn(a, hook):
            flat = a.detach().reshape(-1, a.shape[-1])
            if layer_ not in acts:
                acts[layer_] = torch.empty(n_tokens, flat.shape[1], dtype=torch.float32)
            start = offset[layer_]
            acts[layer_][start : start + flat.shape[0]] = flat.float().cpu()
            offset[layer_] = start + flat.shape[0]

        return fn

    inputs = []
    linear = model.adapter.linear(model.hf_model, layer, role)
    handle = linear.register_forward_pre_hook(
        lambda m, a: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1]).cpu())
    )
    try:
        hooks = [(f"blocks.{i}.mlp.hook_pre", hook(i)) for i in range(n_layers)]
        run_hooked(model, windows, hooks, batch_size=batch_size, progress=False)
    finally:
        handle.remove()
    return acts, torch.cat(inputs)


def rel_error(x: torch.Tensor, w_ref: torch.Tensor, w_p: torch.Tensor) -> float:
    x, w_ref, w_p = x.double(), w_ref.double(), w_p.double()
    y = x @ w_ref.T
    return float((x @ w_p.T - y).norm() / y.norm())


def sparsegpt(x_cal: torch.Tensor, weight: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    pruner = SparseGPTPruner(weight.shape[1])
    pruner.add_batch(x_cal)
    return pruner.prune(weight, spec).weight


def wd_report(wd: dict[str, np.ndarray], dtype: str, top_percent: float) -> None:
    rho, overlap = [], []
    n_layers, d = wd["float32"].shape
    k = max(1, round(d * top_percent / 100))
    for layer in range(n_layers):
        a, b = wd["float32"][layer], wd[dtype][layer]
        rho.append(spearmanr(a, b).statistic)
        top_a, top_b = set(np.argsort(-a)[:k]), set(np.argsort(-b)[:k])
        overlap.append(len(top_a & top_b) / k)
    rho, overlap = np.array(rho), np.array(overlap)
    print(f"\n## Wasserstein distances, {dtype} vs float32, {n_layers} layers x {d} neurons")
    print(
        f"Spearman per layer: min {rho.min():.4f} (layer {int(rho.argmin())}), "
        f"median {np.median(rho):.4f}, max {rho.max():.4f}"
    )
    print(
        f"top {top_percent:g}% ({k} per layer) overlap: min {overlap.min():.3f} "
        f"(layer {int(overlap.argmin())}), median {np.median(overlap):.3f}, "
        f"total {int(round(overlap.sum() * k))} of {k * n_layers}"
    )
    rel = np.abs(wd[dtype] - wd["float32"]) / wd["float32"]
    print(f"|WD - WD_fp32| / WD_fp32: median {np.median(rel):.2e}, max {rel.max():.2e}")
    print("per-layer Spearman:", " ".join(f"{r:.4f}" for r in rho))


def sparsegpt_report(x: dict, w: dict, dtype: str, args) -> None:
    calib, torch_dtype = args.calib_tokens, getattr(torch, dtype)
    print(
        f"\n## SparseGPT, {dtype} vs float32, layer {args.layer} {args.role}: {calib} "
        f"calibration / {x['float32'].shape[0] - calib} held-out tokens"
    )
    print("sparsity   fp32     same X    ratio     own X     ratio")
    x32, x16, w32, w16 = x["float32"], x[dtype], w["float32"], w[dtype]
    for s in args.sparsities.split(","):
        spec = PruneSpec.from_pattern(s) if ":" in s else PruneSpec(sparsity=float(s))
        e32 = rel_error(x32[calib:], w32, sparsegpt(x32[:calib], w32, spec))
        same = sparsegpt(x32[:calib].to(torch_dtype), w32.to(torch_dtype), spec)
        assert same.dtype == torch_dtype
        e_same = rel_error(x32[calib:], w32, same)
        e_own = rel_error(x16[calib:], w16, sparsegpt(x16[:calib], w16, spec))
        print(
            f"{s:>8} {e32:8.5f} {e_same:8.5f}  {e_same / e32:8.5f}  {e_own:8.5f}  "
            f"{e_own / e32:8.5f}"
        )
    print(f"dense weight rounded to {dtype} alone: {rel_error(x32[calib:], w32, w16):.5f}")


def forward_seconds(model, windows) -> tuple[float, float]:
    """Seconds of one bridged (eager) and one native sdpa forward + NLL of ``windows``."""
    hf, out = model.hf_model, []
    for native in (False, True):
        with native_sdpa(hf) if native else nullcontext():
            window_nll(hf, windows[:1, :32])  # warm-up
            t0 = time.perf_counter()
            window_nll(hf, windows)
            out.append(time.perf_counter() - t0)
    return out[0], out[1]


def measure(args, dtype: str, windows, evals) -> dict:
    model = load_model(args.model, device=args.device, dtype=dtype)
    acts, x = capture(model, windows, args.layer, args.role, args.batch_size)
    wd = np.stack([wasserstein_to_gaussian(acts[i]).numpy() for i in sorted(acts)])
    del acts
    w = model.adapter.weight(model.hf_model, args.layer, args.role).detach().clone()
    ppl = perplexity(model, evals, batch_size=args.batch_size, progress=False)
    bridged, sdpa = forward_seconds(model, windows[:4].to(model.device))
    print(
        f"{dtype}: dense perplexity {ppl.perplexity:.4f} ({ppl.n_tokens} tokens, {ppl.backend}); "
        f"forward of 4 x {windows.shape[1]} tokens: bridged {bridged:.2f} s, sdpa {sdpa:.2f} s"
    )
    return {"wd": wd, "x": x, "w": w, "ppl": ppl.perplexity}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    print(
        f"# {args.dtypes} vs float32 on {args.model} ({args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()})"
    )
    probe = load_model(args.model, device=args.device)
    tokens = load_tokens(probe.tokenizer, args.dataset, "evaluation")
    windows = sample_windows(tokens, args.tokens, args.seqlen, seed=args.seed)
    evals = evaluation_windows(tokens, args.seqlen, args.eval_tokens)
    del probe
    dtypes = args.dtypes.split(",")
    res = {dtype: measure(args, dtype, windows, evals) for dtype in ["float32", *dtypes]}
    field = {key: {d: r[key] for d, r in res.items()} for key in ("wd", "x", "w")}
    for dtype in dtypes:
        print(f"\nperplexity {dtype} / float32 = {res[dtype]['ppl'] / res['float32']['ppl']:.5f}")
        wd_report(field["wd"], dtype, args.top_percent)
        sparsegpt_report(field["x"], field["w"], dtype, args)


if __name__ == "__main__":
    main()
