"""Shared fixtures: tiny random models of each supported family, built offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped (and reported as skipped) without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run experiments/gpu_check.py on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Neurons in language models respond to "
    "tokens; some respond to many unrelated contexts. Wasserstein distances measure how far "
    "a distribution is from a Gaussian. Sparse experts route each token to a cluster. "
) * 20


_TOKENIZER_DIR: list[str] = []


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a short text (~300 tokens of vocabulary).

    It is saved once to a temporary folder and reloaded from there, because TransformerLens
    re-opens the tokenizer by its ``name_or_path``.
    """
    import atexit
    import shutil
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _TOKENIZER_DIR:
        return AutoTokenizer.from_pretrained(_TOKENIZER_DIR[0])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>")
    _TOKENIZER_DIR.append(tempfile.mkdtemp(prefix="wn-tiny-tokenizer-"))
    atexit.register(shutil.rmtree, _TOKENIZER_DIR[0], True)  # one folder per test process
    fast.save_pretrained(_TOKENIZER_DIR[0])
    return AutoTokenizer.from_pretrained(_TOKENIZER_DIR[0])


def make_config(family: str, vocab_size: int, n_layers: int = 2):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_inner=128,
            n_layer=n_layers,
            n_head=4,
            n_positions=256,
        )
    raise ValueError(family)


def make_tiny_model(family: str = "llama", seed: int = 0, device: str = "cpu", dtype="float32"):
    """A ``LoadedModel`` around a tiny random HF model of ``family`` (no downloads).

    The random weights are drawn in float32 whatever ``dtype`` is, so the same ``seed`` gives
    the same model in every dtype (up to the rounding of its parameters)."""
    from transformers import AutoModelForCausalLM

    from wasserstein_neurons.models import load_model

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(make_config(family, len(tokenizer)))
    return load_model(
        f"tiny-{family}", device=device, dtype=dtype, hf_model=hf, tokenizer=tokenizer
    )


FAMILIES = ("llama", "gpt_neox", "gpt2")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny models gain nothing from threads, and SparseGPT's
    rounding depends on the count (bit-exact comparisons need the same one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=FAMILIES)
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def tiny_tokenizer():
    return make_tokenizer()


def saved_expansion_tensors(folder) -> dict:
    """Every tensor of a folder written by ``save_expanded`` (its per-layer files merged)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("expansion-*.safetensors")):
        out.update(load_file(str(f)))
    return out


def save_tiny_model(path, family: str = "llama", seed: int = 0):
    """Save a tiny random ``family`` model and its tokenizer as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(make_config(family, len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama saved as a local Hugging Face folder (model + tokenizer)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text-file corpus of blank-line separated documents."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    sentences = TINY_TEXT.split(". ")
    docs = [". ".join(sentences[i : i + 6]) + f" document {i}." for i in range(len(sentences))]
    path.write_text("\n\n".join(docs * 4))
    return path


# ------------------------------------------------------------------ reference forward passes


def _forward_with_hook(model, ids, register, batch_size: int) -> None:
    """Run the HF model over ``ids`` in batches with the pre-hook ``register()`` attached."""
    handle = register()
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch_size):
                model.hf_model(ids[i : i + batch_size], use_cache=False)
    finally:
        handle.remove()


def layer_input(model, layer, ids, batch_size=4):
    """Hidden states entering decoder ``layer`` in the model's full forward ``[n, seq, d]``."""
    chunks = []

    def hook(module, args, kwargs):
        chunks.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    layer_module = model.adapter.decoder_layers(model.hf_model)[layer]
    register = lambda: layer_module.register_forward_pre_hook(hook, with_kwargs=True)  # noqa: E731
    _forward_with_hook(model, ids, register, batch_size)
    return torch.cat(chunks)


def module_inputs(model, module, ids, batch_size=4):
    """Inputs ``[tokens, in]`` of ``module`` in the model's full forward."""
    chunks = []

    def hook(m, a):
        chunks.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())

    _forward_with_hook(model, ids, lambda: module.register_forward_pre_hook(hook), batch_size)
    return torch.cat(chunks)


def manual_forward(layer, x):
    """Per-token reference: y_t = W_{e(t)} x_t + b (numpy float64, independent of the module)."""
    ids = layer.router.route(x).cpu().numpy()
    w = layer.dense_weights().double().cpu().numpy()
    xn = x.double().cpu().numpy()
    y = np.stack([w[e] @ xt for e, xt in zip(ids, xn, strict=True)])
    if layer.bias is not None:
        y += layer.bias.double().detach().cpu().numpy()
    if layer.expert_bias is not None:
        y += layer.expert_bias.double().detach().cpu().numpy()[ids]
    return y, ids


# ------------------------------------------------------------------ runs for the dashboard


@pytest.fixture(scope="module")
def report_runs(tiny_dir, corpus, tmp_path_factory):
    """A small rank run (tiny Llama, 2 layers x 128 neurons, 1024 tokens; activations kept)
    and a disentangle run of its layer 1, for ``wasserstein-neurons report`` tests."""
    import warnings

    from wasserstein_neurons.workflows import (
        DisentangleConfig,
        RankConfig,
        run_disentangle,
        run_rank,
    )

    root = tmp_path_factory.mktemp("report-runs")
    common = dict(model=str(tiny_dir), dataset=str(corpus), seqlen=32)
    rank = run_rank(
        RankConfig(out=str(root / "rank"), tokens=1024, top_percent=5.0, **common),
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few calibration tokens per expert
        run_disentangle(
            DisentangleConfig(
                out=str(root / "disentangle"),
                layer=1,
                experts="1,2",
                sparsity=0.5,
                nsamples=8,
                eval_tokens=128,
                kmeans_restarts=1,
                mapping_pairs=200,
                plot_neurons=2,
                **common,
            ),
            progress=False,
        )
    return {"rank": rank.out, "disentangle": root / "disentangle", "root": root}
