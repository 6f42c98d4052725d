"""`sprintdit prepare`: a class-per-folder image tree -> sharded VAE latents for latent-space training (with --clips,
a clip folder -> per-frame latents (C, F, h, w) of the same image VAE, as Latte trains on).

Layout of the output folder:
- `shard_00000.safetensors`, ...: `mean` and `std` (N, C, h, w) float32, the UNSCALED posterior of the VAE
  (training multiplies by the manifest's `vae.scaling_factor` and draws a fresh sample each step), `labels` (N,)
  int64, and with DINOv2 weights `dinov2` (N, T, D) float16 final-norm patch tokens (REPA's targets).
- `shard_00000.json`: written after its shard, atomically: count, sha256, skipped images, the settings and a
  fingerprint of the shard's file list. A shard with a valid sidecar is complete; resuming keeps it.
- `manifest.json` (written last, atomically, by rank 0): resolution, latent shape, VAE path, config hash and
  scaling factor, DINOv2 settings, class name -> index, count, sha256 per shard, skipped images with reasons.
- With `--captions captions.jsonl` (any images under --images that have a caption, or with --clips any clips:
  `.npy` arrays or frame folders keyed by their path; see sprintdit.captions): first the caption-embedding table
  `captions.safetensors` / `captions.json` from the T5 or CLIP encoder at `--text-encoder-path`, then shards whose
  `caption` (N,) int64 holds each image's (clip's) table row instead of `labels` (Latte's text-to-video data).
  Without --vae only the table is written: pixel training reads it with data.captions=OUT.

Images are cropped as ADM does (`images.adm_center_crop`, as the image-folder reader). Shard i of the (sorted) file list
goes to rank
i mod world, so torchrun processes share the work; every rank writes its own shards and sidecars.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .captions import (
    TABLE_INFO,
    caption_table_matches,
    captioned_files,
    images_under,
    read_captions_jsonl,
    write_caption_table,
)
from .data import ClipFolder
from .distributed import barrier, joined, rank_device
from .errors import UserError
from .files import atomic_write, atomic_write_text, sha256_file
from .images import IMAGE_ERRORS, read_image, scan_class_folders
from .latents_format import FORMAT, MANIFEST, SHARD_NAME

PIXEL_MAX = 255.0


@dataclass
class PrepareConfig:
    # class-per-folder image tree (ImageNet train layout), or with `clips` a clip folder (sprintdit.data.ClipFolder)
    images: str
    out: str  # latent folder
    # local AutoencoderKL folder (config.json + weights); None: only the caption table (needs captions)
    vae: str | None = None
    captions: str | None = None  # captions.jsonl: store caption embeddings (and caption rows in the shards)
    text_encoder: str = "t5"  # t5 | clip (sprintdit.text_encoders)
    text_encoder_path: str | None = None  # its local transformers folder
    max_tokens: int = 120  # caption tokens (PixArt-alpha's T5: 120; CLIP: 77)
    resolution: int = 256  # image side after the ADM centre crop (clips: the frames' side, not cropped)
    # `images` holds clips: every frame is encoded with the image VAE, latents (C, F, h, w) as Latte trains on
    clips: bool = False
    frames: int | None = None  # clips: frames per clip (default: the first clip's)
    shard_size: int = 10000  # images per shard
    batch_size: int = 32  # images per VAE forward
    patch_size: int = 2  # SiT patch on the latents: DINOv2 features use a (latent side / patch) token grid
    device: str = "auto"
    progress: bool = True


@dataclass
class FeatureEncoder:
    """DINOv2 network whose patch tokens are stored with the latents, and how to name it in the manifest."""

    model: torch.nn.Module
    name: str  # e.g. ViT-B/14
    weights: str  # where its weights came from


@dataclass
class PrepareResult:
    manifest: Path | None  # None on ranks other than 0
    encoded: list[int] = field(default_factory=list)  # shard indices this process encoded
    kept: list[int] = field(default_factory=list)  # shard indices found complete and kept


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def files_fingerprint(files: list[tuple[Path, int]], root: Path) -> str:
    text = "\n".join(f"{p.relative_to(root)}\t{label}" for p, label in files)
    return hashlib.sha256(text.encode()).hexdigest()


def sidecar_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def complete_shard(shard: Path, settings: dict, fingerprint: str) -> dict | None:
    """The sidecar of a finished, intact shard; None if it must be (re-)encoded. Other settings are an error."""
    side = sidecar_path(shard)
    if not side.is_file() or not shard.is_file():
        return None
    info = json.loads(side.read_text())
    if info["settings"] != settings or info["files"] != fingerprint:
        raise UserError(
            f"{shard.parent} holds shards prepared with other settings or images ({side.name}); use a new --out"
        )
    return info if sha256_file(shard) == info["sha256"] else None


def pixels_reader(cfg: PrepareConfig, clips=None):
    """path -> uint8 pixels to encode: an image (3, R, R) after the ADM crop, or a clip of `clips` (3, F, R, R)
    (grey clips repeated to the VAE's three channels)."""
    if clips is None:
        return lambda path: read_image(path, cfg.resolution)
    return lambda path: torch.from_numpy(clips.read(path)).permute(3, 0, 1, 2).expand(3, -1, -1, -1)


def encode_shard(
    files, vae, features: FeatureEncoder | None, cfg: PrepareConfig, grid: int, bar, read
) -> tuple[dict, list]:
    """Tensors of one shard and the images skipped as unreadable ([{path, reason}]). files: (path, label) pairs,
    the label a class index, or with captions a caption-table row (stored as `caption`); read: `pixels_reader`'s."""
    from .vae import encode

    label_key = "caption" if cfg.captions else "labels"
    parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], label_key: [], "dinov2": []}
    skipped = []
    for start in range(0, len(files), cfg.batch_size):
        images, labels = [], []
        for path, label in files[start : start + cfg.batch_size]:
            try:
                images.append(read(path))
                labels.append(label)
            except IMAGE_ERRORS as err:
                skipped.append({"path": str(path), "reason": f"{type(err).__name__}: {err}".splitlines()[0]})
        bar.update(len(files[start : start + cfg.batch_size]))
        if not images:
            continue
        pixels = torch.stack(images)  # (B, 3, R, R) or (B, 3, F, R, R) uint8
        mean, std = encode(vae, pixels.float() / (PIXEL_MAX / 2) - 1)  # (B, C, h, w) each
        parts["mean"].append(mean.cpu())
        parts["std"].append(std.cpu())
        parts[label_key].append(torch.tensor(labels, dtype=torch.int64))
        if features is not None:
            from .metrics.dinov2 import dinov2_patch_features

            parts["dinov2"].append(dinov2_patch_features(features.model, pixels, grid).half().cpu())  # (B, T, D)
    tensors = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    return tensors, skipped


def prepare(cfg: PrepareConfig, features: FeatureEncoder | None = None) -> PrepareResult:
    """Encode every pending shard of this rank; rank 0 then writes the manifest. Re-running resumes."""
    from tqdm import tqdm

    from .vae import downsample_factor, load_vae

    if cfg.resolution < 1 or cfg.shard_size < 1 or cfg.batch_size < 1 or cfg.patch_size < 1:
        raise UserError("--resolution, --shard-size, --batch-size and --patch-size must be >= 1")
    if cfg.vae is None and cfg.captions is None:
        raise UserError("prepare needs --vae (latents) or --captions (caption embeddings), or both")
    root, out = Path(cfg.images), Path(cfg.out)
    device = rank_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU (NCCL's barrier uses the current device)
    d = joined(device)
    rank, world = d.shard
    clips, classes, files = list_inputs(cfg, features, root, out, d)
    if cfg.vae is None:
        return PrepareResult(manifest=out / TABLE_INFO if rank == 0 else None)
    vae = load_vae(cfg.vae, device)
    factor = downsample_factor(vae)
    if cfg.resolution % (factor * cfg.patch_size):
        raise UserError(
            f"--resolution {cfg.resolution} is not divisible by VAE factor {factor} x --patch-size {cfg.patch_size}"
        )
    grid = cfg.resolution // factor // cfg.patch_size
    if features is not None:
        features.model.to(device).eval()
    settings = shard_settings(cfg, features, grid, out, clips)
    out.mkdir(parents=True, exist_ok=True)
    plan = [files[i : i + cfg.shard_size] for i in range(0, len(files), cfg.shard_size)]
    result = PrepareResult(manifest=None)
    for i in range(rank, len(plan), world):  # this rank's shards: kept when complete, else (re-)encoded below
        done = complete_shard(out / SHARD_NAME.format(i), settings, files_fingerprint(plan[i], root)) is not None
        (result.kept if done else result.encoded).append(i)
    bar = tqdm(
        total=sum(len(plan[i]) for i in result.encoded),
        disable=not cfg.progress,
        unit="img",
        desc=f"encoding (rank {rank})",
        dynamic_ncols=True,
    )
    for i in result.encoded:
        write_shard(
            out / SHARD_NAME.format(i),
            plan[i],
            vae,
            features,
            cfg,
            grid,
            settings,
            root,
            bar,
            pixels_reader(cfg, clips),
        )
    bar.close()
    barrier(d, "waiting for every rank's shards before the manifest")
    if rank == 0:
        result.manifest = write_manifest(out, plan, classes, settings, vae, cfg, features)
    return result


def shard_settings(cfg: PrepareConfig, features: FeatureEncoder | None, grid: int, out: Path, clips) -> dict:
    """What a shard's latents depend on beyond its files (a shard written with other settings is encoded again)."""
    from .vae import config_sha256

    dinov2 = None if features is None else {"model": features.name, "weights": str(features.weights), "grid": grid}
    return {
        "resolution": cfg.resolution,
        "vae_config_sha256": config_sha256(cfg.vae),
        "dinov2": dinov2,
        "captions": None if cfg.captions is None else json.loads((out / TABLE_INFO).read_text())["sha256"],
        **({"frames": clips.resolution[0]} if clips is not None else {}),
    }


def list_inputs(cfg: PrepareConfig, features: FeatureEncoder | None, root: Path, out: Path, d) -> tuple:
    """(the clip folder or None, class names, the files to encode): clips, captioned images (their caption
    embeddings are written first) or a class-per-folder image tree."""
    if cfg.clips:
        if features is not None or cfg.vae is None:
            raise UserError("prepare --clips encodes clips with --vae; DINOv2 features are for images")
        if not root.is_dir():
            raise UserError(f"clip folder {root} does not exist")
        captioned = prepare_captions(cfg, root, out, d, ClipFolder.clips_under(root), "clip") if cfg.captions else None
        clips = ClipFolder(root, cfg.resolution, cfg.frames, captioned)
        return clips, clips.classes, clips.clips
    if cfg.captions:
        return None, [], prepare_captions(cfg, root, out, d, images_under(root), "image")
    return None, *scan_class_folders(root)


def write_shard(
    shard: Path,
    files: list,
    vae,
    features: FeatureEncoder | None,
    cfg: PrepareConfig,
    grid: int,
    settings: dict,
    root: Path,
    bar,
    read,
) -> None:
    """Encode one shard and write it, then its sidecar (both atomically: a sidecar means a complete shard)."""
    from safetensors.torch import save_file

    tensors, skipped = encode_shard(files, vae, features, cfg, grid, bar, read)
    if not tensors:
        raise UserError(f"no readable image in {shard.name} of {root} (first: {files[0][0]})")
    atomic_write(shard, lambda p: save_file(tensors, str(p)))
    write_json(
        sidecar_path(shard),
        {
            "file": shard.name,
            "count": len(tensors["mean"]),
            "sha256": sha256_file(shard),
            "skipped": skipped,
            "settings": settings,
            "files": files_fingerprint(files, root),
        },
    )


def prepare_captions(
    cfg: PrepareConfig, root: Path, out: Path, d, found: list[str], what: str
) -> list[tuple[Path, int]]:
    """Rank 0 writes the caption table (kept when it is already there and the same); every rank gets the
    captioned files of `found` (images or clips) as (path, table row) pairs."""
    from .text_encoders import PretrainedTextEncoder

    text = read_captions_jsonl(cfg.captions)
    names = captioned_files(root, text, found, what)
    if d.shard[0] == 0:
        if cfg.text_encoder_path is None:
            raise UserError("--captions needs --text-encoder-path: the local T5 or CLIP folder that embeds them")
        encoder = PretrainedTextEncoder(cfg.text_encoder, cfg.text_encoder_path, cfg.max_tokens, d.device)
        if not caption_table_matches(out, names, [text[f] for f in names], encoder):
            write_caption_table(out, names, [text[f] for f in names], encoder)
    barrier(d, "waiting for the caption table")
    return [(root / f, i + 1) for i, f in enumerate(names)]


def write_manifest(
    out: Path, plan: list, classes: list[str], settings: dict, vae, cfg: PrepareConfig, features: FeatureEncoder | None
) -> Path:
    from safetensors import safe_open

    from .vae import downsample_factor, scaling_factor

    infos = []
    for i in range(len(plan)):
        side = sidecar_path(out / SHARD_NAME.format(i))
        if not side.is_file():
            raise UserError(
                f"shard {i} of {out} is not finished ({side.name} missing); run prepare again to complete it"
            )
        infos.append(json.loads(side.read_text()))
    with safe_open(str(out / infos[0]["file"]), framework="pt") as f:
        latent_shape = list(f.get_slice("mean").get_shape()[1:])
        dinov2_shape = list(f.get_slice("dinov2").get_shape()[1:]) if "dinov2" in f.keys() else None
    manifest = {
        "format": FORMAT,
        "resolution": cfg.resolution,
        "latent_shape": latent_shape,  # (C, h, w), clips (C, F, h, w)
        "storage": "unscaled posterior mean and std, float32; multiply by vae.scaling_factor for the model",
        "vae": {
            "path": str(Path(cfg.vae).resolve()),
            "config_sha256": settings["vae_config_sha256"],
            "scaling_factor": scaling_factor(vae),
            "downsample": downsample_factor(vae),
        },
        "dinov2": None
        if features is None
        else {**settings["dinov2"], "tokens": dinov2_shape[0], "dim": dinov2_shape[1], "dtype": "float16"},
        "classes": {name: i for i, name in enumerate(classes)},
        "captions": None if cfg.captions is None else TABLE_INFO,  # shards hold `caption` rows of this table
        "count": sum(info["count"] for info in infos),
        "shards": [{"file": info["file"], "count": info["count"], "sha256": info["sha256"]} for info in infos],
        "skipped": [s for info in infos for s in info["skipped"]],
    }
    write_json(out / MANIFEST, manifest)
    return out / MANIFEST
