"""Issue 17's mechanism diagnostics against direct evaluations: the discriminator accuracy the adversarial scripts
report, and the selection statistics (class TV, rare-class share, hard-city share) of benchmark/selection_histogram."""
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, class_share

sys.path.insert(0, str(ROOT))
from benchmark.selection_histogram import selection_stats  # noqa: E402


def _load(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("rel", ["advent_maxsquare/train_adaptseg.py", "advent_maxsquare/train_advent.py"])
def test_discriminator_accuracy_is_the_share_of_patches_on_the_right_side(rel):
    mod = _load(rel)
    torch.manual_seed(0)
    discs = {"out": torch.nn.Conv2d(5, 1, 1), "aux": torch.nn.Conv2d(5, 1, 1)}
    pred = {k: torch.randn(2, 5, 6, 7) for k in discs}
    pred_t = {k: torch.randn(2, 5, 6, 7) + 0.5 for k in discs}
    got = mod.discriminator_accuracy(discs, pred, pred_t)
    want = []
    for k, D in discs.items():  # source label 0 (logit <= 0 right), target 1 (logit > 0 right)
        with torch.no_grad():
            s = D(mod.discriminator_input(pred[k])).numpy()
            t = D(mod.discriminator_input(pred_t[k])).numpy()
        want.append(0.5 * ((s <= 0).mean() + (t > 0).mean()))
    assert got == pytest.approx(float(np.mean(want)), abs=1e-6)
    from common.runtime import last_quarter
    assert last_quarter([(0, 0.1), (70, 0.2), (75, 0.6), (90, 0.8)], 100) == pytest.approx(0.7)
    assert last_quarter([], 100) is None


def test_selection_stats_match_a_direct_count(tmp_path, tiny_toy):
    root = tmp_path / "toy_cityscapes"
    shutil.copytree(tiny_toy / "toy_cityscapes", root, symlinks=True)
    imgs = sorted(str(p.relative_to(root)) for p in (root / "leftImg8bit" / "train").rglob("*.png"))
    (root / "hard.txt").write_text("".join(f"{n.split('/')[-1]}\n" for n in imgs[-2:]))  # 2 of 8 hard
    run = tmp_path / "select_x"
    run.mkdir()
    picked = [imgs[0], imgs[-1], imgs[3]]
    (run / "selected.txt").write_text("\n".join(picked) + "\n")
    rare = [11, 12]
    st = selection_stats(run, "mada", root, rare=rare)
    tgt, sel = class_share(root, imgs), class_share(root, picked)
    assert st["class_tv"] == pytest.approx(0.5 * np.abs(sel - tgt).sum(), abs=1e-4)
    assert st["rare_share"] == pytest.approx(sel[rare].sum(), abs=1e-4)
    assert st["rare_share_target"] == pytest.approx(tgt[rare].sum(), abs=1e-4)
    assert st["hard_share"] == pytest.approx(1 / 3, abs=1e-4) and st["hard_share_target"] == 0.25
    # SS-ADA runs: only what the acquisition picked (rounds 1..), not the initial random draw
    ss = tmp_path / "ssada_x"
    for d, rels in (("round_00_init", imgs[:4]), ("round_01", picked)):
        (ss / "rounds" / d).mkdir(parents=True)
        (ss / "rounds" / d / "selected.txt").write_text("\n".join(rels) + "\n")
    assert selection_stats(ss, "ssada", root, rare=rare) == st
    assert selection_stats(tmp_path / "empty", "mada", root) is None
