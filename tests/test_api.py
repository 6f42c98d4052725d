"""The Python API as the README shows it: its snippet runs as written and agrees with the CLI."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sprintdit
from sprintdit.cli import main
from sprintdit.config import DataConfig
from sprintdit.errors import UserError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    if not Path(DataConfig().root, "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {DataConfig().root} (make data)")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_snippet(), "README.md", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip() == "step_00000025 3 (32, 32) L"
    assert (tmp_path / "ankle_boot.png").is_file()


def test_import_is_light_and_names_load_on_use():
    code = (
        "import sys, sprintdit; assert 'torch' not in sys.modules; sprintdit.load_config; assert 'torch' in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    with pytest.raises(AttributeError):
        sprintdit.no_such_name


def test_pipeline_images_equal_the_cli_batch(fmnist_dir, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = sprintdit.load_config(
        "fashion_mnist_sprint",
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "train.batch_size=4",
            "train.sample_every=0",
            "stages=[{name: pre, steps: 2, mask_ratio: 0.75}]",
        ],
    )
    assert sprintdit.train(cfg, out=run, progress=False).name == "step_00000002"
    pipe = sprintdit.Pipeline.from_pretrained(run, device="cpu").to("cpu")
    images = pipe(labels=[3, 4], seeds=[5, 6], steps=3, guidance="cfg", scale=1.5)
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(run),
                "--out",
                str(tmp_path / "s"),
                "--labels",
                "3,4",
                "--seeds",
                "5,6",
                "--steps",
                "3",
                "--guidance",
                "cfg",
                "--scale",
                "1.5",
                "--no-progress",
            ]
        )
        == 0
    )
    batch = np.load(tmp_path / "s" / "cfg_euler3_s1.5.npz")["arr_0"]  # (2, 32, 32, 1)
    assert [im.mode for im in images] == ["L", "L"]
    assert np.array_equal(np.stack([np.asarray(im) for im in images])[..., None], batch)
    with pytest.raises(UserError, match="sampler 'rk4' is unknown"):
        pipe(labels=[0], sampler="rk4")
