"""Steps 1 and 5 under torchrun: sharded batches, the global-batch loss, and a real two-process run (gloo, CPU)."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, run_script, tiny_train_args
from data import open_split
from data.cache import DecodedImages
from models.losses import PairwiseLoss
from runs import distributed


def test_shares_of_a_cached_batch_are_the_single_process_batch(tiny_data):
    cached = DecodedImages(open_split(str(tiny_data), "train", 32, 32, "pad-crop"), 32, 32, "pad-crop",
                           torch.device("cpu"))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))

    def epoch(share):
        return list(cached.batches(order, 16, True, torch.Generator().manual_seed(5), torch.device("cpu"), share))

    whole, first, second = epoch((0, 1)), epoch((0, 2)), epoch((1, 2))
    assert len(whole) == len(first) == len(second) == 6
    for (images, labels), (a, la), (b, lb) in zip(whole, first, second):
        assert a.shape[0] == b.shape[0] == 8
        assert torch.equal(images, torch.cat([a, b])) and torch.equal(labels, torch.cat([la, lb]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_problem():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(12, 16)
    with torch.no_grad():
        model.weight.copy_(torch.randn(16, 12, generator=g))
        model.bias.zero_()
    x = torch.randn(8, 12, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 3, (8,), generator=g), 3).float()
    return model, x, y


def distributed_gradient(process: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=process, world_size=world)
    model, x, y = toy_problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    share = slice(process * 4, (process + 1) * 4)
    outputs, labels = distributed.gather_batch(ddp(x[share]), y[share])
    loss = PairwiseLoss(16)(outputs, labels)
    (loss * world).backward()
    if process == 0:
        torch.save({"loss": loss.detach(), "grad": model.weight.grad, "labels": labels}, out)
    dist.destroy_process_group()


def test_global_batch_loss_gives_the_single_process_gradient(tmp_path):
    out = str(tmp_path / "grad.pt")
    mp.spawn(distributed_gradient, args=(2, free_port(), out), nprocs=2)
    got = torch.load(out)
    model, x, y = toy_problem()
    loss = PairwiseLoss(16)(model(x), y)
    loss.backward()
    assert torch.equal(got["labels"], y)  # the global batch in rank order
    assert torch.allclose(got["loss"], loss.detach(), rtol=1e-6)
    assert torch.allclose(got["grad"], model.weight.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cache", ["memory", "off"])
def test_two_processes_train_like_one(tiny_data, tiny_run, tmp_path, cache):
    """torchrun, 2 CPU processes (gloo): same global batches and loss; batch norm and dropout see each process's
    half of the batch (and without the cache the augmentation comes from other random streams), so the losses
    agree closely rather than exactly."""
    run = tmp_path / "two"
    args = [*tiny_train_args(tiny_data, run), "--cache", cache]
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
                      str(REPO / "train_hash.py"), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports and writes
    single = json.loads((tiny_run / "clean" / "history.json").read_text())
    two = json.loads((run / "clean" / "history.json").read_text())
    assert [h["epoch"] for h in two] == [1, 2]
    for a, b in zip(single, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.02)
    config = json.loads((run / "clean" / "config.json").read_text())
    assert config["processes"] == 2
    codes = torch.load(run / "clean" / "codes.pt", weights_only=False)
    assert codes["database_codes"].shape == (200, 48)
    assert not [p for p in (run / "clean").iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_a_batch_that_does_not_split_over_the_processes(tiny_data, tmp_path):
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--",
                      str(REPO / "train_hash.py"), *tiny_train_args(tiny_data, tmp_path / "odd"), "--batch-size", "15")
    assert proc.returncode != 0
    assert "--batch-size 15 does not split over 2 processes" in proc.stderr
    assert not (tmp_path / "odd" / "clean" / "checkpoint.pt").exists()
