"""One self-contained GPU check, sized for one call of the ``device`` tool (< 8 min on an H200).

1. the test suite's CUDA-marked tests (``pytest -m cuda``), which are skipped on CPU machines;
2. a random-weight Llama-2-7B-shaped model in bf16 (built with ``bench_scale.build_model``):
   ``rank`` (4k tokens) and ``prune --method sparsegpt`` (16 × 512 calibration tokens) with
   ``--device cuda``, with the layers offloaded to host memory (``--offload cpu``) and without;
3. a TinyLlama-1.1B-shaped fp32 model: ``expand --experts 4`` on the GPU, offloaded and not
   (its experts pruned together, the CUDA default), then once more with
   ``--batched-experts off`` (one by one) to time what batching buys.

Prints one JSON line per step (return code, wall seconds, peak host RSS) and a summary::

    python experiments/gpu_check.py [--workdir /tmp/wn-gpu] [--skip-tests]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import build_model, measure

_EXPAND = ["--experts", "4", "--nsamples", "16", "--eval-tokens", "4096"]
#: (model, command, flags, offloads); the last step times the experts pruned one by one
#: against the batched default of the step before it (same perplexity within rounding)
STEPS = [
    ("7b", "rank", ["--tokens", "4096", "--dtype", "bfloat16"], ("cpu", None)),
    ("7b", "prune", ["--method", "sparsegpt", "--nsamples", "16", "--eval-tokens", "4096",
                     "--dtype", "bfloat16"], ("cpu", None)),
    ("1.1b", "expand", _EXPAND, ("cpu", None)),
    ("1.1b", "expand", [*_EXPAND, "--batched-experts", "off"], (None,)),
]  # fmt: skip


def run_cuda_tests() -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "tests"],
        capture_output=True,
        text=True,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    return {"step": "pytest -m cuda", "rc": proc.returncode,
            "wall_s": round(time.perf_counter() - start, 1), "tail": tail}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/wn-gpu")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: gpu_check needs a CUDA device")
    print(json.dumps({"device": torch.cuda.get_device_name(0)}), flush=True)
    rows = [] if args.skip_tests else [run_cuda_tests()]
    if rows:
        print(json.dumps(rows[-1]), flush=True)
    work = Path(args.workdir)
    for i, (model, command, extra, offloads) in enumerate(STEPS):
        folder = work / f"llama-{model}"
        start = time.perf_counter()
        build_model(model, folder)
        print(json.dumps({"built": model, "s": round(time.perf_counter() - start, 1)}), flush=True)
        for offload in offloads:
            out = work / "runs" / f"{i}-{model}-{command}-{offload or 'gpu'}"
            row = {"step": f"{model} {command} {' '.join(extra)}", "offload": offload}
            row.update(measure(folder, command, offload, [*extra, "--device", "cuda"], out))
            rows.append(row)
            print(json.dumps(row), flush=True)
    failed = [r for r in rows if r.get("rc") != 0]
    print(f"gpu_check: {len(rows) - len(failed)} of {len(rows)} steps passed")


if __name__ == "__main__":
    main()
