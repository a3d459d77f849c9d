"""Distributed helpers: no-ops in one process; 2 gloo ranks match one process on the whole batch."""
from __future__ import annotations

import os
import socket
import sqlite3
import sys

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


def test_nccl_group_sends_cpu_tensors_through_gloo(monkeypatch):
    """With CUDA the group is NCCL for CUDA tensors and gloo for CPU ones: the run id and the
    stop flag are CPU tensors, which a plain "nccl" group refuses."""
    calls = {}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kw: calls.setdefault("group", kw))
    assert dist.init_from_env() is True
    assert calls["device"] == 1
    assert calls["group"]["backend"] == "cpu:gloo,cuda:nccl"
    assert (calls["group"]["rank"], calls["group"]["world_size"]) == (1, 2)
    # the ranks that wait while rank 0 scans or predicts a big folder are not ended at torch's
    # 30-minute default
    assert calls["group"]["timeout"].total_seconds() >= 3600


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


# ------------------------------------------------------------------ the trainer on two ranks
# classes 2, a 16-image folder, global batch 8 (4 per rank): 2 steps an epoch, 2 epochs
TRAIN = dict(mode="scratch", classes=2, epochs=2, batch_size=8, seed=5, nn_positives=True,
             n_local=0, global_size=8, proj_hidden_dim=32, workers=0, device="cpu")
TRAIN_IMAGES = 16


def _without_batch_norm(build):
    """``build_model`` with every BatchNorm replaced by an identity (same other weights): on CPU
    each gloo rank normalises with the statistics of its own half-batch (SyncBatchNorm needs
    CUDA), so only a model without BatchNorm can give one process's weights on two ranks."""
    def build_model(cfg):
        model = build(cfg)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                    setattr(module, name, torch.nn.Identity())
        return model
    return build_model


class _GlobalBatches(torch.utils.data.Sampler):
    """One process's sampler giving the global batches two DistributedSampler ranks make:
    batch b is rank 0's b-th local batch, then rank 1's (the order the loss gathers them)."""

    def __init__(self, dataset, local_batch: int):
        self.dataset, self.local_batch = dataset, local_batch

    def __iter__(self):
        from torch.utils.data.distributed import DistributedSampler

        shards = []
        for r in range(WORLD):
            s = DistributedSampler(self.dataset, num_replicas=WORLD, rank=r, shuffle=True,
                                   seed=TRAIN["seed"], drop_last=True)
            s.set_epoch(self.dataset.epoch)
            shards.append(list(s))
        n = self.local_batch
        for b in range(len(shards[0]) // n):
            for shard in shards:
                yield from shard[b * n:(b + 1) * n]

    def __len__(self):
        return len(self.dataset) // WORLD // self.local_batch * self.local_batch * WORLD


def _record_writes(workspace: str, into: list[str]) -> None:
    """Record every file this process writes, renames, removes or makes under ``workspace`` and
    every SQL statement that changes a table other than ``meta`` (an audit hook sees all
    Python file I/O; every SQLite connection is traced)."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and \
            os.fsdecode(path).startswith(workspace)

    def sql(statement: str) -> None:
        words = statement.split()
        if words and words[0].upper() in ("INSERT", "UPDATE", "DELETE", "REPLACE") \
                and " meta " not in f" {statement} ".replace("(", " "):
            into.append(f"sql: {' '.join(words)[:80]}")

    def hook(event: str, args) -> None:
        if event == "open" and under(args[0]):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and set(mode) & set("wax+")) or \
                    (isinstance(flags, int) and flags & write_flags):
                into.append(f"open {mode or flags}: {os.fsdecode(args[0])}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.link") \
                and (under(args[0]) or event in ("os.rename", "os.link") and under(args[1])):
            into.append(f"{event}: {os.fsdecode(args[0])}"
                        + (f" -> {os.fsdecode(args[1])}" if event in ("os.rename", "os.link")
                           else ""))

    sys.addaudithook(hook)
    connect = sqlite3.connect

    def traced_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(sql)
        return conn

    sqlite3.connect = traced_connect


def _train_rank(rank: int, port: int, folder: str, workspace: str, out_dir: str) -> None:
    """One rank as torchrun starts it: its environment, then ``train`` (which joins the group)."""
    from selfclassifier_core.training import scratch
    from selfclassifier_core.workflows.pipeline import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    scratch.build_model = _without_batch_norm(scratch.build_model)
    trained = {}
    fit = scratch.Trainer.fit

    def fit_and_keep(self, stopper):  # this rank's weights at the end (rank 1 saves none)
        stats = fit(self, stopper)
        trained.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return stats

    scratch.Trainer.fit = fit_and_keep
    writes: list[str] = []
    _record_writes(workspace, writes)
    try:
        res = train(folder, workspace, **TRAIN)
    finally:
        dist.cleanup()
    torch.save({"status": res.status, "run_id": res.run_id, "writes": writes, "model": trained},
               os.path.join(out_dir, f"train-rank{rank}.pt"))


@pytest.mark.slow  # two gloo processes that train
def test_trainer_on_two_gloo_ranks_matches_one_process(tmp_path, monkeypatch):
    """Two ranks started as torchrun starts them, on a workspace that does not exist yet: the
    run ends done, only rank 0 writes (files and run rows), the ranks end with the same weights,
    and those are the weights of one process trained on the same global batches.

    Not bit-equality: on two ranks each gradient is the mean of two half-batch backward passes
    (DDP), in one process one pass over the whole batch, the same sums in another order, so
    float32 rounding differs in the last bits. Tolerance atol 1e-6 / rtol 1e-5 on weights and
    queue, rtol 1e-5 on the epoch losses; measured after the 4 steps: 7.5e-9 at most on the
    weights, 9e-8 relative on the losses. What a real difference gives, for scale: per-rank
    BatchNorm moves the weights by ~8e-4 and the losses in the second decimal, batches of
    another composition (the plain one-process order) the loss in the first decimal.

    BatchNorm is removed from the model in both runs: on CPU (gloo) each rank normalises with
    the statistics of its own half-batch (no SyncBatchNorm off CUDA), which one process on the
    whole batch cannot reproduce; with it the parameters still agree between the ranks, but
    neither with one process nor in the BatchNorm running statistics of rank 1.
    """
    from train_fixtures import checkpoint_weights, make_folder

    from selfclassifier_core.catalog import datasets
    from selfclassifier_core.store.checkpoint import load_checkpoint
    from selfclassifier_core.store.predictions import load_predictions
    from selfclassifier_core.store.runfiles import read_progress, read_stats
    from selfclassifier_core.store.workspace import Workspace
    from selfclassifier_core.training import scratch
    from selfclassifier_core.workflows.pipeline import train

    folder = make_folder(tmp_path / "imgs", n=TRAIN_IMAGES)
    ws_dir = tmp_path / "ws-two-ranks"
    mp.spawn(_train_rank, args=(_free_port(), str(folder), str(ws_dir), str(tmp_path)),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"train-rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # one process, the same global batches (rank 0's half, then rank 1's), no BatchNorm
    monkeypatch.setattr(scratch, "build_model", _without_batch_norm(scratch.build_model))
    make_loader = datasets.make_loader
    monkeypatch.setattr(scratch, "make_loader", lambda dataset, batch_size, **kw: make_loader(
        dataset, batch_size, **{**kw, "sampler": _GlobalBatches(dataset, batch_size // WORLD)}))
    one = train(folder, tmp_path / "ws-one", **TRAIN)

    assert [r["status"] for r in ranks] == ["done", "done"] and one.status == "done"
    run_id = ranks[0]["run_id"]
    assert ranks[1]["run_id"] == run_id
    ws = Workspace.open(ws_dir)
    assert [(r.id, r.status) for r in ws.list_runs()] == [(run_id, "done")]
    assert read_progress(ws.run_dir(run_id))["status"] == "done"
    preds = load_predictions(ws.run_dir(run_id))
    assert sorted(preds.image_ids.tolist()) == sorted(i for i, _ in ws.usable_images())

    # only rank 0 wrote: the scan, the run row, config, stats, progress, checkpoint, predictions
    assert ranks[1]["writes"] == []
    written = "\n".join(ranks[0]["writes"])
    for what in ("sql: INSERT INTO images", "sql: INSERT INTO runs", "sql: UPDATE runs",
                 "checkpoint.pt", "stats.jsonl", "progress.json", "predictions.npz"):
        assert what in written, what

    # DDP kept the ranks in step, and the weights are one process's
    for k, v in ranks[0]["model"].items():
        assert torch.equal(v, ranks[1]["model"][k]), k
    two, single = checkpoint_weights(ws.run_dir(run_id)), checkpoint_weights(one.run_dir)
    assert two.keys() == single.keys() == ranks[0]["model"].keys()
    for k in two:
        assert torch.equal(two[k], ranks[0]["model"][k]), k
        torch.testing.assert_close(two[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    queues = [load_checkpoint(d / "checkpoint.pt")["queue"] for d in (ws.run_dir(run_id),
                                                                        one.run_dir)]
    assert torch.equal(queues[0]["ids"], queues[1]["ids"])    # gathered in the same order
    torch.testing.assert_close(queues[0]["embeddings"], queues[1]["embeddings"], rtol=1e-5,
                               atol=1e-6)
    loss_two = [s["loss"] for s in read_stats(ws.run_dir(run_id))]
    loss_one = [s["loss"] for s in read_stats(one.run_dir)]
    assert len(loss_two) == 2
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-5, atol=0)


def _extract_rank(rank: int, port: int, workspace: str, weights: str, out_dir: str) -> None:
    """One rank as torchrun starts it, embedding its share of a fast-mode feature cache."""
    from selfclassifier_core.store.workspace import Workspace
    from selfclassifier_core.training.features import extract_features

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_from_env()
    try:
        cache = extract_features(Workspace.open(workspace), "resnet18", weights, views=3,
                                 image_size=32, device="cpu", workers=0, sharded=True)
    finally:
        dist.cleanup()
    torch.save({"key": cache.key, "computed": cache.computed}, os.path.join(
        out_dir, f"extract-rank{rank}.pt"))


@pytest.mark.slow  # two gloo processes that embed images
def test_two_ranks_fill_the_same_feature_cache_as_one_process(dark_bright_cold, tmp_path):
    """Fast mode under torchrun: each rank embeds every other image into one cache; the cache
    equals one process's bit for bit (the same model on the same views, image by image; the
    unreadable file is left out by both)."""
    import shutil

    import numpy as np

    from selfclassifier_core.store.workspace import Workspace
    from selfclassifier_core.training.features import extract_features

    folder, ws, weights, _ = dark_bright_cold
    one_dir = tmp_path / "ws-one"
    shutil.copytree(ws.path, one_dir)
    mp.spawn(_extract_rank, args=(_free_port(), str(ws.path), str(weights), str(tmp_path)),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"extract-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    torch.set_num_threads(1)
    one = extract_features(Workspace.open(one_dir), "resnet18", weights, views=3, image_size=32,
                           device="cpu", workers=0)
    assert ranks[0]["key"] == ranks[1]["key"] == one.key
    assert ranks[0]["computed"] == one.computed == len(one)      # every image embedded once
    two = extract_features(Workspace.open(ws.path), "resnet18", weights, views=3,
                           image_size=32, device="cpu", workers=0)
    assert two.computed == 0                                     # the shared cache is current
    assert np.array_equal(two.image_ids, one.image_ids)
    assert np.array_equal(np.asarray(two.features), np.asarray(one.features))
    assert not list(ws.features_dir.glob(".*.tmp"))              # nothing half-written left


def _fast_rank(rank: int, port: int, folder: str, workspace: str, weights: str,
               out_dir: str) -> None:
    from selfclassifier_core.workflows.pipeline import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        res = train(folder, workspace, mode="fast", backbone="resnet18", pretrained=weights,
                    views=3, image_size=32, classes=2, steps=5, device="cpu", workers=0)
    finally:
        dist.cleanup()
    torch.save({"status": res.status, "run_id": res.run_id},
               os.path.join(out_dir, f"fast-rank{rank}.pt"))


@pytest.mark.slow  # two gloo processes
def test_fast_mode_under_torchrun_shares_the_embedding_and_rank_0_trains(dark_bright_cold,
                                                                         tmp_path):
    from selfclassifier_core.store.predictions import load_predictions
    from selfclassifier_core.store.workspace import Workspace

    folder, _, weights, _ = dark_bright_cold
    ws_dir = tmp_path / "ws-fast-two"
    mp.spawn(_fast_rank, args=(_free_port(), str(folder), str(ws_dir), str(weights),
                               str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"fast-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["status"] == "done" and ranks[0]["run_id"] == 1
    assert ranks[1]["run_id"] == 0                    # the other rank embedded, then left
    ws = Workspace.open(ws_dir)
    assert [(r.id, r.status) for r in ws.list_runs()] == [(1, "done")]
    meta = [p for p in ws.features_dir.glob("*/meta.json")]
    assert len(meta) == 1 and '"ranks": 2' in meta[0].read_text()
    preds = load_predictions(ws.run_dir(1))
    assert sorted(preds.image_ids.tolist()) == sorted(i for i, _ in ws.usable_images())
