"""The ``wasserstein-neurons`` CLI on a tiny local model and a text-file corpus."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from wasserstein_neurons.cli import main


def _rank(tiny_dir, corpus, out, *extra):
    return main(
        [
            "rank",
            "--model",
            str(tiny_dir),
            "--dataset",
            str(corpus),
            "--tokens",
            "1024",
            "--seqlen",
            "64",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_rank_end_to_end(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _rank(tiny_dir, corpus, out, "--hooks", "hook_pre,hook_pre_linear") == 0
    printed = capsys.readouterr().out
    assert "Top Wasserstein neurons" in printed
    df = pd.read_csv(out / "neurons.csv")
    assert {"layer", "hook", "neuron", "wd", "mean", "std", "skew", "kurtosis", "n_tokens"} <= set(
        df.columns
    )
    assert len(df) == 2 * 2 * 128 and (df["n_tokens"] == 1024).all()
    top = pd.read_csv(out / "top_neurons.csv")
    assert (top.groupby("hook").size() == 4).all()  # round(3% of 128) = 4
    config = json.loads((out / "config.json").read_text())
    assert config["finished"] and config["n_tokens"] == 1024 and config["config"]["seed"] == 0
    assert config["versions"]["torch"]
    for png in ("wd_by_layer.png", "top_neuron.png"):
        assert (out / png).stat().st_size > 1000
    assert (out / "activations" / "meta.json").is_file()


def test_existing_run_is_refused_and_kept(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert _rank(tiny_dir, corpus, out) == 0
    before = (out / "neurons.csv").read_bytes()
    capsys.readouterr()
    assert _rank(tiny_dir, corpus, out, "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run" in err[0]
    assert (out / "neurons.csv").read_bytes() == before
    assert _rank(tiny_dir, corpus, out, "--seed", "1", "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hooks", "hook_nope"], "unknown hook"),
        (["--top-percent", "0"], "top_percent must be in"),
        (["--top-percent", "150"], "top_percent must be in"),
        (["--method", "magic"], "unknown method"),
        (["--tokens", "100000"], "corpus split holds only"),
        (["--exclude-positions", "-1"], "--exclude-positions must be an integer >= 0"),
        (["--exclude-positions", "64"], "must be smaller than --seqlen (64)"),
    ],
)
def test_bad_input_one_clear_line(tiny_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert _rank(tiny_dir, corpus, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (out / "config.json").exists()


def test_rank_position_flags_recorded(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--exclude-positions", "2", "--exclude-special", "--bos"]
    assert _rank(tiny_dir, corpus, out, *flags) == 0
    assert "position_artefact" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["exclude_positions"] == 2
    assert config["config"]["exclude_special"] is True and config["config"]["bos"] is True
    assert config["n_tokens"] == 1024 and config["n_tokens_kept"] == 1024 - 2 * 16
    df = pd.read_csv(out / "neurons.csv")
    assert (df["n_tokens"] == 1024 - 2 * 16).all()
    assert {"first_pos_share", "position_artefact"} <= set(df.columns)
    assert "position_artefact" in pd.read_csv(out / "top_neurons.csv").columns
    # the defaults are recorded too
    assert _rank(tiny_dir, corpus, tmp_path / "plain") == 0
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())["config"]
    assert (plain["exclude_positions"], plain["exclude_special"], plain["bos"]) == (0, False, False)


def test_unknown_model_one_clear_line(tmp_path, capsys):
    assert main(["rank", "--model", "nobody/nothing", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not load model 'nobody/nothing'" in err[0]


def _tiny_args(tiny_dir, corpus):
    return ["--model", str(tiny_dir), "--dataset", str(corpus), "--seqlen", "32", "--no-progress"]


def test_eval_prints_perplexity(tiny_dir, corpus, capsys):
    assert main(["eval", *_tiny_args(tiny_dir, corpus), "--eval-tokens", "128"]) == 0
    out = capsys.readouterr().out
    # 128 tokens = 4 windows of 32, each scoring 31 next-token predictions
    assert "perplexity" in out and "124 scored tokens" in out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_writes_csv(tiny_dir, corpus, tmp_path, capsys, method):
    out = tmp_path / "prune"
    assert (
        main(
            [
                "prune",
                *_tiny_args(tiny_dir, corpus),
                "--method",
                method,
                "--sparsity",
                "0.5",
                "--nsamples",
                "4",
                "--eval-tokens",
                "128",
                "--out",
                str(out),
                "--save",
                str(tmp_path / "saved"),
            ]
        )
        == 0
    )
    row = pd.read_csv(out / "prune.csv").iloc[0]
    assert row["method"] == method and row["sparsity"] == 0.5
    assert row["perplexity_after"] != row["perplexity_before"]
    assert abs(row["achieved_sparsity"] - 0.5) < 1e-6
    layers = pd.read_csv(out / "layers.csv")
    assert set(layers["role"]) == {"gate", "up", "down"} and len(layers) == 6
    # the saved model reloads with the pruned weights
    from wasserstein_neurons.models import load_model

    saved = load_model(str(tmp_path / "saved"))
    w = saved.adapter.weight(saved.hf_model, 1, "down")
    assert abs((w == 0).float().mean().item() - 0.5) < 1e-6


def test_prune_nm(tiny_dir, corpus, tmp_path):
    out = tmp_path / "prune"
    assert (
        main(
            [
                "prune",
                *_tiny_args(tiny_dir, corpus),
                "--method",
                "wanda",
                "--prunen",
                "2",
                "--prunem",
                "4",
                "--nsamples",
                "2",
                "--eval-tokens",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    row = pd.read_csv(out / "prune.csv").iloc[0]
    assert row["sparsity"] == 0.5 and abs(row["achieved_sparsity"] - 0.5) < 1e-9


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        (["--prunen", "4", "--prunem", "2"], "malformed n:m"),
        (["--prunen", "2"], "malformed n:m"),
        (["--method", "obs"], "unknown pruning method"),
        (["--method", "wanda", "--wbits", "4"], "only supported with --method sparsegpt"),
        (["--eval-tokens", "10"], "--eval-tokens"),
    ],
)
def test_prune_bad_input(tiny_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "prune"
    assert main(["prune", *_tiny_args(tiny_dir, corpus), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "config.json").exists()


def test_ablate_reuses_ranking(tiny_dir, corpus, tmp_path, capsys):
    rank_out = tmp_path / "rank"
    assert _rank(tiny_dir, corpus, rank_out) == 0
    out = tmp_path / "ablate"
    assert (
        main(
            [
                "ablate",
                *_tiny_args(tiny_dir, corpus),
                "--ranking",
                str(rank_out),
                "--strategies",
                "wd-top,random,wd-bottom,norm",
                "--seeds",
                "2",
                "--neuron-sparsity",
                "0.5,0.9",
                "--method",
                "magnitude",
                "--top-percent",
                "5",
                "--nsamples",
                "2",
                "--eval-tokens",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    df = pd.read_csv(out / "ablation.csv")
    assert {"strategy", "seed", "top_percent", "neuron_sparsity", "method", "perplexity"} <= set(
        df.columns
    )
    assert len(df) == 1 + 2 * (1 + 2 + 1 + 1)
    assert (out / "ablation.png").stat().st_size > 1000
    assert "wd-top" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strategies", "wd-top,best"], "unknown strategy best"),
        (["--neuron-sparsity", "0.5,1.5"], "sparsity must be in [0, 1)"),
        (["--method", "random"], "unknown pruning method"),
        (["--ranking", "/nonexistent/run"], "not a run folder"),
        (["--exclude-positions", "32"], "must be smaller than --seqlen"),
    ],
)
def test_ablate_bad_input(tiny_dir, corpus, tmp_path, capsys, extra, message):
    assert (
        main(["ablate", *_tiny_args(tiny_dir, corpus), "--out", str(tmp_path / "a"), *extra]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_disentangle_cli(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "dis"
    assert (
        main(
            [
                "disentangle",
                *_tiny_args(tiny_dir, corpus),
                "--layer",
                "1",
                "--experts",
                "1,2",
                "--sparsity",
                "0.5",
                "--nsamples",
                "8",
                "--eval-tokens",
                "128",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    df = pd.read_csv(out / "neurons.csv")
    assert {"neuron", "wd", "err_sparsegpt", "ri_k2", "mapping_difficulty"} <= set(df.columns)
    assert "spearman_ri_wd" in capsys.readouterr().out
    assert (
        main(
            [
                "disentangle",
                *_tiny_args(tiny_dir, corpus),
                "--layer",
                "9",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of range" in err[0]


def test_disentangle_bad_exclude_positions(tiny_dir, corpus, tmp_path, capsys):
    args = ["disentangle", *_tiny_args(tiny_dir, corpus), "--out", str(tmp_path / "d")]
    assert main([*args, "--exclude-positions", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --exclude-positions must be")


def test_expand_cli(tiny_dir, corpus, tmp_path, capsys):
    out = tmp_path / "expand"
    assert (
        main(
            [
                "expand",
                *_tiny_args(tiny_dir, corpus),
                "--experts",
                "2",
                "--sparsity",
                "0.5",
                "--nsamples",
                "8",
                "--eval-tokens",
                "128",
                "--kmeans-restarts",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    df = pd.read_csv(out / "results.csv")
    assert {"method", "experts", "sparsity", "perplexity", "flops_per_token", "params"} <= set(
        df.columns
    )
    assert set(df["experts"]) >= {1, 2}
    assert (
        main(
            [
                "expand",
                *_tiny_args(tiny_dir, corpus),
                "--prunen",
                "3",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "malformed n:m" in capsys.readouterr().err
