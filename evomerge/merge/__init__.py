"""The merge core: methods (pure tensor maths) and the engine that applies a recipe."""

from .methods import METHODS

__all__ = ["METHODS"]
