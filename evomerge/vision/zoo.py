"""The vision zoo: a small pretrained image encoder and one fine-tuned expert per
classification task, each task with its own label set and its own head, made locally::

    evomerge-zoo build --kind vision --out zoo_vision

Layout (the language zoo's, so the same ``models.zoo_dir=DIR`` reads it)::

    base/                     the pretrained encoder (a ``CLIPVisionModel``, with its image processor)
    experts/<task>/           one fine-tune per task
    heads/<task>.safetensors  each task's head (``TaskHead``), fixed: made from the base, kept by the experts
    data/<task>/{validation,test}.safetensors   uint8 images [n, 32, 32, 3] and int64 labels
    zoo.json                  the configuration, the tasks' classes and every model's accuracy per task

How it is made (and why):

* **Tasks** are procedural (``vision.images``): shapes, counts, textures, positions,
  orientations and digits, each its own image distribution and label set, as the
  benchmark's eight datasets are. Validation and test images are drawn from their own
  seeds, training images from others.
* **Base.** A ``CLIPVisionModel`` (the architecture of the benchmark's merged towers)
  pretrained on every task at once, on the tasks' *canonical* images (plain background,
  white objects of one size, centred where the label allows), with one cosine classifier
  per task. It knows every label set and reads the tasks' real images (noisy backgrounds,
  any colour, size and place) poorly: as CLIP's zero-shot heads read the benchmark's
  datasets.
* **Heads.** Each task's head is its pretraining classifier (normalized class vectors times
  a logit scale, CLIP's form), fixed from then on.
* **Experts** are the base fully fine-tuned on one task's real images through that task's
  head, the head kept fixed (as CLIP's zero-shot heads are while its towers are
  fine-tuned), so every expert and every merge of them is read by the same heads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..zoo import BuildConfig
from .images import IMAGE_TASKS, ImageTask, draw_mixture

__all__ = ["VisionZooConfig", "build_vision_zoo", "read_images", "write_images", "VISION_KIND"]

VISION_KIND = "vision"
VISION_ZOO_VERSION = 1


@dataclass(frozen=True)
class VisionZooConfig(BuildConfig):
    """Everything that determines the vision zoo's files (hashed into its cache key)."""

    seed: int = 0
    tasks: tuple[str, ...] = ("shape", "count", "texture", "position", "orientation", "digits")
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    patch: int = 8
    eval_size: int = 400  # validation and test images per task
    scale: float = 20.0  # the heads' logit scale
    pretext: float = 0.5  # share of each pretraining batch that is real images, for the unlabeled pretext
    pretrain_steps: int = 2000
    pretrain_lr: float = 2e-3
    expert_steps: int = 500
    expert_lr: float = 3e-4
    batch_size: int = 64
    threads: int = 2
    kind: str = VISION_KIND
    version: int = VISION_ZOO_VERSION
    TEST_MODE: ClassVar[dict] = dict(hidden=16, layers=2, heads=2, intermediate=32, eval_size=64, pretrain_steps=10,
                                     expert_steps=5, batch_size=16)


def _seed(*parts) -> int:
    import zlib

    return zlib.crc32("/".join(map(str, parts)).encode())


def write_images(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> Path:
    """One split: ``images`` (uint8 ``[n, h, w, 3]``) and ``labels``, classes in the metadata."""
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(labels)},
              str(tmp), metadata={"classes": json.dumps(list(classes))})
    tmp.replace(path)
    return path


def read_images(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """``(images, labels, classes)`` of a split written by ``write_images``."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
    classes = json.loads(meta["classes"]) if "classes" in meta else None
    return images, labels, classes


def model_config(cfg: VisionZooConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, image_size=32,
                            patch_size=cfg.patch, num_channels=3, projection_dim=cfg.hidden)


def _processor():
    try:  # (the plain one, where torchvision is not installed)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor

    # the images are made at the model's size: rescaled to [0, 1], then to [-1, 1]
    return CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                              do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=False)


def _lr(step: int, steps: int, lr: float) -> float:
    import math

    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


def _train(params, loss_of_batch, steps: int, lr: float, wd: float, desc: str, progress: bool) -> list[float]:
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        loss = loss_of_batch(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def head_accuracy(model, head, pixels, labels, batch_size: int = 256) -> float:
    import torch

    from .heads import features

    hits = 0
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            hits += int((head.logits(features(model, pixels[i:i + batch_size])).argmax(-1)
                         == labels[i:i + batch_size]).sum())
    return hits / max(1, len(pixels))


def fine_tune(model, task: ImageTask, head, steps: int, lr: float, seed: int, batch_size: int,
              progress: bool = True) -> list[float]:
    """Fine-tune every weight of ``model`` on ``task`` through its fixed ``head`` (AdamW,
    cross-entropy, images drawn from ``seed``)."""
    import torch

    from .heads import features, pixel_values

    rng = np.random.default_rng(seed)

    def loss(step):
        images, labels = task.draw(rng, batch_size)
        return torch.nn.functional.cross_entropy(head.logits(features(model, pixel_values(images))),
                                                 torch.from_numpy(labels))

    model.train()
    try:
        return _train(list(model.parameters()), loss, steps, lr, 0.0, task.name, progress)
    finally:
        model.eval()


INGREDIENT_LR_SCALES = (0.3, 0.6, 1.0, 1.5, 2.5)  # of the experts' learning rate


def build_vision_ingredients(zoo, task: str, count: int = 6, steps: int | None = None, progress: bool = True,
                             log=print) -> list[Path]:
    """Soup ingredients of a vision zoo: ``count`` fine-tunes of the base on ``task`` through
    its head, each with its own data seed and learning rate (the experts' times
    ``INGREDIENT_LR_SCALES``, cycling), for ``steps`` steps (default: half the experts').
    Built once into ``<zoo>/ingredients/<task>/`` and reused; another count or number of
    steps rebuilds them."""
    import torch
    from transformers import CLIPVisionModel

    from ..zoo import ZooError, _atomic_dir
    from .heads import TaskHead, pixel_values

    if task not in zoo.tasks:
        raise ZooError(f"the zoo at {zoo.root} has no task {task!r}; it has {', '.join(zoo.tasks)}")
    if count < 2:
        raise ZooError(f"ingredients: count must be at least 2, got {count}")
    cfg = VisionZooConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in zoo.info["config"].items()})
    steps = int(steps) if steps is not None else max(1, cfg.expert_steps // 2)
    lrs = [cfg.expert_lr * f for f in INGREDIENT_LR_SCALES]
    folder = zoo.root / "ingredients" / task
    meta = folder / "ingredients.json"
    want = {"count": count, "steps": steps, "lrs": lrs, "key": zoo.info.get("key")}
    if meta.is_file():
        info = json.loads(meta.read_text())
        if {k: info.get(k) for k in want} == want:
            return zoo.ingredients(task)
    t = IMAGE_TASKS[task]
    head = TaskHead.load(zoo.head(task))
    splits = {}
    for split in ("validation", "test"):
        images, labels, _ = read_images(zoo.data(task, split))
        splits[split] = (pixel_values(images), torch.from_numpy(labels))
    processor = _processor()
    with _atomic_dir(folder, cfg.threads) as tmp:
        runs = []
        for i in range(count):
            lr, seed = lrs[i % len(lrs)], _seed("ingredient", task, i, cfg.seed)
            log(f"zoo: ingredient {i + 1}/{count} of {task} (lr {lr:g}, seed {seed})")
            torch.manual_seed(seed)
            model = CLIPVisionModel.from_pretrained(zoo.base).eval()
            fine_tune(model, t, head, steps, lr, seed, cfg.batch_size, progress)
            name = f"{i:02d}"
            model.save_pretrained(tmp / name)
            processor.save_pretrained(tmp / name)
            runs.append({"name": name, "lr": lr, "seed": seed,
                         "accuracy": {s: round(head_accuracy(model, head, *xy), 4) for s, xy in splits.items()}})
        (tmp / "ingredients.json").write_text(json.dumps({**want, "task": task, "runs": runs}, indent=2) + "\n")
    return zoo.ingredients(task)


def build_vision_zoo(out: Path, cfg: VisionZooConfig, progress: bool = True, log=print) -> Path:
    """Build the vision zoo into ``out`` (a fresh folder: the caller renames it into place)."""
    import torch
    from transformers import CLIPVisionModel

    from ..zoo import ZooError
    from .heads import TaskHead, features, pixel_values

    unknown = [t for t in cfg.tasks if t not in IMAGE_TASKS]
    if unknown or len(cfg.tasks) < 2 or len(set(cfg.tasks)) != len(cfg.tasks):
        raise ZooError(f"vision zoo tasks {list(cfg.tasks)}: give two or more distinct tasks of "
                       f"{', '.join(IMAGE_TASKS)}" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
    t0 = time.perf_counter()
    tasks: list[ImageTask] = [IMAGE_TASKS[t] for t in cfg.tasks]
    splits: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for t in tasks:
        splits[t.name] = {}
        for split in ("validation", "test"):
            images, labels = t.draw(np.random.default_rng(_seed("eval", t.name, split, cfg.seed)), cfg.eval_size)
            write_images(out / "data" / t.name / f"{split}.safetensors", images, labels, list(t.classes))
            splits[t.name][split] = (pixel_values(images), torch.from_numpy(labels))

    torch.manual_seed(cfg.seed)
    model = CLIPVisionModel(model_config(cfg))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"zoo: pretraining the vision base ({n_params / 1e6:.2f}M parameters, {cfg.pretrain_steps} steps)")
    # one cosine classifier per task, trained with the encoder on the tasks' canonical images
    protos = [torch.nn.Parameter(torch.randn(len(t.classes), cfg.hidden) * 0.1) for t in tasks]
    # and, on the tasks' real images without their labels: which task an image comes from,
    # and by how many quarter turns it was rotated
    domain, turns = torch.nn.Linear(cfg.hidden, len(tasks)), torch.nn.Linear(cfg.hidden, 4)
    rng = np.random.default_rng(_seed("pretrain", cfg.seed))
    ce = torch.nn.functional.cross_entropy
    n_real = int(round(cfg.batch_size * cfg.pretext))

    def pretrain(step):
        images, which, labels = draw_mixture(tasks, rng, cfg.batch_size - n_real, easy=True)
        f = torch.nn.functional.normalize(features(model, pixel_values(images)), dim=-1)
        loss = 0.0
        for i, p in enumerate(protos):
            sel = torch.from_numpy(np.flatnonzero(which == i))
            if len(sel):
                logits = cfg.scale * f[sel] @ torch.nn.functional.normalize(p, dim=-1).T
                loss = loss + ce(logits, torch.from_numpy(labels[sel.numpy()]), reduction="sum")
        loss = loss / max(1, cfg.batch_size - n_real)
        if n_real:
            real, where, _ = draw_mixture(tasks, rng, n_real)
            k = rng.integers(0, 4, n_real)
            real = np.stack([np.rot90(im, int(q)) for im, q in zip(real, k)])
            g = features(model, pixel_values(real))
            loss = loss + ce(domain(g), torch.from_numpy(where)) + ce(turns(g), torch.from_numpy(k.astype(np.int64)))
        return loss

    model.train()
    _train(list(model.parameters()) + protos + list(domain.parameters()) + list(turns.parameters()), pretrain,
           cfg.pretrain_steps, cfg.pretrain_lr, 0.01, "vision base", progress)
    model.eval()
    processor = _processor()
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")

    heads = {}
    for t, p in zip(tasks, protos):  # each task's head: its pretrained classifier, kept fixed from here on
        heads[t.name] = TaskHead(list(t.classes), torch.nn.functional.normalize(p.detach(), dim=-1),
                                 normalize=True, scale=cfg.scale)
        heads[t.name].save(out / "heads" / f"{t.name}.safetensors")

    def measure(m) -> dict[str, dict[str, float]]:
        return {t.name: {s: round(head_accuracy(m, heads[t.name], *splits[t.name][s]), 4)
                         for s in ("validation", "test")} for t in tasks}

    acc = {"base": measure(model)}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in tasks:
        model.load_state_dict(base_state)
        log(f"zoo: fine-tuning the {t.name} expert ({cfg.expert_steps} steps)")
        fine_tune(model, t, heads[t.name], cfg.expert_steps, cfg.expert_lr, _seed("expert", t.name, cfg.seed),
                  cfg.batch_size, progress)
        model.save_pretrained(out / "experts" / t.name)
        processor.save_pretrained(out / "experts" / t.name)
        acc[t.name] = measure(model)
    info = {
        "kind": VISION_KIND,
        "key": cfg.key(),
        "config": asdict(cfg),
        "parameters": n_params,
        "tasks": {t.name: {"classes": list(t.classes), "description": t.description} for t in tasks},
        "accuracy": acc,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "zoo.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out
