"""Capture throughput and peak memory on the embedded model.

Prints
- the time of a plain forward pass (HF model, and the bridge without hooks) over N tokens,
- the time to capture every layer's ``mlp.hook_pre`` for the same tokens to disk, and the ratio,
- the peak RSS of a fresh process capturing 8k tokens vs one capturing 64k tokens, and the ratio
  (target ≤ 1.3: memory must not grow with the token count).

Each measurement runs in its own subprocess so ``ru_maxrss`` is that job's own peak.

    python experiments/bench_capture.py [--small 8192] [--large 65536] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def child(mode: str, n_tokens: int, seqlen: int, batch_size: int) -> dict:
    import torch

    from wasserstein_neurons import capture_activations, load_model, load_tokens, sample_windows

    model = load_model()
    tokens = load_tokens(model.tokenizer, "embedded", "calibration")
    windows = sample_windows(tokens, n_tokens, seqlen, seed=0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "capture":
            with tempfile.TemporaryDirectory() as tmp:
                capture_activations(model, windows, tmp, batch_size=batch_size, progress=False)
        else:
            for i in range(0, len(windows), batch_size):
                batch = windows[i : i + batch_size]
                if mode == "forward-hf":
                    model.hf_model(batch, use_cache=False)
                else:
                    model.bridge(batch, return_type=None)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "tokens": int(windows.numel()),
        "seconds": seconds,
        "rss_before_gb": rss_before,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def run(mode: str, n_tokens: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--small",
        str(n_tokens),
        "--seqlen",
        str(args.seqlen),
        "--batch-size",
        str(args.batch_size),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=8192)
    p.add_argument("--large", type=int, default=65536)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.small, args.seqlen, args.batch_size)))
        return

    hf = run("forward-hf", args.small, args)
    br = run("forward-bridge", args.small, args)
    small = run("capture", args.small, args)
    print(
        f"tokens: {args.small} (seqlen {args.seqlen}, batch {args.batch_size}), "
        "hooks: blocks.*.mlp.hook_pre (30 layers, float16 store)"
    )
    print(f"plain forward, HF model       : {hf['seconds']:7.1f} s")
    print(f"plain forward, bridge no hooks: {br['seconds']:7.1f} s")
    print(
        f"capture to disk               : {small['seconds']:7.1f} s  "
        f"= {small['seconds'] / hf['seconds']:.2f}x HF forward, "
        f"{small['seconds'] / br['seconds']:.2f}x bridge forward"
    )
    print(f"capture throughput            : {small['tokens'] / small['seconds']:7.0f} tokens/s")
    large = run("capture", args.large, args)
    print(
        f"peak RSS capturing {small['tokens']:>6} tokens: {small['peak_rss_gb']:.2f} GB "
        f"(after loading model+corpus: {small['rss_before_gb']:.2f} GB)"
    )
    print(
        f"peak RSS capturing {large['tokens']:>6} tokens: {large['peak_rss_gb']:.2f} GB "
        f"(capture took {large['seconds']:.1f} s)"
    )
    print(
        f"RSS ratio large/small: {large['peak_rss_gb'] / small['peak_rss_gb']:.3f} (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
