"""Classification: the procedural image tasks, task heads, the classification evaluator and
the vision zoo, on the zoo's CLIP vision towers and on a second family (ViT image
classifiers, each with its own classifier head)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from evomerge.evaluate import EvaluationError, build_evaluator
from evomerge.evaluate.classification import ClassificationEvaluator, class_entropy
from evomerge.vision.heads import (
    HeadError, TaskHead, classifier_head, clip_head, features, pixel_values, prototype_head,
)
from evomerge.vision.images import IMAGE_TASKS
from evomerge.vision.zoo import VisionZooConfig, read_images, write_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_clip_vision(seed=0, hidden=16, layers=2):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=hidden)
    return CLIPVisionModel(cfg).eval()


def tiny_vit_classifier(labels, seed=0):
    """The second family: a ViT image classifier (another architecture, layer naming and
    pooling, and a head of its own per task)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32,
                    patch_size=8, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={c: i for i, c in enumerate(labels)})
    return ViTForImageClassification(cfg).eval()


def tiny_clip(seed=0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vis = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2)
    txt = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=32, bos_token_id=0, pad_token_id=1, eos_token_id=98)
    return CLIPModel(CLIPConfig(text_config=txt, vision_config=vis, projection_dim=8)).eval()


class _Words:
    """A whitespace tokenizer for the tiny CLIP (ids 2..97 by a stable hash, EOS 98 last)."""

    def __call__(self, texts, padding=True, return_tensors="pt"):
        import zlib

        rows = [[2 + zlib.crc32(w.encode()) % 96 for w in t.split()] + [98] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [1] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])

        class _B(dict):
            def to(self, device):
                return _B({k: v.to(device) for k, v in self.items()})

        return _B(input_ids=ids, attention_mask=mask)


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("name", list(IMAGE_TASKS))
def test_image_tasks_are_seeded_and_cover_their_labels(name):
    t = IMAGE_TASKS[name]
    a, ya = t.draw(np.random.default_rng(3), 120)
    b, yb = t.draw(np.random.default_rng(3), 120)
    c, _ = t.draw(np.random.default_rng(4), 120)
    assert a.dtype == np.uint8 and a.shape == (120, 32, 32, 3) and ya.dtype == np.int64
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    assert set(ya.tolist()) == set(range(len(t.classes)))
    assert len(set(t.classes)) == len(t.classes)
    # no two images alike, and the images are not the background alone
    assert len({im.tobytes() for im in a}) == 120
    assert float(a.std()) > 20


def test_count_draws_the_number_of_squares_it_labels():
    from scipy import ndimage

    t = IMAGE_TASKS["count"]
    imgs, ys = t.draw(np.random.default_rng(0), 60)
    for im, y in zip(imgs, ys):
        bright = np.abs(im.astype(int) - np.median(im.reshape(-1, 3), 0)).max(-1) > 60
        n = ndimage.label(bright)[1]
        assert n == y + 1


def test_image_splits_round_trip(tmp_path):
    imgs, ys = IMAGE_TASKS["shape"].draw(np.random.default_rng(0), 10)
    write_images(tmp_path / "s.safetensors", imgs, ys, list(IMAGE_TASKS["shape"].classes))
    i2, y2, c2 = read_images(tmp_path / "s.safetensors")
    assert np.array_equal(i2, imgs) and np.array_equal(y2, ys) and c2 == list(IMAGE_TASKS["shape"].classes)


# ------------------------------------------------------------------------------ heads


def test_a_head_computes_its_formula_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, b, p = torch.randn(3, 4, generator=g), torch.randn(3, generator=g), torch.randn(4, 6, generator=g)
    head = TaskHead(["a", "b", "c"], w, b, p, normalize=True, scale=7.0)
    x = torch.randn(5, 6, generator=g)
    f = x @ p.T
    want = 7.0 * (f / f.norm(dim=-1, keepdim=True)) @ w.T + b
    assert torch.allclose(head.logits(x), want, atol=1e-5)
    again = TaskHead.load(head.save(tmp_path / "h.safetensors"))
    assert again.classes == ["a", "b", "c"] and again.scale == 7.0 and again.normalize
    assert torch.equal(again.logits(x), head.logits(x))
    plain = TaskHead(["a", "b", "c"], w, normalize=False)
    f4 = torch.randn(2, 4, generator=g)
    assert torch.allclose(plain.logits(f4), f4 @ w.T, atol=1e-6)  # no projection, no normalization, scale 1
    with pytest.raises(HeadError, match="6 dimensions; this head reads 4"):
        plain.logits(x)


def test_bad_heads_are_refused(tmp_path):
    with pytest.raises(HeadError, match="one row per class"):
        TaskHead(["a", "b"], torch.zeros(3, 4))
    with pytest.raises(HeadError, match="no task head"):
        TaskHead.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(HeadError, match="not a task head"):
        TaskHead.load(tmp_path / "w.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(HeadError, match="not a readable task head"):
        TaskHead.load(tmp_path / "junk.safetensors")


def test_live_models_are_bound_by_their_checkpoints_names(tmp_path):
    """transformers renames a ViT's tensors between its checkpoint and its modules; the
    merge binds the live model through those renamings. The class a live model is built
    with is the one its config names (a vision encoder), or the causal LM class."""
    from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel, ViTForImageClassification

    from evomerge.checkpoint import CheckpointError, build_from_config, live_class, live_names
    from safetensors import safe_open

    m = tiny_vit_classifier(["a", "b"])
    m.save_pretrained(tmp_path / "vit")
    names = live_names(m)
    saved = set(safe_open(str(tmp_path / "vit" / "model.safetensors"), "pt").keys())
    params = dict(m.named_parameters())
    assert saved <= set(names) and set(names[k] for k in saved) <= set(params)
    assert names["vit.encoder.layer.0.attention.attention.query.weight"] == "vit.layers.0.attention.q_proj.weight"
    for k in saved:  # each checkpoint tensor is the live parameter it is bound to
        with safe_open(str(tmp_path / "vit" / "model.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor(k), params[names[k]].detach()), k
    tiny_clip_vision().save_pretrained(tmp_path / "clip")
    assert live_class(tmp_path / "vit", "vision") is ViTForImageClassification
    assert live_class(tmp_path / "clip", "vision") is CLIPVisionModel
    assert live_class(tmp_path / "clip") is AutoModelForCausalLM
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    cfg["architectures"] = ["SomethingElse"]
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    assert live_class(tmp_path / "clip", "vision") is AutoModel
    with pytest.raises(CheckpointError, match="unknown model kind"):
        live_class(tmp_path / "clip", "audio")
    from transformers import AutoConfig

    built = build_from_config(ViTForImageClassification, AutoConfig.from_pretrained(tmp_path / "vit"))
    assert isinstance(built, ViTForImageClassification)


def test_features_of_a_clip_tower_are_its_pooled_output():
    m = tiny_clip_vision()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(features(m, x), m(pixel_values=x).pooler_output)


def test_an_image_classifier_read_through_its_own_head_gives_its_logits():
    m = tiny_vit_classifier(["cat", "dog", "cow"])
    x = torch.randn(4, 3, 32, 32)
    head = classifier_head(m)
    assert head.classes == ["cat", "dog", "cow"]
    assert torch.allclose(head.logits(features(m, x)), m(pixel_values=x).logits, atol=1e-6)


def test_a_clip_head_gives_clips_own_logits():
    clip = tiny_clip()
    classes, tok = ["red circle", "blue square", "green ring"], _Words()
    head = clip_head(clip, classes, ["a photo of a {}."], tokenizer=tok)
    x = torch.randn(2, 3, 32, 32)
    enc = tok([f"a photo of a {c}." for c in classes])
    want = clip(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=x).logits_per_image
    tower = clip.vision_model
    assert torch.allclose(head.logits(features(tower, x)), want, atol=1e-4)
    assert torch.allclose(head.logits(features(clip, x)), want, atol=1e-4)  # the whole model reads its tower
    # several templates: each embedding normalized, averaged, normalized again
    two = clip_head(clip, classes, ["a photo of a {}.", "{} !"], tokenizer=tok)
    e = [torch.nn.functional.normalize(clip.get_text_features(**tok([t.format(c) for t in
                                                                      ["a photo of a {}.", "{} !"]])).pooler_output, dim=-1)
         for c in classes]
    w = torch.nn.functional.normalize(torch.stack([v.mean(0) for v in e]), dim=-1)
    assert torch.allclose(two.weight, w, atol=1e-5)
    with pytest.raises(HeadError, match="no '\\{\\}'"):
        clip_head(clip, classes, ["a photo"], tokenizer=tok)


def test_prototype_heads_are_class_means():
    m = tiny_clip_vision()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 2, 2])
    head = prototype_head(m, x, y, ["a", "b", "c"], scale=5.0)
    f = torch.nn.functional.normalize(features(m, x), dim=-1)
    for i in range(3):
        assert torch.allclose(head.weight[i], torch.nn.functional.normalize(f[y == i].mean(0), dim=0), atol=1e-5)
    with pytest.raises(HeadError, match="class\\(es\\) \\['d'\\]"):
        prototype_head(m, x, y, ["a", "b", "c", "d"])


def test_the_zoo_processor_and_the_plain_scaling_agree():
    from evomerge.vision.zoo import _processor

    imgs, _ = IMAGE_TASKS["digits"].draw(np.random.default_rng(0), 5)
    assert torch.allclose(pixel_values(imgs, _processor()), pixel_values(imgs), atol=1e-6)


# ------------------------------------------------------------------------------ evaluator


def _task_folder(root, name, model, n=40, seed=0, classes=None):
    """A task's data (``root/<name>/{validation,test}.safetensors``) and its head, whose
    labels are what ``model`` predicts through the head for half the images (so the
    accuracy is known)."""
    t = IMAGE_TASKS[name]
    imgs, _ = t.draw(np.random.default_rng(seed), 2 * n)
    g = torch.Generator().manual_seed(seed)
    head = TaskHead(list(classes or t.classes), torch.randn(len(classes or t.classes), 16, generator=g), normalize=True,
                    scale=10.0)
    with torch.no_grad():
        pred = head.logits(features(model, pixel_values(imgs))).argmax(-1).numpy()
    labels = pred.copy()
    labels[::2] = (pred[::2] + 1) % len(head.classes)  # every other image wrong
    for split, sl in (("validation", slice(0, n)), ("test", slice(n, 2 * n))):
        write_images(root / name / f"{split}.safetensors", imgs[sl], labels[sl], head.classes)
    head.save(root / "heads" / f"{name}.safetensors")
    return head, pred, labels


def test_accuracy_and_entropy_are_those_of_each_task_through_its_head(tmp_path):
    m = tiny_clip_vision()
    for i, name in enumerate(("shape", "digits")):
        _task_folder(tmp_path, name, m, seed=i)
    ev = build_evaluator("classification", data_dir=tmp_path, tasks=["shape", "digits"], limit=None)
    assert ev.direction == "maximize" and ev.model_kind == "vision"
    out = ev(m, None, split="test")
    assert out == {"shape/acc": 0.5, "digits/acc": 0.5, "score": 0.5}
    ent = build_evaluator("classification_entropy", data_dir=tmp_path, tasks=["shape", "digits"])
    assert ent.direction == "minimize" and ent.primary("shape") == "entropy"
    got = ent(m, None, split="test")
    for name in ("shape", "digits"):
        imgs, _, _ = read_images(tmp_path / name / "test.safetensors")
        head = TaskHead.load(tmp_path / "heads" / f"{name}.safetensors")
        with torch.no_grad():
            lg = head.logits(features(m, pixel_values(imgs)))
        p = torch.softmax(lg, -1)
        assert got[f"{name}/entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    # a share of the search split for a first look: the seeded share every evaluator takes
    from evomerge.evaluate._common import part

    for fraction in (0.25, 0.5):
        got = ev(m, None, split="search", fraction=fraction)
        for name in ("shape", "digits"):
            imgs, ys, _ = read_images(tmp_path / name / "validation.safetensors")
            idx = part(list(range(len(ys))), fraction, 0)
            head = TaskHead.load(tmp_path / "heads" / f"{name}.safetensors")
            with torch.no_grad():
                pred = head.logits(features(m, pixel_values(imgs[idx]))).argmax(-1).numpy()
            assert got[f"{name}/acc"] == pytest.approx(float((pred == ys[idx]).mean()))
    with pytest.raises(EvaluationError, match="only the search split"):
        ev(m, None, split="test", fraction=0.5)


def test_a_split_too_large_to_keep_is_converted_batch_by_batch(tmp_path):
    m = tiny_clip_vision()
    _task_folder(tmp_path, "shape", m, n=40)
    ev = ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"], batch_size=7)
    kept = ev(m, None, split="test"), ev(m, None, split="search", fraction=0.5)
    ev2 = ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"], batch_size=7)
    ev2.cache_images = 10
    assert (ev2(m, None, split="test"), ev2(m, None, split="search", fraction=0.5)) == kept
    assert not ev2._pixels  # nothing kept


def test_the_entropy_loss_is_differentiable_and_matches_the_metric(tmp_path):
    m = tiny_clip_vision()
    _task_folder(tmp_path, "shape", m)
    ev = ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"], metric="entropy")
    px = ev.pixels("shape", "test")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}

    def call(**kw):
        return torch.func.functional_call(m, params, args=(), kwargs=kw)

    loss = ev.entropy_loss(m, call, {"shape": px})
    loss.backward()
    assert loss.item() == pytest.approx(ev(m, None, split="test")["shape/entropy"], rel=1e-5)
    assert all(p.grad is not None for p in params.values())
    assert torch.allclose(class_entropy(torch.zeros(1, 4)), torch.tensor([np.log(4)], dtype=torch.float32))


def test_the_second_family_is_read_through_each_tasks_own_classifier(tmp_path):
    """ViT classifiers with their own label sets: each task read through its expert's
    classifier (taken from the checkpoint), whatever classifier the live model carries."""
    experts = {"shape": tiny_vit_classifier(IMAGE_TASKS["shape"].classes, seed=1),
               "digits": tiny_vit_classifier(IMAGE_TASKS["digits"].classes, seed=2)}
    heads = {}
    for name, m in experts.items():
        m.save_pretrained(tmp_path / "models" / name)
        heads[name] = classifier_head(tmp_path / "models" / name)
        for split, seed in (("validation", 1), ("test", 0)):
            imgs, _ = IMAGE_TASKS[name].draw(np.random.default_rng(seed), 30)
            with torch.no_grad():
                labels = m(pixel_values=pixel_values(imgs)).logits.argmax(-1).numpy()
            write_images(tmp_path / name / f"{split}.safetensors", imgs, labels, list(IMAGE_TASKS[name].classes))
    ev = ClassificationEvaluator(data_dir=tmp_path, tasks=["shape", "digits"], heads=heads)
    # each expert, read through its own head, scores 100% on its task (the labels are its predictions)
    assert ev(experts["shape"], None, split="test")["shape/acc"] == 1.0
    assert ev(experts["digits"], None, split="test")["digits/acc"] == 1.0


def test_bad_classification_inputs_are_named(tmp_path):
    m = tiny_clip_vision()
    _task_folder(tmp_path, "shape", m)
    with pytest.raises(EvaluationError, match="'count'.*does not exist"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["count"])
    (tmp_path / "heads" / "shape.safetensors").unlink()
    with pytest.raises(EvaluationError, match="task 'shape': no task head"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"])
    _task_folder(tmp_path, "shape", m, classes=["a", "b"])  # labels 0..1, but the data says 6 classes
    imgs, ys, _ = read_images(tmp_path / "shape" / "test.safetensors")
    write_images(tmp_path / "shape" / "test.safetensors", imgs, ys + 4, ["a", "b"])
    with pytest.raises(EvaluationError, match="labels run from 4 to 5, but its head has 2 classes \\(0 to 1\\)"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"])
    write_images(tmp_path / "shape" / "test.safetensors", imgs, ys - 1, ["a", "b"])
    with pytest.raises(EvaluationError, match="labels run from -1 to 0"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"])
    ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"], metric="entropy")  # (which reads no labels)
    write_images(tmp_path / "shape" / "test.safetensors", imgs, ys, ["b", "a"])
    with pytest.raises(EvaluationError, match="the data's classes \\['b', 'a'\\] are not its head's \\['a', 'b'\\]"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"])
    write_images(tmp_path / "shape" / "test.safetensors", imgs[..., 0].copy(), ys, ["a", "b"])
    with pytest.raises(EvaluationError, match="uint8 images \\[n, h, w, 3\\]"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"])
    write_images(tmp_path / "shape" / "test.safetensors", imgs, ys, ["a", "b"])
    with pytest.raises(EvaluationError, match="one image split file \\(.safetensors\\) or a datasets spec"):
        ClassificationEvaluator({"shape": {"test": [str(tmp_path / "shape" / "test.safetensors")]}},
                                heads={"shape": tmp_path / "heads" / "shape.safetensors"})
    (tmp_path / "shape" / "test.safetensors").write_text("not safetensors")
    with pytest.raises(EvaluationError, match="not a readable image split"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"])
    with pytest.raises(EvaluationError, match="unknown metric"):
        ClassificationEvaluator(data_dir=tmp_path, tasks=["shape"], metric="f1")


def test_a_datasets_folder_is_a_source(tmp_path):
    """Images and labels from a ``datasets`` dataset (a local folder of parquet files), with
    the class names from its label feature and its own column names."""
    import datasets
    from PIL import Image

    m = tiny_clip_vision()
    t = IMAGE_TASKS["digits"]
    feats = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=list(t.classes))})
    (tmp_path / "ds").mkdir()
    for split, seed in (("validation", 1), ("test", 0)):
        imgs, ys = t.draw(np.random.default_rng(seed), 24)
        ds = datasets.Dataset.from_dict({"img": [Image.fromarray(i) for i in imgs], "y": ys.tolist()}, features=feats)
        ds.to_parquet(str(tmp_path / "ds" / f"{split}.parquet"))
    head = TaskHead(list(t.classes), torch.randn(10, 16), scale=10.0)
    spec = {"path": str(tmp_path / "ds"), "image": "img", "label": "y"}
    ev = ClassificationEvaluator({"digits": {"validation": spec, "test": spec}}, heads={"digits": head})
    with torch.no_grad():
        want = float((head.logits(features(m, pixel_values(imgs))).argmax(-1) == torch.from_numpy(ys)).float().mean())
    assert ev(m, None, split="test")["digits/acc"] == pytest.approx(want)
    # a search split that shares an image with the test split is refused
    with pytest.raises(EvaluationError, match="also occur in the test split"):
        ClassificationEvaluator({"digits": {"validation": {**spec, "split": "test"}, "test": spec}},
                                heads={"digits": head})
    with pytest.raises(EvaluationError, match="no column\\(s\\) \\['label'\\]"):
        ClassificationEvaluator({"digits": {"test": {"path": str(tmp_path / "ds"), "image": "img"}}},
                                heads={"digits": head})


# ------------------------------------------------------------------------------ the zoo


def test_the_vision_zoo_builds_deterministically(tmp_path):
    from evomerge.zoo import build_zoo, load_zoo

    cfg = VisionZooConfig.test_mode(tasks=("shape", "digits"), threads=1)
    a = build_zoo(tmp_path / "a", cfg, progress=False, log=lambda *_: None)
    b = build_zoo(tmp_path / "b", cfg, progress=False, log=lambda *_: None)
    assert a.kind == "vision" and a.tasks == ["shape", "digits"]
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file() and p.name != "zoo.json")
    assert files and all((a.root / f).read_bytes() == (b.root / f).read_bytes() for f in files)
    info = json.loads((a.root / "zoo.json").read_text())
    assert set(info["accuracy"]) == {"base", "shape", "digits"}
    assert a.data("shape", "test").name == "test.safetensors" and a.head("digits").is_file()
    assert load_zoo(a.root).experts["shape"].is_dir()
    # its own evaluator reads it
    ev = build_evaluator("classification", data_dir=a.root, tasks=a.tasks)
    from transformers import CLIPVisionModel

    expert = CLIPVisionModel.from_pretrained(a.experts["shape"])
    got = ev(expert, None, split="test")
    assert got["shape/acc"] == pytest.approx(info["accuracy"]["shape"]["shape"]["test"], abs=1e-4)


# ------------------------------------------------------------------------------ merging encoders


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    from evomerge.testing import vit_family

    return vit_family(tmp_path_factory.mktemp("vit") / "family")


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_merge_keeps_each_experts_head_apart(vits, tmp_path):
    """The second family: experts with classifiers of other shapes (6 and 10 classes) merge
    their encoders; ``keep: [classifier]`` takes the base's classifier as it is, and every
    other tensor is task arithmetic's, checked tensor by tensor."""
    from evomerge.merge.engine import Merger
    from evomerge.recipe import RecipeError, parse_recipe

    recipe = {"merge_method": "task_arithmetic", "base_model": str(vits.base),
              "models": [{"model": str(vits.experts[t]), "parameters": {"weight": w}} for t, w in
                         zip(vits.tasks, (0.7, 0.4))], "dtype": "float32", "keep": ["classifier"]}
    out = Merger(parse_recipe(recipe)).write(tmp_path / "merged")
    got, base = _state(out), _state(vits.base)
    ex = [_state(vits.experts[t]) for t in vits.tasks]
    assert set(got) == set(base)
    for name, t in got.items():
        if name.startswith("classifier."):
            assert torch.equal(t, base[name])
        else:
            want = base[name] + 0.7 * (ex[0][name] - base[name]) + 0.4 * (ex[1][name] - base[name])
            assert torch.allclose(t, want, atol=1e-6), name
    # without it, the classifiers' shapes differ and the merge is refused by name
    from evomerge.merge.plan import MergeError

    with pytest.raises(MergeError, match="shape mismatch for tensor 'classifier.(weight|bias)'"):
        Merger(parse_recipe({k: v for k, v in recipe.items() if k != "keep"}))
    with pytest.raises(RecipeError, match="keep: 'head' names no tensor"):
        Merger(parse_recipe({**recipe, "keep": ["head"]}))
    with pytest.raises(RecipeError, match="keep: expected a list"):
        parse_recipe({**recipe, "keep": [".classifier"]})


def _search(args, cwd):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "evomerge.app", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_a_search_on_the_second_family_reads_each_task_through_its_experts_head(vits, tmp_path):
    """The command line on ViT classifiers: each task's head from its own expert, the
    classifiers kept out of the merge, and the sources scored as they score alone."""
    run = tmp_path / "run"
    heads = ",".join(f"{t}:{{classifier:{vits.experts[t]}}}" for t in vits.tasks)
    r = _search(["models=custom", f"models.base={vits.base}",
                 f"models.experts=[{','.join(str(vits.experts[t]) for t in vits.tasks)}]", "models.keep=[classifier]",
                 "eval=classification", f"eval.data_dir={vits.root / 'data'}", f"eval.tasks=[{','.join(vits.tasks)}]",
                 "eval.search_split=dev", f"eval.heads={{{heads}}}", "search=random", "budget=4", "executor=local",
                 "progress=false", "threads=1", f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    res = summary["results"]
    for t in vits.tasks:  # each expert through its own head, as measured when the family was made
        assert res[t]["test"][f"{t}/acc"] == pytest.approx(vits.accuracy[t][t], abs=1e-4)
    assert res["base"]["test"]["shape/acc"] == pytest.approx(vits.accuracy["base"]["shape"], abs=1e-4)
    best = (run / "best_recipe.yaml").read_text()
    assert "keep:\n- classifier" in best


@pytest.fixture(scope="module")
def vzoo(tmp_path_factory):
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("vzoo") / "zoo", VisionZooConfig.test_mode(threads=1), progress=False,
                     log=lambda *_: None)


@pytest.mark.parametrize("experiment", ["vision_cmaes_per_layer", "vision_ta_grid", "vision_adamerging_taskwise",
                                        "vision_adamerging_layerwise", "vision_adamerging_plus_plus",
                                        "vision_greedy_soup"])
def test_every_vision_experiment_runs_on_the_vision_zoo(vzoo, tmp_path, experiment):
    run = tmp_path / "run"
    extra = {"vision_cmaes_per_layer": ["budget=6"], "vision_ta_grid": ["search.points=3", "budget=3"],
             "vision_adamerging_taskwise": ["search.steps=3"], "vision_adamerging_layerwise": ["search.steps=3"],
             "vision_adamerging_plus_plus": ["search.steps=3"],
             "vision_greedy_soup": ["models.ingredient_count=2", "models.ingredient_steps=2"]}[experiment]
    r = _search([f"experiment={experiment}", f"models.zoo_dir={vzoo.root}", "executor=local", "progress=false",
                 "threads=1", *extra, f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    best = summary["results"]["best"]["test"]
    tasks = ["digits"] if experiment == "vision_greedy_soup" else vzoo.tasks  # (a soup of one task's fine-tunes)
    assert set(best) == {f"{t}/acc" for t in tasks} | {"score"}
    assert 0 <= best["score"] <= 1


def test_a_vision_zoo_is_not_scored_by_a_language_evaluator(vzoo, tmp_path):
    r = _search([f"models.zoo_dir={vzoo.root}", "executor=local", "progress=false", "budget=2",
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2
    assert "is a vision zoo, and models.zoo_kind=language: give models.zoo_kind=vision eval=classification" in r.stderr
    r = _search([f"models.zoo_dir={vzoo.root}", "models.zoo_kind=vision", "eval=accuracy", "executor=local",
                 "progress=false", "budget=2", f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path)
    assert r.returncode == 2 and "is a vision zoo" in r.stderr


# ------------------------------------------------------------------------------ the CLIP benchmark's configs


CLIP_EXPERIMENTS = ["clip_vit_b32_ta8_task_arithmetic", "clip_vit_b32_ta8_ties", "clip_vit_b32_ta8_adamerging_layerwise",
                    "clip_vit_b32_ta8_cmaes_per_layer"]


def _compose(experiment, overrides=()):
    from hydra import compose, initialize_config_dir

    from evomerge.app import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return compose("config", overrides=[f"experiment={experiment}", *overrides])


@pytest.mark.parametrize("experiment", CLIP_EXPERIMENTS)
def test_the_clip_benchmark_configs_compose_with_the_real_models(experiment):
    from evomerge.app import check_config

    cfg = _compose(experiment)
    check_config(cfg)
    assert cfg.models.base == "openai/clip-vit-base-patch32"
    assert [e.rsplit("_", 1)[1] for e in cfg.models.experts] == [
        "sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert list(cfg.models.keep) == ["text_model", "text_projection", "visual_projection", "logit_scale"]
    assert cfg.eval.name == "classification" and list(cfg.eval.data) == list(cfg.eval.heads)
    assert len(cfg.eval.data) == 8 and all(set(v) == {"search", "test"} for v in cfg.eval.data.values())
    assert all(h.clip == "openai/clip-vit-base-patch32" and len(h.templates) >= 1 for h in cfg.eval.heads.values())
    assert [len(h.templates) for h in cfg.eval.heads.values()] == [2, 8, 18, 3, 1, 3, 1, 8]
    if "ties" in experiment:
        assert list(cfg.merge.search) == ["lambda"] and cfg.merge.fixed.density == 0.2
        assert cfg.merge.fixed.normalize is False


@pytest.fixture(scope="module")
def tiny_clip_benchmark(tmp_path_factory):
    """A tiny randomly initialized CLIP (with a word tokenizer), two fine-tuned vision towers
    saved as the hub's are (``vision_model.``-prefixed names, a CLIPVisionModel config), and
    two local datasets standing in for MNIST and EuroSAT."""
    import datasets
    from PIL import Image
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPVisionModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("clip")
    words = sorted({w for s in ['a photo of the number: "{}".', "a centered satellite photo of {}.",
                                "a centered satellite photo of a {}.", "a centered satellite photo of the {}."]
                    for w in s.replace("{}", "").replace('"', " ").replace(".", " ").replace(":", " ").split()})
    names = {"mnist": [str(d) for d in range(10)], "eurosat": list(IMAGE_TASKS["shape"].classes)}
    vocab = ["<pad>", "<unk>", "<eos>", '"', ".", ":"] + words + sorted({c for v in names.values() for c in v})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vis = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2)
    txt = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    clip = CLIPModel(CLIPConfig(text_config=txt, vision_config=vis, projection_dim=8)).eval()
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    from evomerge.vision.zoo import _processor

    _processor().save_pretrained(root / "clip")
    # as the hub's older CLIP checkpoints do, the base also stores its position ids (int64), which the
    # fine-tunes (saved later) do not
    from safetensors.torch import load_file

    state = load_file(str(root / "clip" / "model.safetensors"))
    state["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)
    save_file(state, str(root / "clip" / "model.safetensors"), metadata={"format": "pt"})
    experts = []
    for i in range(2):
        tower = CLIPVisionModel(clip.config.vision_config)
        tower.load_state_dict(clip.vision_model.state_dict())
        with torch.no_grad():
            for p in tower.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        folder = root / f"expert{i}"
        tower.save_pretrained(folder)
        state = {f"vision_model.{k}": v.contiguous() for k, v in tower.state_dict().items()}
        (folder / "model.safetensors").unlink()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        experts.append(folder)
    data = {}
    for task, source in (("mnist", "digits"), ("eurosat", "shape")):
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names[task])})
        (root / task).mkdir()
        for split, seed in (("train", 1), ("test", 2)):
            imgs, ys = IMAGE_TASKS[source].draw(np.random.default_rng(seed), 24)
            datasets.Dataset.from_dict({"image": [Image.fromarray(x) for x in imgs], "label": ys.tolist()},
                                       features=feats).to_parquet(str(root / task / f"{split}.parquet"))
        data[task] = root / task
    return root / "clip", experts, data


@pytest.mark.parametrize("experiment", CLIP_EXPERIMENTS)
def test_the_clip_benchmark_configs_run_on_a_tiny_clip(tiny_clip_benchmark, tmp_path, experiment):
    """Each benchmark experiment end to end, its models and datasets swapped for a tiny
    random CLIP and local stand-ins: the vision tower merged into the whole CLIP model,
    the text tower and projections kept, every task read through its zero-shot head."""
    clip, experts, data = tiny_clip_benchmark
    run = tmp_path / "run"
    extra = {"clip_vit_b32_ta8_task_arithmetic": ["search.points=3", "budget=3"],
             "clip_vit_b32_ta8_ties": ["search.points=3", "budget=3"],
             "clip_vit_b32_ta8_adamerging_layerwise": ["search.steps=2"],
             "clip_vit_b32_ta8_cmaes_per_layer": ["budget=4"]}[experiment]
    over = [f"experiment={experiment}", f"models.base={clip}", f"models.experts=[{experiments_list(experts)}]",
            "eval.tasks=[mnist,eurosat]", "eval.limit=16"]
    for task, folder in data.items():
        over += [f"eval.data.{task}.search.path={folder}", f"eval.data.{task}.test.path={folder}",
                 f"eval.heads.{task}.clip={clip}"]
    r = _search([*over, *extra, "executor=local", "progress=false", "threads=1", "export_model=true",
                 f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["results"]["best"]["test"]) == {"mnist/acc", "eurosat/acc", "score"}
    assert "keep:\n- text_model\n- text_projection\n- visual_projection\n- logit_scale" in (
        run / "best_recipe.yaml").read_text()
    # the merged model: the base's text tower, projections, scale and position ids as they are, the
    # vision tower merged (task arithmetic of the fine-tunes), and the base's image processor
    merged, base = _state(run / "best_model"), _state(clip)
    ex = [_state(e) for e in experts]
    assert set(merged) == set(base)
    for name, t in merged.items():
        if not name.startswith("vision_model.") or name.endswith("position_ids"):
            assert torch.equal(t, base[name]), name
    if experiment == "clip_vit_b32_ta8_task_arithmetic":  # one weight w: base + w * (sum of the task vectors)
        w = summary["results"]["best"]["genome"]["weight"]
        for name, t in merged.items():
            if name.startswith("vision_model.") and not name.endswith("position_ids"):
                want = base[name] + w * (ex[0][name] - base[name]) + w * (ex[1][name] - base[name])
                assert torch.allclose(t, want, atol=1e-6), name
    assert (run / "best_model" / "preprocessor_config.json").is_file()


def experiments_list(paths):
    return ",".join(str(p) for p in paths)


# ------------------------------------------------------------------------------ AdaMerging on classification


def _vision_worker(vzoo, granularity, model=None):
    from evomerge.execute import Worker
    from evomerge.space import Space

    sp = Space("task_arithmetic", [str(p) for p in vzoo.experts.values()], base_model=str(vzoo.base),
               search=["weight"], granularity=granularity)
    ev = ClassificationEvaluator(data_dir=vzoo.root, tasks=vzoo.tasks)
    return sp, Worker(sp, ev)


@pytest.mark.parametrize("granularity", ["per_model", "per_layer"])
def test_adamerging_on_images_merges_as_the_engine_and_lowers_the_entropy(vzoo, tmp_path, granularity):
    """The differentiable merge is the engine's merge of the same genome; training lowers
    the summed class entropy of the tasks' search images, read through their heads."""
    from evomerge.search.adamerging import AdaMerging

    sp, w = _vision_worker(vzoo, granularity)
    assert w.kind == "vision" and w.tokenizer is not None  # the zoo's image processor
    am = AdaMerging(sp, w, None, lr=0.05, steps=15, batch_size=16)
    x = np.random.default_rng(0).uniform(0, 1, len(sp))
    with torch.no_grad():
        am.x.copy_(torch.tensor(x, dtype=torch.float32))
    ours, ref = am.merged_params(), w.engine.merged(sp.recipe(x))
    assert ours and set(ours) <= set(ref)
    for name, t in ours.items():
        assert torch.allclose(t, ref[name], atol=1e-5), name
    ent = ClassificationEvaluator(data_dir=vzoo.root, tasks=vzoo.tasks, metric="entropy")

    def entropy(genome):
        w.engine.materialize(sp.recipe(genome), into=w.model)
        return sum(ent(w.model, w.tokenizer, split="search")[f"{t}/entropy"] for t in vzoo.tasks)

    with torch.no_grad():
        am.x.fill_(0.3)
    before = entropy(am.genome())
    got, _ = am.run(tmp_path / "run", progress=False)
    assert np.all(got >= 0) and np.all(got <= 1) and not np.allclose(got, 0.3)
    assert entropy(got) < before


def test_keep_does_not_let_a_merge_drop_weights(tiny_clip_benchmark, tmp_path):
    """With keep, models of other architectures may merge (a tower into a whole model), but a
    model holding weights the base lacks is refused by name: they would be left out."""
    from evomerge.merge.engine import Merger
    from evomerge.merge.plan import MergeError
    from evomerge.recipe import parse_recipe

    clip, experts, _ = tiny_clip_benchmark
    recipe = {"merge_method": "task_arithmetic", "base_model": str(experts[0]), "dtype": "float32",
              "models": [{"model": str(clip), "parameters": {"weight": 0.5}}], "keep": ["vision_model.post_layernorm"]}
    with pytest.raises(MergeError, match=r"has tensor 'logit_scale' \(\d+ in all\) that .* lacks: the merge would "
                                         "leave it out"):
        Merger(parse_recipe(recipe))


def test_a_renamed_live_model_takes_the_fast_path_after_its_first_candidate(vits, monkeypatch):
    """A ViT's live parameters are named otherwise than its checkpoint's tensors; after the
    first candidate the resident merger finds them along their live module paths, without
    looking the renamings up again, and writes the same weights as a fresh lookup."""
    from transformers import ViTForImageClassification

    import evomerge.checkpoint as ck
    from evomerge.merge.resident import ResidentMerger
    from evomerge.space import Space

    sp = Space("task_arithmetic", [str(vits.experts[t]) for t in vits.tasks], base_model=str(vits.base),
               search=["weight"], granularity="per_layer", keep=["classifier"])
    eng = ResidentMerger(sp.recipe(sp.x0))
    model = ViTForImageClassification.from_pretrained(vits.base).eval()
    cmap = sp.compile(eng.tasks)
    eng.materialize(cmap.columns(sp.x0), into=model)
    calls = []
    real = ck.live_names
    monkeypatch.setattr(ck, "live_names", lambda m: calls.append(1) or real(m))
    x = np.random.default_rng(0).uniform(0, 1, len(sp))
    eng.materialize(cmap.columns(x), into=model)
    assert not calls  # the fast path
    want = eng.merged(sp.recipe(x))
    live = dict(model.named_parameters())
    names = real(model)
    for name, t in want.items():
        assert torch.equal(live[names[name]].detach(), t), name


def test_a_merge_that_reads_text_statistics_is_refused_for_an_encoder(vzoo, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "abc"}\n')
    r = _search(["experiment=vision_cmaes_per_layer", f"models.zoo_dir={vzoo.root}", "merge=regmean",
                 f"merge.data.path={data}", "executor=local", "progress=false", "budget=2",
                 f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2
    assert "merge=regmean: its statistics come from a causal LM's forward passes" in r.stderr
    assert not (tmp_path / "run" / "trials.jsonl").exists()
