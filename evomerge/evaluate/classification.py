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

from ._common import EvaluationError, check_disjoint, check_fraction, check_split, check_tasks, model_device, part, resolve_sources, subsample

__all__ = ["ClassificationEvaluator", "class_entropy", "METRICS"]

METRICS = ("accuracy", "entropy")


def class_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The Shannon entropy (nats) of ``softmax(logits)`` per row; differentiable."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class _Split:
    """One task's split: its labels (read at once) and its images, decoded only when asked
    for (``images(idx)``): a vision-zoo file's uint8 array, or a ``datasets`` dataset whose
    image column is decoded batch by batch."""

    def __init__(self, labels: np.ndarray, classes: list[str] | None, array: np.ndarray | None = None,
                 dataset=None, column: str = "image"):
        self.labels, self.classes = labels, classes
        self.array, self.dataset, self.column = array, dataset, column

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, idx: np.ndarray) -> "_Split":
        if self.array is not None:
            return _Split(self.labels[idx], self.classes, array=self.array[idx])
        return _Split(self.labels[idx], self.classes, dataset=self.dataset.select(idx.tolist()), column=self.column)

    def images(self, start: int, stop: int):
        if self.array is not None:
            return self.array[start:stop]
        return self.dataset[start:stop][self.column]

    def keys(self) -> list[str]:
        """Each image's identity for the split check (a hash of its bytes), read in batches
        without decoding a dataset's images."""
        import hashlib

        if self.array is not None:
            return [f"image {i.shape} sha1 {hashlib.sha1(np.ascontiguousarray(i).tobytes()).hexdigest()}"
                    for i in self.array]
        import datasets

        raw = self.dataset.cast_column(self.column, datasets.Image(decode=False))
        out = []
        for start in range(0, len(raw), 1024):
            for im in raw[start:start + 1024][self.column]:
                data = im.get("bytes") if isinstance(im, dict) else None
                if data is None and isinstance(im, dict) and im.get("path"):
                    data = Path(im["path"]).read_bytes()
                out.append(f"image bytes sha1 {hashlib.sha1(data or b'').hexdigest()}")
        return out


def _read_split(src: Any, task: str, split: str, name: str, labelled: bool = True) -> _Split:
    """One source's split (``name``: the dataset split a spec without ``split`` reads);
    ``labelled=False`` accepts images without labels (they are then -1)."""
    where = f"task {task!r}, {split} split"
    if isinstance(src, Mapping):
        import datasets

        spec = dict(src)
        image, label = spec.pop("image", "image"), spec.pop("label", "label")
        if "path" not in spec:
            raise EvaluationError(f"{where}: a datasets spec needs a path (a hub id or a local folder), got {dict(src)}")
        try:
            ds = datasets.load_dataset(spec.pop("path"), spec.pop("name", None), split=spec.pop("split", name), **spec)
        except Exception as e:  # noqa: BLE001 - not found, offline, a bad split
            first = (str(e).strip().splitlines() or [""])[0]
            raise EvaluationError(f"{where}: cannot load dataset {dict(src)}: {type(e).__name__}: {first}") from None
        missing = [c for c in (image, label) if c not in ds.column_names and (labelled or c == image)]
        if missing:
            raise EvaluationError(f"{where}: dataset {src.get('path')!r} has no column(s) {missing} (columns: "
                                  f"{ds.column_names}); name them with image=/label=")
        if label in ds.column_names:
            try:
                labels = np.asarray(ds[label], dtype=np.int64)
            except (TypeError, ValueError):
                raise EvaluationError(f"{where}: dataset {src.get('path')!r}'s {label!r} column is not integer class "
                                      "indices") from None
            feat = ds.features.get(label)
            classes = list(feat.names) if getattr(feat, "names", None) else None
        else:
            labels, classes = np.full(len(ds), -1, dtype=np.int64), None
        return _Split(labels, classes, dataset=ds, column=image)
    if not isinstance(src, (str, os.PathLike)):
        raise EvaluationError(f"{where}: one image split file (.safetensors) or a datasets spec, got {src!r}")
    path = Path(src)
    if path.suffix != ".safetensors":
        raise EvaluationError(f"{where}: {path} is not an image split (.safetensors with 'images' and 'labels', "
                              "as the vision zoo writes) or a datasets spec")
    from ..vision.zoo import read_images

    try:
        images, labels, classes = read_images(path)
    except Exception as e:  # noqa: BLE001 - not safetensors, missing tensors
        raise EvaluationError(f"{where}: {path} is not a readable image split ({type(e).__name__}: {e})") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or labels.shape != (len(images),):
        raise EvaluationError(f"{where}: {path} must hold uint8 images [n, h, w, 3] and one label each; it holds "
                              f"{images.dtype} {tuple(images.shape)} and labels {tuple(labels.shape)}")
    return _Split(labels.astype(np.int64), classes, array=images)


def _short(names: list[str]) -> str:
    return str(list(names[:4]))[:-1] + (", ...]" if len(names) > 4 else "]")


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
        self.splits: dict[str, dict[str, _Split]] = {}
        classes: dict[str, list[str] | None] = {}
        for task, splits in sources.items():
            self.splits[task] = {}
            for split, src in splits.items():
                sp = _read_split(src, task, split, search_split if split == "search" else test_split,
                                 labelled=metric == "accuracy")
                if len(sp) == 0:
                    raise EvaluationError(f"task {task!r}: the {split} split has no images ({src})")
                if split == "search":  # (before any image is decoded)
                    sp = sp.select(subsample(len(sp), limit, seed))
                self.splits[task][split] = sp
                classes[task] = classes.get(task) or sp.classes
            if len(self.splits[task]) == 2:
                check_disjoint(self.splits[task]["search"].keys(), self.splits[task]["test"].keys(), f"task {task!r}")
        self.tasks = list(self.splits)
        root = Path(data_dir) if data_dir is not None else None
        self._clips: dict[str, tuple] = {}  # a CLIP model read once for every task's zero-shot head
        self.heads = {t: self._head(t, (heads or {}).get(t), root, classes.get(t)) for t in self.tasks}
        self._clips.clear()
        for t in self.tasks:
            head = self.heads[t]
            for split, sp in self.splits[t].items():
                if sp.classes and not all(c.startswith("LABEL_") for c in head.classes) and sp.classes != head.classes:
                    raise EvaluationError(f"task {t!r}, {split} split: the data's classes {_short(sp.classes)} are not "
                                          f"its head's {_short(head.classes)} (in that order)")
                if metric != "accuracy":
                    continue  # (the entropy reads no labels)
                y = sp.labels
                if int(y.min()) < 0 or int(y.max()) >= len(head.classes):
                    raise EvaluationError(f"task {t!r}, {split} split: labels run from {int(y.min())} to {int(y.max())}, "
                                          f"but its head has {len(head.classes)} classes (0 to {len(head.classes) - 1})")
        self._pixels: dict[tuple, torch.Tensor] = {}
        self.cache_images = 4096  # a split of at most this many images is kept as model inputs

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

    def batches(self, task: str, split: str, processor=None, device="cpu", idx: Sequence[int] | None = None):
        """``(start, pixels)`` of the split's images (or of ``idx``) as model inputs, a batch at
        a time: a split of at most ``cache_images`` images is converted once and kept (per
        processor and device); a larger one is decoded and converted batch by batch."""
        from ..vision.heads import pixel_values

        sp = self._split(task, split)
        if len(sp) <= self.cache_images:
            px = self.pixels(task, split, processor, device)
            if idx is not None:
                px = px[torch.as_tensor(list(idx), device=px.device)]
            for i in range(0, len(px), self.batch_size):
                yield i, px[i:i + self.batch_size]
            return
        part_ = sp if idx is None else sp.select(np.asarray(list(idx), dtype=np.int64))
        for i in range(0, len(part_), self.batch_size):
            yield i, pixel_values(part_.images(i, i + self.batch_size), processor).to(device)

    def _split(self, task: str, split: str) -> _Split:
        if split not in self.splits[task]:
            raise EvaluationError(f"task {task!r} has no {split} split")
        return self.splits[task][split]

    def pixels(self, task: str, split: str, processor=None, device="cpu") -> torch.Tensor:
        """The split's images as model inputs, all at once (kept per processor and device)."""
        from ..vision.heads import pixel_values

        key = (task, split, id(processor), str(device))
        if key not in self._pixels:
            sp = self._split(task, split)
            chunks = [pixel_values(sp.images(i, i + 512), processor) for i in range(0, len(sp), 512)]
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
                    sp = self._split(task, split)
                    idx = part(list(range(len(sp))), fraction, self.seed)
                    y = torch.from_numpy(sp.labels[idx]).to(dev)
                    total, n = 0.0, 0
                    for at, px in self.batches(task, split, processor, dev, idx if fraction < 1 else None):
                        lg = self.logits(model, task, px)
                        if self.metric == "accuracy":
                            total += float((lg.argmax(-1) == y[at:at + len(px)]).sum())
                        else:
                            total += float(class_entropy(lg).sum())
                        n += len(px)
                    out[f"{task}/{self.primary(task)}"] = total / max(1, n)
        finally:
            model.train(was)
        out["score"] = float(np.mean([out[f"{t}/{self.primary(t)}"] for t in self.tasks]))
        return out

    def unlabeled(self, split: str = "search", tasks: Sequence[str] | None = None) -> dict[str, int]:
        """How many unlabeled images each task offers on ``split`` (AdaMerging's inputs)."""
        check_split(split)
        return {t: len(self._split(t, split)) for t in check_tasks(self.tasks, tasks)}

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
