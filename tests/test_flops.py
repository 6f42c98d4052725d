from dataclasses import replace

import pytest
import torch
from conftest import DENSE, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sprintdit.config import RunConfig, StageConfig
from sprintdit.flops import forward_flops, train_flops, train_step_flops
from sprintdit.masking import make_mask
from sprintdit.models import SiT
from sprintdit.models.sit import TextConfig


def counted(model, *args, **kwargs) -> int:
    """torch's own count; the math attention backend runs as counted matmuls on the CPU."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_flops_match_torch_counter(mlp, learn_sigma):
    model = SiT(tiny_config(mlp=mlp, learn_sigma=learn_sigma))
    cfg, b = model.config, 4
    x, t, y = torch.randn(b, cfg.in_channels, *cfg.input_size), torch.rand(b), torch.randint(0, cfg.num_classes, (b,))
    assert counted(model, x, t, y) == forward_flops(cfg, b)
    for ratio in (0.5, 0.75):
        mask = make_mask(b, cfg.grid, ratio, "structured", torch.Generator().manual_seed(0))
        assert counted(model, x, t, y, mask=mask) == forward_flops(cfg, b, ratio)
    assert counted(model, x, t, y, middle_rows=1) == forward_flops(cfg, b, middle_rows=1)  # a PDG step


@pytest.mark.parametrize("encoder", ["learned", "t5"])
def test_text_model_flops_match_torch_counter(encoder):
    """Cross-attention to the caption in every block, the caption encoder (or projection) and the pooled vector."""
    text = TextConfig(
        encoder=encoder,
        vocabulary=["a", "b"] if encoder == "learned" else None,
        dim=None if encoder == "learned" else 12,
        max_tokens=4,
        pooled=True,
    )
    model = SiT(
        tiny_config(condition="text", num_classes=None, text=text)
    ).train()  # train mode: the plain (counted) encoder layers
    cfg, b = model.config, 2
    x, t = torch.randn(b, cfg.in_channels, *cfg.input_size), torch.rand(b)
    y = torch.tensor([[1, 2, 3, 0], [1, 0, 0, 0]]) if encoder == "learned" else torch.randn(b, 4, 12)
    assert counted(model, x, t, y) == forward_flops(cfg, b)
    mask = make_mask(b, cfg.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    assert counted(model, x, t, y, mask=mask) == forward_flops(cfg, b, 0.75)


def test_dense_sit_flops_without_fusion():
    model = SiT(tiny_config(sprint=DENSE))
    cfg = model.config
    x, t, y = torch.randn(2, cfg.in_channels, *cfg.input_size), torch.rand(2), torch.zeros(2, dtype=torch.long)
    assert counted(model, x, t, y) == forward_flops(cfg, 2)


def test_train_flops_sum_the_stages():
    model_cfg = SiT(tiny_config()).config
    run = RunConfig(
        model=model_cfg,
        stages=[
            StageConfig(name="a", steps=3, mask_ratio=0.75),
            StageConfig(name="b", steps=2, mask_ratio=0.0, batch_size=8),
        ],
    )
    first, second = train_step_flops(run, 0), train_step_flops(run, 1)
    assert first == 3 * forward_flops(model_cfg, run.train.batch_size, 0.75)
    assert second == 3 * forward_flops(model_cfg, 8)
    assert train_flops(run, 0) == 0 and train_flops(run, 2) == 2 * first
    assert train_flops(run, 4) == 3 * first + second and train_flops(run, 99) == 3 * first + 2 * second
    # train.batch_size is the global batch, however it is split
    accumulated = replace(run, train=replace(run.train, grad_accum=4))
    assert train_step_flops(accumulated, 0) == first


def xl2(side: int, **changes):
    """DiT-XL/2 (or, with changes, PixArt-alpha-XL/2) at `side` latent pixels, dense."""
    from sprintdit.models import resolve_model_config
    from sprintdit.sections import ModelConfig, SprintConfig

    dense = SprintConfig(encoder_depth=0, decoder_depth=0, fusion="none", path_drop_prob=0.0)
    base = dict(preset="SiT-XL/2", input_size=[side, side], in_channels=4, num_classes=1000, learn_sigma=True)
    return resolve_model_config(
        ModelConfig(**{**base, "pos_embed": "sincos", "qk_norm": False, "sprint": dense, **changes})
    )


@pytest.mark.parametrize(
    "side,pixart,grid,paper",
    [(32, False, None, 118.64), (64, False, None, 525.0), (32, True, None, 148.73), (32, True, "6:10", 91.62)],
)
def test_analytic_macs_reproduce_the_sparsedit_papers_table(side, pixart, grid, paper):
    """The SparseDiT paper counts multiply-adds (GMACs = our FLOPs / 2) at 256 px (latent 32) and 512 px: DiT-XL/2,
    PixArt-alpha-XL/2 with 120 T5 tokens, and its SparseDiT with the default layout and grid 6:10 (mean over t)."""
    from sprintdit.density import SparseConfig
    from sprintdit.flops import mean_forward_flops

    text = TextConfig(encoder="t5", dim=4096, max_tokens=120)
    changes = dict(condition="text", num_classes=None, adaln="single", pos_base=side // 2, text=text) if pixart else {}
    cfg = xl2(side, **changes)
    if grid is not None:
        cfg = xl2(side, **changes, arch="sparsedit", sparse=SparseConfig(grid=grid))
    macs = (mean_forward_flops(cfg, 1) if grid else forward_flops(cfg, 1)) / 2e9
    assert abs(macs / paper - 1) < 0.005, macs
