"""Procedural image-classification tasks: small RGB images drawn from a seeded NumPy
generator, each task with its own image distribution and its own label set (as the eight
datasets of the published CLIP benchmark each are).

``ImageTask.draw(rng, n)`` gives ``(images, labels)``: ``uint8 [n, size, size, 3]`` and
``int64 [n]``. Every image has a noisy background of random brightness and tint, so no
task is solved by the background; what decides the label is the task's own property:

========== ======= ==========================================================
task       classes what decides the label
========== ======= ==========================================================
shape      6       the shape of one object (any colour, size and place)
colour     8       the colour of one object (any shape)
count      6       how many small squares (1 to 6)
texture    6       the pattern filling the image (stripes, checks, dots...)
position   9       the cell of a 3 x 3 grid holding one object
orientation 6      the angle of one bar (0 to 150 degrees, by 30)
digits     10      the digit drawn (a 3 x 5 bitmap font, scaled and placed)
========== ======= ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["ImageTask", "IMAGE_TASKS", "PALETTE", "draw_mixture"]

SIZE = 32

PALETTE = {  # name: RGB in [0, 1]
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1),
    "cyan": (0.1, 0.85, 0.9), "magenta": (0.9, 0.15, 0.85), "orange": (1.0, 0.55, 0.05), "white": (0.97, 0.97, 0.97),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checks", "dots", "rings")
ANGLES = (0, 30, 60, 90, 120, 150)
_FONT = {  # 3 x 5 bitmaps, rows top to bottom
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
}

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _background(rng: np.random.Generator, easy: bool = False) -> np.ndarray:
    if easy:
        return np.full((SIZE, SIZE, 3), 0.25, np.float32)
    grey = rng.uniform(0.05, 0.45)
    tint = rng.uniform(-0.08, 0.08, 3)
    img = np.clip(grey + tint, 0, 1)[None, None, :] * np.ones((SIZE, SIZE, 1), np.float32)
    return img + rng.normal(0, 0.04, (SIZE, SIZE, 3)).astype(np.float32)


def _colour(rng: np.random.Generator, name: str | None = None, easy: bool = False) -> np.ndarray:
    if easy and name is None:
        return np.ones(3, np.float32)
    name = name or list(PALETTE)[int(rng.integers(len(PALETTE)))]
    return np.clip(np.asarray(PALETTE[name], np.float32) + rng.uniform(-0.07, 0.07, 3), 0, 1)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    img[mask] = colour


def _shape_mask(kind: str, cy: float, cx: float, s: float, turn: float = 0.0) -> np.ndarray:
    dy, dx = _YY - cy, _XX - cx
    if turn:
        c, si = np.cos(turn), np.sin(turn)
        dy, dx = c * dy - si * dx, si * dy + c * dx
    if kind == "circle":
        return dy**2 + dx**2 <= s**2
    if kind == "square":
        return (np.abs(dy) <= s * 0.85) & (np.abs(dx) <= s * 0.85)
    if kind == "triangle":
        return (dy <= s * 0.8) & (dy >= -s) & (np.abs(dx) <= (dy + s) * 0.6)
    if kind == "cross":
        w = max(1.0, s * 0.3)
        return ((np.abs(dy) <= w) & (np.abs(dx) <= s)) | ((np.abs(dx) <= w) & (np.abs(dy) <= s))
    if kind == "ring":
        r2 = dy**2 + dx**2
        return (r2 <= s**2) & (r2 >= (s * 0.55) ** 2)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= s * 1.1
    raise ValueError(kind)


def _shape(rng, label, easy=False):
    img = _background(rng, easy)
    s = 7.0 if easy else rng.uniform(5, 9)
    cy, cx = (SIZE / 2, SIZE / 2) if easy else rng.uniform(s + 1, SIZE - s - 1, 2)
    _paint(img, _shape_mask(SHAPES[label], cy, cx, s, 0.0 if easy else rng.uniform(-0.3, 0.3)), _colour(rng, easy=easy))
    return img


def _colour_task(rng, label, easy=False):
    img = _background(rng, easy)
    s = 7.0 if easy else rng.uniform(4, 9)
    cy, cx = (SIZE / 2, SIZE / 2) if easy else rng.uniform(s + 1, SIZE - s - 1, 2)
    kind = "square" if easy else SHAPES[int(rng.integers(len(SHAPES)))]
    _paint(img, _shape_mask(kind, cy, cx, s), _colour(rng, list(PALETTE)[label]))
    return img


def _count(rng, label, easy=False):
    img = _background(rng, easy)
    n, placed = label + 1, []
    if easy:  # in a row across the middle
        for i in range(n):
            img[14:18, 1 + 5 * i:5 + 5 * i] = 1.0
        return img
    while len(placed) < n:
        y, x = rng.integers(1, SIZE - 5, 2)
        if all(abs(y - py) > 5 or abs(x - px) > 5 for py, px in placed):
            placed.append((y, x))
    for y, x in placed:
        side = int(rng.integers(3, 5))
        img[y:y + side, x:x + side] = _colour(rng)
    return img


def _texture(rng, label, easy=False):
    img = _background(rng, easy)
    period = 6.0 if easy else rng.uniform(4, 8)
    phase = 0.0 if easy else rng.uniform(0, period)
    kind = TEXTURES[label]
    y, x = _YY + phase, _XX + (0.0 if easy else rng.uniform(0, period))
    if kind == "horizontal stripes":
        mask = (y % period) < period / 2
    elif kind == "vertical stripes":
        mask = (x % period) < period / 2
    elif kind == "diagonal stripes":
        mask = ((x + y) % period) < period / 2
    elif kind == "checks":
        mask = ((y // (period / 2)) + (x // (period / 2))) % 2 == 0
    elif kind == "dots":
        mask = ((y % period) - period / 2) ** 2 + ((x % period) - period / 2) ** 2 <= (period / 4) ** 2
    else:  # rings around a random centre
        cy, cx = (SIZE / 2, SIZE / 2) if easy else rng.uniform(0, SIZE, 2)
        mask = (np.sqrt((_YY - cy) ** 2 + (_XX - cx) ** 2) % period) < period / 2
    _paint(img, mask, _colour(rng, easy=easy))
    return img


def _position(rng, label, easy=False):
    img = _background(rng, easy)
    row, col = divmod(label, 3)
    cell = SIZE / 3
    jitter = (0.0, 0.0) if easy else rng.uniform(-2, 2, 2)
    cy, cx = (row + 0.5) * cell + jitter[0], (col + 0.5) * cell + jitter[1]
    kind = "square" if easy else SHAPES[int(rng.integers(len(SHAPES)))]
    _paint(img, _shape_mask(kind, cy, cx, 3.5 if easy else rng.uniform(2.5, 4)), _colour(rng, easy=easy))
    return img


def _orientation(rng, label, easy=False):
    img = _background(rng, easy)
    theta = np.deg2rad(ANGLES[label] + (0.0 if easy else rng.uniform(-6, 6)))
    cy, cx = (SIZE / 2, SIZE / 2) if easy else rng.uniform(12, SIZE - 12, 2)
    dy, dx = _YY - cy, _XX - cx
    along = dx * np.cos(theta) - dy * np.sin(theta)
    across = dx * np.sin(theta) + dy * np.cos(theta)
    length = 10.0 if easy else rng.uniform(8, 12)
    _paint(img, (np.abs(along) <= length) & (np.abs(across) <= 1.2), _colour(rng, easy=easy))
    return img


def _digits(rng, label, easy=False):
    img = _background(rng, easy)
    scale = 4 if easy else int(rng.integers(4, 6))
    glyph = np.array([[c == "1" for c in row] for row in _FONT[str(label)]])
    big = np.kron(glyph, np.ones((scale, scale), bool))
    h, w = big.shape
    if easy:
        y, x = (SIZE - h) // 2, (SIZE - w) // 2
    else:
        y, x = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y:y + h, x:x + w] = big
    _paint(img, mask, _colour(rng, easy=easy))
    return img


@dataclass(frozen=True)
class ImageTask:
    """A classification task: ``classes`` (label ``i`` is ``classes[i]``) and a drawing
    function of a generator and a label."""

    name: str
    classes: tuple[str, ...]
    paint: Callable[..., np.ndarray]  # (rng, label, easy) -> float image [32, 32, 3] in [0, 1]
    description: str

    def draw(self, rng: np.random.Generator, n: int, easy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``n`` images of uniformly drawn labels: ``uint8 [n, 32, 32, 3]``, ``int64 [n]``;
        ``easy``: the canonical variant (plain background, white objects of one size,
        centred where the label allows), on which the vision zoo's base is pretrained."""
        labels = rng.integers(0, len(self.classes), n).astype(np.int64)
        images = np.stack([self.paint(rng, int(y), easy) for y in labels]) if n else np.zeros((0, SIZE, SIZE, 3))
        return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8), labels


IMAGE_TASKS: dict[str, ImageTask] = {t.name: t for t in [
    ImageTask("shape", SHAPES, _shape, "the shape of one object"),
    ImageTask("colour", tuple(PALETTE), _colour_task, "the colour of one object"),
    ImageTask("count", ("one", "two", "three", "four", "five", "six"), _count, "how many small squares"),
    ImageTask("texture", TEXTURES, _texture, "the pattern that fills the image"),
    ImageTask("position", tuple(f"{r} {c}" for r in ("top", "middle", "bottom") for c in ("left", "centre", "right")),
              _position, "the cell of a 3 x 3 grid that holds one object"),
    ImageTask("orientation", tuple(f"{a} degrees" for a in ANGLES), _orientation, "the angle of one bar"),
    ImageTask("digits", tuple(str(d) for d in range(10)), _digits, "the digit drawn"),
]}


def draw_mixture(tasks: list[ImageTask], rng: np.random.Generator, n: int,
                 easy: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` images from the tasks' distributions mixed uniformly: the images, the index of
    the task each came from, and its label in that task."""
    which = rng.integers(0, len(tasks), n)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i, t in enumerate(tasks):
        idx = np.flatnonzero(which == i)
        if len(idx):
            images[idx], labels[idx] = t.draw(rng, len(idx), easy)
    return images, which.astype(np.int64), labels
