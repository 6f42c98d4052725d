"""Image tensors to files: PNG grids for people, npz batches in the ADM layout for evaluators."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_npz


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding as the ADM sample scripts do."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: torch.Tensor, path: str | Path, columns: int, pad: int = 2, row_labels: list[str] | None = None) -> Path:
    """Save images (N, C, H, W) in [-1, 1] as one PNG, `columns` images per row; `row_labels` (e.g. the prompts)
    are written to the left of their rows."""
    from PIL import Image, ImageDraw, ImageFont

    images = to_uint8(x)  # (N, H, W, C)
    n, h, w, c = images.shape
    rows = -(-n // columns)
    font = ImageFont.load_default()
    margin = 0 if not row_labels else int(max(font.getlength(s) for s in row_labels)) + 2 * pad
    grid = np.full((rows * (h + pad) + pad, margin + columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        left = margin + pad + col * (w + pad)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, left : left + w] = img
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if row_labels:
        draw = ImageDraw.Draw(picture)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((pad, pad + r * (h + pad) + h // 2), label, fill=0, font=font, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def save_npz(x: torch.Tensor, labels: list[int] | None, path: str | Path) -> Path:
    """ADM layout: arr_0 uint8 (N, H, W, 3 or 1), arr_1 int64 labels (none for prompts); x (N, C, H, W) in [-1, 1], or already uint8."""
    images = x.permute(0, 2, 3, 1).cpu().numpy() if x.dtype == torch.uint8 else to_uint8(x)
    return atomic_write_npz(path, images) if labels is None else atomic_write_npz(path, images, np.asarray(labels, dtype=np.int64))


def save_samples(x: torch.Tensor, stem: Path, labels: list[int] | None, prompts: list[str] | None, per_label: int, grid_max: int) -> list[str]:
    """What `sprintdit sample` writes for images (N, C, H, W) in [-1, 1], each label or prompt `per_label` times in a
    row: STEM.npz (ADM layout; labels only for class models), STEM.prompts.txt (sample i: prompt i // per_label)
    and a PNG grid of at most `grid_max` images in whole rows (0: none). Returns what it wrote, for people."""
    from .files import atomic_write_text

    def named(suffix: str) -> Path:  # not with_suffix: a stem like pdg_euler25_s1.5 has a dot of its own
        return stem.parent / (stem.name + suffix)

    written = [f"batch: {save_npz(x, labels, named('.npz'))}"]
    if prompts:
        written.append(f"prompts: {atomic_write_text(named('.prompts.txt'), ''.join(p + chr(10) for p in prompts))}")
    if grid_max > 0:  # a PNG for people (a 50k ADM batch lives in the npz)
        columns = per_label if per_label > 1 or prompts else min(len(x), 10)
        count = min(len(x), grid_max - grid_max % columns or columns)
        grid = save_grid(x[:count], named(".png"), columns=columns, row_labels=prompts)
        written.append(f"grid: {grid}" + (f" (first {count})" if count < len(x) else ""))
    else:
        written.append("no grid")
    return written
