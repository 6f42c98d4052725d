import pytest

from sprintdit.config import from_yaml_text, load_config, to_yaml
from sprintdit.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 16\nstages:\n  - {name: a, steps: 5}\n  - {name: b, steps: 2, mask_ratio: 0}\n")
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
    assert load_config("fashion_mnist_sprint") == load_config(CONFIG_DIR / "fashion_mnist_sprint.yaml")  # shipped names too
