"""The toy stand-in for ImageNet weights (common/toy_backbone.py): its pre-training task is what the docstring
says, its output loads into every toy model's backbone, and `--init toy` resolves to the cached file without
re-training. (The full 1500-iteration pre-training is not run here: a 3-iteration one checks the plumbing.)"""
import argparse

import numpy as np
import torch

from common import cli
from common import toy_backbone as TB
from common.models import load_backbone_weights, make_segmenter


def test_mosaic_deterministic_and_labelled_by_texture():
    a = TB.mosaic(np.random.default_rng(3))
    b = TB.mosaic(np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    img, lab = a
    assert img.shape == TB.INPUT + (3,) and lab.shape == TB.INPUT
    assert lab.min() >= 0 and lab.max() < TB.NUM_LABELS
    # over a few mosaics every label occurs: 4 aperiodic kinds + 5 periodic kinds x 2 period bins
    labs = np.concatenate([TB.mosaic(np.random.default_rng(i))[1].ravel() for i in range(40)])
    assert set(np.unique(labs)) == set(range(TB.NUM_LABELS))


def test_flat_regions_are_flat_and_colours_vary_between_mosaics():
    """A 'flat' (label 3) region has no texture; the same label gets different colours in different mosaics."""
    means = []
    for i in range(30):
        img, lab = TB.mosaic(np.random.default_rng(100 + i))
        m = lab == 3
        if m.sum() > 200:
            means.append(img[m].mean(0))
    means = np.array(means)
    assert len(means) >= 5
    assert means.std(0).min() > 0.1  # colour is no cue to the texture label


def test_pretrained_state_loads_into_every_toy_backbone(tmp_path):
    sd, stats, _ = TB.pretrain(iters=3, batch_size=2, log_every=0)
    assert np.isfinite(stats["loss"]) and 0 <= stats["accuracy"] <= 1
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    for model in ("deeplabv2", "deeplabv3plus"):
        net, _ = make_segmenter(model, "resnet18", 19, init=str(path))
        assert torch.equal(net.backbone.conv1.weight, sd["conv1.weight"])
    from common.bisenet import make_bisenet
    net, _ = make_bisenet(19, str(path))
    load_backbone_weights(net, str(path))


def test_init_toy_is_scratch_on_v2(monkeypatch):
    monkeypatch.setenv("SEGDA_TOY_VERSION", "2")
    args = argparse.Namespace(source="toy", target="toy", init=None, iters=None, stop_iter=None)
    cli.fill_defaults(args, dict(init="toy", iters=5), dict(init=None, iters=10))
    assert args.init == "scratch"


def test_init_toy_resolves_to_the_cached_file_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGDA_DATA", str(tmp_path))
    monkeypatch.setenv("SEGDA_TOY_VERSION", "3")
    path = TB.backbone_path()
    path.parent.mkdir(parents=True)
    torch.save({"marker": torch.zeros(1)}, path)
    monkeypatch.setattr(TB, "pretrain", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    args = argparse.Namespace(source="toy", target="toy", init=None, iters=None, stop_iter=None)
    cli.fill_defaults(args, dict(init="toy", iters=5), dict(init=None, iters=10))
    assert args.init == str(path)
