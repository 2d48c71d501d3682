"""Every bad input found so far gets exactly one ``error:`` line and exit code 2: no
traceback, every file that existed before unchanged, and no folder left behind (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wasserstein_neurons.cli import main

SMALL = ["--seqlen", "32", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir, corpus):
    """A folder of things to be attacked: a finished rank run, a finished grid, damaged
    model folders and corpora, a file where a folder is expected."""
    root = tmp_path_factory.mktemp("world")
    base = ["--model", str(tiny_dir), "--dataset", str(corpus), *SMALL]
    assert main(["rank", *base, "--tokens", "512", "--out", str(root / "rank")]) == 0
    grid = ["--grid", "--grid-sparsities", "0.5", "--grid-experts", "1", "--nsamples", "4"]
    assert main(["expand", *base, *grid, "--eval-tokens", "256", "--out", str(root / "grid")]) == 0
    (root / "a_file").write_text("not a folder")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n\n".encode("latin-1") * 200)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    no_tok = root / "no_tokenizer"
    no_tok.mkdir()
    for f in Path(tiny_dir).iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tok / f.name).write_bytes(f.read_bytes())
    no_shards = root / "no_shards"
    no_shards.mkdir()
    (no_shards / "config.json").write_bytes((Path(tiny_dir) / "config.json").read_bytes())
    bad_cfg = root / "bad_config"
    bad_cfg.mkdir()
    for f in Path(tiny_dir).iterdir():
        (bad_cfg / f.name).write_bytes(f.read_bytes())
    (bad_cfg / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    _save_tiny(root / "mixtral", "mixtral", num_local_experts=4, num_experts_per_tok=2)
    _save_tiny(root / "ctrl", "ctrl", n_embd=64, n_layer=2, n_head=4, dff=128)
    broken_rank = root / "broken_rank"
    broken_rank.mkdir()
    (broken_rank / "config.json").write_text("{not json")
    (broken_rank / "neurons.csv").write_text("layer,neuron\n")
    return {"root": root, "tiny": str(tiny_dir), "corpus": str(corpus)}


def _save_tiny(path: Path, model_type: str, **kw) -> None:
    """A tiny random model folder of ``model_type`` with the test tokenizer."""
    from conftest import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    if "n_embd" not in kw:
        kw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        kw.update(num_attention_heads=4, num_key_value_heads=2)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **kw)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _args(w, command, out, *extra, corpus=None, model=None):
    return [
        command,
        "--model",
        model or w["tiny"],
        "--dataset",
        corpus or w["corpus"],
        *SMALL,
        "--out",
        out,
        *extra,
    ]


GRID = ["--grid", "--grid-sparsities", "0.5", "--grid-experts", "1", "--eval-tokens", "256"]

# (case id, argv from the world, words the error line must contain)
CASES = [
    (
        "mixture-of-experts model",
        lambda w, r: _args(w, "rank", r("new"), model=str(w["root"] / "mixtral")),
        "'mixtral' is mapped by TransformerLens but has no dense MLP neurons here: its MLP is "
        "a mixture of experts",
    ),
    (
        "offload of a folder without safetensors",
        lambda w, r: _args(
            w, "rank", r("new"), "--offload", "disk", model=str(w["root"] / "no_shards")
        ),
        "offload needs safetensors shards",
    ),
    (
        "unknown offload mode",
        lambda w, r: _args(w, "prune", r("new"), "--offload", "tape"),
        "unknown offload 'tape'; valid: none, cpu, disk",
    ),
    (
        "architecture the bridge does not map",
        lambda w, r: _args(w, "prune", r("new"), model=str(w["root"] / "ctrl")),
        "does not map the architecture CTRLLMHeadModel",
    ),
    (
        "seqlen beyond context",
        lambda w, r: _args(w, "rank", r("new"), "--seqlen", "512", "--tokens", "1024"),
        "longer than the context",
    ),
    ("seqlen 0", lambda w, r: _args(w, "rank", r("new"), "--seqlen", "0"), "--seqlen must be"),
    ("seqlen -1", lambda w, r: _args(w, "rank", r("new"), "--seqlen", "-1"), "--seqlen must be"),
    (
        "batch size 0",
        lambda w, r: _args(w, "rank", r("new"), "--batch-size", "0"),
        "--batch-size must be",
    ),
    ("empty --out", lambda w, r: _args(w, "rank", ""), "must name a folder"),
    ("--out is a file", lambda w, r: _args(w, "rank", r("a_file")), "is a file"),
    ("--out under a file", lambda w, r: _args(w, "rank", r("a_file/run")), "is a file"),
    ("--out not writable", lambda w, r: _args(w, "rank", "/sys/wn_run"), "/sys"),
    (
        "--save is a file",
        lambda w, r: _args(w, "prune", r("new"), "--method", "magnitude", "--save", r("a_file")),
        "is a file",
    ),
    (
        "device cuda without CUDA",  # every case runs with torch.cuda.is_available() False
        lambda w, r: _args(w, "rank", r("new"), "--device", "cuda"),
        "device 'cuda' requested but torch sees no CUDA device",
    ),
    (
        "device cuda:1 without CUDA",
        lambda w, r: _args(w, "prune", r("new"), "--device", "cuda:1", "--dtype", "bfloat16"),
        "device 'cuda' requested but torch sees no CUDA device",
    ),
    (
        "dtype float8",
        lambda w, r: _args(w, "expand", r("new"), "--dtype", "float8"),
        "unknown dtype 'float8'",
    ),
    (
        "device tpu9",
        lambda w, r: _args(w, "rank", r("new"), "--device", "tpu9"),
        "unknown device 'tpu9'",
    ),
    ("empty hooks", lambda w, r: _args(w, "rank", r("new"), "--hooks", ","), "no hook named"),
    (
        "binary corpus",
        lambda w, r: _args(w, "rank", r("new"), corpus=r("binary.txt")),
        "binary.txt is not UTF-8",
    ),
    (
        "latin-1 corpus",
        lambda w, r: _args(w, "rank", r("new"), corpus=r("latin1.txt")),
        "latin1.txt is not UTF-8",
    ),
    (
        "grid experts 1,x",
        lambda w, r: _args(w, "expand", r("new"), "--grid-experts", "1,x"),
        "expected comma-separated integers",
    ),
    (
        "n:m 2:3",
        lambda w, r: _args(w, "prune", r("new"), "--prunen", "2", "--prunem", "3"),
        "prunem must divide",
    ),
    ("seed -1", lambda w, r: _args(w, "rank", r("new"), "--seed", "-1"), "--seed must be"),
    (
        "broken --ranking",
        lambda w, r: _args(w, "ablate", r("new"), "--ranking", r("broken_rank")),
        "not valid JSON",
    ),
    (
        "model without tokenizer",
        lambda w, r: _args(w, "rank", r("new"), model=r("no_tokenizer")),
        "could not load the model folder",
    ),
    (
        "model with bad config",
        lambda w, r: _args(w, "rank", r("new"), model=r("bad_config")),
        "could not load the model folder",
    ),
    ("wbits 33", lambda w, r: _args(w, "prune", r("new"), "--wbits", "33"), "wbits must be"),
    (
        "empty neuron sparsity",
        lambda w, r: _args(w, "ablate", r("new"), "--neuron-sparsity", ""),
        "expected comma-separated numbers",
    ),
    (
        "unknown flag",
        lambda w, r: _args(w, "rank", r("new"), "--tokenz", "5"),
        "unrecognized arguments",
    ),
    (
        "resume without grid",
        lambda w, r: _args(w, "expand", r("grid"), "--resume"),
        "pass it with --grid",
    ),
    (
        "batched experts neither auto, on nor off",
        lambda w, r: _args(w, "expand", r("new"), "--batched-experts", "yes"),
        "expected auto, on or off, got 'yes'",
    ),
    (
        "unknown engine",
        lambda w, r: _args(w, "expand", r("new"), *GRID, "--engine", "spark"),
        "unknown engine 'spark'",
    ),
    (
        "ray address without ray",
        lambda w, r: _args(w, "expand", r("new"), *GRID, "--ray-address", "1.2.3.4:6379"),
        "--ray-address needs --engine ray",
    ),
    (
        "zero trial cpus",
        lambda w, r: _args(w, "expand", r("new"), *GRID, "--trial-cpus", "0"),
        "--trial-cpus must be > 0",
    ),
    (
        "ray without grid",
        lambda w, r: _args(w, "expand", r("new"), "--engine", "ray"),
        "pass it with --grid",
    ),
    # runs that exist
    ("finished run kept", lambda w, r: _args(w, "rank", r("rank")), "already holds a finished"),
    (
        "overwrite + bad hooks",
        lambda w, r: _args(w, "rank", r("rank"), "--overwrite", "--hooks", "bogus"),
        "unknown hook",
    ),
    (
        "overwrite + model typo",
        lambda w, r: _args(w, "rank", r("rank"), "--overwrite", model="smollm2-135M"),
        "could not load model",
    ),
    (
        "overwrite + dataset typo",
        lambda w, r: _args(w, "prune", r("rank"), "--overwrite", corpus="wikitxt2"),
        "wikitxt2",
    ),
    (
        "not a run folder",
        lambda w, r: _args(w, "rank", r("notes"), "--overwrite"),
        "holds files but no run record",
    ),
    (
        "grid resume takes a rank run",
        lambda w, r: _args(w, "expand", r("rank"), *GRID, "--resume"),
        "holds a rank run",
    ),
    (
        "grid resume, other settings",
        lambda w, r: _args(w, "expand", r("grid"), *GRID, "--resume", "--nsamples", "8"),
        "nsamples: 4 -> 8",
    ),
    (
        "grid resume, other model",
        lambda w, r: _args(
            w, "expand", r("grid"), *GRID, "--resume", "--nsamples", "4", model=r("bad_config")
        ),
        "was made with other settings (model: ",
    ),
    (
        "overwrite and resume",
        lambda w, r: _args(w, "expand", r("grid"), *GRID, "--resume", "--overwrite"),
        "exclude each other",
    ),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_error_line(world, capsys, monkeypatch, argv, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    root = world["root"]
    before = _files(root)
    names = {p.name for p in root.iterdir()}
    code = main(argv(world, lambda name: str(root / name)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and words in lines[0], lines[0]
    assert _files(root) == before  # every pre-existing byte unchanged
    assert {p.name for p in root.iterdir()} == names  # nothing left behind


def test_resume_mismatch_names_every_key(world, capsys):
    """Resuming with another model *and* other windows names both (the model is checked
    before it is loaded)."""
    root = world["root"]
    argv = _args(
        world,
        "expand",
        str(root / "grid"),
        *GRID,
        "--resume",
        "--nsamples",
        "8",
        "--seed",
        "3",
        model="someone/else",
    )
    assert main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert "model: " in line and "nsamples: 4 -> 8" in line and "seed: 0 -> 3" in line
    assert json.loads((root / "grid" / "config.json").read_text())["finished"] is True
