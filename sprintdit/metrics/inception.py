"""InceptionV3 in its "FID" form: the TensorFlow graph `inception-2015-12-05` (classify_image_graph_def.pb)
rebuilt in PyTorch, as pytorch-fid, torch-fidelity and the ADM (guided-diffusion) evaluator use it for FID,
sFID and Inception Score.

Layout. Module and weight names follow torchvision's Inception3: `Conv2d_1a_3x3`, `Conv2d_2a_3x3`,
`Conv2d_2b_3x3`, (max-pool), `Conv2d_3b_1x1`, `Conv2d_4a_3x3`, (max-pool), `Mixed_5b/5c/5d` (A blocks, pool
features 32/64/64), `Mixed_6a` (B), `Mixed_6b..6e` (C, 7x7 widths 128/160/160/192), `Mixed_7a` (D),
`Mixed_7b/7c` (E), global average pool ("pool3", 2048) and `fc` (2048 -> 1008). Every conv is
`<name>.conv` (no bias) + `<name>.bn` (BatchNorm, eps 0.001) + ReLU. Two details differ from torchvision's
ImageNet network and make this the FID network: the average pools of the A, C and E blocks leave padding out
of the average (`count_include_pad=False`), and the last E block (`Mixed_7c`) max-pools in its pool branch.

Weights (never downloaded here; pass the local file):
- pytorch-fid: release asset `pt_inception-2015-12-05-6726825d.pth`
  (github.com/mseitzer/pytorch-fid/releases, tag fid_weights);
- torch-fidelity: release asset `weights-inception-2015-12-05-6726825d.pth`
  (github.com/toshas/torch-fidelity/releases).
Both are conversions of the same TF graph with the torchvision key layout above, so no key renaming is
needed; a conversion without BatchNorm `num_batches_tracked` buffers (torch-fidelity's converter writes none) loads, as
the loader
ignores them either way (unused in eval mode). A `module.` prefix (DataParallel) is stripped. A
`.safetensors` file with the same keys loads too.

Outputs of `InceptionV3FID.forward` / `inception_features`:
- `pool` (N, 2048): pool3 features for FID, precision/recall and friends (cast to float64 for statistics);
- `spatial` (N, 2023): sFID features, the TF tensor `mixed_6/conv:0` that ADM's evaluator reads, first 7
  channels. In the TF graph the mixed blocks are numbered `mixed, mixed_1, ..., mixed_10` = Mixed_5b ... Mixed_7c,
  so `mixed_6` is **Mixed_6d** (not 6e) and `mixed_6/conv` is its 1x1 branch (conv-BN-ReLU, 192 channels at
  17x17), which is also the first 192 channels of the Mixed_6d output. ADM flattens the NHWC tensor
  (N, 17, 17, 7); we flatten in the same (H, W, C) order. (A Frechet distance does not depend on the order
  of coordinates, so this only matters when comparing raw features.)
- `logits` (N, 1008): pool3 @ fc.weight^T **without the bias**. This is what ADM's Inception Score uses
  (it multiplies pool3 by the `softmax/logits/MatMul` weight only) and what torch-fidelity calls
  `logits_unbiased`, its default for the Inception Score; both take the softmax over all 1008 classes
  (1000 ImageNet classes plus 8 unused ones), so take the softmax of these logits.

Preprocessing (`preprocess`), images (N, 3, H, W) uint8 or float in [0, 255] (grayscale (N, 1, H, W) is
repeated to three channels) -> (N, 3, 299, 299) in about [-1, 1], in one of two conventions:
- "pytorch-fid": PyTorch bilinear resize (align_corners=False, no antialiasing), then
  x / 127.5 - 1, as pytorch-fid does;
- "tf": TF 1.x's legacy bilinear resize (source coordinate = output index * in / out, no half-pixel
  offset, clamped at the far edge), then (x - 128) / 128, as the TF graph itself does and hence the ADM
  evaluator, and as torch-fidelity replicates; the default everywhere (the Python API, `eval.inception_resize`,
  the CLI), so that the numbers compare with ADM reference-batch statistics and the papers.
On 299x299 inputs the two differ only in the scaling (127.5 vs 128 around the centre).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import INCEPTION_PYTORCH_FID, INCEPTION_RESIZES, INCEPTION_TF
from ..errors import UserError
from .feature_io import GRAY, RGB, check_images, load_checked, read_state_dict

BN_EPS = 1e-3  # TF's batch-norm epsilon in the 2015-12-05 graph
INPUT_SIZE = 299  # (H, W) the network sees
PIXEL_HALF_RANGE = 127.5  # pytorch-fid: [0, 255] -> [-1, 1] by x / 127.5 - 1
TF_PIXEL_CENTER = 128.0  # TF graph: x -> (x - 128) / 128
PYTORCH_FID, TF = (
    INCEPTION_PYTORCH_FID,
    INCEPTION_TF,
)  # preprocessing conventions, see the module docstring (eval.inception_resize)
POOL_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # channels of mixed_6/conv kept for sFID
SPATIAL_SIDE = 17  # spatial side of the Mixed_6* blocks at 299x299 input
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIDE * SPATIAL_SIDE  # 2023
POOL_KERNEL = 3  # every pool inside and between blocks is 3x3
FEATURE_BATCH = 100  # images per forward in `inception_features`
WEIGHTS_OPTION = "--inception-weights"
WEIGHTS_HINT = (
    "get pt_inception-2015-12-05-6726825d.pth (pytorch-fid release) or weights-inception-2015-12-05-6726825d.pth "
    f"(torch-fidelity release) and pass its path with {WEIGHTS_OPTION}"
)


def fid_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that keeps the size and averages only real pixels at the border (TF's SAME pool)."""
    return F.avg_pool2d(x, POOL_KERNEL, stride=1, padding=1, count_include_pad=False)


def same_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 max pool that keeps the size (the pool branch of Mixed_7c)."""
    return F.max_pool2d(x, POOL_KERNEL, stride=1, padding=1)


def reducing_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 max pool without padding: (H, W) -> ((H - 3) // 2 + 1, ...)."""
    return F.max_pool2d(x, POOL_KERNEL, stride=2)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001) -> ReLU, stored as `.conv` and `.bn`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def conv_1x7(in_channels: int, out_channels: int) -> BasicConv2d:
    return BasicConv2d(in_channels, out_channels, (1, 7), padding=(0, 3))


def conv_7x1(in_channels: int, out_channels: int) -> BasicConv2d:
    return BasicConv2d(in_channels, out_channels, (7, 1), padding=(3, 0))


def conv_1x3(in_channels: int, out_channels: int) -> BasicConv2d:
    return BasicConv2d(in_channels, out_channels, (1, 3), padding=(0, 1))


def conv_3x1(in_channels: int, out_channels: int) -> BasicConv2d:
    return BasicConv2d(in_channels, out_channels, (3, 1), padding=(1, 0))


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg-pool -> 1x1; out 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(fid_avg_pool(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max-pool/2; out 384 + 96 + in_channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            reducing_max_pool(x),
        ]
        return torch.cat(branches, dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs of width `channels_7x7`; out 4 x 192 = 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = conv_1x7(c7, c7)
        self.branch7x7_3 = conv_7x1(c7, 192)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv_7x1(c7, c7)
        self.branch7x7dbl_3 = conv_1x7(c7, c7)
        self.branch7x7dbl_4 = conv_7x1(c7, c7)
        self.branch7x7dbl_5 = conv_1x7(c7, 192)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branches = [
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(double)),
            self.branch_pool(fid_avg_pool(x)),
        ]
        return torch.cat(branches, dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max-pool/2; out 320 + 192 + in_channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = conv_1x7(192, 192)
        self.branch7x7x3_3 = conv_7x1(192, 192)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        branches = [self.branch3x3_2(self.branch3x3_1(x)), self.branch7x7x3_4(tower), reducing_max_pool(x)]
        return torch.cat(branches, dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 convs; out 320 + 768 + 768 + 192 = 2048 channels. `max_pool` selects the
    FID graph's max pool (Mixed_7c) instead of the count_include_pad=False average pool (Mixed_7b)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = conv_1x3(384, 384)
        self.branch3x3_2b = conv_3x1(384, 384)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv_1x3(384, 384)
        self.branch3x3dbl_3b = conv_3x1(384, 384)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = same_max_pool(x) if self.max_pool else fid_avg_pool(x)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(single),
            self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double),
            self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, dim=1)


class InceptionV3FID(nn.Module):
    """The FID InceptionV3; `forward` takes preprocessed images (see `preprocess`)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) -> (N, 192, 35, 35)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(reducing_max_pool(x)))  # (N, 192, 71, 71)
        return reducing_max_pool(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (N, 3, 299, 299) in [-1, 1] -> {pool (N, 2048), spatial (N, 2023), logits (N, 1008) without the fc
        bias}."""
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(self.stem(x))))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)  # (N, 768, 17, 17); channels [0, 192) are its 1x1 branch, TF's mixed_6/conv
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (N, 17 * 17 * 7) in TF's NHWC order
        x = self.Mixed_7a(self.Mixed_6e(x))  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048), TF's pool_3
        logits = F.linear(pool, self.fc.weight)  # (N, 1008); no bias, as ADM and torch-fidelity's IS use
        return {"pool": pool, "spatial": spatial, "logits": logits}


def tf1_resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear resampling of `dim` to `size` by TF 1.x's legacy rule: source = i * (n / size), neighbours floor and
    floor + 1 (clamped to n - 1), weighted by the fractional part."""
    n = x.shape[dim]
    scale = torch.tensor(n / size, dtype=torch.float32)  # TF computes the scale and coordinates in float32
    source = torch.arange(size, dtype=torch.float32) * scale  # (size,)
    low = source.floor().long()
    high = (low + 1).clamp(max=n - 1)
    shape = [1] * x.ndim
    shape[dim] = size
    frac = (source - low).to(x.device, x.dtype).view(shape)
    a, b = x.index_select(dim, low.to(x.device)), x.index_select(dim, high.to(x.device))
    return a + (b - a) * frac


def tf1_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, size, size) with TF 1.x's legacy bilinear resize (align_corners=False)."""
    return tf1_resize_axis(tf1_resize_axis(x, size, dim=2), size, dim=3)


def preprocess(images: torch.Tensor, convention: str = TF) -> torch.Tensor:
    """images (N, 3 or 1, H, W), uint8 or float in [0, 255] -> float32 (N, 3, 299, 299) in about [-1, 1]."""
    if convention not in INCEPTION_RESIZES:
        raise UserError(f"unknown Inception preprocessing {convention!r}; choose one of {', '.join(INCEPTION_RESIZES)}")
    x = images.float()
    if x.shape[1] == GRAY:
        x = x.expand(-1, RGB, -1, -1)  # (N, 3, H, W)
    if convention == TF:
        return (tf1_resize(x, INPUT_SIZE) - TF_PIXEL_CENTER) / TF_PIXEL_CENTER
    if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x / PIXEL_HALF_RANGE - 1


def load_inception(path: str | Path | None, device: torch.device | str = "cpu") -> InceptionV3FID:
    """The FID InceptionV3 with the weights at `path` (see the module docstring), in eval mode on `device`."""
    state = read_state_dict(path, WEIGHTS_HINT)
    model = InceptionV3FID()
    load_checked(model, state, path, WEIGHTS_HINT)
    return model.to(device).eval()


@torch.no_grad()
def inception_features(
    model: InceptionV3FID, images: torch.Tensor, batch_size: int = FEATURE_BATCH, convention: str = TF
) -> dict[str, torch.Tensor]:
    """images (N, 3 or 1, H, W) in [0, 255] -> {pool (N, 2048), spatial (N, 2023), logits (N, 1008)}: CPU float32.
    `convention` picks the preprocessing: "pytorch-fid" or "tf" (ADM / torch-fidelity), see the module docstring."""
    check_images(images, "the Inception network")
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {"pool": [], "spatial": [], "logits": []}
    for block in images.split(batch_size):
        out = model(preprocess(block.to(device), convention))
        for name, values in out.items():
            parts[name].append(values.float().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}
