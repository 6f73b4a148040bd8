"""slimsearch: search smaller, faster PyTorch models, measured on the file you deploy."""

from slimsearch._version import __version__
from slimsearch.errors import ArtifactError, ConfigError, SlimsearchError, TrialError
from slimsearch.runtimes import load_model
from slimsearch.spaces import LayerRecipe, Recipe
from slimsearch.tasks import Split, Task, Vocabulary, model_factory, register_task
from slimsearch.tasks.attention import HeadAttention
from slimsearch.tasks.metrics import Metric, metric

__all__ = [
    "ArtifactError",
    "ConfigError",
    "HeadAttention",
    "LayerRecipe",
    "Metric",
    "Recipe",
    "SlimsearchError",
    "Split",
    "Task",
    "TrialError",
    "Vocabulary",
    "__version__",
    "load_model",
    "metric",
    "model_factory",
    "register_task",
]
