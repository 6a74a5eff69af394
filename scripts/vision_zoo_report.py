"""Measure the vision zoo's merging signal and write its section of ``results/zoo.md``.

    python scripts/vision_zoo_report.py                       # builds ./zoo_vision if missing
    python scripts/vision_zoo_report.py --zoo DIR --rebuild-timing   # also times a fresh build

On the test split (top-1 accuracy, each task through its own head), checks that
  (a) each expert beats the base on its own task by >= 30 points,
  (b) the base does not already solve the tasks (< 50% on each... here: its head's accuracy),
  (c) task arithmetic over all experts, at the single lambda best on the validation split,
      beats the base on mean accuracy by >= 10 points,
  (d) the merge is sensitive to lambda (test mean spread over the curve >= 20 points).
Merges go through evomerge's merge engine straight into a live encoder. The section replaces
everything from "# The vision zoo" on in the output file (the language zoo's report, made by
``scripts/zoo_report.py``, keeps it).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from evomerge.evaluate import build_evaluator  # noqa: E402
from evomerge.vision.zoo import VisionZooConfig  # noqa: E402
from evomerge.zoo import build_zoo  # noqa: E402
from zoo_report import (  # noqa: E402
    LAMBDAS, check_lines, curve_lines, lambda_curve, rebuild_timing, same_files, signal_checks, sources_lines,
)
HEADER = "# The vision zoo"


def splice(path: Path, section: str) -> None:
    """Replace ``path``'s vision-zoo section (from ``HEADER`` on) with ``section``."""
    text = path.read_text() if path.is_file() else ""
    at = text.find("\n" + HEADER)
    keep = text if at < 0 else text[:at]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(keep.rstrip("\n") + "\n\n" + section if keep.strip() else section)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo_vision")
    ap.add_argument("--out", default="results/zoo.md")
    ap.add_argument("--rebuild-timing", action="store_true",
                    help="also build a second zoo from scratch in a temporary folder and compare its files")
    a = ap.parse_args()
    torch.set_num_threads(VisionZooConfig.threads)
    from transformers import CLIPVisionModel

    from evomerge.vision.heads import load_processor

    t0 = time.perf_counter()
    from evomerge.zoo import load_zoo

    # a zoo already there is measured as built; a missing one is built with the defaults
    zoo = load_zoo(a.zoo) if (Path(a.zoo) / "zoo.json").is_file() else build_zoo(a.zoo, VisionZooConfig())
    first_build = time.perf_counter() - t0
    cfg = VisionZooConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in zoo.info["config"].items()})
    tasks = zoo.tasks
    ev = build_evaluator("classification", data_dir=zoo.root, tasks=tasks)  # search = the whole validation split
    proc = load_processor(zoo.base)

    def measure(model) -> dict[str, dict[str, float]]:
        return {name: {t: ev(model, proc, split=split)[f"{t}/acc"] for t in tasks}
                for name, split in (("validation", "search"), ("test", "test"))}

    scores = {}
    model = CLIPVisionModel.from_pretrained(zoo.base).eval()
    scores["base"] = measure(model)
    for t in tasks:
        scores[f"expert:{t}"] = measure(CLIPVisionModel.from_pretrained(zoo.experts[t]).eval())
    curve, best = lambda_curve(zoo, tasks, model, measure)
    rebuild = rebuild_timing(zoo, cfg, _same_files) if a.rebuild_timing else None

    checks = signal_checks(tasks, scores, curve, best, LAMBDAS)

    lines = [
        HEADER,
        "",
        "Made by `python scripts/vision_zoo_report.py" + (" --rebuild-timing" if a.rebuild_timing else "") + "` "
        f"(`evomerge-zoo build --kind vision`; zoo key `{zoo.info['key']}`, a `CLIPVisionModel` of "
        f"{zoo.info['parameters'] / 1e6:.2f}M parameters, {cfg.layers} layers, hidden {cfg.hidden}, 32 x 32 images "
        f"in {cfg.patch} x {cfg.patch} patches). Top-1 accuracy of each task through its own head (its classifier from "
        "the base's pretraining on the tasks' canonical images, fixed while the experts are fine-tuned), "
        f"{cfg.eval_size} images per task and split. Merges are made by evomerge's merge engine straight into a "
        "live encoder.",
        "",
        "## Tasks",
        "",
        "| task | classes | what decides the label |",
        "|---|---|---|",
    ]
    for t in tasks:
        info = zoo.info["tasks"][t]
        lines.append(f"| {t} | {len(info['classes'])}: {', '.join(info['classes'])} | {info['description']} |")
    lines += check_lines(checks)
    lines += sources_lines(tasks, [(k, v["test"]) for k, v in scores.items()]
                           + [(f"task arithmetic, lambda {best}", curve[best]["test"])])
    lines += curve_lines(tasks, curve, best, LAMBDAS)
    lines += ["", "## Build", ""]
    if rebuild:
        secs, again, same = rebuild
        lines.append(f"A fresh build took {secs:.0f} s on {cfg.threads} threads ({os.cpu_count()} CPUs); building "
                     f"again into the same folder took {again:.2f} s; the two builds' files are "
                     f"{'identical' if same else '**not identical**'} (zoo.json aside, which records the build time).")
    else:
        lines.append(f"Opening (or building) the zoo took {first_build:.1f} s in this run "
                     f"(the zoo records {zoo.info.get('seconds', '?')} s for its build).")
    lines.append("")
    section = "\n".join(lines)
    splice(Path(a.out), section)
    print(section)
    return 0 if all(ok for _, ok, _ in checks) else 1


def _same_files(a: Path, b: Path) -> bool:
    return same_files(a, b, lambda p: p.name != "zoo.json" and "ingredients" not in p.parts)


if __name__ == "__main__":
    raise SystemExit(main())
