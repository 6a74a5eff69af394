"""Console entry points.

    evomerge-merge RECIPE.yaml OUTPUT_DIR [--device cuda] [--dtype bfloat16] [--shard-size 5GB] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

__all__ = ["merge_main", "merge_command", "user_errors"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the input's fault, each with a message naming the model, tensor,
    file or key: the commands print them in one line and exit with 2 (anything else is a bug,
    and keeps its traceback)."""
    from .app import ConfigError
    from .checkpoint import CheckpointError
    from .evaluate import EvaluationError
    from .merge.engine import MergeError
    from .recipe import RecipeError
    from .trials import StateError
    from .zoo import ZooError

    return (ConfigError, CheckpointError, EvaluationError, MergeError, RecipeError, StateError, ZooError,
            FileExistsError)


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evomerge-merge",
        description="Merge models as a recipe says (mergekit-compatible YAML) into a new model folder.",
    )
    p.add_argument("recipe", help="recipe YAML (merge_method, base_model, models or slices, parameters)")
    p.add_argument("output_dir", help="folder to create; written atomically")
    p.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--dtype", default=None, help="dtype of the written weights (overrides out_dtype)")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random methods (dare_*, della*)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled pytorch_model*.bin weights (loaded with weights_only=True)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="merge task arithmetic, TIES and DARE through torch.compile (for GPUs; same weights)")
    return p


def check_device(name, where: str = "--device") -> None:
    """Refuse a device evomerge cannot merge on (``cpu``, ``cuda``, ``cuda:N``, ``mps``
    where torch has it), naming the option or key ``where``."""
    import torch

    from .recipe import RecipeError

    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise RecipeError(f"{where}: {name!r} is not a device evomerge merges on (cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{where}: {name!r} was asked for, but torch sees no CUDA device here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RecipeError(f"{where}: {name!r} was asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"{where}: {name!r} was asked for, but torch has no MPS device here")


def quiet_loading() -> None:
    """No progress bars from the libraries that load models and data (transformers' weight
    loading, the hub's and datasets' downloads), here and in the processes started from here
    (Ray workers)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
    except ImportError:
        pass


def merge_main(argv: list[str] | None = None) -> int:
    args = _merge_parser().parse_args(argv)
    if args.no_progress:
        quiet_loading()
    from .checkpoint import check_output_name, parse_size, refuse_overlap
    from .merge.engine import Merger
    from .recipe import DTYPES, RecipeError, load_recipe

    try:
        if args.dtype is not None and args.dtype.lower() not in DTYPES:
            raise RecipeError(f"--dtype: unknown dtype {args.dtype!r}; accepted: float32, float16, bfloat16")
        try:
            shard = parse_size(args.shard_size)
        except ValueError as e:
            raise RecipeError(f"--shard-size: {e}") from None
        check_device(args.device)
        recipe = load_recipe(args.recipe)
        from pathlib import Path

        out = Path(args.output_dir)
        check_output_name(out)
        refuse_overlap(out, {f"recipe '{args.recipe}'": Path(args.recipe)})
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"output '{out}' already exists (pass --overwrite to replace it)")
        t0 = time.perf_counter()
        engine = Merger(
            recipe, device=args.device, seed=args.seed,
            out_dtype=DTYPES[args.dtype.lower()] if args.dtype else None,
            allow_pickle=args.allow_pickle, compile=args.compile,
        )
        text = Path(args.recipe).read_text()
        path = engine.write(out, shard_size=shard, overwrite=args.overwrite,
                            progress=not args.no_progress, recipe_text=text)
    except (*user_errors(), ValueError) as e:
        print(f"evomerge-merge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge-merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {path} ({len(engine.tasks)} tensors, {time.perf_counter() - t0:.1f}s)")
    return 0


def _terminated(signum, frame):
    raise KeyboardInterrupt


def merge_command() -> int:
    """The ``evomerge-merge`` console script. Every full collection of the garbage
    collector walks all the objects importing torch made (0.1-0.4 s here each time: one
    during planning, one at exit), so they are frozen out of it once imported, and what
    the merge made is frozen before the interpreter exits."""
    import gc

    from .merge import engine  # noqa: F401  (torch and the merge core)

    gc.freeze()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwinds like an interrupt: the partial output goes
        signal.signal(sig, _terminated)
    rc = merge_main()
    gc.freeze()
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(merge_command())
