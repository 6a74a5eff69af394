"""Task heads: how a merged vision encoder is read as one task's classifier.

In the published merging benchmarks the encoder is merged and every task keeps its own
head, which is part of the task, not of the merge. A ``TaskHead`` is

    logits = scale * f @ weight.T + bias,   f = normalize(projection @ pooled)  (when normalize)

where ``pooled`` is the encoder's pooled output for an image (``features``). Its three
sources:

* ``clip_head``: CLIP's zero-shot head: each class name under the prompt templates,
  embedded by the text tower and projected, normalized, averaged over the templates and
  normalized again; the image side takes the CLIP model's ``visual_projection`` and the
  scale is ``exp(logit_scale)``. The vision tower is what is merged.
* ``classifier_head``: the ``classifier`` layer of an image-classification checkpoint
  (``AutoModelForImageClassification``): each fine-tune keeps its own.
* ``prototype_head``: the normalized mean pooled output of each class's labelled images
  under one encoder (the vision zoo's heads, fixed while its experts are fine-tuned).

A head is saved as one safetensors file (its tensors; the classes and flags in the
header's metadata), so nothing is read back through pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["TaskHead", "HeadError", "features", "clip_head", "classifier_head", "prototype_head", "pixel_values",
           "load_processor", "vision_tower"]


class HeadError(ValueError):
    """A head that cannot be made or read; the message names the file, model or task."""


@dataclass
class TaskHead:
    classes: list[str]
    weight: torch.Tensor  # [classes, dim]
    bias: torch.Tensor | None = None  # [classes]
    projection: torch.Tensor | None = None  # [dim, encoder width]
    normalize: bool = True
    scale: float = 1.0

    def __post_init__(self):
        if self.weight.ndim != 2 or self.weight.shape[0] != len(self.classes):
            raise HeadError(f"a head's weight must be [classes, dim] with one row per class; got "
                            f"{tuple(self.weight.shape)} for {len(self.classes)} classes")
        if self.bias is not None and tuple(self.bias.shape) != (len(self.classes),):
            raise HeadError(f"a head's bias must have one entry per class, got {tuple(self.bias.shape)}")
        if self.projection is not None and self.projection.shape[0] != self.weight.shape[1]:
            raise HeadError(f"a head's projection {tuple(self.projection.shape)} does not give the weight's "
                            f"{self.weight.shape[1]} dimensions")

    @property
    def width(self) -> int:
        """The pooled width the head reads."""
        return int(self.projection.shape[1] if self.projection is not None else self.weight.shape[1])

    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.shape[-1] != self.width:
            raise HeadError(f"the encoder's pooled output has {pooled.shape[-1]} dimensions; this head reads "
                            f"{self.width}")
        f = pooled.to(self.weight.dtype)
        if self.projection is not None:
            f = f @ self.projection.to(f.device).T
        if self.normalize:
            f = torch.nn.functional.normalize(f, dim=-1)
        out = self.scale * (f @ self.weight.to(f.device).T)
        return out if self.bias is None else out + self.bias.to(f.device)

    def to(self, device) -> "TaskHead":
        mv = (lambda t: None if t is None else t.to(device))
        return TaskHead(list(self.classes), mv(self.weight), mv(self.bias), mv(self.projection), self.normalize,
                        self.scale)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().float().contiguous().cpu()}
        if self.bias is not None:
            tensors["bias"] = self.bias.detach().float().contiguous().cpu()
        if self.projection is not None:
            tensors["projection"] = self.projection.detach().float().contiguous().cpu()
        # one metadata entry (the file's bytes do not depend on the order of several)
        meta = {"evomerge.head": json.dumps({"version": 1, "classes": list(self.classes),
                                             "normalize": bool(self.normalize), "scale": float(self.scale)},
                                            sort_keys=True)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TaskHead":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise HeadError(f"no task head at {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if "evomerge.head" not in meta:
                raise HeadError(f"{path}: not a task head (no 'evomerge.head' entry in its metadata)")
            info = json.loads(meta["evomerge.head"])
            return cls(list(info["classes"]), tensors["weight"], tensors.get("bias"), tensors.get("projection"),
                       bool(info["normalize"]), float(info["scale"]))
        except HeadError:
            raise
        except Exception as e:
            raise HeadError(f"{path}: not a readable task head ({type(e).__name__}: {e})") from None


def features(model, pixels: torch.Tensor, call=None) -> torch.Tensor:
    """The pooled output a head reads, for an image batch ``pixels`` ``[n, 3, h, w]``:
    what an image-classification model's ``classifier`` reads; a CLIP model's vision
    tower's pooled output (before its projection, which the head holds); else the model's
    ``pooler_output``, or its first token's last hidden state. ``call`` runs the model in
    its place (``call(pixel_values=...)``, e.g. a functional call with other weights)."""
    call = call or model
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, torch.nn.Module) and not hasattr(model, "text_model"):
        seen = []
        hook = classifier.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            call(pixel_values=pixels)
        finally:
            hook.remove()
        if not seen:
            raise HeadError(f"{type(model).__name__}'s classifier was not reached by its forward pass")
        return seen[-1].flatten(1)
    tower, _ = vision_tower(model)
    if tower is not model:  # a whole CLIP model: its vision tower
        if call is not model:
            raise HeadError("a whole CLIP model is read through its vision tower: call the tower (vision_tower)")
        out = tower(pixel_values=pixels)
    else:
        out = call(pixel_values=pixels)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out.last_hidden_state[:, 0]
    return pooled


def vision_tower(model) -> tuple[torch.nn.Module, str]:
    """The module that reads the images, and the prefix of its parameters' names in
    ``model``: a whole CLIP model's ``vision_model`` (``"vision_model."``), else the model."""
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return model.vision_model, "vision_model."
    return model, ""


def load_processor(folder: str | Path):
    """The image processor saved with a model (``preprocessor_config.json``), or None."""
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(folder))


def pixel_values(images, processor=None) -> torch.Tensor:
    """``float32 [n, 3, h, w]`` model inputs for ``images`` (``uint8 [n, h, w, 3]`` arrays
    or PIL images): through the model's image processor when it has one, else scaled to
    [-1, 1] (the vision zoo's convention, which its saved processor repeats)."""
    import numpy as np

    if processor is not None:
        imgs = [np.asarray(im.convert("RGB")) if hasattr(im, "convert") else np.asarray(im) for im in images]
        return processor(images=imgs, return_tensors="pt")["pixel_values"].float()
    arr = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    return (arr.permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5


def prototype_head(model, pixels: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                   scale: float = 20.0, batch_size: int = 256) -> TaskHead:
    """Each class's normalized mean of ``model``'s normalized pooled outputs."""
    with torch.no_grad():
        f = torch.cat([torch.nn.functional.normalize(features(model, pixels[i:i + batch_size]).float(), dim=-1)
                       for i in range(0, len(pixels), batch_size)])
    missing = [c for i, c in enumerate(classes) if not bool((labels == i).any())]
    if missing:
        raise HeadError(f"no labelled image of class(es) {missing} to make their prototype from")
    w = torch.stack([f[labels == i].mean(0) for i in range(len(classes))])
    return TaskHead(list(classes), torch.nn.functional.normalize(w, dim=-1), normalize=True, scale=float(scale))


def clip_head(clip, classes: Sequence[str], templates: Sequence[str], tokenizer=None, device="cpu") -> TaskHead:
    """CLIP's zero-shot head for ``classes`` under ``templates`` (``"a photo of a {}."``;
    each is formatted with a class name): ``clip`` is a ``CLIPModel`` or its folder."""
    from transformers import AutoTokenizer, CLIPModel

    if not templates or not classes:
        raise HeadError("a CLIP head needs class names and at least one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise HeadError(f"template(s) {bad} have no '{{}}' for the class name")
    if isinstance(clip, (str, Path)):
        folder = str(clip)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
        clip = CLIPModel.from_pretrained(folder)
    if tokenizer is None:
        raise HeadError("clip_head: give the CLIP model's tokenizer (or the model's folder)")
    clip = clip.to(device).eval()
    rows = []
    with torch.no_grad():
        for c in classes:
            enc = tokenizer([t.format(c) for t in templates], padding=True, return_tensors="pt").to(device)
            out = clip.get_text_features(**enc)
            emb = out if isinstance(out, torch.Tensor) else out.pooler_output
            emb = torch.nn.functional.normalize(emb.float(), dim=-1).mean(0)
            rows.append(torch.nn.functional.normalize(emb, dim=-1))
        proj = clip.visual_projection.weight.detach().float().cpu()
        scale = float(clip.logit_scale.exp())
    return TaskHead(list(classes), torch.stack(rows).cpu(), projection=proj, normalize=True, scale=scale)


def classifier_head(model) -> TaskHead:
    """The ``classifier`` layer of an image-classification model (or its folder), with its
    classes from the config's ``id2label``."""
    if isinstance(model, (str, Path)):
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(str(model))
    layer = getattr(model, "classifier", None)
    if isinstance(layer, torch.nn.Sequential):
        linear = [m for m in layer if isinstance(m, torch.nn.Linear)]
        layer = linear[-1] if len(linear) == 1 else None
    if not isinstance(layer, torch.nn.Linear):
        raise HeadError(f"{type(model).__name__} has no linear 'classifier' layer to take as a head")
    id2label = getattr(model.config, "id2label", None) or {}
    classes = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(layer.out_features)]
    bias = None if layer.bias is None else layer.bias.detach().float().cpu()
    return TaskHead(classes, layer.weight.detach().float().cpu(), bias, normalize=False, scale=1.0)
