"""End-to-end: train_source.py and test.py as a user runs them (subprocess, tiny budgets), exact resume,
torchrun, and the run folder never overwritten."""
import json

import pytest
import torch

from conftest import run_script, run_torchrun

TINY = ["--iters", "4", "--batch-size", "2", "--eval-every", "4", "--save-every", "2", "--workers", "0"]


def roots(tiny):
    return ["--source-root", tiny / "toy_gta5", "--target-root", tiny / "toy_cityscapes"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_train_source_then_test_end_to_end(tmp_path, tiny_toy):
    out = tmp_path / "src"
    p = run_script("advent_maxsquare/train_source.py", *TINY, *roots(tiny_toy), "--multi", "1", "--keep-snapshots",
                   "--out", out)
    assert "[done]" in p.stdout
    final = json.loads((out / "final.json").read_text())
    assert 0 <= final["last"]["mIoU"] <= 100 and final["best"]["iter"] == 4
    for f in ("config.json", "log.jsonl", "checkpoint.pth", "model.pth", "iou_table.md", "snapshots/iter_000004.pth"):
        assert (out / f).exists(), f
    assert len(list((out / "predictions").glob("*_pred.png"))) == 4
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "iter", "rng", "best", "config"} <= set(ck)
    # test.py: held-out split, flip TTA, ensemble with itself, snapshot scan (best labelled as such)
    ev = tmp_path / "eval"
    p = run_script("advent_maxsquare/test.py", "--checkpoint", out / "model.pth", "--split", "test", "--flip",
                   "--target-root", tiny_toy / "toy_cityscapes",
                   "--ensemble", out / "model.pth", "--snapshots", out / "snapshots", "--out", ev, "--workers", "0")
    rep = json.loads((ev / "final.json").read_text())
    assert rep["split"] == "test" and rep["images"] == 4 and "best_snapshot" in rep
    assert "optimistic" in rep["best_snapshot"]["note"]


def test_resume_reaches_the_same_weights(tmp_path, tiny_toy):
    a, b = tmp_path / "a", tmp_path / "b"
    run_script("advent_maxsquare/train_source.py", *TINY, *roots(tiny_toy), "--out", a)
    run_script("advent_maxsquare/train_source.py", *TINY, *roots(tiny_toy), "--stop-iter", "2", "--out", b)  # "interrupted" at 2
    p = run_script("advent_maxsquare/train_source.py", *TINY, *roots(tiny_toy), "--resume", "--out", b)
    assert "resumed" in p.stdout
    wa, wb = _weights(a / "model.pth"), _weights(b / "model.pth")
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6), k


def test_run_folder_is_never_overwritten(tmp_path, tiny_toy):
    out = tmp_path / "run"
    run_script("advent_maxsquare/train_source.py", "--iters", "1", "--batch-size", "2", "--eval-every", "1",
               "--workers", "0", *roots(tiny_toy), "--out", out)
    first = (out / "final.json").read_text()
    p = run_script("advent_maxsquare/train_source.py", "--iters", "1", "--batch-size", "2", "--eval-every", "1",
                   "--workers", "0", *roots(tiny_toy), "--out", out)
    assert "moved to" in p.stdout
    aside = [d for d in tmp_path.iterdir() if d.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "final.json").read_text() == first


def test_torchrun_two_processes(tmp_path, tiny_toy):
    out = tmp_path / "ddp"
    p = run_torchrun("advent_maxsquare/train_source.py", "--iters", "2", "--batch-size", "2", "--eval-every", "2",
                     "--workers", "0", *roots(tiny_toy), "--out", out)
    assert (out / "model.pth").exists() and "[done]" in p.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("val_mIoU" in r for r in log)


def test_missing_real_dataset_root_is_a_clear_error(tmp_path):
    p = run_script("advent_maxsquare/train_source.py", "--source", "gta5", "--source-root", tmp_path / "GTA5",
                   "--init", "scratch", "--target", "cityscapes", "--target-root", tmp_path / "cs",
                   "--out", tmp_path / "o", check=False)
    assert p.returncode != 0 and "GTA5/images" in p.stderr and "expected layout" in p.stderr
