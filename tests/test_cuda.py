"""CUDA paths (`pytest -m cuda`, run by scripts/gpu_check.sh): each compares the GPU against the CPU or against the
plain code path. Skipped where no CUDA device is present."""

import os
import socket

import pytest
import torch

from sprintdit.config import load_config
from sprintdit.draws import Draws, step_seed
from sprintdit.training import Trainer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ATOL = 1e-4  # CPU and GPU kernels sum in other orders


def tiny(fmnist_dir, *extra):
    return load_config(
        None,
        [
            f"data.root={fmnist_dir}",
            "model.preset=SiT-Nano/4",
            "model.hidden_size=32",
            "train.batch_size=8",
            "train.log_every=1",
            "train.sample_every=0",
            "train.ema_decay=0.9",
            "stages=[{name: pre, steps: 3, lr: 0.001, mask_ratio: 0.75}, {name: ft, steps: 2, lr: 0.0005, mask_ratio: "
            "0.0}]",
            *extra,
        ],
    )


def weights(trainer):
    return {k: v.detach().float().cpu() for k, v in trainer.model.state_dict().items()}


def test_training_on_cuda_matches_cpu(fmnist_dir, tmp_path, monkeypatch):
    """Same draws (the CPU generator's, handed out on the GPU), same data: fused AdamW and the GPU kernels agree with
    the CPU run. (A CUDA run draws with a CUDA generator, whose numbers differ from the CPU's.)"""
    cpu = Trainer(tiny(fmnist_dir, "train.device=cpu"), tmp_path / "cpu", progress=False)
    cpu.fit()
    cpu_draws = lambda seed, step, shard, device: Draws(
        torch.Generator().manual_seed(step_seed(seed, step)), shard, device
    )
    monkeypatch.setattr(Draws, "for_step", staticmethod(cpu_draws))
    gpu = Trainer(tiny(fmnist_dir, "train.device=cuda"), tmp_path / "gpu", progress=False)
    assert gpu.networks.optimizer.defaults["fused"]
    gpu.fit()
    a, b = weights(cpu), weights(gpu)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=ATOL, msg=k)


def test_draws_on_cuda_are_made_there_and_split_over_ranks():
    whole = Draws.for_step(0, 7, device="cuda")
    noise, mask = whole.randn(4, 3), whole.mask(4, (4, 4), 0.75, "structured")
    assert noise.is_cuda and mask.ids_keep.is_cuda and whole.generator.device.type == "cuda"
    halves = [Draws.for_step(0, 7, (r, 2), "cuda") for r in range(2)]
    parts = [(d.randn(2, 3), d.mask(2, (4, 4), 0.75, "structured")) for d in halves]
    assert torch.equal(torch.cat([n for n, _ in parts]), noise)
    assert torch.equal(torch.cat([m.ids_keep for _, m in parts]), mask.ids_keep)


@pytest.mark.parametrize("stage", [0, 1])  # masked (structured groups), then full tokens
def test_training_step_makes_no_host_sync(fmnist_dir, tmp_path, stage):
    """Draws, masks, forward and backward run without a host-device sync (the step's one sync, on the finite and
    stop flags, is in `update`): torch raises on any synchronising call inside the step."""
    trainer = Trainer(
        tiny(fmnist_dir, "train.device=cuda", "model.sprint.path_drop_prob=0.1"), tmp_path / "s", progress=False
    )
    loaded = trainer.next_batch(stage)
    assert loaded.x.is_pinned() and loaded.y.is_pinned()  # page-locked: the copy to the device does not block the host
    batch = loaded.to(trainer.device)
    trainer.train_step(batch, trainer.cfg.stages[stage])  # first calls may sync while kernels load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(batch, trainer.cfg.stages[stage])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_resume_on_cuda_is_exact(fmnist_dir, tmp_path):
    straight = Trainer(tiny(fmnist_dir, "train.device=cuda"), tmp_path / "a", progress=False)
    straight.fit()
    first = Trainer(tiny(fmnist_dir, "train.device=cuda"), tmp_path / "b", progress=False)
    first.fit(stop_at=2)
    resumed = Trainer(None, tmp_path / "b", progress=False)
    resumed.fit()
    a, b = weights(straight), weights(resumed)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst  # bitwise where the kernels are deterministic


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cuda(fmnist_dir, tmp_path, precision):
    trainer = Trainer(
        tiny(fmnist_dir, "train.device=cuda", f"train.precision={precision}"), tmp_path / precision, progress=False
    )
    before = [p.detach().clone() for p in trainer.networks.params]
    trainer.fit()
    assert trainer.networks.scaler.is_enabled() == (precision == "fp16")
    assert all(torch.isfinite(p).all() for p in trainer.networks.params) and any(
        not torch.equal(a, p) for a, p in zip(before, trainer.networks.params)
    )


def test_sampling_on_cuda_matches_cpu():
    from conftest import perturbed_model

    from sprintdit.objective import FlowMatching, ObjectiveConfig
    from sprintdit.sampling import SampleConfig, generate

    model = perturbed_model(dtype=torch.float32)
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    for guidance in ("pdg", "cfg"):
        cfg = SampleConfig(steps=4, guidance=guidance, batch_size=3)
        cpu = generate(model, fm, [0, 1, 2], [5, 6, 7], cfg, "cpu")
        gpu = generate(model.cuda(), fm, [0, 1, 2], [5, 6, 7], cfg, "cuda")
        model.cpu()
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=ATOL)


def test_compiled_forward_matches_eager():
    from conftest import perturbed_model, tiny_inputs

    model = perturbed_model(dtype=torch.float32).cuda()
    x, t, y = (v.cuda() for v in tiny_inputs(model))
    compiled = torch.compile(model, dynamic=False)
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-3, atol=ATOL)


def test_sparsedit_grids_on_cuda_match_cpu():
    from conftest import DENSE, tiny_config

    from sprintdit.density import SparseConfig
    from sprintdit.models import SparseDiT, resolve_model_config

    torch.manual_seed(0)
    cfg = resolve_model_config(
        tiny_config(
            arch="sparsedit",
            sprint=DENSE,
            input_size=[32, 32],
            depth=8,
            sparse=SparseConfig(grid="4:8", pool_depth=1, modules=2, sparse_depth=1, dense_depth=0),
        )
    )
    model = SparseDiT(cfg).eval()  # an 8x8 token grid pooled to 4..8 per side as t falls
    x, t, y = torch.randn(4, 2, 32, 32), torch.tensor([0.05, 0.3, 0.6, 0.95]), torch.tensor([0, 1, 2, 5])
    cpu = model(x, t, y)
    gpu = model.cuda()(x.cuda(), t.cuda(), y.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=ATOL)


def test_ddp_with_nccl_averages_like_the_plain_model(monkeypatch):
    """DistributedDataParallel over NCCL (a group of one rank) gives the plain model's gradients."""
    import copy

    import torch.distributed as dist
    from conftest import perturbed_model, tiny_inputs
    from torch.nn.parallel import DistributedDataParallel

    from sprintdit.distributed import shutdown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(os.environ, "MASTER_ADDR", "127.0.0.1")
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        plain = perturbed_model(dtype=torch.float32).cuda().train()
        wrapped = DistributedDataParallel(copy.deepcopy(plain), device_ids=[0])
        x, t, y = (v.cuda() for v in tiny_inputs(plain))
        plain(x, t, y).square().mean().backward()
        wrapped(x, t, y).square().mean().backward()
        for (name, a), b in zip(plain.named_parameters(), wrapped.module.parameters()):
            if a.grad is None:  # fixed tensors (the MASK token)
                assert b.grad is None, name
                continue
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        shutdown()


def text_guidance_samples(device: str) -> dict:
    """A text model's PDG and CFG samples (padding-masked cross-attention, the empty text as null) on `device`."""
    from test_text import VOCAB, text_model

    from sprintdit.objective import FlowMatching, ObjectiveConfig
    from sprintdit.sampling import SampleConfig, generate
    from sprintdit.text import tokenize

    model = text_model(pooled=True).float().to(device)
    ids = [tokenize(c, VOCAB, 6) for c in ("a bag top left", "a bag", "")]
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    return {
        g: generate(model, fm, ids, [5, 6, 7], SampleConfig(steps=4, guidance=g, batch_size=3), device)
        for g in ("pdg", "cfg")
    }


def test_text_model_guidance_on_cuda_matches_cpu():
    cpu, gpu = text_guidance_samples("cpu"), text_guidance_samples("cuda")
    for guidance in cpu:
        torch.testing.assert_close(gpu[guidance], cpu[guidance], rtol=1e-3, atol=ATOL)
