"""The ``wasserstein-neurons`` CLI on a tiny local model and a text-file corpus."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import TINY_TEXT, make_config, make_tokenizer

from wasserstein_neurons.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("llama", len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    sentences = TINY_TEXT.split(". ")
    docs = [". ".join(sentences[i : i + 6]) + f" document {i}." for i in range(len(sentences))]
    path.write_text("\n\n".join(docs * 4))
    return path


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
    ],
)
def test_bad_input_one_clear_line(tiny_dir, corpus, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert _rank(tiny_dir, corpus, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (out / "config.json").exists()


def test_unknown_model_one_clear_line(tmp_path, capsys):
    assert main(["rank", "--model", "nobody/nothing", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not load model 'nobody/nothing'" in err[0]
