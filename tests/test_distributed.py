"""Multi-process training and sampling on CPU: two gloo ranks spawned here (no torchrun needed) against one
process. The ranks are spawned once for all scenarios (a module-scoped fixture) and one thread each; the
tests assert on what they wrote."""

import json
import os
import shutil
import signal
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import perturbed_model, write_idx
from safetensors.torch import load_file

from sprintdit import checkpoint as ckpt
from sprintdit import distributed as D
from sprintdit.config import load_config
from sprintdit.errors import Stopped, UserError
from sprintdit.objective import FlowMatching, ObjectiveConfig
from sprintdit.sampling import SampleConfig, generate, generate_on_ranks
from sprintdit.training import Trainer

WORLD = 2
ATOL = 1e-5  # two ranks sum gradients in another order than one process
SAMPLE_SETTINGS = [dict(sampler="euler", guidance="pdg"), dict(sampler="sde", guidance="cfg")]
TIMEOUT_S = 2
NUM_SAMPLES = 7  # 4 batches of 2: the last one partial, the ranks get 2 batches each


def tiny_run(root, *extra):
    """Two stages (3 masked steps, then 1 dense) of a tiny SPRINT, global batch 8 in 2 micro-batches (2 rows per
    rank)."""
    return load_config(
        None,
        [
            f"data.root={root}",
            "model.preset=SiT-Nano/4",
            "model.hidden_size=32",
            "train.batch_size=8",
            "train.grad_accum=2",
            "train.log_every=1",
            "train.ckpt_every=100",
            "train.sample_every=0",
            "train.ema_decay=0.9",
            "train.keep_last=5",
            "stages=[{name: pre, steps: 3, lr: 0.001, warmup_steps: 2, mask_ratio: 0.75}, {name: ft, steps: 1, lr: "
            "0.0005, mask_ratio: 0.0}]",
            *extra,
        ],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int, timeout_s: float = 120.0) -> D.Dist:
    """What torchrun would set up for this rank (one thread: the ranks share the CI's cores)."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    return D.init_from_env(D.DistributedConfig(timeout_s=timeout_s), torch.device("cpu"))


def spawn(worker, *args) -> None:
    mp.spawn(worker, args=args, nprocs=WORLD, join=True)


def flat_params(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def checkpoint_tensors(run, step):
    folder = ckpt.step_dir(run, step)
    out = {f"model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    out.update({f"ema.{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()})
    optim = ckpt.load_train_state(folder / "state.pt")["optimizer"]["state"]
    out.update({f"adam.{i}.{k}": v for i, s in optim.items() for k, v in s.items() if k != "step"})
    return out


def assert_close_checkpoints(a, b, step):
    ta, tb = checkpoint_tensors(a, step), checkpoint_tensors(b, step)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=ATOL, msg=k)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ scenarios (run once per module)


def worker(rank, ports, root, base):
    d = join(rank, ports[0])
    trainer = Trainer(tiny_run(root), base / "two", progress=False, dist=d)
    trainer.fit(stop_at=3)  # the pre-training stage on two ranks (checkpoint at its end)
    torch.save(flat_params(trainer), base / f"params_rank{rank}.pt")
    Trainer(tiny_run(root), base / "one_then_two", progress=False, dist=d).fit()  # resume a 1-process checkpoint on 2
    fsdp = tiny_run(root, "distributed.strategy=fsdp")
    trainer = Trainer(fsdp, base / "fsdp", progress=False, dist=d)
    trainer.fit(stop_at=3)
    assert type(trainer.networks.params[0]).__name__ == "DTensor"  # really sharded
    Trainer(fsdp, base / "one_then_fsdp", progress=False, dist=d).fit()  # a 1-process checkpoint loaded into shards
    trainer = Trainer(tiny_run(root), base / "sigterm", progress=False, dist=d)
    if rank == 1:  # preemption seen by one rank only, during step 2: every rank stops after it, rank 0 saves
        real_step = trainer.train_step

        def step_with_sigterm(*args):
            if trainer.step + 1 == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(*args)

        trainer.train_step = step_with_sigterm
    try:
        trainer.fit()
    except Stopped as err:
        (base / f"stopped_rank{rank}.json").write_text(
            json.dumps({"message": str(err), "code": err.exit_code, "step": trainer.step})
        )
    model = perturbed_model(dtype=torch.float32)
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    labels, seeds = [i % 5 for i in range(NUM_SAMPLES)], list(range(10, 10 + NUM_SAMPLES))
    for i, setting in enumerate(SAMPLE_SETTINGS):
        images = generate_on_ranks(model, fm, labels, seeds, SampleConfig(steps=3, batch_size=2, **setting), d)
        assert (images is None) == (rank != 0)
        if rank == 0:
            torch.save(images, base / f"samples_{i}.pt")
    D.shutdown()
    d = join(rank, ports[1], timeout_s=TIMEOUT_S)  # a new group with a short timeout
    if rank == 1:  # alive but never reaching the barrier
        time.sleep(TIMEOUT_S + 1)
        return
    try:
        D.barrier(d, "waiting at the test barrier")
    except UserError as err:
        (base / "timeout_error.txt").write_text(str(err))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread in this process too: tiny ops on several threads crawl when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("fmnist")
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)), 0x0803)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(40) % 10, 0x0801)
    return root


def stopped_copy(run, dest, step):
    """The run folder as if it had stopped at `step` (later checkpoints removed; resume trims the log)."""
    shutil.copytree(run, dest)
    for folder in ckpt.list_checkpoints(dest):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory):
    """One process: the whole run (checkpoints at both stage ends, steps 3 and 4)."""
    base = tmp_path_factory.mktemp("single")
    Trainer(tiny_run(data_root), base / "one", progress=False).fit()
    return base


@pytest.fixture(scope="module")
def ranks(data_root, single, tmp_path_factory):
    """Everything two ranks do, DDP then FSDP; 1-process runs stopped at step 3 are resumed on 2 ranks."""
    base = tmp_path_factory.mktemp("ranks")
    for name in ("one_then_two", "one_then_fsdp"):
        stopped_copy(single / "one", base / name, step=3)
    spawn(worker, (free_port(), free_port()), data_root, base)
    return base


# ------------------------------------------------------------------ tests


def test_two_ranks_with_half_batches_train_like_one_process(single, ranks):
    assert_close_checkpoints(single / "one", ranks / "two", step=3)
    first = checkpoint_tensors(single / "one", 3)
    assert not torch.equal(
        first["model.blocks.0.adaLN_modulation.1.weight"],
        torch.zeros_like(first["model.blocks.0.adaLN_modulation.1.weight"]),
    )
    # the logged loss is the mean over both ranks: the single process's loss
    np.testing.assert_allclose(losses(ranks / "two"), losses(single / "one")[:3], rtol=1e-5)
    state = ckpt.load_train_state(ckpt.step_dir(ranks / "two", 3) / "state.pt")
    assert (state["world_size"], state["position"]) == (WORLD, 24)  # the position counts global samples


def test_sigterm_on_one_rank_stops_every_rank_at_one_step(single, ranks, capsys):
    stopped = [json.loads((ranks / f"stopped_rank{r}.json").read_text()) for r in range(WORLD)]
    assert [s["step"] for s in stopped] == [2, 2] and all(s["code"] == 128 + signal.SIGTERM for s in stopped)
    assert stopped[0]["message"].startswith("stop requested on another rank at step 2: saved")
    assert stopped[1]["message"].startswith("SIGTERM at step 2")
    assert [p.name for p in ckpt.list_checkpoints(ranks / "sigterm")] == ["step_00000002"]
    Trainer(None, ranks / "sigterm", progress=False).fit()  # requeued on one process: the run ends as if never stopped
    assert_close_checkpoints(single / "one", ranks / "sigterm", step=4)


def test_ranks_hold_identical_parameters(ranks):
    a, b = (torch.load(ranks / f"params_rank{r}.pt") for r in range(WORLD))
    assert torch.equal(a, b)


def test_only_rank_zero_writes(ranks):
    assert len(losses(ranks / "two")) == 3  # one line per step, not one per rank
    assert not list((ranks / "two" / "checkpoints").glob(".tmp_*"))


def test_resume_on_another_world_size(data_root, single, ranks, tmp_path, capsys):
    # saved on 1 process, resumed on 2 ranks (in the worker)
    assert_close_checkpoints(single / "one", ranks / "one_then_two", step=4)
    # saved on 2 ranks, resumed on 1 process
    shutil.copytree(ranks / "two", tmp_path / "two_then_one")
    resumed = Trainer(tiny_run(data_root), tmp_path / "two_then_one", progress=False)
    assert "saved on 2 rank(s) (ddp) on 1 (ddp)" in capsys.readouterr().err
    assert resumed.step == 3 and resumed.state.position == 24
    resumed.fit()
    assert_close_checkpoints(single / "one", tmp_path / "two_then_one", step=4)


@pytest.mark.parametrize("setting", range(len(SAMPLE_SETTINGS)))
def test_sampling_is_identical_for_any_world_size(ranks, setting):
    model = perturbed_model(dtype=torch.float32)
    fm = FlowMatching(ObjectiveConfig(), model.null_class)
    labels, seeds = [i % 5 for i in range(NUM_SAMPLES)], list(range(10, 10 + NUM_SAMPLES))
    alone = generate(model, fm, labels, seeds, SampleConfig(steps=3, batch_size=2, **SAMPLE_SETTINGS[setting]), "cpu")
    assert torch.equal(torch.load(ranks / f"samples_{setting}.pt"), alone)


def test_fsdp_trains_like_one_process_and_its_checkpoints_move(data_root, single, ranks, tmp_path):
    assert_close_checkpoints(single / "one", ranks / "fsdp", step=3)  # gathered full states, index-keyed optimizer
    assert_close_checkpoints(single / "one", ranks / "one_then_fsdp", step=4)  # a full checkpoint loaded into shards
    shutil.copytree(ranks / "fsdp", tmp_path / "fsdp_then_one")
    Trainer(tiny_run(data_root), tmp_path / "fsdp_then_one", progress=False).fit()
    assert_close_checkpoints(single / "one", tmp_path / "fsdp_then_one", step=4)


def test_a_hanging_rank_is_reported_with_the_timeout(ranks):
    message = (ranks / "timeout_error.txt").read_text()
    assert message.startswith("rank 0/2: waiting at the test barrier timed out after 2s (distributed.timeout_s)")


# ------------------------------------------------------------------ pure pieces, one process


def test_rank_rows_cover_each_micro_batch_once():
    rows = [D.rank_rows(12, 3, (r, 2)) for r in range(2)]
    assert rows[0].tolist() == [0, 1, 4, 5, 8, 9] and rows[1].tolist() == [2, 3, 6, 7, 10, 11]
    assert D.rank_rows(12, 3, (0, 1)).tolist() == list(range(12))


def test_sampling_batches_split_whole_batches():
    blocks = [D.batches_of_rank(7, 2, (r, 2)) for r in range(2)]
    assert blocks == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 7)]]
    assert D.batches_of_rank(1, 2, (1, 2)) == []


def test_optimizer_state_keys_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    state = opt.state_dict()
    by_name = D.optimizer_state_by_name(state, names)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    back = D.optimizer_state_by_index(by_name, names)
    assert back["param_groups"] == state["param_groups"] and back["state"].keys() == state["state"].keys()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for NCCL without CUDA")
def test_batch_not_divisible_by_the_world_is_one_line(data_root, tmp_path, monkeypatch):
    with pytest.raises(
        UserError, match=r"stages.0 \(pre\): global batch 8 is not divisible by world size 3 x train.grad_accum 2"
    ):
        Trainer(tiny_run(data_root), tmp_path / "r", progress=False, dist=D.Dist(rank=0, world_size=3))
    assert not (tmp_path / "r").exists()  # refused before rank 0 writes anything
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="nccl needs CUDA"):
        D.init_from_env(D.DistributedConfig(backend="nccl"), torch.device("cpu"))
    monkeypatch.delenv("WORLD_SIZE")
    alone = D.init_from_env(D.DistributedConfig(), torch.device("cpu"))
    assert not alone.active and alone.is_main and not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "override,message",
    [
        ("distributed.strategy=zero", "distributed.strategy is 'zero'; choose one of ddp, fsdp"),
        ("distributed.timeout_s=0", "distributed.timeout_s must be positive"),
        ("distributed.bakend=gloo", "did you mean 'distributed.backend'"),
    ],
)
def test_distributed_config_errors_are_one_line(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])
