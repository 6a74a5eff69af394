"""Time to score one merge candidate on a zoo-like search split, four ways:

(a) the ``lm_eval`` command on a saved checkpoint, as a user would run it per candidate
    (a subprocess: start-up, task indexing, loading the model and data, scoring);
(b) ``LMEvalEvaluator``, in memory and cached: the second and later calls on the same
    model object with its weights changed in place;
(b0) ``lm_eval.evaluator.evaluate`` in memory with one prebuilt ``HFLM`` and task dict
    (what the evaluator does without its request cache: requests rebuilt every call);
(c) the native ``ExactMatchEvaluator`` (generate and teacher-forced modes, or choice).

    python scripts/bench_eval.py                      # a random zoo-sized model, zoo data in a temp folder
    python scripts/bench_eval.py --zoo zoo            # zoo/base and zoo/data when the zoo is built
    python scripts/bench_eval.py --variant mc --limit 200 --threads 2

Prints each time (median of ``--repeats`` calls after a first, untimed one, where a
repeat makes sense) and the ratios to (a).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default=None, help="a built zoo folder (base/, data/); default: make a random model")
    ap.add_argument("--tasks", default=None, help="comma-separated (default: the zoo's tasks)")
    ap.add_argument("--variant", choices=["gen", "mc"], default="gen",
                    help="gen: generate_until + exact match; mc: multiple choice over 4 candidates")
    ap.add_argument("--limit", type=int, default=100, help="search documents per task (default 100)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cli-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the subprocess")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128, help="random model width (default: the zoo's)")
    ap.add_argument("--layers", type=int, default=None, help="random model depth (default: the zoo's)")
    return ap.parse_args(argv)


def _random_checkpoint(folder: Path, hidden: int, layers: int):
    import torch
    from tokenizers import decoders
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo import _save_tokenizer, zoo_tokenizer

    tok = zoo_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    _save_tokenizer(tok, folder)
    return model, tok


def _median_time(fn, repeats: int, between=None) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if between is not None:
            between()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> int:
    a = _parse(argv)
    import logging

    import torch

    logging.getLogger("lm_eval").setLevel(logging.ERROR)

    torch.set_num_threads(a.threads)
    from evomerge.evaluate import ExactMatchEvaluator, LMEvalEvaluator, write_jsonl_tasks
    from evomerge.zoo import ZooConfig, write_data

    tasks = a.tasks.split(",") if a.tasks else list(ZooConfig().tasks)
    a.layers = a.layers or ZooConfig().layers
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        if a.zoo and (Path(a.zoo) / "base" / "config.json").is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = Path(a.zoo) / "base"
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            tok = AutoTokenizer.from_pretrained(folder)
            data = {t: {s: Path(a.zoo) / "data" / t / f"{s}.jsonl" for s in ("validation", "test")} for t in tasks}
            source = f"zoo {a.zoo}"
        else:
            folder = work / "model"
            model, tok = _random_checkpoint(folder, a.hidden, a.layers)
            data = write_data(ZooConfig(tasks=tuple(tasks)), work)
            source = f"random Llama, hidden {a.hidden}, {a.layers} layers"
        n_params = sum(p.numel() for p in model.parameters())
        include = write_jsonl_tasks(data, work / "tasks", stop=["\n"])
        names = [f"zoo_{t}" + ("_mc" if a.variant == "mc" else "") for t in tasks]

        g = torch.Generator().manual_seed(0)

        def perturb():
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)

        print(f"model: {source} ({n_params / 1e6:.2f}M parameters); tasks: {','.join(names)}; "
              f"{a.limit} documents per task; {a.threads} thread(s); batch size {a.batch_size}")

        # (a) the lm_eval command on a saved checkpoint
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
               "--tasks", ",".join(names), "--include_path", str(include), "--limit", str(a.limit),
               "--batch_size", str(a.batch_size), "--device", "cpu", "--output_path", str(work / "out")]
        cli_times = []
        for _ in range(a.cli_repeats):
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            cli_times.append(time.perf_counter() - t)
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"lm_eval failed ({r.returncode})")
        t_cli = statistics.median(cli_times)

        # (b) the cached in-memory evaluator
        t = time.perf_counter()
        ev = LMEvalEvaluator(names, include_path=include, limit=a.limit, batch_size=a.batch_size)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        ev(model, tok)
        t_first = time.perf_counter() - t
        t_cached, res_b = _median_time(lambda: ev(model, tok), a.repeats, perturb)

        # (b0) lm-eval's evaluate() in memory, requests rebuilt every call
        from lm_eval.evaluator import evaluate
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=str(include), include_defaults=False)
        loaded = tm.load(names)
        for task in loaded["tasks"].values():
            task.set_fewshot_seed(0)
        lm = ev._lm
        t_rebuild, _ = _median_time(
            lambda: evaluate(lm=lm, task_dict=loaded, limit=a.limit, bootstrap_iters=0, log_samples=False),
            a.repeats, perturb)

        # (c) native evaluators
        modes = ["choice"] if a.variant == "mc" else ["generate", "teacher_forced"]
        native = {}
        for mode in modes:
            nev = ExactMatchEvaluator(data, tasks=tasks, limit=a.limit, mode=mode, batch_size=256)
            nev(model, tok)
            native[mode], _ = _median_time(lambda: nev(model, tok), a.repeats, perturb)

        print(f"\n{'way':58s} {'s/candidate':>12s} {'vs (a)':>8s}")
        rows = [("(a) lm_eval CLI on a saved checkpoint (subprocess)", t_cli),
                ("(b) LMEvalEvaluator, cached, 2nd+ call", t_cached),
                ("(b0) lm_eval.evaluate in memory, requests rebuilt", t_rebuild)]
        rows += [(f"(c) ExactMatchEvaluator mode={m}", v) for m, v in native.items()]
        for label, v in rows:
            print(f"{label:58s} {v:12.3f} {t_cli / v:7.1f}x")
        print(f"\nLMEvalEvaluator one-off costs: construction {t_build:.2f} s, first call {t_first:.2f} s")
        print(f"CLI runs: {', '.join(f'{x:.2f}' for x in cli_times)} s")
        print(f"ratios: (b)/(a) = {t_cached / t_cli:.4f} ({t_cli / t_cached:.0f}x faster); "
              f"(b)/(b0) = {t_cached / t_rebuild:.2f}; " +
              "; ".join(f"(c {m})/(b) = {v / t_cached:.2f}" for m, v in native.items()))
        print(f"last (b) score: {res_b['score']:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
