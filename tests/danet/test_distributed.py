"""danet.distributed and DDP training: two gloo processes on the CPU stay in sync and learn."""

import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from danet.distributed import (
    DistributedContext,
    ResumableDistributedSampler,
    ShardSampler,
    convert_batchnorm,
    resolve_device,
    setup_distributed,
    wrap_ddp,
)
from tests.danet.training_helpers import TINY


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the real trainer."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    import danet_kernels
    from danet.config import load_config
    from danet.training.trainer import train

    danet_kernels.set_backend("torch")  # the CPU attention backend (as tests/danet/conftest.py)
    cfg = load_config("synthetic", overrides=[
        *TINY, "data.train_samples=32", "data.val_samples=6", "eval.batch_size=2", "train.batch_size=8",
        "train.accum_steps=2", "train.iters=8", "train.val_interval=0", f"train.output={out_dir}/run",
    ])
    result = train(cfg)
    torch.save({"state": result.model.state_dict(), "losses": result.losses, "metrics": result.metrics},
               f"{out_dir}/rank{rank}.pt")


def test_two_gloo_processes_stay_identical_and_learn(tmp_path):
    """Global batch 8 = 2 processes x 2 accumulation steps (no_sync on the first) x 2 images."""
    world_size = 2
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size))
    for key, value in rank0["state"].items():
        if value.is_floating_point() and "running" not in key:  # BN running stats are per process
            assert torch.equal(value, rank1["state"][key]), key
    # the logged loss is all-reduced: the same on both ranks, and it fell
    assert rank0["losses"] == rank1["losses"]
    assert rank0["losses"][-1] < rank0["losses"][0]
    assert rank0["metrics"] == rank1["metrics"]  # the confusion matrix was reduced across ranks
    # only rank 0 wrote logs and checkpoints
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == ["checkpoint_best.pt", "config.yaml", "last.pt", "last_good.pt", "metrics.jsonl"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"type": "train"' in line for line in lines) == 8  # once per iteration, not per rank


def test_resumable_sampler_partitions_and_skips():
    data = list(range(10))
    shares = []
    for rank in range(3):
        sampler = ResumableDistributedSampler(data, num_replicas=3, rank=rank, seed=5)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    flat = [i for share in shares for i in share]
    assert set(flat) == set(data) and len(flat) == 12  # every sample; two repeated to pad to 3 x 4
    again = ResumableDistributedSampler(data, num_replicas=3, rank=1, seed=5)
    again.set_epoch(2)
    again.set_start(2)
    assert list(again) == shares[1][2:] and len(again) == len(shares[1]) - 2
    again.set_epoch(3)
    again.set_start(0)
    assert list(again) != shares[1]  # a new epoch, a new order
    with pytest.raises(ValueError, match="cannot skip"):
        again.set_start(99)


def test_shard_sampler_covers_each_index_once():
    shards = [list(ShardSampler(7, 3, rank)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_single_process_context_and_device_errors(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        setup_distributed("cpu")
    with pytest.raises(ValueError, match=r"train\.device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_single_process_wrappers_are_identity():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert_batchnorm(model, DistributedContext(), sync_bn=True) is model
        assert wrap_ddp(model, DistributedContext()) is model


def test_batchnorm_cannot_sync_on_cpu_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    two_cpu_processes = DistributedContext(rank=0, world_size=2)
    with pytest.warns(UserWarning, match="SyncBatchNorm needs CUDA"):
        assert convert_batchnorm(model, two_cpu_processes, sync_bn=True) is model
    assert type(model[1]) is nn.BatchNorm2d


def _freezing_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Rank 1 stops answering after step 2 (as a frozen or deadlocked process would)."""
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    import danet_kernels
    from danet.config import load_config
    from danet.distributed import DistributedTimeoutError
    from danet.training.trainer import train

    danet_kernels.set_backend("torch")
    cfg = load_config("synthetic", overrides=[
        *TINY, "data.train_samples=32", "eval.batch_size=2", "train.iters=8", "train.val_interval=0",
        "dist.timeout_s=4", f"train.output={out_dir}/run",
    ])

    def freeze(iteration, model):
        if rank == 1 and iteration == 2:
            time.sleep(600)  # the test kills this process long before

    try:
        train(cfg, on_step=freeze)
    except DistributedTimeoutError as err:
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(str(err))


def test_a_frozen_rank_is_named_after_dist_timeout_s(tmp_path):
    """Two gloo processes, rank 1 freezes: rank 0 gives up after 4 s, naming rank 1 and where it was."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_freezing_worker, args=(rank, 2, port, str(tmp_path))) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        procs[0].join(timeout=240)
        assert procs[0].exitcode == 0, "rank 0 did not give up in time"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=30)
    message = (tmp_path / "rank0.txt").read_text()
    assert "waited dist.timeout_s=4 s" in message
    assert "rank 1 (last started step 2" in message and "stopped answering" in message
    assert "rank(s) 0 had started step 3" in message
