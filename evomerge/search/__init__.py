"""Search strategies (one protocol: ``ask``, ``tell``, ``best``, ``state_dict``) and the loop."""

from .base import Candidate, Result, Strategy
from .baselines import GridSearch, RandomSearch
from .cmaes import CMAES
from .loop import SearchOutcome, run_search

STRATEGIES = {"cmaes": CMAES, "random": RandomSearch, "grid": GridSearch}

__all__ = ["Candidate", "Result", "Strategy", "CMAES", "RandomSearch", "GridSearch", "STRATEGIES",
           "run_search", "SearchOutcome"]
