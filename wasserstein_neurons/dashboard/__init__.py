"""The neuron dashboard: static HTML pages and neuron records built from run folders.

Modules (each imports only those above it):

=============  ==============================================================================
``svg``        inline SVG charts drawn from numbers (histograms, lines, points)
``neuron``     one neuron's page data from its stored outputs (:func:`neuron_data`)
``records``    neuron-explainer-like JSON records and their schema (:data:`SCHEMA`)
``pages``      the neuron view's HTML (site page, notebook cell)
``index``      the index page (run, WD profile, sortable neuron table, search)
``source``     a ``rank`` run folder with its activation store (:class:`RankRun`)
``overlays``   what ``expand`` / ``disentangle`` runs add to the pages
=============  ==============================================================================

The site itself is written by :func:`wasserstein_neurons.workflows.report.build_report`
(CLI ``wasserstein-neurons report``); :func:`wasserstein_neurons.plotting.show_neuron` shows
one neuron view inline in a notebook.
"""

from .neuron import ActivationRecord, NeuronData, TokenDecoder, neuron_data
from .overlays import DisentangleRun, ExpandRun
from .pages import inline_view, neuron_page, neuron_view
from .records import SCHEMA, neuron_record
from .source import RankRun, resolve_tokenizer

__all__ = [
    "SCHEMA",
    "ActivationRecord",
    "DisentangleRun",
    "ExpandRun",
    "NeuronData",
    "RankRun",
    "TokenDecoder",
    "inline_view",
    "neuron_data",
    "neuron_page",
    "neuron_record",
    "neuron_view",
    "resolve_tokenizer",
]
