"""SPRINT's middle blocks thinned while sampling (sample.middle_keep): the schedule, the masks, guidance, FLOPs."""

from fractions import Fraction

import pytest
import torch
from conftest import DENSE, perturbed_model, tiny_config, tiny_inputs
from test_flops import counted

from sprintdit.density import interpolate, keep_at, parse_keep
from sprintdit.errors import UserError
from sprintdit.flops import forward_flops, sampling_flops
from sprintdit.masking import keep_levels, shared_mask
from sprintdit.models import resolve_model_config
from sprintdit.objective import FlowMatching, ObjectiveConfig
from sprintdit.sampling import FIXED_MASK_SEED, SampleConfig, generate, guided_output, time_grid, time_seed
from sprintdit.sections import check_sampling

QUARTERS = [Fraction(k, 4) for k in range(1, 5)]  # the keep ratios of 2 x 2 groups


def sparsedit_form(start: float, final: float, t: float) -> float:
    """SparseDiT's schedule in closed form: `final` for t <= 1/4, linear in t up to `start` at t = 1."""
    return final if t <= 0.25 else (4 * t - 1) / 3 * start + (4 - 4 * t) / 3 * final


def test_keep_schedule_matches_the_closed_form():
    schedule = parse_keep("0.25:1")
    for t in [i / 200 for i in range(201)]:
        exact = sparsedit_form(0.25, 1.0, t)
        assert interpolate(schedule.knots, t) == pytest.approx(exact, abs=1e-12)
        assert keep_at(schedule, t, QUARTERS) == min(QUARTERS, key=lambda q: (abs(q - exact), -q))
    assert [keep_at(schedule, t, QUARTERS) for t in (1.0, 0.25, 0.0)] == [Fraction(1, 4), 1, 1]
    assert keep_at(parse_keep("0.5"), 0.3, QUARTERS) == Fraction(1, 2)
    knots = parse_keep("1=0.25,0.5=0.5,0=1")
    assert [keep_at(knots, t, QUARTERS) for t in (1.0, 0.5, 0.0)] == [Fraction(1, 4), Fraction(1, 2), 1]
    assert parse_keep("1").dense and not parse_keep("0.25:1").dense


@pytest.mark.parametrize("text", ["0", "1.5", "a", "0.25-1", "1=0.5,1=0.25", "2=0.5"])
def test_bad_keep_schedules_are_one_line_errors(text):
    with pytest.raises(UserError):
        SampleConfig(middle_keep=text)


def test_keep_levels_follow_the_sparsest_ratios_groups():
    assert keep_levels((8, 8), 0.25) == QUARTERS
    assert keep_levels((8, 8), 0.5) == QUARTERS  # 2 of a 2 x 2 group's 4 tokens: its quarters
    assert keep_levels((8, 8), 1 / 16)[:2] == [Fraction(1, 16), Fraction(2, 16)]


def kept_per_group(dropped: torch.Tensor, side: int, group: int) -> set[int] | None:
    """Kept tokens per group of the lattice shifted so that every group holds the same count, or None if no shift
    does: dropped (N,) bool on a side x side grid."""
    grid = (~dropped).view(side, side).int()
    for dy in range(group):
        for dx in range(group):
            shifted = torch.roll(grid, (-dy, -dx), (0, 1))
            counts = shifted.view(side // group, group, side // group, group).sum((1, 3))
            if len(set(counts.flatten().tolist())) == 1:
                return set(counts.flatten().tolist())
    return None


def test_a_kept_subset_is_a_structured_mask_of_the_trained_grid():
    """keep 1/4: one token of every 2 x 2 group, as the demo trains (drop 0.75); every row the same; varying draws move
    with t, fixed ones do not."""
    side = 8
    masks = {t: shared_mask(3, (side, side), 0.25, time_seed(t)) for t in time_grid(8)[:-1]}
    for mask in masks.values():
        assert mask.num_kept == side * side // 4
        assert all(torch.equal(mask.dropped[0], row) for row in mask.dropped)
        assert kept_per_group(mask.dropped[0], side, 2) == {1}
        restored = torch.cat([mask.ids_keep[0], torch.nonzero(mask.dropped[0]).flatten()])[mask.ids_restore[0]]
        assert torch.equal(restored, torch.arange(side * side))  # ids_restore undoes [kept, dropped]
    assert len({tuple(m.ids_keep[0].tolist()) for m in masks.values()}) > 1
    assert kept_per_group(shared_mask(1, (side, side), 0.5, 7).dropped[0], side, 2) == {2}
    assert shared_mask(2, (side, side), 1, 0) is None


def recording(model):
    """`model` with the keyword arguments of each forward appended to model.calls."""
    model.calls = []
    forward = model.forward

    def record(*args, **kwargs):
        model.calls.append(kwargs)
        return forward(*args, **kwargs)

    model.forward = record
    return model


@pytest.mark.parametrize("guidance", ["pdg", "cfg", "none"])
def test_keep_one_is_todays_sampler_bit_for_bit(guidance):
    """middle_keep 1 (and a schedule where it reaches 1, t <= 1/4) passes no mask: the same forwards as before."""
    model = recording(perturbed_model(dtype=torch.float32))
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    base = SampleConfig(steps=4, guidance=guidance, scale=3.0)
    before = generate(model, fm, [1, 3], [5, 6], base, "cpu")
    calls = list(model.calls)
    model.calls.clear()
    keep_one = generate(model, fm, [1, 3], [5, 6], SampleConfig(**{**vars(base), "middle_keep": "1.0"}), "cpu")
    assert torch.equal(before, keep_one) and model.calls == calls and not any("mask" in c for c in calls)
    x, _, _ = tiny_inputs(model, batch=2)
    thinned = guided_output(model, torch.tensor([1, 3]), SampleConfig(**{**vars(base), "middle_keep": "0.25:1"}), 2)
    assert torch.equal(thinned(x, 0.2), guided_output(model, torch.tensor([1, 3]), base, 2)(x, 0.2))


def test_thinned_guidance_is_the_formula():
    """CFG: both halves see the step's kept tokens; PDG: the unconditional half still skips the middle blocks."""
    model = perturbed_model()
    x, _, _ = tiny_inputs(model)
    y = torch.tensor([0, 1, 4])
    t, scale = 0.9, 3.0
    tt = torch.full((3,), t, dtype=x.dtype)
    mask = shared_mask(3, model.config.grid, 0.25, time_seed(t))
    null = torch.full_like(y, model.null_class)
    cond = model(x, tt, y, mask=mask)
    assert not torch.allclose(cond, model(x, tt, y))  # the mask matters
    uncond = {"cfg": model(x, tt, null, mask=mask), "pdg": model(x, tt, null, path_drop=torch.ones(3, dtype=bool))}
    for guidance in ("cfg", "pdg"):
        v = guided_output(model, y, SampleConfig(guidance=guidance, scale=scale, middle_keep="0.25"), channels=2)
        expected = uncond[guidance] + scale * (cond - uncond[guidance])
        torch.testing.assert_close(v(x, t), expected, rtol=0, atol=1e-6)
    fixed = SampleConfig(guidance="none", middle_keep="0.25", middle_mask="fixed")
    v = guided_output(model, y, fixed, channels=2)
    torch.testing.assert_close(v(x, 0.4), model(x, tt * 0 + 0.4, y, mask=shared_mask(3, (4, 4), 0.25, FIXED_MASK_SEED)))
    outside = SampleConfig(guidance="none", middle_keep="0.25", middle_interval=[0.5, 1.0])
    assert torch.equal(guided_output(model, y, outside, channels=2)(x, 0.4), model(x, tt * 0 + 0.4, y))


@pytest.mark.parametrize(
    "guidance,keep,choice", [("pdg", "0.25:1", "varying"), ("cfg", "0.5", "fixed"), ("none", "0.25", "varying")]
)
def test_thinned_sample_depends_only_on_its_seed_and_label(guidance, keep, choice):
    model = perturbed_model(dtype=torch.float32)
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    cfg = SampleConfig(steps=4, guidance=guidance, batch_size=8, middle_keep=keep, middle_mask=choice)
    alone = generate(model, fm, [3], [7], cfg, "cpu")
    in_batch = generate(model, fm, [1, 3, 0, 2], [0, 7, 9, 11], cfg, "cpu")
    other_batch = generate(model, fm, [3, 4], [7, 1], SampleConfig(**{**vars(cfg), "batch_size": 1}), "cpu")
    torch.testing.assert_close(in_batch[1:2], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(other_batch[0:1], alone, rtol=0, atol=1e-5)
    dense = generate(model, fm, [3], [7], SampleConfig(**{**vars(cfg), "middle_keep": "1"}), "cpu")
    assert not torch.allclose(dense, alone, atol=1e-3)


@pytest.mark.parametrize("guidance", ["pdg", "cfg"])
def test_sampling_flops_with_a_schedule_sum_the_steps(guidance):
    """The analytic count of a whole sampling run equals torch's count of it, and the sum of the per-step forwards at
    the schedule's closed-form keep ratio."""
    model = perturbed_model(dtype=torch.float32)
    cfg, fm = model.config, FlowMatching(ObjectiveConfig(), model.null_class)
    scfg = SampleConfig(steps=6, guidance=guidance, middle_keep="0.25:1")
    total = sampling_flops(model, fm, scfg)
    assert total == counted(lambda: generate(model, fm, [1], [0], scfg, "cpu"))
    rows = 1 if guidance == "pdg" else None
    per_step = [
        forward_flops(cfg, 2, 1 - float(min(QUARTERS, key=lambda q: (abs(q - sparsedit_form(0.25, 1, t)), -q))), rows)
        for t in time_grid(6)[:-1]
    ]
    assert total == sum(per_step)
    assert total < sampling_flops(model, fm, SampleConfig(steps=6, guidance=guidance))


def test_thinning_needs_sprint_and_a_structured_ratio():
    fine, model = SampleConfig(middle_keep="0.25:1"), resolve_model_config(tiny_config())
    check_sampling(model, "flow", fine)
    with pytest.raises(UserError, match="not a structured mask of the 4x4 token grid"):
        check_sampling(model, "flow", SampleConfig(middle_keep="0.3"))
    with pytest.raises(UserError, match="concat_linear"):
        check_sampling(tiny_config(sprint=DENSE), "flow", fine)
    with pytest.raises(UserError, match="middle interval"):
        SampleConfig(middle_interval=[0.8, 0.2])
    with pytest.raises(UserError, match="middle_mask"):
        SampleConfig(middle_mask="random")
