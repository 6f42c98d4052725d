"""REPA: projected intermediate tokens aligned to DINOv2 features by negative cosine similarity, kept tokens only."""

import math

import pytest
import torch
from conftest import perturbed_model, tiny_inputs

from sprintdit.draws import Draws
from sprintdit.errors import UserError
from sprintdit.masking import make_mask
from sprintdit.models.sit import RepaConfig, RepaTap, SprintConfig
from sprintdit.objective import FlowMatching, ObjectiveConfig, repa_loss

REPA_DIM = 6


def test_repa_loss_matches_a_hand_computation():
    projected = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (1, K=2, 2): the tokens at ids 0 and 2
    features = torch.tensor([[[2.0, 0.0], [5.0, -7.0], [0.0, 3.0]]])  # (1, N=3, 2)
    ids_keep = torch.tensor([[0, 2]])
    # cos((1,0),(2,0)) = 1; cos((1,1),(0,3)) = 3 / (sqrt 2 * 3) = 1/sqrt 2; token 1 is dropped
    expected = -(1.0 + 1.0 / math.sqrt(2)) / 2
    assert repa_loss(projected, features, ids_keep).item() == pytest.approx(expected, rel=1e-6)
    full = torch.cat([projected[:, :1], torch.tensor([[[0.0, 1.0]]]), projected[:, 1:]], dim=1)  # (1, 3, 2), all tokens
    cos_middle = -7.0 / math.hypot(5.0, 7.0)
    assert repa_loss(full, features, None).item() == pytest.approx(
        -(1.0 + cos_middle + 1.0 / math.sqrt(2)) / 3, rel=1e-6
    )


def repa_model(repa_depth: int):
    # 6 blocks: encoder 2, middle 2, decoder 2; depth 3 or 4 is a middle (sparse) block, 1-2 encoder, 5-6 decoder
    return perturbed_model(
        sprint=SprintConfig(encoder_depth=2, decoder_depth=2), repa=RepaConfig(depth=repa_depth, dim=REPA_DIM, hidden=8)
    )


@pytest.mark.parametrize("repa_depth,sparse", [(1, False), (3, True), (4, True), (6, False)])
def test_model_returns_projected_tokens_of_the_repa_block(repa_depth, sparse):
    model = repa_model(repa_depth)
    x, t, y = tiny_inputs(model, batch=2)
    mask = make_mask(2, model.config.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    tap = RepaTap()
    out = model(x, t, y, mask=mask, repa=tap)
    projected, ids = tap.projected, tap.ids_keep
    torch.testing.assert_close(out, model(x, t, y, mask=mask))  # the prediction is unchanged
    n = model.config.grid[0] * model.config.grid[1]
    if sparse:
        assert torch.equal(ids, mask.ids_keep) and projected.shape == (2, mask.num_kept, REPA_DIM)
    else:
        assert ids is None and projected.shape == (2, n, REPA_DIM)
    # the block's output, captured by hand, through the projector
    captured = []
    handle = model.blocks[repa_depth - 1].register_forward_hook(lambda m, i, o: captured.append(o))
    model(x, t, y, mask=mask)
    handle.remove()
    torch.testing.assert_close(projected, model.repa_projector(captured[0]))


def loss_of(model, x, t, y, features, mask, weight: float, **kw):
    fm = FlowMatching(ObjectiveConfig(repa_weight=weight), null_class=model.config.num_classes)
    return fm.loss(model, x, y, Draws(torch.Generator().manual_seed(5)), features=features, mask=mask, **kw)


def test_features_of_dropped_tokens_do_not_change_the_loss():
    model = repa_model(3)  # a sparse middle block
    x, t, y = tiny_inputs(model, batch=2)
    mask = make_mask(2, model.config.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    features = torch.randn(2, model.config.grid[0] * model.config.grid[1], REPA_DIM, dtype=x.dtype)
    base = loss_of(model, x, t, y, features, mask, 0.5)
    at_dropped = features.clone()
    at_dropped[mask.dropped] = torch.randn_like(at_dropped[mask.dropped]) * 10
    torch.testing.assert_close(loss_of(model, x, t, y, at_dropped, mask, 0.5), base, rtol=0, atol=1e-12)
    at_kept = features.clone()
    at_kept[~mask.dropped] = torch.randn_like(at_kept[~mask.dropped])
    assert abs(loss_of(model, x, t, y, at_kept, mask, 0.5) - base) > 1e-4


def test_repa_weight_zero_or_no_features_is_the_plain_loss():
    model = repa_model(3)
    x, t, y = tiny_inputs(model, batch=2)
    mask = make_mask(2, model.config.grid, 0.75, "structured", torch.Generator().manual_seed(0))
    features = torch.randn(2, model.config.grid[0] * model.config.grid[1], REPA_DIM, dtype=x.dtype)
    plain = loss_of(model, x, t, y, None, mask, 0.5)
    torch.testing.assert_close(loss_of(model, x, t, y, features, mask, 0.0), plain, rtol=0, atol=0)
    with_repa = loss_of(model, x, t, y, features, mask, 0.5)
    # the total is the plain loss plus weight * the alignment of the projected tokens at the kept ids
    tap = RepaTap()
    model(*_noised(model, x, y, mask), repa=tap, mask=mask)
    projected, ids = tap.projected, tap.ids_keep
    torch.testing.assert_close(with_repa, plain + 0.5 * repa_loss(projected, features, ids))
    # REPA off: no projector, the same weights otherwise
    off = perturbed_model(sprint=SprintConfig(encoder_depth=2, decoder_depth=2))
    off.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("repa_projector.")})
    assert off.repa_projector is None
    torch.testing.assert_close(loss_of(off, x, t, y, None, mask, 0.5), plain, rtol=0, atol=0)


def _noised(model, x, y, mask):
    """The (x_t, t, labels) the objective feeds the model with generator seed 5 (its draw order: t, eps, labels)."""
    fm = FlowMatching(ObjectiveConfig(), null_class=model.config.num_classes)
    g = torch.Generator().manual_seed(5)
    t = fm.sample_t(x.shape[0], g)
    eps = torch.randn(x.shape, generator=g).to(x.dtype)
    x_t, _ = fm.interpolate(x, eps, t)
    return x_t, t, fm.drop_labels(y, Draws(g))


def test_return_repa_needs_a_projector():
    model = perturbed_model()
    x, t, y = tiny_inputs(model)
    with pytest.raises(UserError, match="repa.depth"):
        model(x, t, y, repa=RepaTap())
    with pytest.raises(UserError, match="repa.depth"):
        perturbed_model(repa=RepaConfig(depth=7, dim=REPA_DIM))  # beyond the 6 blocks
