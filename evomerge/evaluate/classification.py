"""Image classification: a vision encoder read through each task's own head.

The setting of the published merging benchmarks (CLIP's eight tasks, model soups): the
encoder is merged, and each task keeps its head (``evomerge.vision.heads.TaskHead``). The
evaluator is called as every evaluator is, ``ev(model, processor, split=...)``, where the
second argument is the model's image processor (or None: the vision zoo's pixel scaling).

Two metrics (``metric``):

``"accuracy"`` (maximize)
    Top-1 accuracy per task (``"<task>/acc"``); ``"score"`` is their unweighted mean.
``"entropy"`` (minimize)
    The mean Shannon entropy of each task's predicted class distribution (``"<task>/entropy"``),
    labels unused: AdaMerging's objective (``entropy_loss`` is its differentiable form).

Data per task and split: a split file of the vision zoo (``<task>/<split>.safetensors``:
``uint8`` images and labels) or a ``datasets`` spec ``{"path": ID_OR_FOLDER, "name": ...,
"split": ..., "revision": ..., "image": "image", "label": "label"}``. Images are converted to
model inputs once per image processor and kept on the model's device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import EvaluationError, check_fraction, check_split, check_tasks, model_device, part, resolve_sources, subsample

__all__ = ["ClassificationEvaluator", "class_entropy", "METRICS"]

METRICS = ("accuracy", "entropy")


def class_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The Shannon entropy (nats) of ``softmax(logits)`` per row; differentiable."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _read_split(src: Any, task: str, split: str, name: str) -> tuple[list | np.ndarray, np.ndarray, list[str] | None]:
    """``(images, labels, classes)`` of one source (``name``: the dataset split a spec
    without ``split`` reads)."""
    if isinstance(src, Mapping):
        import datasets

        spec = dict(src)
        image, label = spec.pop("image", "image"), spec.pop("label", "label")
        try:
            ds = datasets.load_dataset(spec.pop("path"), spec.pop("name", None), split=spec.pop("split", name), **spec)
        except Exception as e:  # noqa: BLE001 - not found, offline, a bad split
            first = (str(e).strip().splitlines() or [""])[0]
            raise EvaluationError(f"task {task!r}, {split} split: cannot load dataset {dict(src)}: "
                                  f"{type(e).__name__}: {first}") from None
        missing = [c for c in (image, label) if c not in ds.column_names]
        if missing:
            raise EvaluationError(f"task {task!r}, {split} split: dataset {src.get('path')!r} has no column(s) "
                                  f"{missing} (columns: {ds.column_names}); name them with image=/label=")
        feat = ds.features.get(label)
        classes = list(feat.names) if getattr(feat, "names", None) else None
        return list(ds[image]), np.asarray(ds[label], dtype=np.int64), classes
    path = Path(src)
    if path.suffix != ".safetensors":
        raise EvaluationError(f"task {task!r}, {split} split: {path} is not an image split (.safetensors with "
                              "'images' and 'labels', as the vision zoo writes) or a datasets spec")
    from ..vision.zoo import read_images

    try:
        images, labels, classes = read_images(path)
    except Exception as e:  # noqa: BLE001 - not safetensors, missing tensors
        raise EvaluationError(f"task {task!r}, {split} split: {path} is not a readable image split "
                              f"({type(e).__name__}: {e})") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or labels.shape != (len(images),):
        raise EvaluationError(f"task {task!r}, {split} split: {path} must hold uint8 images [n, h, w, 3] and one "
                              f"label each; it holds {images.dtype} {tuple(images.shape)} and labels "
                              f"{tuple(labels.shape)}")
    return images, labels.astype(np.int64), classes


def _image_key(image) -> tuple:
    """An image's identity for the split check: its shape and a hash of its pixels."""
    import hashlib

    arr = np.ascontiguousarray(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
    return arr.shape, hashlib.sha1(arr.tobytes()).hexdigest()


class ClassificationEvaluator:
    """Accuracy (or prediction entropy) of a vision encoder on classification tasks, each
    read through its own head.

    Args:
        data: ``{task: {split: source}}`` (split ``"search"``/``"test"`` or the file split
            names); a source is an image split file or a datasets spec (module docstring).
        data_dir: alternative to ``data``: ``<data_dir>/<task>/<split>.safetensors`` (a
            vision zoo folder, which holds ``data/``, serves).
        tasks: task names (required with ``data_dir``; with ``data``, a selection).
        heads: ``{task: head}``: a ``TaskHead``, its file, ``{"classifier": MODEL}`` (the
            ``classifier`` layer of an image-classification checkpoint: each fine-tune's
            own), or ``{"clip": MODEL, "templates": [...], "classes": [...]}`` (CLIP's
            zero-shot head, made once; ``classes`` defaults to the dataset's label names).
            Default: ``<data_dir>/heads/<task>.safetensors``.
        search_split, test_split, limit, seed: as the other evaluators (a seeded subsample of
            ``limit`` images of the search split; the test split whole).
        batch_size: images per forward pass.
        metric: ``"accuracy"`` or ``"entropy"``.
    """

    model_kind = "vision"  # the worker builds a vision encoder, and passes its image processor

    def __init__(self, data: Mapping | None = None, *, data_dir: str | os.PathLike | None = None,
                 tasks: Sequence[str] | None = None, heads: Mapping | None = None, search_split: str = "validation",
                 test_split: str = "test", limit: int | None = None, seed: int = 0, batch_size: int = 256,
                 metric: str = "accuracy"):
        if metric not in METRICS:
            raise EvaluationError(f"unknown metric {metric!r}; choose one of {METRICS}")
        if int(batch_size) < 1:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}")
        self.metric, self.batch_size, self.seed = metric, int(batch_size), int(seed)
        self.direction = "maximize" if metric == "accuracy" else "minimize"
        sources = resolve_sources(data, data_dir, tasks, search_split, test_split, default_name="task",
                                  suffix=".safetensors")
        self.images: dict[str, dict[str, Any]] = {}
        self.labels: dict[str, dict[str, torch.Tensor]] = {}
        classes: dict[str, list[str] | None] = {}
        for task, splits in sources.items():
            self.images[task], self.labels[task] = {}, {}
            for split, src in splits.items():
                images, labels, names = _read_split(src, task, split, search_split if split == "search" else test_split)
                if len(labels) == 0:
                    raise EvaluationError(f"task {task!r}: the {split} split has no images ({src})")
                if split == "search":
                    keep = subsample(len(labels), limit, seed)
                    images = [images[i] for i in keep] if isinstance(images, list) else images[keep]
                    labels = labels[keep]
                self.images[task][split], self.labels[task][split] = images, torch.from_numpy(labels)
                classes[task] = classes.get(task) or names
            if len(self.images[task]) == 2:
                test = {_image_key(i) for i in self.images[task]["test"]}
                shared = [j for j, im in enumerate(self.images[task]["search"]) if _image_key(im) in test]
                if shared:
                    raise EvaluationError(f"task {task!r}: {len(shared)} image(s) of the search split also occur in "
                                          f"the test split (the first: search image {shared[0]}); the search split "
                                          "must not overlap the test split")
        self.tasks = list(self.images)
        root = Path(data_dir) if data_dir is not None else None
        self._clips: dict[str, tuple] = {}  # a CLIP model read once for every task's zero-shot head
        self.heads = {t: self._head(t, (heads or {}).get(t), root, classes.get(t)) for t in self.tasks}
        self._clips.clear()
        for t in self.tasks:
            for split, y in self.labels[t].items():
                n = len(self.heads[t].classes)
                if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
                    raise EvaluationError(f"task {t!r}, {split} split: labels reach {int(y.max())}, but its head has "
                                          f"{n} classes")
        self._pixels: dict[tuple, torch.Tensor] = {}

    def primary(self, task: str) -> str:
        """The metric that stands for a task: ``"acc"`` or ``"entropy"``."""
        return "acc" if self.metric == "accuracy" else "entropy"

    def _head(self, task: str, spec, root: Path | None, classes: list[str] | None):
        from ..vision.heads import HeadError, TaskHead, classifier_head, clip_head

        try:
            if isinstance(spec, TaskHead):
                return spec
            if isinstance(spec, Mapping) and set(spec) == {"classifier"}:
                return classifier_head(str(spec["classifier"]))
            if isinstance(spec, Mapping):
                unknown = set(spec) - {"clip", "templates", "classes"}
                if unknown or "clip" not in spec:
                    raise HeadError(f"a head spec is {{classifier: MODEL}} or takes clip, templates and classes; got "
                                    f"{sorted(spec)}")
                names = spec.get("classes") or classes
                if not names:
                    raise HeadError("no class names: give classes=[...] (the dataset's labels have none)")
                folder = str(spec["clip"])
                if folder not in self._clips:
                    from transformers import AutoTokenizer, CLIPModel

                    from ..checkpoint import model_folder

                    local = model_folder(folder)  # (a hub id: its files, once)
                    self._clips[folder] = (CLIPModel.from_pretrained(str(local)), AutoTokenizer.from_pretrained(str(local)))
                clip, tok = self._clips[folder]
                return clip_head(clip, list(names), list(spec.get("templates") or ["a photo of a {}."]), tokenizer=tok)
            if spec is None:
                if root is None:
                    raise HeadError("no head given (heads={task: ...})")
                zoo = root / "heads" / f"{task}.safetensors"
                spec = zoo if zoo.is_file() else root.parent / "heads" / f"{task}.safetensors"
            return TaskHead.load(spec)
        except HeadError as e:
            raise EvaluationError(f"task {task!r}: {e}") from None
        except (OSError, ValueError, RuntimeError) as e:  # (RuntimeError: CheckpointError, a hub id not found)
            first = (str(e).strip().splitlines() or [""])[0]
            raise EvaluationError(f"task {task!r}: its head's model cannot be read ({type(e).__name__}: {first})") from None

    # ------------------------------------------------------------------ scoring

    def pixels(self, task: str, split: str, processor=None, device="cpu") -> torch.Tensor:
        """The split's images as model inputs (once per processor and device)."""
        from ..vision.heads import pixel_values

        key = (task, split, id(processor), str(device))
        if key not in self._pixels:
            if split not in self.images[task]:
                raise EvaluationError(f"task {task!r} has no {split} split")
            imgs = self.images[task][split]
            chunks = [pixel_values(imgs[i:i + 512], processor) for i in range(0, len(imgs), 512)]
            self._pixels[key] = torch.cat(chunks).to(device)
        return self._pixels[key]

    def logits(self, model, task: str, pixels: torch.Tensor) -> torch.Tensor:
        from ..vision.heads import features

        head = self.heads[task]
        if head.weight.device != pixels.device:
            head = self.heads[task] = head.to(pixels.device)
        return head.logits(features(model, pixels))

    def __call__(self, model, processor=None, split: str = "search", fraction: float = 1.0) -> dict[str, float]:
        check_split(split)
        fraction = check_fraction(split, fraction)
        dev = model_device(model)
        was = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            with torch.no_grad():
                for task in self.tasks:
                    px = self.pixels(task, split, processor, dev)
                    idx = part(list(range(len(px))), fraction, self.seed)
                    y = self.labels[task][split][idx].to(dev)
                    total, n = 0.0, 0
                    for i in range(0, len(idx), self.batch_size):
                        sel = torch.as_tensor(idx[i:i + self.batch_size], device=dev)
                        lg = self.logits(model, task, px[sel])
                        if self.metric == "accuracy":
                            total += float((lg.argmax(-1) == y[i:i + self.batch_size]).sum())
                        else:
                            total += float(class_entropy(lg).sum())
                        n += len(sel)
                    out[f"{task}/{self.primary(task)}"] = total / max(1, n)
        finally:
            model.train(was)
        out["score"] = float(np.mean([out[f"{t}/{self.primary(t)}"] for t in self.tasks]))
        return out

    def unlabeled(self, split: str = "search", tasks: Sequence[str] | None = None) -> dict[str, int]:
        """How many unlabeled images each task offers on ``split`` (AdaMerging's inputs)."""
        check_split(split)
        return {t: len(self.labels[t][split]) for t in check_tasks(self.tasks, tasks)}

    def entropy_loss(self, model, call, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The sum over tasks of the mean prediction entropy of ``batch`` (``{task: pixels}``),
        differentiable through ``call(pixel_values=...)`` (``model``'s forward with the merged
        weights): AdaMerging's loss."""
        from ..vision.heads import features

        total = 0.0
        for task, px in batch.items():
            head = self.heads[task]
            if head.weight.device != px.device:
                head = self.heads[task] = head.to(px.device)
            total = total + class_entropy(head.logits(features(model, px, call=call))).mean()
        return total
