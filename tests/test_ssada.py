"""ssada/: SS-ADA's acquisition scores, budget, IoU class weights, OHEM, UniMatch masking and CutMix
pairing, TUFL's unsupervised focal loss and adaptive thresholds (each against a direct evaluation of
the formula), the warm-up + poly schedule read back from the stepped optimiser, BiSeNetV1, and the
three scripts end to end (tiny budgets), 100% labels, and resume mid-round."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import EXACT, run_script, run_torchrun
from common.bisenet import BiSeNetV1, bisenet_from_checkpoint, make_bisenet
from ssada.active import budget_plan, epoch_plan, image_scores, select
from ssada.data import Pool, UnlabeledViews, cutmix_box, split_partner
from ssada.losses import (AdaptiveThresholds, confidence_mask, iou_class_weights, unlabeled_ce, unsup_focal_loss,
                          warmup_poly_lr, weighted_ohem_ce)
from ssada.test import sliding_logits, windows


def softmax_np(z, axis=1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


# ---------------------------------------------------------------------------------------------- acquisition
def test_image_scores_match_the_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(1, 5, 6, 7)) * 2
    iou = rng.uniform(size=5)
    s = image_scores(torch.tensor(z, dtype=torch.float32), torch.tensor(iou, dtype=torch.float32))
    p = softmax_np(z)[0]
    ent = (-(p * np.log2(p + 1e-30)).sum(0) / np.log2(5)).mean()
    iou_s = iou[p.argmax(0)].mean()
    assert s["entropy"] == pytest.approx(ent, abs=1e-5)
    assert s["confidence"] == pytest.approx(p.max(0).mean(), abs=1e-5)
    assert s["iou_score"] == pytest.approx(iou_s, abs=1e-5)
    assert s["entropy_iou"] == pytest.approx(ent + 1 - iou_s, abs=1e-5)


def test_selection_order_per_strategy():
    scores = {i: {"entropy": e, "confidence": c, "iou_score": u, "entropy_iou": e + 1 - u}
              for i, (e, c, u) in enumerate([(0.1, 0.9, 0.8), (0.7, 0.3, 0.5), (0.4, 0.6, 0.1), (0.9, 0.2, 0.9)])}
    assert select(scores, 2, "entropy") == [3, 1]        # highest entropy first
    assert select(scores, 2, "confidence") == [3, 1]     # lowest confidence first
    assert select(scores, 2, "iou_score") == [2, 1]      # lowest IoU score first
    assert select(scores, 2, "entropy_iou") == [2, 1]    # 1.3, 1.2, 1.0, 0.3: highest sum first
    r1 = select(scores, 3, "random", np.random.default_rng(5))
    assert r1 == select(scores, 3, "random", np.random.default_rng(5)) and len(set(r1)) == 3
    assert select(scores, 10, "entropy") == [3, 1, 2, 0] and select({}, 3, "entropy") == []


def test_budget_and_epoch_plan():
    assert budget_plan(400, 0.01, 0.25, [20, 40, 60]) == (4, [32, 32, 32])
    assert budget_plan(140, 0.01, 0.5, [20, 40, 60]) == (1, [23, 23, 23])  # 70 in all, remainder to the last
    assert budget_plan(400, 1.0, 1.0, [1, 2]) == (400, [0, 0])
    with pytest.raises(ValueError):
        budget_plan(10, 0.5, 0.2, [1])
    # upstream epoch length: max(labeled, unlabeled) // batch, changing at each round
    lengths, starts = epoch_plan(100, 10, [20, 30], [1, 2], 4, 5)
    assert lengths == [18, 14, 12, 12] and starts == [18, 32]
    assert epoch_plan(100, 10, [20], [1], 3, 5, epoch_iters=7) == ([7, 7, 7], [7])


# ---------------------------------------------------------------------------------------------- losses
def test_iou_class_weights_formula():
    iou = torch.tensor([0.0, 0.25, 0.9, 1.0])
    for u in (2.0, 3.0):
        assert torch.allclose(iou_class_weights(iou, u), 1 + (u - 1) * (1 - iou))


def _ohem_np(z, y, thresh, min_kept, w):
    p = softmax_np(z)
    valid = y != 255
    yc = np.where(valid, y, 0)
    py = np.take_along_axis(p, yc[:, None], 1)[:, 0]
    py = np.where(valid, py, 1.0)
    thr = 1.0  # upstream: fewer valid pixels than min_kept -> every valid pixel is kept
    if min_kept <= valid.sum():
        thr = max(thresh, np.sort(py.ravel())[min_kept - 1])
    keep = valid & (py <= thr)
    ce = -np.log(np.take_along_axis(p, yc[:, None], 1)[:, 0])
    wy = w[yc]
    return (wy * ce)[keep].sum() / wy[keep].sum()


@pytest.mark.parametrize("min_kept", [3, 10, 1000])
def test_weighted_ohem_matches_direct_evaluation(min_kept):
    rng = np.random.default_rng(min_kept)
    z = rng.normal(size=(2, 4, 3, 5)) * 2
    y = rng.integers(0, 4, size=(2, 3, 5))
    y[0, 0, :2] = 255
    w = np.array([1.0, 1.5, 2.0, 1.2])
    got = weighted_ohem_ce(torch.tensor(z), torch.tensor(y), 0.7, min_kept, torch.tensor(w, dtype=torch.float32))
    assert float(got) == pytest.approx(_ohem_np(z, y, 0.7, min_kept, w), rel=1e-5)


def test_unlabeled_ce_and_confidence_masks():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(1, 3, 4, 4))
    pseudo = rng.integers(0, 3, size=(1, 4, 4))
    conf = rng.uniform(size=(1, 4, 4))
    ign = np.zeros((1, 4, 4), np.int64)
    ign[0, 0] = 255
    m = confidence_mask(torch.tensor(pseudo), torch.tensor(conf), 0.5)
    assert torch.equal(m, torch.tensor(conf >= 0.5))
    iou = np.array([0.2, 0.6, 0.9])
    mc = confidence_mask(torch.tensor(pseudo), torch.tensor(conf), 0.0, torch.tensor(iou), 0.5)
    assert torch.equal(mc, torch.tensor(conf >= iou[pseudo] * 0.5))
    got = unlabeled_ce(torch.tensor(z), torch.tensor(pseudo), m, torch.tensor(ign))
    ce = -np.log(np.take_along_axis(softmax_np(z), pseudo[:, None], 1)[:, 0])
    valid = ign != 255
    assert float(got) == pytest.approx((ce * ((conf >= 0.5) & valid)).sum() / valid.sum(), rel=1e-6)


def _focal_np(a, b, gamma):
    p, q = softmax_np(a), softmax_np(b)
    y = p.argmax(1)
    py = np.take_along_axis(p, y[:, None], 1)
    qy = np.take_along_axis(q, y[:, None], 1)
    d = np.abs(py - qy)
    per = (p * (np.log(p + 1e-8) - d ** gamma * np.log(q + 1e-8))).sum(1) - (p * np.log(p + 1e-8)).sum(1)
    return per, p.max(1), y


def test_unsup_focal_loss_matches_formula_and_thresholds():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 4, 5, 6)) * 3, rng.normal(size=(2, 4, 5, 6)) * 3
    per, conf, y = _focal_np(a, b, 2.0)
    got, frac = unsup_focal_loss(torch.tensor(a), torch.tensor(b), 2.0, None)
    assert float(got) == pytest.approx(per.mean(), rel=1e-5) and frac == 1.0
    got, frac = unsup_focal_loss(torch.tensor(a), torch.tensor(b), 2.0, 0.8)
    assert float(got) == pytest.approx(per[conf > 0.8].mean(), rel=1e-5)
    assert frac == pytest.approx((conf > 0.8).mean())
    tau = np.array([0.5, 0.9, 0.6, 0.7])
    got, _ = unsup_focal_loss(torch.tensor(a), torch.tensor(b), 1.0, torch.tensor(tau, dtype=torch.float32))
    per1, _, _ = _focal_np(a, b, 1.0)
    assert float(got) == pytest.approx(per1[conf > tau[y]].mean(), rel=1e-5)
    # gradient: only the other view through the focal CE, and the reference view through H(p)
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    unsup_focal_loss(ta, tb, 2.0, None)[0].backward()
    assert ta.grad.abs().sum() > 0 and tb.grad.abs().sum() > 0


def test_adaptive_thresholds_follow_the_rule():
    rng = np.random.default_rng(3)
    prob = torch.tensor(softmax_np(rng.normal(size=(1, 3, 8, 8)) * 3))
    th = AdaptiveThresholds(3, tau0=0.8, a=0.9, b=0.8, d=8.0)
    conf, y = prob.max(1)
    expect = []
    for c in range(3):
        vals = conf[y == c].double().numpy()
        if vals.size == 0:
            expect.append(0.8)
            continue
        vals = np.sort(np.append(vals, 0.8))[::-1]
        expect.append(vals[int(len(vals) * 0.8 * 0.8 ** 8)])
    t = th.update(prob)
    assert np.allclose(t.numpy(), 0.9 * 0.8 + 0.1 * np.array(expect), atol=1e-6)
    th.tau[:] = 1.5
    assert (th.update(prob) <= 0.999 + 1e-6).all()


def test_warmup_poly_schedule_values():
    assert warmup_poly_lr(0.05, 0, 100, 10) == 0
    assert warmup_poly_lr(0.05, 5, 100, 10) == pytest.approx(0.025)
    assert warmup_poly_lr(0.05, 10, 100, 10) == pytest.approx(0.05)
    assert warmup_poly_lr(0.05, 55, 100, 10) == pytest.approx(0.05 * 0.5 ** 0.9)


# ---------------------------------------------------------------------------------------------- CutMix, data
def test_cutmix_never_pairs_an_image_with_itself(toy_root):
    from common.datasets import infinite_loader
    from common.transforms import Compose, RandomHFlip, Resize
    files = sorted((toy_root / "toy_cityscapes" / "leftImg8bit" / "train").rglob("*.png"))[:6]
    ds = UnlabeledViews(files, Compose([Resize((32, 48)), RandomHFlip()]), "imagenet")
    for pool in ([0, 1, 2, 3, 4, 5], [0, 1, 2, 3]):
        batches = infinite_loader(Pool(ds, pool), 4, 0, 0, 0)
        for _ in range(6):
            own, mix = split_partner(next(batches))
            assert (own["index"] != mix["index"]).all()
            assert own["s1"].shape == (2, 3, 32, 48) and own["box1"].shape == (2, 32, 48)
    odd = {"index": torch.tensor([4, 7, 9]), "image": torch.zeros(3, 1)}
    own, mix = split_partner(odd)
    assert (own["index"] != mix["index"]).all()
    rng = np.random.default_rng(0)
    for _ in range(50):  # non-square crops: one rectangle of 2%..40% of the area, or nothing
        box = cutmix_box(24, 80, rng, p=1.0)
        assert box.sum() > 0 and box.sum() <= 0.4 * 24 * 80 + 1e-6


# ---------------------------------------------------------------------------------------------- model, eval
def test_bisenet_heads_and_feature_perturbation():
    torch.manual_seed(0)
    m, cfg = make_bisenet(13)
    m.train()
    out = m(torch.randn(2, 3, 64, 96), need_fp=True)
    assert out["out"].shape == (2, 13, 8, 12) and out["fp"].shape == (2, 13, 8, 12)
    assert out["aux16"].shape == (2, 13, 8, 12) and out["aux32"].shape == (2, 13, 4, 6)
    assert not torch.allclose(out["out"], out["fp"])  # dropout on the features changes the prediction
    m.eval()
    assert set(m(torch.randn(1, 3, 40, 70))) == {"out"}
    back, heads = m.param_groups()
    assert len(back) + len(heads) == len(list(m.parameters())) and any(p is m.head_out.cls.weight for p in heads)
    assert cfg["model"] == "bisenetv1"


def test_sliding_window_covers_any_crop_shape():
    assert windows(10, 4, 2) == [0, 2, 4, 6] and windows(10, 12, 8) == [0] and windows(9, 4, 2)[-1] == 5

    class Echo(torch.nn.Module):  # "logits" = the input's first 3 channels: probabilities are per-pixel
        def forward(self, x):
            return {"out": x}
    x = torch.randn(1, 3, 17, 23)
    for crop in ((5, 7), (17, 23), (30, 4), (8, 30)):
        p = sliding_logits(Echo(), x, crop, 3)
        assert torch.allclose(p, x.softmax(1), atol=1e-5), crop


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy_root):
    """A tiny copy of the toy domains (symlinks): 8 GTA5-style images; Cityscapes-style 16 train, 4 val,
    4 test; CrossCity-style Rome 8 Train, 4 Test (labelled)."""
    out = tmp_path_factory.mktemp("tiny")
    g = out / "gta"
    (g / "lists").mkdir(parents=True)
    for d in ("images", "labels"):
        os.symlink(toy_root / "toy_gta5" / d, g / d)
    names = (toy_root / "toy_gta5/lists/train.txt").read_text().split()[:8]
    (g / "lists/train.txt").write_text("\n".join(names) + "\n")
    (g / "lists/val.txt").write_text("\n".join(names[:2]) + "\n")
    cs = toy_root / "toy_cityscapes"
    for split, n in (("train", 16), ("val", 4), ("test", 4)):
        city = sorted((cs / "leftImg8bit" / split).iterdir())[0]
        for p in sorted(city.glob("*_leftImg8bit.png"))[:n]:
            stem = p.name[: -len("_leftImg8bit.png")]
            for sub, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
                d = out / "cs" / sub / split / city.name
                d.mkdir(parents=True, exist_ok=True)
                os.symlink(cs / sub / split / city.name / (stem + suffix), d / (stem + suffix))
    cc = toy_root / "toy_crosscity" / "Rome"
    for split, n in (("Train", 8), ("Test", 4)):
        d = out / "cc" / "Rome" / "Images" / split
        d.mkdir(parents=True)
        for p in sorted((cc / "Images" / split).iterdir())[:n]:
            os.symlink(p, d / p.name)
            if split == "Test":
                (out / "cc" / "Rome" / "Labels" / "Test").mkdir(parents=True, exist_ok=True)
                lab = cc / "Labels" / "Test" / f"{p.stem}_eval.png"
                os.symlink(lab, out / "cc" / "Rome" / "Labels" / "Test" / lab.name)
    return {"gta": g, "cs": out / "cs", "cc": out / "cc"}


def ssada_args(tiny):
    return ["--source", "toy_gta5", "--source-root", tiny["gta"], "--target", "toy_cityscapes",
            "--target-root", tiny["cs"], "--crop-size", "32,64", "--batch-size", "2", "--epochs", "3",
            "--sample-epochs", "1", "2", "--epoch-iters", "2", "--warmup", "3", "--eval-every", "1000",
            "--workers", "0", "--log-every", "1"]


BUDGET = ["--init-ratio", "0.125", "--total-ratio", "0.5", "--strategy", "entropy_iou"]


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ssada_run(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("ssada") / "run"
    p = run_script("ssada/train_ssada.py", *ssada_args(tiny), *BUDGET, "--out", out)
    return out, p


def test_train_ssada_rounds_files_lr_and_test(tmp_path, tiny, ssada_run):
    out, p = ssada_run
    assert "[done]" in p.stdout and "with 8/16 target images labeled" in p.stdout
    r1, r2 = out / "rounds" / "round_01", out / "rounds" / "round_02"
    for f in ("labeled.txt", "unlabeled.txt", "selected.txt", "scores.json", "class_counts.json",
              "class_iou.json", "iou_table.md"):
        assert (r1 / f).exists() and (r2 / f).exists(), f
    init = (out / "rounds" / "round_00_init" / "labeled.txt").read_text().split()
    sel1, lab1 = (r1 / "selected.txt").read_text().split(), (r1 / "labeled.txt").read_text().split()
    assert len(init) == 2 and len(sel1) == 3 and sorted(lab1) == sorted(init + sel1)
    assert not set(sel1) & set(init) and len((r1 / "unlabeled.txt").read_text().split()) == 11
    sc = json.loads((r1 / "scores.json").read_text())["scores"]
    best = sorted(sc, key=lambda n: -sc[n]["entropy_iou"])[:3]
    assert sorted(best) == sorted(sel1)  # the selected ones are the top Entropy-IoU sums
    ci = json.loads((r1 / "class_iou.json").read_text())
    assert np.allclose(ci["class_weights"], 1 + (1 - np.array(ci["iou_on_labeled_before_round"])), atol=1e-6)
    counts = json.loads((r1 / "class_counts.json").read_text())
    assert sum(counts["labeled"]["pixels"]) > sum(counts["selected"]["pixels"]) > 0
    assert len(list((r1 / "selected").glob("*.png"))) == 3
    # the learning rate read back from the stepped optimiser follows warm-up + poly
    recs = [r for r in _log(out) if "lr_read" in r]
    assert len(recs) == 6 and recs[3]["lr_read"] > 0
    for rec in recs:
        assert rec["lr_read"] == pytest.approx(warmup_poly_lr(0.02, rec["iter"], 6, 3), abs=1e-12)
    assert {"loss_s", "loss_fp"} <= set(recs[0])
    # test.py: whole image and sliding windows of a non-square crop on the held-out split
    for mode in ("whole", "sliding"):
        ev = tmp_path / f"eval_{mode}"
        run_script("ssada/test.py", "--checkpoint", out / "model.pth", "--target", "toy_cityscapes",
                   "--target-root", tiny["cs"], "--split", "test", "--mode", mode, "--crop-size", "40,56",
                   "--out", ev, "--workers", "0", "--save-predictions", "2")
        rep = json.loads((ev / "final.json").read_text())
        assert rep["split"] == "test" and rep["images"] == 4 and 0 <= rep["mIoU"] <= 100
    m, cfg = bisenet_from_checkpoint(out / "model.pth")
    assert isinstance(m, BiSeNetV1) and cfg["num_classes"] == 19


def test_resume_mid_round_keeps_the_labeled_set(tmp_path, tiny, ssada_run):
    a, _ = ssada_run
    b = tmp_path / "b"
    run_script("ssada/train_ssada.py", *ssada_args(tiny), *BUDGET, "--stop-iter", "3", "--out", b)  # inside round 1
    ck = torch.load(b / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ck["rounds_done"] == 1 and ck["iter"] == 3
    assert len(ck["labeled"]) == 5 == len((b / "rounds" / "round_01" / "labeled.txt").read_text().split())
    p = run_script("ssada/train_ssada.py", *ssada_args(tiny), *BUDGET, "--resume", "--out", b)
    assert "resumed" in p.stdout and "labeled=5" in p.stdout
    assert (a / "labeled.txt").read_text() == (b / "labeled.txt").read_text()
    for r in ("round_01", "round_02"):
        assert (a / "rounds" / r / "labeled.txt").read_text() == (b / "rounds" / r / "labeled.txt").read_text()
    wa = torch.load(a / "model.pth", weights_only=True)["model"]
    wb = torch.load(b / "model.pth", weights_only=True)["model"]
    for k in wa if EXACT else ():
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), k


def test_train_ssada_at_100_percent_labels(tmp_path, tiny):
    out = tmp_path / "full"
    p = run_script("ssada/train_ssada.py", *ssada_args(tiny), "--init-ratio", "1", "--total-ratio", "1",
                   "--out", out)
    assert "with 16/16 target images labeled" in p.stdout
    recs = [r for r in _log(out) if "loss_tl" in r]
    assert len(recs) == 6 and all("loss_fp" not in r for r in recs)  # no unlabeled pool: supervised terms only
    assert (out / "rounds" / "round_02" / "selected.txt").read_text() == ""


def test_train_tufl_end_to_end_adaptive(tmp_path, tiny):
    out = tmp_path / "tufl"
    p = run_script("ssada/train_tufl.py", "--source", "toy_cityscapes", "--source-root", tiny["cs"],
                   "--target", "toy_crosscity", "--target-root", tiny["cc"], "--crop-size", "32,64",
                   "--source-iters", "2", "--iters", "2",
                   "--source-batch-size", "2", "--batch-size", "2", "--eval-every", "2", "--save-every", "2",
                   "--workers", "0", "--thresholds", "adaptive", "--out", out)
    assert "[done]" in p.stdout
    assert (out / "source_model.pth").exists() and (out / "model.pth").exists()
    rep = json.loads((out / "final.json").read_text())
    assert len(rep["adaptive_tau"]) == 3 and rep["last"]["mIoU13"] == rep["last"]["mIoU"]
    assert any(r.get("phase") == "adapt" and "tau_mean" in r for r in _log(out))
    ev = tmp_path / "ev"
    run_script("ssada/test.py", "--checkpoint", out / "source_model.pth", "--target", "toy_crosscity",
               "--target-root", tiny["cc"], "--split", "test", "--out", ev, "--workers", "0",
               "--save-predictions", "0")
    rep = json.loads((ev / "final.json").read_text())
    assert rep["images"] == 4 and "mIoU13" in rep["last"]


def test_train_ssada_under_torchrun_selects_one_labeled_set(tmp_path, tiny, ssada_run):
    """Two processes: acquisition scores are gathered from both ranks and every rank trains on the same
    labelled set; the rounds' files are written once and match the single-process run's sizes."""
    a, _ = ssada_run
    out = tmp_path / "ddp"
    p = run_torchrun("ssada/train_ssada.py", *ssada_args(tiny), *BUDGET, "--out", out)
    assert "[done]" in p.stdout and "with 8/16 target images labeled" in p.stdout
    lab = (out / "labeled.txt").read_text().split()
    assert len(lab) == 8 == len(set(lab))
    assert len((out / "rounds" / "round_01" / "selected.txt").read_text().split()) == 3
