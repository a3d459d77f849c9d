"""Refit end to end: a new run learns from the person's names, moves, checks and exclusions.

Every test here trains (fast mode on cached features, or a scratch/finetune run from its
checkpoint), so the module is in the slow lane.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import selfclassifier_core as sc
from selfclassifier_core.cli import main as cli_main
from selfclassifier_core.curation.feedback import read_plan
from selfclassifier_core.curation.labels import Labels
from selfclassifier_core.store.checkpoint import CHECKPOINT_FILE, load_checkpoint
from selfclassifier_core.training.targets import load_targets
from selfclassifier_core.workflows.refit import refit

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

KINDS = {"dark": ((0, 70), (0, 70), (0, 70)), "bright": ((190, 256), (190, 256), (190, 256)),
         "red": ((200, 256), (0, 40), (0, 40))}
FAST = dict(mode="fast", backbone="resnet18", views=3, image_size=32, device="cpu", workers=0)


@pytest.fixture(scope="module")
def three_kinds(tmp_path_factory):
    """12 dark, 12 bright and 12 red noise images, random resnet18 weights."""
    root = tmp_path_factory.mktemp("three-kinds")
    folder = root / "images"
    folder.mkdir()
    kind_of = {}
    for j in range(36):
        kind = list(KINDS)[j % 3]
        rng = np.random.default_rng(j)
        pixels = np.stack([rng.integers(lo, hi, (16, 16)) for lo, hi in KINDS[kind]], axis=-1)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{j:02d}.png")
        kind_of[f"img_{j:02d}.png"] = kind
    torch.manual_seed(0)
    weights = root / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return folder, weights, kind_of


def kinds_by_label(lab: Labels, kind_of: dict[str, str]) -> dict[str, dict[str, int]]:
    df = lab.final_table()
    out: dict[str, dict[str, int]] = {}
    for path, label in zip(df["path"], df["label"]):
        k = kind_of[Path(path).name]
        out.setdefault(label, {}).setdefault(k, 0)
        out[label][k] += 1
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fast_refit_pulls_a_mixed_kind_out_into_its_own_label(three_kinds, tmp_path):
    folder, weights, kind_of = three_kinds
    first = sc.train(folder, tmp_path / "ws", pretrained=str(weights), classes=2, steps=60,
                     **FAST)
    ws = first.workspace
    lab = Labels(ws, first.run_id)
    df = lab.final_table()
    kind = np.array([kind_of[Path(p).name] for p in df["path"]])
    # two classes for three kinds: name each cluster by the kind most of it holds
    for c in range(2):
        members = kind[df["cluster"].to_numpy() == c]
        if len(members):
            lab.rename(c, max(sorted(set(members)), key=list(members).count))
    mixed = kinds_by_label(lab, kind_of)
    assert any(len(v) > 1 for v in mixed.values())          # two kinds share a label
    minority = next(k for k in KINDS if all(max(v, key=v.get) != k for v in mixed.values()))
    picked = df.index[kind == minority][:3].tolist()
    lab.move_to_label(picked, minority)                      # a label no cluster has
    before_preds = digest(ws.run_dir(first.run_id) / "predictions.npz")
    before_labels = lab.final_table().copy()
    history = [e.id for e in lab.history()]

    result = refit(ws, first.run_id, steps=150)
    assert result.status == "done"
    assert result.labels == len(set(lab.final_table()["label"]))   # every label got a class
    assert result.heads[0] == max(2, result.labels)          # grown when they outnumber them
    new = Labels(ws, result.run_id)
    assert minority in new.cluster_names().values()          # carried by a cluster of its own
    table = kinds_by_label(new, kind_of)
    assert table[minority].get(minority, 0) >= 10            # the kinds are apart now
    for label, counts in table.items():
        assert max(counts, key=counts.get) == label          # every label is its own kind
    assert result.changed is not None and result.changed >= 6
    assert set(picked) <= set(new.final_table().query("label == @minority").index)
    # the earlier run is as it was
    assert digest(ws.run_dir(first.run_id) / "predictions.npz") == before_preds
    assert Labels(ws, first.run_id).final_table().equals(before_labels)
    assert [e.id for e in Labels(ws, first.run_id).history()] == history
    run = ws.get_run(result.run_id)
    assert run.refit_of == first.run_id and run.summary.startswith("refit of run")


def test_fast_refit_leaves_excluded_images_out_of_training(three_kinds, tmp_path):
    folder, weights, kind_of = three_kinds
    first = sc.train(folder, tmp_path / "ws", pretrained=str(weights), classes=3, steps=30,
                     **FAST)
    lab = Labels(first.workspace, first.run_id)
    ids = lab.final_table().index.tolist()
    lab.exclude(ids[:4])
    lab.rename(0, "zero")
    result = refit(first.workspace, first.run_id, steps=20)
    targets = load_targets(first.workspace.run_dir(result.run_id))
    assert targets.excluded.tolist() == ids[:4]
    new = Labels(first.workspace, result.run_id).final_table()
    assert new.loc[ids[:4], "excluded"].all()                # still excluded in the new run
    assert len(new) == len(ids)                              # but predicted like every image


def test_refit_with_nothing_to_learn_is_refused(three_kinds, tmp_path):
    folder, weights, _ = three_kinds
    first = sc.train(folder, tmp_path / "ws", pretrained=str(weights), classes=2, steps=10,
                     **FAST)
    with pytest.raises(ValueError, match="nothing to learn from yet"):
        refit(first.workspace, first.run_id)
    assert len(first.workspace.list_runs()) == 1             # no run was created


SCRATCH = dict(backbone="convnet_small", batch_size=12, device="cpu", workers=0, n_local=0,
               global_size=16)


@pytest.mark.parametrize("mode", ["scratch", "finetune"])
def test_scratch_and_finetune_refits_start_from_the_checkpoint(three_kinds, tmp_path, mode,
                                                               monkeypatch):
    folder, _, kind_of = three_kinds
    extra = {}
    if mode == "finetune":
        from selfclassifier_core.engine.backbones import build_backbone

        net, _ = build_backbone("convnet_small", True, 16)
        torch.save(net.state_dict(), tmp_path / "small.pth")
        extra = {"pretrained": str(tmp_path / "small.pth")}
    first = sc.train(folder, tmp_path / "ws", mode=mode, classes=3, epochs=1, **SCRATCH,
                     **extra)
    ws = first.workspace
    lab = Labels(ws, first.run_id)
    used = int(lab.final_table()["cluster"].iloc[0])
    lab.rename(used, "one")
    lab.confirm(lab.final_table().index[:5].tolist())
    start = load_checkpoint(ws.run_dir(first.run_id) / CHECKPOINT_FILE)["model"]
    seen = {}
    from selfclassifier_core.training import scratch

    real = scratch.Trainer.prepare

    def spy(self, resume_state=None):
        real(self, resume_state)
        seen.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(scratch.Trainer, "prepare", spy)
    result = refit(ws, first.run_id, epochs=1)
    assert result.status == "done"
    for name, value in start.items():                        # trained from the run's weights
        assert torch.equal(seen[name].cpu(), value), name
    assert ws.get_run(result.run_id).mode == mode
    assert Labels(ws, result.run_id).cluster_names()[used] == "one"   # its class: its cluster
    assert read_plan(ws.run_dir(result.run_id))["applied"]["confirmed"] + \
        read_plan(ws.run_dir(result.run_id))["applied"]["moved"] == 5
    for run_id in (first.run_id, result.run_id):            # both summaries remembered
        assert (ws.cache_dir / f"run-{run_id}-summary.json").exists()


def test_a_scratch_refit_stopped_midway_resumes_and_gets_its_names(three_kinds, tmp_path):
    folder, _, _ = three_kinds
    first = sc.train(folder, tmp_path / "ws", mode="scratch", classes=3, epochs=1, **SCRATCH)
    ws = first.workspace
    lab = Labels(ws, first.run_id)
    used = int(lab.final_table()["cluster"].iloc[0])
    lab.rename(used, "two")
    calls = []

    def stop_soon():
        calls.append(1)
        return len(calls) > 2

    stopped = refit(ws, first.run_id, epochs=2, should_stop=stop_soon)
    assert stopped.status == "cancelled"
    assert ws.get_run(stopped.run_id).status == "cancelled"
    assert read_plan(ws.run_dir(stopped.run_id))["applied"] is None
    resumed = sc.train(None, ws, resume=True, run_id=stopped.run_id, device="cpu", workers=0)
    assert resumed.status == "done"
    assert read_plan(ws.run_dir(stopped.run_id))["applied"] is not None
    assert Labels(ws, stopped.run_id).cluster_names()[used] == "two"


def test_cli_refit_prints_the_new_run_and_what_it_learned(three_kinds, tmp_path, capsys):
    folder, weights, _ = three_kinds
    first = sc.train(folder, tmp_path / "ws", pretrained=str(weights), classes=2, steps=20,
                     **FAST)
    ws = first.workspace
    lab = Labels(ws, first.run_id)
    lab.confirm(lab.final_table().index[:4].tolist())
    capsys.readouterr()
    assert cli_main(["refit", str(ws.path), "--run", str(first.run_id), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    new_id = ws.list_runs()[-1].id
    assert f"refit run {new_id} of run {first.run_id}: done; learned from 4 checked images" in out
    assert "images changed label" in out
    assert f"Run {new_id} (fast): " in out          # the new run's summary, as train prints it
    assert out.index("images changed label") < out.index(f"Run {new_id} (fast)") < \
        out.index("next: ")
    assert cli_main(["refit", str(ws.path), "--run", "99"]) == 2
    assert "no run 99" in capsys.readouterr().err
