"""Sweeps on Ray Tune (issue 13): the grid gives the same table under both engines, a killed
Ray sweep resumes under either engine, and bad engine settings are one clear error.

Skipped, with the reason, when the ``distributed`` extra (``ray[tune]``) is not installed;
the README's test command installs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from wasserstein_neurons import trials
from wasserstein_neurons.cli import main
from wasserstein_neurons.workflows import ExpandConfig, run_grid

ray = pytest.importorskip("ray", reason="the 'distributed' extra (ray[tune]) is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::wasserstein_neurons.expansion.SmallClusterWarning")


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs for the module; yields its address."""
    trials._init_ray(None)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _grid_cfg(tiny_dir, corpus, out, **kw) -> ExpandConfig:
    base = dict(
        model=str(tiny_dir),
        dataset=str(corpus),
        seqlen=32,
        nsamples=4,
        eval_tokens=512,
        grid_sparsities=("0.5",),
        grid_experts=(1,),
        out=str(out),
    )
    return ExpandConfig(**{**base, **kw})


def _same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    keys = ["method", "experts", "pattern"]
    assert a[keys].astype(str).values.tolist() == b[keys].astype(str).values.tolist()
    pd.testing.assert_series_equal(a["perplexity"], b["perplexity"], rtol=1e-6)
    pd.testing.assert_series_equal(a["params"], b["params"])


def test_grid_is_the_same_under_both_engines(ray_cluster, tiny_dir, corpus, tmp_path):
    """4 cells (dense, magnitude, wanda, SparseGPT at 0.5) as two 1-CPU trials at a time."""
    local = run_grid(_grid_cfg(tiny_dir, corpus, tmp_path / "local"), progress=False)
    on_ray = run_grid(
        _grid_cfg(tiny_dir, corpus, tmp_path / "ray", engine="ray", trial_cpus=1),
        progress=False,
    )
    assert len(local) == 4
    _same_table(local, on_ray)
    saved = pd.read_csv(tmp_path / "ray" / "results.csv", dtype={"pattern": str})
    _same_table(saved, local)


def _rows(path) -> int:
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def test_killed_ray_sweep_resumes_locally(ray_cluster, tiny_dir, corpus, tmp_path):
    out = tmp_path / "grid"
    flags = ["expand", "--model", str(tiny_dir), "--dataset", str(corpus), "--seqlen", "32"]
    flags += ["--nsamples", "4", "--eval-tokens", "512", "--no-progress", "--grid"]
    flags += ["--grid-sparsities", "0.5,0.7,0.9", "--grid-experts", "1,2", "--out", str(out)]
    code = "import sys; from wasserstein_neurons.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *flags, "--engine", "ray", "--ray-address", ray_cluster],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while _rows(out / "results.csv") < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the Ray sweep produced no rows in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep, trials still running
    proc.wait()
    kept = pd.read_csv(out / "results.csv", dtype={"pattern": str})
    assert 2 <= len(kept) < 1 + 3 * 4
    assert main([*flags, "--resume"]) == 0  # finished by the local engine
    resumed = pd.read_csv(out / "results.csv", dtype={"pattern": str})
    fresh = run_grid(
        _grid_cfg(
            tiny_dir,
            corpus,
            tmp_path / "fresh",
            grid_sparsities=("0.5", "0.7", "0.9"),
            grid_experts=(1, 2),
        ),
        progress=False,
    )
    _same_table(resumed, fresh)
    for _, row in kept.iterrows():  # the Ray rows were kept, not recomputed
        match = resumed[
            (resumed["method"] == row["method"])
            & (resumed["pattern"] == row["pattern"])
            & (resumed["experts"] == row["experts"])
        ]
        assert match["build_seconds"].iloc[0] == row["build_seconds"]


def test_unreachable_address_fails_fast(tiny_dir, corpus, tmp_path, capsys):
    t0 = time.monotonic()
    argv = ["expand", "--model", str(tiny_dir), "--grid", "--engine", "ray"]
    assert main([*argv, "--ray-address", "127.0.0.1:9", "--out", str(tmp_path / "x")]) == 2
    assert time.monotonic() - t0 < 15
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: cannot reach the Ray cluster at 127.0.0.1:9")
    assert not (tmp_path / "x").exists()


def test_missing_extra_names_it(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    argv = ["expand", "--model", str(tiny_dir), "--grid", "--engine", "ray"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    line = capsys.readouterr().err.strip()
    assert "'distributed' extra" in line and "wasserstein_neurons[distributed]" in line


def test_sweep_is_the_same_under_both_engines(ray_cluster, tiny_dir, corpus, tmp_path):
    import json

    from wasserstein_neurons.workflows.sweep import load_sweep, run_sweep

    spec = {
        "models": [str(tiny_dir)],
        "settings": {"dataset": str(corpus), "seqlen": 32, "eval_tokens": 256, "nsamples": 4},
        "runs": [{"workflow": "prune", "grid": {"method": ["magnitude", "wanda"]}}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    local = run_sweep(load_sweep(path, out=str(tmp_path / "local")), progress=False)
    on_ray = run_sweep(
        load_sweep(path, out=str(tmp_path / "ray"), engine="ray", ray_address=ray_cluster),
        progress=False,
    )
    assert list(local["trial"]) == list(on_ray["trial"]) and len(local) == 2
    pd.testing.assert_series_equal(local["perplexity_after"], on_ray["perplexity_after"], rtol=1e-6)


def test_ablation_is_the_same_under_both_engines(ray_cluster, tiny_dir, corpus, tmp_path):
    base = ["ablate", "--model", str(tiny_dir), "--dataset", str(corpus), "--seqlen", "32"]
    base += ["--nsamples", "4", "--eval-tokens", "256", "--tokens", "512", "--no-progress"]
    base += ["--strategies", "wd-top,random", "--seeds", "2", "--mode", "weights,zero,threshold"]
    base += ["--activation-sparsity", "0.5", "--threshold-scope", "selected,all"]
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    ray_flags = ["--engine", "ray", "--ray-address", ray_cluster, "--out", str(tmp_path / "ray")]
    assert main([*base, *ray_flags]) == 0
    local = pd.read_csv(tmp_path / "local" / "ablation.csv")
    on_ray = pd.read_csv(tmp_path / "ray" / "ablation.csv")
    keys = ["strategy", "seed", "mode"]
    assert local[keys].astype(str).values.tolist() == on_ray[keys].astype(str).values.tolist()
    # dense; weights, zero and selected thresholding x (wd-top + 2 random seeds); all-neuron one
    assert len(local) == 1 + 3 * (1 + 2) + 1
    pd.testing.assert_series_equal(local["perplexity"], on_ray["perplexity"], rtol=1e-6)
