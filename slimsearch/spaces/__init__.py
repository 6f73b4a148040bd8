"""Search spaces: which layers can be compressed and how; ``SearchSpace.suggest`` -> ``Recipe``."""

from slimsearch.spaces.recipe import LayerRecipe, Recipe
from slimsearch.spaces.space import COMPRESSIBLE, LayerInfo, SearchSpace, compressible_layers

__all__ = ["COMPRESSIBLE", "LayerInfo", "LayerRecipe", "Recipe", "SearchSpace", "compressible_layers"]
