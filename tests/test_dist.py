"""Distributed helpers: no-ops in one process; 2 gloo ranks match one process on the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from selfclassifier_core.engine import dist
from selfclassifier_core.engine.loss import self_classifier_loss

WORLD = 2
N_LOCAL = 4
C = 3
D = 5
N_VIEWS = 3


def _data():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(WORLD * N_LOCAL, C, generator=g) for _ in range(N_VIEWS)]
    inputs = [torch.randn(WORLD * N_LOCAL, D, generator=g) for _ in range(N_VIEWS)]
    weight = torch.randn(C, D, generator=g)
    return logits, inputs, weight


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        logits, inputs, weight = _data()

        # 1) raw logits: this rank's rows only
        mine = [z[rows].clone().requires_grad_(True) for z in logits]
        loss = self_classifier_loss([mine], n_global=2)
        loss.backward()

        # 2) a tiny linear model; DDP averages parameter gradients over ranks
        lin = torch.nn.Linear(D, C, bias=False)
        with torch.no_grad():
            lin.weight.copy_(weight)
        model_loss = self_classifier_loss([[lin(x[rows]) for x in inputs]], n_global=2)
        model_loss.backward()
        grad_w = lin.weight.grad.clone()
        torch.distributed.all_reduce(grad_w)
        grad_w /= WORLD

        gathered = dist.gather_with_grad(torch.full((2, 1), float(rank)))
        torch.save(
            {
                "is_dist": dist.is_dist(),
                "world_size": dist.world_size(),
                "rank": dist.rank(),
                "is_main": dist.is_main(),
                "gathered": gathered,
                "mean": dist.all_reduce_mean(torch.tensor([float(rank)])),
                "loss": loss.detach(),
                "grads": [z.grad for z in mine],
                "model_loss": model_loss.detach(),
                "grad_w": grad_w,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.cleanup()


def test_single_process_helpers_are_noops():
    assert not dist.is_dist()
    assert dist.world_size() == 1
    assert dist.rank() == 0
    assert dist.is_main()
    dist.barrier()
    x = torch.randn(3, 2)
    assert dist.gather_with_grad(x) is x
    assert dist.all_reduce_mean(x) is x
    dist.cleanup()


def test_init_from_env_without_torchrun_vars(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_from_env() is False
    assert not dist.is_dist()


def test_init_from_env_rejects_unknown_backend(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="'bogus'"):
        dist.init_from_env(backend="bogus")


@pytest.mark.slow  # two gloo processes
def test_two_gloo_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    logits, inputs, weight = _data()
    full = [z.clone().requires_grad_(True) for z in logits]
    loss = self_classifier_loss([full], n_global=2)
    loss.backward()
    lin = torch.nn.Linear(D, C, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    model_loss = self_classifier_loss([[lin(x) for x in inputs]], n_global=2)
    model_loss.backward()

    for r, res in enumerate(results):
        assert res["is_dist"] and res["world_size"] == WORLD and res["rank"] == r
        assert res["is_main"] == (r == 0)
        torch.testing.assert_close(res["gathered"], torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
        torch.testing.assert_close(res["mean"], torch.tensor([0.5]))
        # every rank sees the loss of the concatenated batch
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["model_loss"], model_loss.detach(), rtol=1e-5, atol=1e-6)
        # the gather's backward sums over ranks: each rank's logits get WORLD x the gradient of its
        # rows, which DDP's averaging of parameter gradients turns back into the exact gradient
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        for g_rank, z in zip(res["grads"], full):
            torch.testing.assert_close(g_rank, WORLD * z.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res["grad_w"], lin.weight.grad, rtol=1e-4, atol=1e-6)
