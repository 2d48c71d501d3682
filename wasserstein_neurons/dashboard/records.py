"""Neuron records: one JSON file per neuron page, laid out like OpenAI neuron-explainer's.

``neurons/<layer>_<neuron>.json`` holds the fields of neuron-explainer's ``NeuronRecord``
(``neuron_id``, ``random_sample``, ``random_sample_by_quantile``, ``quantile_boundaries``,
``mean``, ``variance``, ``skewness``, ``kurtosis``, ``most_positive_activation_records``), each
activation record an ``{"tokens": [str], "activations": [float]}`` object tagged with the
``dataclass_name`` keys that neuron-explainer's ``fast_dataclasses.loads`` reads, plus two keys
of this project:

``most_negative_activation_records``
    The other tail (Wasserstein neurons are heavy-tailed on either side).
``wasserstein_neurons``
    ``schema_version``, the ranking row (``hook``, ``layer``, ``neuron``, ``wd``, ``wd_rank``,
    ``layer_neurons``, ``is_top``, ``std``, ``n_tokens``, ``first_pos_share``,
    ``position_artefact``), ``quantile_levels``, the ``run`` (model, corpus, tokens) and, for
    every activation record in the same order, where it comes from (``records``: ``position``
    store row, ``window``, ``start`` window position of its first token, ``target`` index of the
    chosen token).

A reader that builds neuron-explainer's own ``NeuronRecord`` drops these two keys first.
:data:`SCHEMA` is the JSON Schema (draft 2020-12) the files follow; the site ships it as
``neuron_record.schema.json`` and README's "Neuron records" section documents it.
"""

from __future__ import annotations

import math

from .neuron import ActivationRecord, NeuronData

SCHEMA_VERSION = 1

_ACTIVATION_RECORD = {
    "type": "object",
    "required": ["dataclass_name", "tokens", "activations"],
    "additionalProperties": False,
    "properties": {
        "dataclass_name": {"const": "ActivationRecord"},
        "tokens": {"type": "array", "items": {"type": "string"}},
        "activations": {"type": "array", "items": {"type": "number"}},
    },
}
_RECORDS = {"type": "array", "items": {"$ref": "#/$defs/ActivationRecord"}}
_ORIGIN = {
    "type": "object",
    "required": ["position", "window", "start", "target"],
    "properties": {
        k: {"type": "integer", "minimum": 0} for k in ("position", "window", "start", "target")
    },
}
_ORIGINS = {"type": "array", "items": {"$ref": "#/$defs/Origin"}}
_NUMBER_OR_NULL = {"type": ["number", "null"]}

#: JSON Schema of a neuron record (draft 2020-12).
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "wasserstein_neurons neuron record",
    "type": "object",
    "required": [
        "dataclass_name",
        "neuron_id",
        "random_sample",
        "random_sample_by_quantile",
        "quantile_boundaries",
        "mean",
        "variance",
        "skewness",
        "kurtosis",
        "most_positive_activation_records",
        "most_negative_activation_records",
        "wasserstein_neurons",
    ],
    "additionalProperties": False,
    "properties": {
        "dataclass_name": {"const": "NeuronRecord"},
        "neuron_id": {
            "type": "object",
            "required": ["dataclass_name", "layer_index", "neuron_index"],
            "properties": {
                "dataclass_name": {"const": "NeuronId"},
                "layer_index": {"type": "integer"},
                "neuron_index": {"type": "integer", "minimum": 0},
            },
        },
        "random_sample": _RECORDS,
        "random_sample_by_quantile": {"type": "array", "items": _RECORDS},
        "quantile_boundaries": {"type": "array", "items": {"type": "number"}},
        "mean": {"type": "number"},
        "variance": {"type": "number", "minimum": 0},
        "skewness": _NUMBER_OR_NULL,
        "kurtosis": _NUMBER_OR_NULL,
        "most_positive_activation_records": _RECORDS,
        "most_negative_activation_records": _RECORDS,
        "wasserstein_neurons": {
            "type": "object",
            "required": ["schema_version", "hook", "layer", "neuron", "wd", "quantile_levels"],
            "properties": {
                "schema_version": {"const": SCHEMA_VERSION},
                "hook": {"type": "string"},
                "layer": {"type": "integer"},
                "neuron": {"type": "integer", "minimum": 0},
                "wd": _NUMBER_OR_NULL,
                "wd_rank": {"type": ["integer", "null"]},
                "layer_neurons": {"type": ["integer", "null"]},
                "is_top": {"type": ["boolean", "null"]},
                "quantile_levels": {"type": "array", "items": {"type": "number"}},
                "run": {"type": "object"},
                "records": {
                    "type": "object",
                    "properties": {
                        "random_sample": _ORIGINS,
                        "random_sample_by_quantile": {"type": "array", "items": _ORIGINS},
                        "most_positive_activation_records": _ORIGINS,
                        "most_negative_activation_records": _ORIGINS,
                    },
                },
            },
        },
    },
    "$defs": {"ActivationRecord": _ACTIVATION_RECORD, "Origin": _ORIGIN},
}


def _num(v):
    """A JSON number, or ``None`` for NaN / inf / missing."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _activation(rec: ActivationRecord) -> dict:
    return {
        "dataclass_name": "ActivationRecord",
        "tokens": list(rec.tokens),
        "activations": [round(float(a), 5) for a in rec.activations],
    }


def _origin(rec: ActivationRecord) -> dict:
    return {
        "position": rec.position,
        "window": rec.window,
        "start": rec.start,
        "target": rec.target,
    }


def _optional(stats: dict, key: str, kind):
    v = stats.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return kind(v)


def neuron_record(data: NeuronData, run: dict | None = None) -> dict:
    """The JSON-ready record of one neuron (validates against :data:`SCHEMA`)."""
    s = data.stats
    groups = {
        "random_sample": data.random,
        "most_positive_activation_records": data.top,
        "most_negative_activation_records": data.bottom,
    }
    extra = {
        "schema_version": SCHEMA_VERSION,
        "hook": data.hook,
        "layer": data.layer,
        "neuron": data.neuron,
        "wd": _num(s.get("wd")),
        "wd_rank": _optional(s, "wd_rank", int),
        "layer_neurons": _optional(s, "layer_neurons", int),
        "is_top": _optional(s, "is_top", bool),
        "std": _num(data.std),
        "n_tokens": data.n,
        "first_pos_share": _num(s.get("first_pos_share")),
        "position_artefact": _optional(s, "position_artefact", bool),
        "quantile_levels": list(data.quantile_levels),
        "run": run or {},
        "records": {
            **{k: [_origin(r) for r in v] for k, v in groups.items()},
            "random_sample_by_quantile": [[_origin(r) for r in b] for b in data.by_quantile],
        },
    }
    return {
        "dataclass_name": "NeuronRecord",
        "neuron_id": {
            "dataclass_name": "NeuronId",
            "layer_index": data.layer,
            "neuron_index": data.neuron,
        },
        "random_sample": [_activation(r) for r in data.random],
        "random_sample_by_quantile": [[_activation(r) for r in b] for b in data.by_quantile],
        "quantile_boundaries": list(data.quantile_boundaries),
        "mean": data.mean,
        "variance": data.std**2,
        "skewness": _num(s.get("skew")),
        "kurtosis": _num(s.get("kurtosis")),
        "most_positive_activation_records": [_activation(r) for r in data.top],
        "most_negative_activation_records": [_activation(r) for r in data.bottom],
        "wasserstein_neurons": extra,
    }
