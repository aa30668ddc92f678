"""Evaluation outputs people use (issue 15): Cityscapes label-id predictions checked against the OFFICIAL
evaluation (cityscapesscripts' evalPixelLevelSemanticLabeling, a test dependency), and the pictures
(common/pictures.py): prediction grid, sheets, outlined regions, class-histogram charts.

How the two sides treat a class: the official script computes IoU per Cityscapes label id over the pixels
whose ground truth is not ignored, reports NaN for a class absent from both prediction and ground truth and
averages over the non-NaN classes (getIouScoreForLabel / getScoreAverage); common.metrics does the same in
class-index space (pixels with label 255 dropped, NaN where TP + FP + FN = 0, nanmean). A class predicted
but absent from the ground truth is 0 on both sides.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script

from common import labels as L
from common import pictures as P



def official_module():
    """cityscapesscripts' pixel-level evaluation (requirements.txt, a test dependency); the tests that need it
    are skipped, visibly, where it is not installed."""
    return pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                               reason="cityscapesscripts (requirements.txt, test dependency) not installed")


TRAIN_ID, BUS_ID = 31, 28  # Cityscapes label ids


class Fixed(torch.nn.Module):
    """A 'model' that returns the given logits (each (1, C, H, W)) of the next x.shape[0] images, in order
    (evaluate batches same-size images: common.datasets.eval_batches)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.i, self.w = logits, 0, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.cat(self.logits[self.i:self.i + x.shape[0]])
        self.i += x.shape[0]
        return {"out": out}


def corrupted_logits(labels, num_classes, seed, never=(), forced=None):
    """Logits (1, C, H, W) whose argmax is the label (class indices) with 25% of the pixels (ignored ones
    included) set to random classes, never predicting the classes in `never`, and `forced` (a class)
    predicted on a 10x20 block."""
    rng = np.random.default_rng(seed)
    allowed = [c for c in range(num_classes) if c not in never]
    out = []
    for lab in labels:
        pred = np.where(lab == 255, rng.choice(allowed, lab.shape), lab)
        flip = rng.random(lab.shape) < 0.25
        pred[flip] = rng.choice(allowed, int(flip.sum()))
        if forced is not None:
            pred[:10, :20] = forced
        assert not np.isin(pred, list(never)).any()
        out.append(10.0 * torch.nn.functional.one_hot(torch.from_numpy(pred).long(), num_classes).permute(2, 0, 1)[None].float())
    return out


def cityscapes_tree(toy_root, dst, n=4, drop=()):
    """A Cityscapes-layout val split of n toy images (images linked); label ids in `drop` set to 0
    (unlabeled) in the ground truth; instanceIds = labelIds (no instances: the official script reads them)."""
    src = toy_root / "toy_cityscapes"
    imgs = sorted((src / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[:n]
    for p in imgs:
        city, stem = p.parent.name, p.name[: -len("_leftImg8bit.png")]
        (dst / "leftImg8bit" / "val" / city).mkdir(parents=True, exist_ok=True)
        (dst / "leftImg8bit" / "val" / city / p.name).symlink_to(p)
        ids = np.array(Image.open(src / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"))
        ids[np.isin(ids, list(drop))] = 0
        g = dst / "gtFine" / "val" / city
        g.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids, "L").save(g / f"{stem}_gtFine_labelIds.png")
        shutil.copy(g / f"{stem}_gtFine_labelIds.png", g / f"{stem}_gtFine_instanceIds.png")
    return dst


def ours(data, num_classes, logits, label_dir, save_dir=None):
    from common.evaluate import evaluate
    return evaluate(Fixed(logits), data, num_classes, torch.device("cpu"), workers=0, save_dir=save_dir,
                    label_id_dir=label_dir)


def official_cli(dataset_root, results, export):
    """The official script as a user runs it: python -m ...evalPixelLevelSemanticLabeling with
    CITYSCAPES_DATASET / CITYSCAPES_RESULTS / CITYSCAPES_EXPORT_DIR; returns its result JSON."""
    official_module()
    export.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CITYSCAPES_DATASET=str(dataset_root), CITYSCAPES_RESULTS=str(results),
               CITYSCAPES_EXPORT_DIR=str(export))
    # cityscapesscripts 2.3.0 calls np.in1d (removed in NumPy 2.4) in its instance-level (nIoU) branch only;
    # aliased here to the equivalent np.isin(...).ravel(). The class IoU does not go through it.
    shim = ("import runpy, numpy as np; np.in1d = getattr(np, 'in1d', lambda a, b, **k: np.isin(a, b, **k).ravel()); "
            "runpy.run_module('cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", shim], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads((export / "resultPixelLevelSemanticLabeling.json").read_text())


def official_lists(preds, gts):
    """The official evaluateImgLists on explicit (prediction, ground truth) pairs (instance scores off)."""
    cs_eval = official_module()
    a = cs_eval.args
    a.evalInstLevelScore, a.JSONOutput, a.quiet = False, False, True
    return cs_eval.evaluateImgLists([str(p) for p in preds], [str(g) for g in gts], a)


def test_label_id_pngs_agree_with_the_official_cityscapes_evaluation_19_classes(toy_root, tmp_path):
    """19 classes, Cityscapes layout: our files pass the official script unchanged; its class mIoU equals
    ours to 1e-4 (in IoU percent). 'train' is absent from prediction and ground truth (NaN on both sides,
    left out of both averages); 'bus' is predicted but absent from the ground truth (0 on both sides)."""
    from common.datasets import eval_set
    tree = cityscapes_tree(toy_root, tmp_path / "cs", drop=(TRAIN_ID, BUS_ID))
    data = eval_set("toy_cityscapes", tree, 19, "imagenet")
    labels = [data.load_label(i) for i in range(len(data))]
    logits = corrupted_logits(labels, 19, 0, never=(16,), forced=15)
    res = ours(data, 19, logits, tmp_path / "ids", tmp_path / "pred")
    # the files: one per image, single channel, the label's full resolution, Cityscapes label ids
    files = sorted((tmp_path / "ids").iterdir())
    assert [f.name for f in files] == sorted(f"{data.files[i][0].name[:-len('_leftImg8bit.png')]}_pred_labelIds.png"
                                             for i in range(len(data)))
    for i, f in enumerate(sorted(files)):
        im = Image.open(f)
        assert im.mode == "L" and im.size == Image.open(data.files[i][1]).size
        assert np.array_equal(np.array(im), L.label_id_lut(19)[logits[i][0].argmax(0).numpy()])
    off = official_cli(tree, tmp_path / "ids", tmp_path / "export")
    assert off["classScores"]["train"] != off["classScores"]["train"]  # NaN: absent from both
    assert res["per_class"]["train"] is None
    assert off["classScores"]["bus"] == 0.0 and res["per_class"]["bus"] == 0.0
    assert abs(100 * off["averageScoreClasses"] - res["mIoU"]) < 1e-4, (off["averageScoreClasses"], res["mIoU"])
    for name in L.CLASS_NAMES_19:
        if res["per_class"][name] is not None:
            assert abs(100 * off["classScores"][name] - res["per_class"][name]) <= 0.005 + 1e-9, name
    # the picture grid of the same evaluation: 4 rows, 4 columns, legend (size arithmetic)
    th, tw = P.tile_hw(labels[0].shape)
    w = P.PAD + 4 * (tw + P.PAD)
    h = P.LINE + 4 * (P.LINE + th + P.PAD) + P.legend_height(19 + 3, w)
    assert Image.open(tmp_path / "pred" / "grid.png").size == (w, h)
    # an earlier prediction folder is refused, not mixed with the new files
    with pytest.raises(SystemExit, match="new or empty"):
        ours(data, 19, logits, tmp_path / "ids")


def test_label_id_pngs_16_and_13_class_protocols_against_the_official_evaluation(toy_root, tmp_path):
    """16 classes (SYNTHIA protocol): the files hold the 16 classes' label ids; the official script scores
    19 classes, so to reproduce our mIoU16 its ground truth must have terrain/truck/train made unlabeled
    (our 16-class labels ignore them): then its average (those three NaN) equals our mIoU16, and its mean
    over the 13 classes our mIoU13, to 1e-4."""
    from common.datasets import eval_set
    tree = cityscapes_tree(toy_root, tmp_path / "cs", drop=(22, 27, 31))  # terrain, truck, train
    data = eval_set("toy_cityscapes", tree, 16, "imagenet")
    labels = [data.load_label(i) for i in range(len(data))]
    res = ours(data, 16, corrupted_logits(labels, 16, 1), tmp_path / "ids")
    assert set(np.unique(np.concatenate([np.unique(np.array(Image.open(f))) for f in (tmp_path / "ids").iterdir()]))) \
        <= set(L.label_id_lut(16)[:16].tolist())
    off = official_cli(tree, tmp_path / "ids", tmp_path / "export")
    assert abs(100 * off["averageScoreClasses"] - res["mIoU16"]) < 1e-4
    names13 = [L.CLASS_NAMES_19[t] for t in L.TRAINIDS_13]
    assert abs(100 * np.mean([off["classScores"][n] for n in names13]) - res["mIoU13"]) < 1e-4


def test_label_id_pngs_crosscity_13_classes_against_the_official_evaluation(toy_root, tmp_path):
    """CrossCity: predictions in the encoding of its *_eval.png (Cityscapes ids of the 13 classes), named
    pano_XXXXX_pred_labelIds.png (CrossCity names do not follow the Cityscapes pattern, so the pairs are
    given to the official evaluateImgLists explicitly); its average (the 6 other classes NaN) = our mIoU13."""
    from common.datasets import eval_set
    data = eval_set("toy_crosscity", toy_root / "toy_crosscity", 13, "imagenet")
    data.files = data.files[:4]
    labels = [data.load_label(i) for i in range(len(data))]
    res = ours(data, 13, corrupted_logits(labels, 13, 2), tmp_path / "ids")
    preds = [tmp_path / "ids" / f"{p.stem}_pred_labelIds.png" for p, _ in data.files]
    off = official_lists(preds, [g for _, g in data.files])
    assert abs(100 * off["averageScoreClasses"] - res["mIoU13"]) < 1e-4


def tiny_checkpoint(path, num_classes=19):
    from common.models import make_segmenter
    from common.runtime import save_checkpoint
    torch.manual_seed(0)
    net, cfg = make_segmenter("deeplabv2", "resnet18", num_classes, "scratch")
    save_checkpoint(path, model=net.state_dict(), config=cfg)
    return path


@pytest.mark.parametrize("script,extra", [("advent_maxsquare/test.py", ()),
                                          ("ssada/test.py", ("--mode", "sliding", "--crop-size", "32,64"))])
def test_test_py_writes_label_ids_and_the_grid(toy_root, tmp_path, script, extra):
    """test.py --save-label-ids: one single-channel label-id PNG per evaluated image at the label's
    resolution, and predictions/grid.png, on a 4-image Cityscapes-style split."""
    tree = cityscapes_tree(toy_root, tmp_path / "cs")
    ck = tiny_checkpoint(tmp_path / "model.pth")
    run_script(script, "--checkpoint", ck, "--target", "toy_cityscapes", "--target-root", tree, "--out",
               tmp_path / "ev", "--save-label-ids", tmp_path / "ids", "--workers", "0", *extra)
    files = sorted((tmp_path / "ids").iterdir())
    assert len(files) == 4
    ids = set(L.label_id_lut(19)[:19].tolist())
    for f in files:
        im = Image.open(f)
        assert im.mode == "L" and im.size == (256, 128) and set(np.unique(np.array(im)).tolist()) <= ids
    assert Image.open(tmp_path / "ev" / "predictions" / "grid.png").size[0] == P.PAD + 4 * (P.TILE_W + P.PAD)


# -- the pictures ----------------------------------------------------------------------------------
def test_error_map_and_class_strip_against_direct_rules():
    img = np.full((4, 6, 3), 200, np.uint8)
    lab = np.array([[0, 1, 255, 2, 2, 2]] * 4, np.uint8)
    pred = np.array([[0, 2, 1, 2, 2, 0]] * 4, np.uint8)
    e = P.error_map(img, lab, pred)
    assert (e[:, 1] == P.WRONG).all() and (e[:, 5] == P.WRONG).all()
    assert (e[:, 0] == 70).all() and (e[:, 3] == 70).all()  # right: input grey x 0.35
    assert {tuple(v) for v in e[:, 2]} <= set(P.HATCH)  # ignored: the hatch, never 'wrong'
    s = P.class_strip(lab, 19, 50)  # shares 4:4:12 of 20 labelled pixels -> 10 | 10 | 30 px
    assert (s[:, :10] == L.PALETTE_19[0]).all() and (s[:, 10:20] == L.PALETTE_19[1]).all()
    assert (s[:, 20:] == L.PALETTE_19[2]).all()


def test_sheet_region_and_histogram_pictures_have_the_expected_layout(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)
    lab = rng.integers(0, 19, (64, 128)).astype(np.uint8)
    panels = [("selected", [dict(image=img, caption="a", label=lab)] * 5), ("random", [dict(image=img, label=lab)] * 3)]
    w, h = P.image_sheet(panels, 19, tmp_path / "s.png", "title", cols=4)
    th = P.tile_hw((64, 128))[0]
    cell = th + P.STRIP + 2 + P.LINE + P.PAD
    assert (w, h) == (P.PAD + 4 * (P.TILE_W + P.PAD), P.LINE + (P.LINE + 2 * cell) + (P.LINE + cell)
                      + P.legend_height(19, w))
    assert Image.open(tmp_path / "s.png").size == (w, h)
    # regions: the picked region's outline is drawn in its criterion's colour, an untouched one is not
    reg = np.zeros((64, 128), np.int32)
    reg[:, 64:] = 1
    reg[16:48, 16:48] = 2
    out = P.outline_regions(np.zeros((64, 128, 3), np.uint8), reg, {2: "density"}, {"density": (255, 140, 0)})
    assert (out[16, 16:48] == (255, 140, 0)).all() and (out[17, 20] == (255, 140, 0)).all()
    assert np.abs(out[30, 30].astype(float) - 0.35 * np.array([255, 140, 0])).max() <= 1  # tinted inside
    assert (out[:, 64:] == 0).all()
    w, h = P.region_sheet([dict(image=img, regions=reg, picked={2: "density"}, caption="x")] * 2,
                          {"density": (255, 140, 0), "uncertainty": (30, 144, 255)}, tmp_path / "r.png", "round 1")
    cell = th + P.LINE + P.PAD
    assert (w, h) == (P.PAD + 3 * (P.TILE_W + P.PAD), P.LINE + P.LINE + cell + P.legend_height(2, w))
    w, h = P.class_histogram_chart(np.arange(19), np.ones(19), 19, tmp_path / "c.png", "t")
    assert (w, h) == (P.PAD + P.BAR_NAME_W + P.BAR_W + 50, 3 * P.LINE + 19 * (2 * P.BAR_H + 6) + P.PAD)
    assert Image.open(tmp_path / "c.png").size == (w, h)
