import itertools
from fractions import Fraction

import pytest
import torch

from sprintdit.errors import UserError
from sprintdit.masking import (
    achievable_structured_ratios,
    gather_tokens,
    make_mask,
    random_mask,
    restore_tokens,
    structured_group,
    structured_mask,
)


@pytest.mark.parametrize(
    "ratio,expected", [(0.75, (2, 1)), (0.5, (2, 2)), (0.875, (4, 2)), (0.9375, (4, 1)), (0.625, (4, 6)), (0.0, (1, 1))]
)
def test_structured_group_for_ratio(ratio, expected):
    assert structured_group(ratio, (8, 8)) == expected


@pytest.mark.parametrize("grid", [(8, 8), (4, 12)])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875, 0.9375])
def test_structured_keeps_k_in_every_group(grid, ratio):
    g, k = structured_group(ratio, grid)
    mask = structured_mask(16, grid, ratio, torch.Generator().manual_seed(3))
    h, w = grid
    assert mask.num_kept == h * w * k // (g * g)
    for dropped in mask.dropped.view(16, h, w):
        kept = (~dropped).int()
        # some lattice offset must give exactly k kept tokens in every g x g group (groups wrap around)
        ok = any(
            bool((torch.roll(kept, (-oy, -ox), (0, 1)).view(h // g, g, w // g, g).sum((1, 3)) == k).all())
            for oy, ox in itertools.product(range(g), range(g))
        )
        assert ok


def test_structured_offsets_vary():
    mask = structured_mask(64, (8, 8), 0.9375, torch.Generator().manual_seed(0))
    kept = (~mask.dropped).view(64, 8, 8)
    offsets = set()
    for sample in kept:
        rows, cols = torch.nonzero(sample, as_tuple=True)
        offsets.add((int(rows.min()) % 4, int(cols.min()) % 4))
    assert len(offsets) > 4  # a fixed lattice would always give the same residues


def test_random_mask_count_and_inverse():
    mask = random_mask(5, (6, 6), 0.3, torch.Generator().manual_seed(0))
    assert mask.num_kept == round(36 * 0.7)
    assert bool((mask.ids_keep.diff(dim=1) > 0).all())  # kept ids in raster order
    assert bool(((~mask.dropped).sum(1) == mask.num_kept).all())
    order = torch.cat([mask.ids_keep, torch.nonzero(mask.dropped)[:, 1].view(5, -1)], dim=1)
    assert torch.equal(torch.gather(order, 1, mask.ids_restore), torch.arange(36).expand(5, -1))


@pytest.mark.parametrize("kind,ratio", [("random", 0.4), ("structured", 0.75)])
def test_restore_puts_every_token_back(kind, ratio):
    x = torch.randn(4, 64, 3)
    mask = make_mask(4, (8, 8), ratio, kind, torch.Generator().manual_seed(1))
    fill = torch.tensor([7.0, 8.0, 9.0])
    kept = gather_tokens(x, mask.ids_keep)
    assert kept.shape == (4, mask.num_kept, 3)
    restored = restore_tokens(kept, mask, fill)
    assert torch.equal(restored[~mask.dropped], x[~mask.dropped])
    assert torch.equal(restored[mask.dropped], fill.expand(int(mask.dropped.sum()), 3))


def test_masks_reproducible_from_generator():
    a = make_mask(4, (8, 8), 0.75, "structured", torch.Generator().manual_seed(5))
    b = make_mask(4, (8, 8), 0.75, "structured", torch.Generator().manual_seed(5))
    c = make_mask(4, (8, 8), 0.75, "structured", torch.Generator().manual_seed(6))
    assert torch.equal(a.dropped, b.dropped) and not torch.equal(a.dropped, c.dropped)


def test_ratio_zero_is_dense():
    assert make_mask(2, (8, 8), 0.0, "structured") is None


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_unachievable_structured_ratio_lists_achievable(ratio):
    with pytest.raises(UserError, match=r"not achievable.*0\.75"):
        structured_group(ratio, (8, 8))


@pytest.mark.parametrize("kind,ratio", [("random", 1.0), ("random", -0.1), ("structured", 1.0), ("blocky", 0.5)])
def test_impossible_ratios_rejected(kind, ratio):
    with pytest.raises(UserError):
        make_mask(2, (8, 8), ratio, kind)


def test_achievable_ratios_respect_grid():
    ratios = achievable_structured_ratios((6, 6))  # groups 1, 2, 3 and 6 tile a 6x6 grid
    assert Fraction(3, 4) in ratios and Fraction(8, 9) in ratios
    assert Fraction(7, 8) not in ratios  # needs 4x4 groups
    with pytest.raises(UserError):
        structured_group(0.875, (6, 6))
