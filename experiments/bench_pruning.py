"""Benchmark the pruning baselines and the sequential driver on the embedded model.

Part 1 — one MLP matrix (default: layer 5 ``gate``) of the dense model: its inputs for
``--calib-tokens`` calibration tokens and ``--heldout-tokens`` held-out tokens (evaluation
split) are collected with :func:`sequential_layerwise`; each method is timed (calibration
statistics + pruning) and its held-out relative output error
``||(W - W_hat) X|| / ||W X||`` is reported at each sparsity.

Part 2 — the whole-model MLP pruning pass (every gate/up/down of every layer, sequential
calibration on ``--nsamples`` x ``--seqlen`` tokens) for each method at ``--sparsity``, with
the perplexity on ``--eval-tokens`` held-out tokens; the weights are restored bit-exactly
between methods with :func:`snapshot_weights` / :func:`restore_weights`.

Usage::

    python experiments/bench_pruning.py                       # embedded SmolLM2-135M, CPU
    python experiments/bench_pruning.py --device cuda --nsamples 128
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import pandas as pd
import torch

from wasserstein_neurons import (
    calibration_windows,
    evaluation_windows,
    load_model,
    load_tokens,
    perplexity,
)
from wasserstein_neurons.pruning import (
    PruneSpec,
    make_pruner,
    restore_weights,
    sequential_layerwise,
    sequential_prune,
    snapshot_weights,
)

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layer", type=int, default=5)
    p.add_argument("--role", default="gate")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--heldout-tokens", type=int, default=4096)
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--skip-matrix", action="store_true", help="skip part 1")
    p.add_argument("--skip-model", action="store_true", help="skip part 2")
    return p.parse_args(argv)


def machine_note() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


def bench_matrix(model, cal_tokens, eval_tokens, args, methods) -> pd.DataFrame:
    seqlen = args.seqlen
    n_cal = args.calib_tokens // seqlen
    n_ho = args.heldout_tokens // seqlen
    ids = torch.cat(
        [
            calibration_windows(cal_tokens, n_cal, seqlen, seed=args.seed),
            evaluation_windows(eval_tokens, seqlen, n_ho * seqlen),
        ]
    )
    inputs = {}

    def grab(ctx):
        inputs["x"] = ctx.collect_inputs(ctx.targets([args.role]))[args.role]

    t0 = time.perf_counter()
    sequential_layerwise(
        model, ids, grab, layers=[args.layer], batch_size=args.batch_size, progress=False
    )
    t_collect = time.perf_counter() - t0
    x = inputs["x"].to(torch.float32)
    x_cal, x_ho = x[: n_cal * seqlen], x[n_cal * seqlen :]
    w = model.adapter.weight(model.hf_model, args.layer, args.role).clone()
    y_ho = x_ho @ w.T
    print(
        f"  layer {args.layer} {args.role}: W {tuple(w.shape)}, {len(x_cal)} calibration and "
        f"{len(x_ho)} held-out tokens (collected in {t_collect:.1f} s)"
    )
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        pruner = make_pruner(method, w.shape[1], device=w.device)
        for chunk in x_cal.split(4096):
            pruner.add_batch(chunk)
        t_stats = time.perf_counter() - t0
        for s in args.sparsities:
            res = pruner.prune(w, PruneSpec(sparsity=s))
            err = torch.linalg.norm(y_ho - x_ho @ res.weight.T) / torch.linalg.norm(y_ho)
            rows.append(
                {
                    "method": method,
                    "sparsity": s,
                    "achieved": res.sparsity,
                    "stats_s": t_stats,
                    "prune_s": res.time_s,
                    "heldout_rel_err": float(err),
                }
            )
    return pd.DataFrame(rows)


def bench_model(model, cal_tokens, eval_tokens, args, methods) -> pd.DataFrame:
    cal = calibration_windows(cal_tokens, args.nsamples, args.seqlen, seed=args.seed)
    ev = evaluation_windows(eval_tokens, args.seqlen, args.eval_tokens)
    adapter = model.adapter
    pairs = [(layer, role) for layer in range(adapter.n_layers) for role in adapter.roles]
    snap = snapshot_weights(model, pairs)
    rows = []
    for use_sdpa in (False, True):
        r = perplexity(model, ev, use_sdpa=use_sdpa, progress=False)
        rows.append(
            {
                "method": f"dense ({r.backend})",
                "prune_pass_s": float("nan"),
                "matrices_s": float("nan"),
                "sparsity": 0.0,
                "ppl": r.perplexity,
                "ppl_s": r.seconds,
            }
        )
    for method in methods:
        t0 = time.perf_counter()
        summary = sequential_prune(
            model, cal, method, args.sparsity, batch_size=args.batch_size, progress=False
        )
        t_pass = time.perf_counter() - t0
        r = perplexity(model, ev, progress=False)
        rows.append(
            {
                "method": method,
                "prune_pass_s": t_pass,
                "matrices_s": summary.seconds.sum(),
                "sparsity": summary.sparsity.mean(),
                "ppl": r.perplexity,
                "ppl_s": r.seconds,
            }
        )
        restore_weights(snap)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print("bench_pruning —", machine_note())
    print("NOTE: the CPU is shared with other jobs; wall-clock times are indicative only.")
    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    cal_tokens = load_tokens(model.tokenizer, args.dataset, "calibration")
    eval_tokens = load_tokens(model.tokenizer, args.dataset, "evaluation")
    print(
        f"model {args.model} ({model.adapter.n_layers} layers, d_model {model.adapter.d_model}, "
        f"d_mlp {model.adapter.d_mlp}) on {args.device}; corpus {args.dataset}: "
        f"{len(cal_tokens)} calibration / {len(eval_tokens)} evaluation tokens "
        f"(loaded in {time.perf_counter() - t0:.1f} s)"
    )
    with pd.option_context("display.width", 120, "display.float_format", "{:.4f}".format):
        if not args.skip_matrix:
            print(f"\n[1] one matrix: layer {args.layer} {args.role}")
            print(bench_matrix(model, cal_tokens, eval_tokens, args, methods).to_string())
        if not args.skip_model:
            print(
                f"\n[2] whole-model MLP pruning at {args.sparsity:.0%}, "
                f"{args.nsamples} x {args.seqlen} calibration tokens, "
                f"perplexity on {args.eval_tokens} held-out tokens"
            )
            print(bench_model(model, cal_tokens, eval_tokens, args, methods).to_string())
    print("\nend —", machine_note())


if __name__ == "__main__":
    main()
