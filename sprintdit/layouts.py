"""Compositional Fashion-MNIST: captioned 2x2 layouts of shrunk garments, generated from the IDX files.

Canvas i (32x32, 1 channel) holds 1 or 2 garments, each shrunk from 28x28 to 16x16 and placed in a cell of the
2x2 grid; its caption names what stands where, cells in reading order: "a sneaker top left and a bag bottom
right". Everything about canvas i (how many garments, their cells, classes and images) comes from a generator
seeded with (seed, i), so the data set is the same on every machine. One in HOLDOUT_FOLD layouts (a layout:
the set of (cell, class) pairs) is held out: training never sees it, and the demo scores captions of both kinds.
The score: each cell's content (garment class, or empty) against the caption, read by the shipped classifier.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from .fashion_mnist import FashionMNIST
from .errors import UserError
from .text import tokenize, vocabulary_of, words_of

CANVAS, CELL, GARMENT = 32, 16, 28  # canvas side, cell side (the shrunk garment), Fashion-MNIST's side
CELLS = ("top left", "top right", "bottom left", "bottom right")  # reading order; cell k at row k // 2, column k % 2
CLASS_WORDS = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)  # FASHION_MNIST_CLASSES
EMPTY = -1  # a cell's content when no garment stands there
MAX_GARMENTS = 2
HOLDOUT_FOLD = 10  # one layout in 10 is held out
EMPTY_INK = 0.1  # a cell whose brightest pixel (in [0, 1]) stays below this is read as empty
SIZES = ("train", "held_out")


Layout = tuple[int, ...]  # (4,) content of each cell: a class index or EMPTY


def caption_of(layout: Layout) -> str:
    return " and ".join(f"a {CLASS_WORDS[c]} {CELLS[k]}" for k, c in enumerate(layout) if c != EMPTY)


def parse_caption(caption: str) -> Layout:
    """The layout a caption describes (the inverse of caption_of)."""
    layout = [EMPTY] * len(CELLS)
    for part in caption.split(" and "):
        words = part.split()
        if len(words) != 4 or words[0] != "a" or words[1] not in CLASS_WORDS or " ".join(words[2:]) not in CELLS:
            raise UserError(f"{caption!r} is not a layout caption (e.g. 'a sneaker top left and a bag bottom right')")
        layout[CELLS.index(" ".join(words[2:]))] = CLASS_WORDS.index(words[1])
    return tuple(layout)


def held_out(layout: Layout) -> bool:
    return zlib.crc32(bytes(c + 1 for c in layout)) % HOLDOUT_FOLD == 0


def all_layouts() -> list[Layout]:
    """Every layout of 1 to MAX_GARMENTS garments, in a fixed order."""
    out = []
    for mask in range(1, 2 ** len(CELLS)):
        cells = [k for k in range(len(CELLS)) if mask >> k & 1]
        if len(cells) > MAX_GARMENTS:
            continue
        for classes in np.ndindex(*[len(CLASS_WORDS)] * len(cells)):
            layout = [EMPTY] * len(CELLS)
            for k, c in zip(cells, classes):
                layout[k] = int(c)
            out.append(tuple(layout))
    return out


VOCABULARY = vocabulary_of([caption_of(layout) for layout in all_layouts()])
MAX_TOKENS = 1 + max(len(words_of(caption_of(layout))) for layout in all_layouts())  # START + the longest caption


def shrink(images: torch.Tensor, side: int = CELL) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, side, side) float in [0, 1] (area-averaged)."""
    return F.interpolate(images[:, None].float() / 255.0, size=(side, side), mode="area")[:, 0]


def render(layout: Layout, garments: list[torch.Tensor]) -> torch.Tensor:
    """(1, 32, 32) in [-1, 1]: each garment (16, 16 in [0, 1]) in its cell, black elsewhere."""
    canvas = torch.zeros(CANVAS, CANVAS)
    for (k, _), g in zip([(k, c) for k, c in enumerate(layout) if c != EMPTY], garments):
        r, c = divmod(k, 2)
        canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = g
    return canvas[None] * 2 - 1


class FashionMNISTLayouts:
    """`data.name: fashion_mnist_layouts`: canvases and caption token ids; `split` train (held-out layouts never
    drawn) or held_out (only those), garments from Fashion-MNIST's train images."""

    channels = 1
    num_classes = 0  # captions, not classes
    vocabulary = VOCABULARY
    max_tokens = MAX_TOKENS

    def __init__(self, root: str, split: str = "train", size: int = 60000, seed: int = 0):
        if split not in SIZES:
            raise UserError(f"data.split for fashion_mnist_layouts is {split!r}; choose {' or '.join(SIZES)}")
        source = FashionMNIST(root, "train", GARMENT)
        self.garments = shrink(source.images[:, 0])  # (M, 16, 16)
        self.by_class = [torch.nonzero(source.labels == c)[:, 0] for c in range(len(CLASS_WORDS))]
        self.layouts = [layout for layout in all_layouts() if held_out(layout) == (split == "held_out")]
        self.size, self.seed = size, seed
        self.resolution = (CANVAS, CANVAS)

    def __len__(self) -> int:
        return self.size

    def item(self, i: int) -> tuple[Layout, list[int]]:
        """Canvas i's layout and the garment images (indices into Fashion-MNIST train) in its filled cells."""
        rng = np.random.default_rng((self.seed, i))
        layout = self.layouts[rng.integers(len(self.layouts))]
        images = [int(self.by_class[c][rng.integers(len(self.by_class[c]))]) for c in layout if c != EMPTY]
        return layout, images

    def load(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 32, 32) in [-1, 1] and (B, max_tokens) caption ids."""
        xs, ids = [], []
        for i in indices.tolist():
            layout, images = self.item(i)
            xs.append(render(layout, [self.garments[j] for j in images]))
            ids.append(tokenize(caption_of(layout), VOCABULARY, MAX_TOKENS))
        return torch.stack(xs), torch.tensor(ids)


def cell_contents(images: torch.Tensor, classifier) -> torch.Tensor:
    """(N, 1, 32, 32) in [-1, 1] -> (N, 4) each cell's class as the classifier reads it (the cell scaled back to
    28x28 and padded to 32, as it was trained), or EMPTY when the cell holds no ink."""
    from .metrics.fmnist_classifier import classify_garments

    n = images.shape[0]
    cells = (
        images[:, 0].unflatten(1, (2, CELL)).unflatten(3, (2, CELL)).permute(0, 1, 3, 2, 4).reshape(n * 4, CELL, CELL)
    )  # (N*4, 16, 16)
    ink = ((cells + 1) / 2).flatten(1).amax(1)  # (N*4,)
    logits = classify_garments(classifier, cells)
    read = torch.where(ink < EMPTY_INK, torch.full((n * 4,), EMPTY), logits.argmax(1))
    return read.view(n, 4)


def caption_accuracy(images: torch.Tensor, layouts: list[Layout], classifier) -> float:
    """Share of cells (all 4 of each canvas) whose content matches the caption's layout."""
    read = cell_contents(images, classifier)
    return (read == torch.tensor(layouts)).float().mean().item()
