"""The layering the code is organised by (docs/architecture.md), checked on the source: the trainer's internals stay
inside sprintdit/training, and nothing outside it reaches into them."""

import ast
from dataclasses import replace
from pathlib import Path

import sprintdit

PACKAGE = Path(sprintdit.__file__).parent
TRAINING = PACKAGE / "training"


def trainer_private_names() -> set[str]:
    """Every `_name` the Trainer class defines: its private attributes (self._x = ...) and methods (def _x)."""
    tree = ast.parse((TRAINING / "loop.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    names = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
    names |= {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_outside_training_touches_a_private_trainer_attribute():
    private = trainer_private_names()
    assert {"_checkpointer", "_periodic", "_dataset"} <= private  # the check sees the trainer's internals
    reached = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if TRAINING in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                reached.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    assert not reached, reached


def test_the_trainer_delegates_its_jobs():
    """The loop reads as one page: the run folder, checkpoints, records and sampling live in their own components."""
    tree = ast.parse((TRAINING / "loop.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = [
        f
        for f in cls.body
        if isinstance(f, ast.FunctionDef) and not any(getattr(d, "id", "") == "property" for d in f.decorator_list)
    ]
    stored = {
        n.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
        and isinstance(n.ctx, ast.Store)
    }
    assert len(methods) <= 13 and len(stored) <= 16, ([f.name for f in methods], sorted(stored))


def test_config_is_a_foundation():
    """Reading and validating a run config loads no network, objective, sampler, metric or tracker module."""
    import subprocess
    import sys

    probe = (
        "import sys, sprintdit.config as c; c.load_config('fashion_mnist_sprint'); "
        "print(sorted(m for m in sys.modules if m.startswith(('sprintdit.models', 'sprintdit.objective', "
        "'sprintdit.sampling', "
        "'sprintdit.metrics', 'sprintdit.tracking', 'sprintdit.training'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded


def test_no_function_reads_longer_than_a_screen():
    """Every function of the package fits in 60 lines (a reader holds it at once); split the long ones."""
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long


def test_a_rule_between_sections_is_one_function_for_configs_and_networks():
    """PDG without SPRINT's fusion is refused by the same rule whether a config says it or a network is asked to."""
    import pytest
    import torch

    from sprintdit.config import load_config
    from sprintdit.errors import UserError
    from sprintdit.models import build_model, resolve_model_config
    from sprintdit.objective import build_objective
    from sprintdit.sampling import SampleConfig, generate

    dense = ["model.sprint.fusion=none", "model.sprint.path_drop_prob=0", "sample.guidance=pdg"]
    with pytest.raises(UserError) as from_config:
        load_config("fashion_mnist_sprint", dense)
    cfg = load_config("fashion_mnist_sprint", dense[:2] + ["sample.guidance=cfg", "model.preset=SiT-Nano/4"])
    model_cfg = replace(cfg.model, input_size=[8, 8], in_channels=1, num_classes=2)
    model = build_model(resolve_model_config(model_cfg))
    objective = build_objective(cfg.objective, 2, False)
    with pytest.raises(UserError) as from_network:
        generate(model, objective, [0], [0], SampleConfig(guidance="pdg", steps=1), torch.device("cpu"))
    assert str(from_config.value) == f"sample: {from_network.value}"
    assert "Path-Drop Guidance" in str(from_network.value)
