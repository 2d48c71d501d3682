"""wasserstein_neurons: neuron entanglement in LLMs.

Capture every MLP neuron's output distribution, rank neurons by the Wasserstein distance of
that distribution to a Gaussian, sparsify chosen neuron sets and apply Sparse Expansion.
"""

from .models import LoadedModel, load_model
from .wasserstein import neuron_statistics, wasserstein_between, wasserstein_to_gaussian

__all__ = [
    "LoadedModel",
    "load_model",
    "neuron_statistics",
    "wasserstein_between",
    "wasserstein_to_gaussian",
]
__version__ = "0.1.0"
