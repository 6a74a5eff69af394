"""Search strategies (one protocol: ``ask``, ``tell``, ``best``, ``state_dict``) and the loop."""

from .base import Candidate, Result, Strategy
from .baselines import GridSearch, RandomSearch
from .cmaes import CMAES
from .greedy_soup import GreedySoup
from .optuna import OptunaSearch
from .steady import SteadyStateEvolution
from .adamerging import AdaMerging
from .loop import SearchOutcome, finish_run, run_search

STRATEGIES = {"cmaes": CMAES, "optuna": OptunaSearch, "greedy_soup": GreedySoup, "random": RandomSearch,
              "grid": GridSearch, "steady": SteadyStateEvolution}

__all__ = ["Candidate", "Result", "Strategy", "CMAES", "OptunaSearch", "GreedySoup", "RandomSearch", "GridSearch",
           "SteadyStateEvolution", "STRATEGIES",
           "run_search", "SearchOutcome", "finish_run", "AdaMerging"]
