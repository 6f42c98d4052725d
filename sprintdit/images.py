"""Image files in and out. In: class-per-folder scans and ADM's centre crop, shared by the image-folder reader
(sprintdit.data) and `sprintdit prepare`. Out: PNG grids for people (a clip as a strip of its frames), animated GIFs,
npz batches in the ADM layout for evaluators (clips: uint8 (N, F, H, W, C))."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .files import atomic_write, atomic_write_npz

IMAGE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)  # PIL's for empty, damaged or foreign files
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
STRIP_GAP = 1  # white pixels between the frames of a clip's strip
GIF_FRAME_MS = 125  # GIF frame duration: 8 frames per second


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) or clips (N, C, F, H, W) in [-1, 1] -> (N, H, W, C) or (N, F, H, W, C) uint8, rounding as the
    ADM sample scripts do."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).cpu().numpy()


def frame_strips(clips: torch.Tensor) -> torch.Tensor:
    """clips (N, C, F, H, W) -> (N, C, H, F W + (F - 1) STRIP_GAP): each clip's frames left to right, white between."""
    n, c, f, h, w = clips.shape
    strips = torch.ones(n, c, h, f * (w + STRIP_GAP) - STRIP_GAP, dtype=clips.dtype, device=clips.device)
    for i in range(f):
        strips[..., i * (w + STRIP_GAP) : i * (w + STRIP_GAP) + w] = clips[:, :, i]
    return strips


def save_gif(clip: torch.Tensor, path: str | Path) -> Path:
    """One clip (C, F, H, W) in [-1, 1] as an animated GIF that loops (grey levels are kept exactly; colour is
    quantised to GIF's 256-colour palette)."""
    from PIL import Image

    frames = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in to_uint8(clip[None])[0]]  # F x (H, W[, 3])
    return atomic_write(
        path,
        lambda tmp: frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0, optimize=False
        ),
    )


def save_grid(
    x: torch.Tensor, path: str | Path, columns: int, pad: int = 2, row_labels: list[str] | None = None
) -> Path:
    """Save images (N, C, H, W) in [-1, 1] as one PNG, `columns` images per row; `row_labels` (e.g. the prompts)
    are written to the left of their rows. Clips (N, C, F, H, W) are shown as strips of their frames."""
    from PIL import Image, ImageDraw, ImageFont

    images = to_uint8(frame_strips(x) if x.ndim == 5 else x)  # (N, H, W, C)
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
    """ADM layout: arr_0 uint8 (N, H, W, 3 or 1), arr_1 int64 labels (none for prompts); x (N, C, H, W) in [-1, 1], or
    already uint8. Clips (N, C, F, H, W) give arr_0 (N, F, H, W, C)."""
    images = x.movedim(1, -1).cpu().numpy() if x.dtype == torch.uint8 else to_uint8(x)
    return (
        atomic_write_npz(path, images)
        if labels is None
        else atomic_write_npz(path, images, np.asarray(labels, dtype=np.int64))
    )


def save_samples(
    x: torch.Tensor, stem: Path, labels: list[int] | None, prompts: list[str] | None, per_label: int, grid_max: int
) -> list[str]:
    """What `sprintdit sample` writes for images (N, C, H, W) in [-1, 1], each label or prompt `per_label` times in a
    row: STEM.npz (ADM layout; labels only for class models), STEM.prompts.txt (sample i: prompt i // per_label)
    and a PNG grid of at most `grid_max` images in whole rows (0: none). Clips (N, C, F, H, W) also get one GIF each,
    STEM_gifs/NNNNN.gif, and their grid shows each clip as a strip of frames. Returns what it wrote, for people."""
    from .files import atomic_write_text

    def named(suffix: str) -> Path:  # not with_suffix: a stem like pdg_euler25_s1.5 has a dot of its own
        return stem.parent / (stem.name + suffix)

    written = [f"batch: {save_npz(x, labels, named('.npz'))}"]
    if x.ndim == 5:
        for i, clip in enumerate(x):
            save_gif(clip, stem.parent / f"{stem.name}_gifs" / f"{i:05d}.gif")
        written.append(f"{len(x)} GIFs: {stem.parent / (stem.name + '_gifs')}")
    if prompts:
        written.append(f"prompts: {atomic_write_text(named('.prompts.txt'), ''.join(p + chr(10) for p in prompts))}")
    if grid_max > 0:  # a PNG for people (a 50k ADM batch lives in the npz)
        columns = per_label if per_label > 1 or prompts else min(len(x), 1 if x.ndim == 5 else 10)
        count = min(len(x), grid_max - grid_max % columns or columns)
        grid = save_grid(x[:count], named(".png"), columns=columns, row_labels=prompts)
        written.append(f"grid: {grid}" + (f" (first {count})" if count < len(x) else ""))
    else:
        written.append("no grid")
    return written


def scan_class_folders(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and (image path, label) pairs, sorted within each class."""
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise UserError(f"no images found under {root} (expected one sub-folder of images per class)")
    return classes, files


def adm_center_crop(img, resolution: int):
    """ADM's crop: halve with BOX while the short side is >= 2 * resolution, resize with BICUBIC so the short side
    is `resolution`, then take the centre square."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def read_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, R, R) uint8, RGB, ADM-cropped; raises (e.g. OSError) for files PIL cannot decode."""
    with Image.open(path) as img:
        arr = np.asarray(adm_center_crop(img.convert("RGB"), resolution), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
