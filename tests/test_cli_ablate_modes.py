"""``wasserstein-neurons ablate --mode ...`` on a tiny local model: flags, table, errors."""

from __future__ import annotations

import pandas as pd
import pytest

from wasserstein_neurons.cli import main


def _args(tiny_dir, corpus, out, *extra):
    return [
        "ablate",
        "--model",
        str(tiny_dir),
        "--dataset",
        str(corpus),
        "--seqlen",
        "32",
        "--tokens",
        "256",
        "--eval-tokens",
        "64",
        "--nsamples",
        "2",
        "--top-percent",
        "5",
        "--seeds",
        "1",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_ablate_activation_modes(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "a"
    extra = [
        "--mode",
        "zero,resample,threshold",
        "--strategies",
        "wd-top,random",
        "--sign",
        "positive",
        "--activation-sparsity",
        "0.5,0.7",
        "--threshold-scope",
        "selected,complement",
        "--threshold-rule",
        "channel,uniform",
        "--stats-tokens",
        "32",
    ]
    assert main(_args(tiny_dir, corpus, out, *extra)) == 0
    df = pd.read_csv(out / "ablation.csv", keep_default_na=False)
    assert list(dict.fromkeys(df["mode"])) == ["dense", "zero", "resample", "threshold"]
    assert len(df) == 1 + 2 + 2 + 2 * 2 * 2 * 2
    assert set(df.loc[df["mode"] == "threshold", "rule"]) == {"channel", "uniform"}
    assert set(df.loc[df["mode"] == "zero", "sign"]) == {"positive"}
    assert "threshold" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mode", "scramble"], "unknown mode scramble; valid: weights, zero, mean"),
        (["--mode", "threshold", "--activation-sparsity", "1"], "activation sparsity must be in"),
        (["--mode", "threshold", "--activation-sparsity", "-0.2"], "must be in [0, 1)"),
        (["--mode", "mean", "--sign", "negative"], "--sign applies only to --mode zero"),
        (["--sign", "negative"], "--sign applies only to --mode zero"),
        (["--activation-sparsity", "0.5"], "--activation-sparsity applies only to --mode thr"),
        (["--mode", "threshold", "--threshold-scope", "half"], "unknown threshold scope half"),
        (["--mode", "zero", "--hook", "hook_mid"], "unknown hook 'hook_mid'"),
    ],
)
def test_ablate_mode_bad_input(tiny_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(_args(tiny_dir, corpus, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("error: "), err
    assert not (out / "config.json").exists()
