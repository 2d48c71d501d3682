"""wasserstein_neurons: neuron entanglement in LLMs.

Capture every MLP neuron's output distribution, rank neurons by the Wasserstein distance of
that distribution to a Gaussian, sparsify chosen neuron sets and apply Sparse Expansion.
"""

from .capture import ActivationStore, capture_activations
from .data import calibration_windows, evaluation_windows, load_tokens, sample_windows
from .evaluate import PerplexityResult, perplexity
from .models import LoadedModel, load_model
from .ranking import rank_store, top_neurons
from .wasserstein import neuron_statistics, wasserstein_between, wasserstein_to_gaussian

__all__ = [
    "ActivationStore",
    "LoadedModel",
    "PerplexityResult",
    "calibration_windows",
    "capture_activations",
    "evaluation_windows",
    "load_model",
    "load_tokens",
    "neuron_statistics",
    "perplexity",
    "rank_store",
    "sample_windows",
    "top_neurons",
    "wasserstein_between",
    "wasserstein_to_gaussian",
]
__version__ = "0.1.0"
