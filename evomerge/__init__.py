"""evomerge: find good model merges automatically."""

from .merge.engine import Merger, MergeError
from .recipe import Recipe, RecipeError, load_recipe, parse_recipe

__all__ = ["Merger", "MergeError", "Recipe", "RecipeError", "load_recipe", "parse_recipe"]
__version__ = "0.1.0"
