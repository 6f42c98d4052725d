import pytest

from sprintdit.config import from_yaml_text, load_config, to_yaml
from sprintdit.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "train:\n  batch_size: 16\nstages:\n  - {name: a, steps: 5}\n  - {name: b, steps: 2, mask_ratio: 0}\n"
    )
    cfg = load_config(path, ["stages.1.lr=3e-4", "train.optim.betas=[0.9,0.95]", "model.input_size=[16,24]"])
    assert cfg.train.batch_size == 16 and [s.steps for s in cfg.stages] == [5, 2]
    assert cfg.stages[1].lr == 3e-4 and cfg.train.optim.betas == [0.9, 0.95] and cfg.model.input_size == [16, 24]
    assert from_yaml_text(to_yaml(cfg), "saved") == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.bach_size=3", "unknown config key 'train.bach_size'.*did you mean 'train.batch_size'"),
        ("stages.0.mask_ration=0.5", "did you mean 'stages.N.mask_ratio'"),
        ("train.batch_size=abc", "bad value for config key 'train.batch_size'"),
        ("stages.2.steps=1", "'stages' has 1 entries"),
        ("train.precision=fp8", "train.precision"),
        ("train.compile_mode=fast", "train.compile_mode"),
        ("sample.guidance=magic", "guidance"),
        ("train.batch_size=10", "not divisible"),
        ("no_equals_sign", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    extra = ["train.grad_accum=4"] if "divisible" in message else []
    with pytest.raises(UserError, match=message):
        load_config(None, [override, *extra])


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "unknown.yaml").write_text("trian:\n  seed: 1\n")
    with pytest.raises(UserError, match="did you mean 'train'"):
        load_config(tmp_path / "unknown.yaml")
    with pytest.raises(UserError, match="missing.yaml not found .*shipped config: .*fashion_mnist_sprint"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from sprintdit.config import CONFIG_DIR

    shipped = sorted(CONFIG_DIR.glob("*.yaml"))
    assert shipped
    for path in shipped:
        load_config(path)
    # shipped names too
    assert load_config("fashion_mnist_sprint") == load_config(CONFIG_DIR / "fashion_mnist_sprint.yaml")


FLAT = (
    "model:\n  preset: SiT-Ti/4\n  fusion: none\n  path_drop_prob: 0.0\n  encoder_depth: 1\n  repa_hidden: 64\n"
    "sample: {guidance: cfg}\n"
)
NESTED = (
    "sample: {guidance: cfg}\nmodel:\n  preset: SiT-Ti/4\n"
    "  sprint: {fusion: none, path_drop_prob: 0.0, encoder_depth: 1}\n  repa: {hidden: 64}\n"
)


def test_flat_model_keys_of_0_1_still_load_with_one_warning(tmp_path, capsys):
    (tmp_path / "flat.yaml").write_text(FLAT)
    (tmp_path / "nested.yaml").write_text(NESTED)
    nested = load_config(tmp_path / "nested.yaml")
    assert capsys.readouterr().err == ""
    assert load_config(tmp_path / "flat.yaml") == nested
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "model.encoder_depth, model.fusion, model.path_drop_prob, model.repa_hidden are now "
        "model.sprint.encoder_depth"
        in err[0]
    )
    # an old override
    assert load_config(tmp_path / "nested.yaml", ["model.decoder_depth=1"]).model.sprint.decoder_depth == 1
    assert (
        "override model.decoder_depth: model.decoder_depth is now model.sprint.decoder_depth" in capsys.readouterr().err
    )
    # a config saved by 0.1 (a run's config.yaml, a checkpoint's metadata) reads as the nested one
    saved = to_yaml(nested).replace("  sprint:\n    encoder_depth: 1\n", "  encoder_depth: 1\n  sprint:\n")
    assert "  encoder_depth: 1\n  sprint:\n" in saved
    assert from_yaml_text(saved, "config.yaml") == nested


def test_a_key_set_both_flat_and_nested_is_refused(tmp_path):
    (tmp_path / "both.yaml").write_text(NESTED + "  fusion: concat_linear\n")
    with pytest.raises(UserError, match="sets both model.fusion and model.sprint.fusion"):
        load_config(tmp_path / "both.yaml")


def test_a_grid_schedule_like_6_10_stays_text_in_overrides_and_files(tmp_path):
    """PyYAML reads 6:10 as the base-60 integer 370 (YAML 1.1); configs read it as the string it means."""
    assert load_config(None, ["model.sparse.grid=6:10"]).model.sparse.grid == "6:10"
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  sparse:\n    grid: 6:10\ntrain:\n  batch_size: 0x20\n  log_every: 1_000\n")
    cfg = load_config(path)
    assert cfg.model.sparse.grid == "6:10" and cfg.train.batch_size == 32 and cfg.train.log_every == 1000
    assert from_yaml_text(to_yaml(cfg), "saved").model.sparse.grid == "6:10"
