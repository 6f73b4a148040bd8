"""slimsearch: search smaller, faster PyTorch models, measured on the file you deploy."""

__version__ = "0.1.0"

from slimsearch.compression import load_model  # noqa: E402
from slimsearch.errors import ArtifactError, ConfigError, SlimsearchError, TrialError  # noqa: E402
from slimsearch.spaces import LayerRecipe, Recipe  # noqa: E402
from slimsearch.tasks import Split, Task, model_factory, register_task  # noqa: E402

__all__ = [
    "ArtifactError",
    "ConfigError",
    "LayerRecipe",
    "Recipe",
    "SlimsearchError",
    "Split",
    "Task",
    "TrialError",
    "__version__",
    "load_model",
    "model_factory",
    "register_task",
]
