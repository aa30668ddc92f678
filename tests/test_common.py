"""Foundation tests: label tables, real-format readers (generated fixture trees), transforms, mIoU,
models, strict weight loading, bad input."""
import json

import numpy as np
import png
import pytest
import torch
import torchvision
from PIL import Image

from common import labels as L
from common.datasets import (DatasetLayoutError, build_dataset, read_png16, infinite_loader, resolve_domain,
                             IterationBatchSampler)
from common.losses import cross_entropy, entropy_map, ohem_cross_entropy, self_information
from common.metrics import ConfusionMatrix
from common.models import (DeepLabV2, DeepLabV3Plus, FCDiscriminator, WeightLoadError, load_backbone_weights,
                           load_model_weights, make_segmenter, segmenter_from_checkpoint)
from common.transforms import Compose, RandomHFlip, RandomScaleCrop, Resize, to_tensor, ColorJitter, GaussianBlur


# ---------------------------------------------------------------------------------------------- labels
def test_cityscapes_table_matches_torchvision():
    tv = {c.name: c for c in torchvision.datasets.Cityscapes.classes}
    for name, cid, tid, colour in L.CITYSCAPES_CLASSES:
        c = tv[name]
        assert (c.id, c.train_id, tuple(c.color)) == (cid, tid, colour), name
    evaluated = sorted((c.train_id, c.name) for c in tv.values() if c.train_id not in (255, -1))
    assert [n for _, n in evaluated] == L.CLASS_NAMES_19


def test_subsets_and_luts():
    assert len(L.TRAINIDS_16) == 16 and len(L.TRAINIDS_13) == 13
    assert [L.TRAINIDS_16[i] for i in L.INDEX_13_IN_16] == L.TRAINIDS_13
    assert L.class_names(13) == ["road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                                 "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle"]
    lut16 = L.lut_from_map(L.SYNTHIA_ID_TO_TRAINID, 16)
    assert lut16[3] == 0 and lut16[1] == L.TRAINIDS_16.index(10)      # road, sky
    assert lut16[16] == 255 and lut16[18] == 255 and lut16[20] == 255  # terrain, truck, train ignored
    assert lut16[0] == 255 and lut16[13] == 255
    lut13 = L.lut_from_map(L.CROSSCITY_ID_TO_13, 13)
    assert lut13[26] == 9 and lut13[12] == 255 and lut13[17] == 255   # car; wall and pole ignored
    assert (L.lut_from_map(L.CITYSCAPES_ID_TO_TRAINID, 19)[[7, 26, 33, 0, 1]] == [0, 13, 18, 255, 255]).all()


# ---------------------------------------------------------------------------------------------- fixtures
def _rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_png16(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        png.Writer(arr.shape[1], arr.shape[0], bitdepth=16, greyscale=False).write(f, arr.reshape(arr.shape[0], -1))


@pytest.fixture
def trees(tmp_path):
    ids = np.array([[7, 8, 11, 26], [23, 24, 0, 33], [7, 7, 21, 21]], np.uint8)  # Cityscapes ids
    # GTA5: palette PNG labels
    for i in range(3):
        (tmp_path / "gta/images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gta/labels").mkdir(parents=True, exist_ok=True)
        _rgb(3, 4, i).save(tmp_path / f"gta/images/{i:05d}.png")
        p = Image.fromarray(ids, "P")
        p.putpalette([v for c in range(256) for v in (c, 0, 0)])
        p.save(tmp_path / f"gta/labels/{i:05d}.png")
    # SYNTHIA: 16-bit RGB, id in R, something else in G
    syn = np.zeros((3, 4, 3), np.uint16)
    syn[..., 0] = [[3, 4, 2, 8], [1, 10, 0, 11], [16, 18, 20, 21]]
    syn[..., 1] = 513  # instance-like values above 255
    for i in range(2):
        (tmp_path / "syn/RGB").mkdir(parents=True, exist_ok=True)
        _rgb(3, 4, i).save(tmp_path / f"syn/RGB/{i:07d}.png")
        write_png16(tmp_path / f"syn/GT/LABELS/{i:07d}.png", syn)
    # Cityscapes
    for split, city in (("train", "aachen"), ("val", "lindau")):
        d = tmp_path / "cs/leftImg8bit" / split / city
        g = tmp_path / "cs/gtFine" / split / city
        d.mkdir(parents=True)
        g.mkdir(parents=True)
        _rgb(3, 4).save(d / f"{city}_000000_000019_leftImg8bit.png")
        Image.fromarray(ids, "L").save(g / f"{city}_000000_000019_gtFine_labelIds.png")
    # CrossCity
    (tmp_path / "nthu/Rome/Images/Test").mkdir(parents=True)
    (tmp_path / "nthu/Rome/Images/Train").mkdir(parents=True)
    (tmp_path / "nthu/Rome/Labels/Test").mkdir(parents=True)
    _rgb(3, 4).save(tmp_path / "nthu/Rome/Images/Test/pano_00001.jpg")
    _rgb(3, 4).save(tmp_path / "nthu/Rome/Images/Train/pano_00002.jpg")
    Image.fromarray(ids, "L").save(tmp_path / "nthu/Rome/Labels/Test/pano_00001_eval.png")
    return tmp_path, ids, syn


def test_gta5_cityscapes_crosscity_readers(trees):
    root, ids, _ = trees
    want19 = L.lut_from_map(L.CITYSCAPES_ID_TO_TRAINID, 19)[ids]
    ds = build_dataset("gta5", root / "gta", "all")
    assert len(ds) == 3 and (ds[0]["label"].numpy() == want19).all() and ds[0]["image"].shape == (3, 3, 4)
    for split in ("train", "val"):
        cs = build_dataset("cityscapes", root / "cs", split)
        assert len(cs) == 1 and (cs[0]["label"].numpy() == want19).all()
    cc = build_dataset("crosscity", root / "nthu", "Test", num_classes=13)
    want13 = L.lut_from_map(L.CROSSCITY_ID_TO_13, 13)[ids]
    assert (cc[0]["label"].numpy() == want13).all() and want13[0, 3] == 9
    unl = build_dataset("crosscity", root / "nthu", "Train", num_classes=13)
    assert "label" not in unl[0]


def test_synthia_16bit_labels_read_correctly(trees):
    root, _, syn = trees
    path = root / "syn/GT/LABELS/0000000.png"
    # The trap: Pillow (and skimage.io) decode these 16-bit RGB PNGs to zeros without any error.
    assert np.asarray(Image.open(path).convert("RGB"))[..., 0].max() == 0
    assert (read_png16(path) == syn).all()
    ds = build_dataset("synthia", root / "syn", "all", num_classes=16)
    lab = ds[0]["label"].numpy()
    want = L.lut_from_map(L.SYNTHIA_ID_TO_TRAINID, 16)[syn[..., 0]]
    assert (lab == want).all()
    assert lab[0, 0] == 0 and lab[1, 0] == L.TRAINIDS_16.index(10) and lab[1, 2] == 255
    ds19 = build_dataset("synthia", root / "syn", "all", num_classes=19)
    assert ds19[0]["label"][2, 1] == 14  # SYNTHIA 18 = truck, kept in 19-class mode


def test_toy_domains_read_back(toy_root):
    from common.toy import COUNTS
    for name, n in (("toy_gta5", COUNTS["gta5"]), ("toy_synthia", COUNTS["synthia"])):
        _, kind, root = resolve_domain(name)
        ds = build_dataset(kind, root, "all", 19)
        assert len(ds) == n
        lab = ds[0]["label"]
        assert lab.max() < 19 or (lab == 255).any()
        assert (lab[lab != 255] < 19).all() and len(torch.unique(lab)) >= 5
    _, _, root = resolve_domain("toy", role="target")
    for split in ("train", "val", "test"):
        assert len(build_dataset("cityscapes", root, split)) == COUNTS["cityscapes"][split]


# ---------------------------------------------------------------------------------------------- transforms
def test_joint_transforms_keep_alignment():
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(0, 19, (6, 12)), np.ones((12, 12), np.int64)).astype(np.uint8)  # 72x144 blocks
    img = Image.fromarray(L.PALETTE_19[lab])
    t = Compose([RandomScaleCrop((72, 144), (48, 96), (0.7, 1.4)), RandomHFlip(0.5)])
    for s in range(10):
        im2, lb2 = t(img, Image.fromarray(lab, "L"), np.random.default_rng(s))
        a, b = np.asarray(im2).astype(int), np.asarray(lb2)
        ok = b != 255
        # colour of each labelled pixel must be its class colour (bicubic edges aside)
        match = (np.abs(a - L.PALETTE_19[np.minimum(b, 18)].astype(int)).sum(-1) < 30) & ok
        assert match.sum() > 0.8 * ok.sum()
        mis = (np.abs(a[:, ::-1] - L.PALETTE_19[np.minimum(b, 18)].astype(int)).sum(-1) < 30) & ok
        assert mis.sum() < 0.3 * ok.sum()  # the check can fail: a misaligned pair does not pass
    # photometric transforms never touch the label; the same rng gives the same sample
    j = Compose([ColorJitter(), GaussianBlur(p=1.0)])
    a1, l1 = j(img, Image.fromarray(lab, "L"), np.random.default_rng(3))
    a2, _ = j(img, Image.fromarray(lab, "L"), np.random.default_rng(3))
    assert (np.asarray(l1) == lab).all() and (np.asarray(a1) == np.asarray(a2)).all()


def test_input_normalisations():
    img = Image.fromarray(np.full((2, 2, 3), [10, 20, 30], np.uint8))
    caffe = to_tensor(img, "caffe")
    assert torch.allclose(caffe[:, 0, 0], torch.tensor([30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434]))
    tv = to_tensor(img, "imagenet")
    assert torch.allclose(tv[:, 0, 0], (torch.tensor([10, 20, 30]) / 255 - torch.tensor([.485, .456, .406]))
                          / torch.tensor([.229, .224, .225]))


def test_sampler_is_resumable_and_sharded():
    full = IterationBatchSampler(10, 2, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(12)]  # crosses an epoch boundary
    it5 = iter(IterationBatchSampler(10, 2, seed=1, start_iter=5))
    assert [next(it5) for _ in range(7)] == first[5:]
    r0, r1 = iter(IterationBatchSampler(10, 2, 1, 0, 0, 2)), iter(IterationBatchSampler(10, 2, 1, 0, 1, 2))
    a, b = next(r0), next(r1)
    assert not {i for i, _ in a} & {i for i, _ in b}


# ---------------------------------------------------------------------------------------------- metrics
def test_miou_against_direct_computation():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 19, (4, 30, 40))
    gt[:, :3] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 19, gt.shape)) % 19
    cm = ConfusionMatrix(19)
    cm.update(torch.from_numpy(pred), torch.from_numpy(gt))
    ious = []
    for c in range(19):
        valid = gt != 255
        inter = ((pred == c) & (gt == c) & valid).sum()
        union = (((pred == c) | (gt == c)) & valid).sum()
        ious.append(inter / union if union else np.nan)
    assert np.allclose(cm.iou(), ious, equal_nan=True)
    assert abs(cm.summary()["mIoU"] - 100 * np.nanmean(ious)) < 1e-9
    cm16 = ConfusionMatrix(16)
    cm16.update(torch.from_numpy(pred % 16), torch.from_numpy(np.where(gt == 255, 255, gt % 16)))
    s = cm16.summary()
    assert abs(s["mIoU13"] - 100 * np.nanmean(cm16.iou()[L.INDEX_13_IN_16])) < 1e-9


def test_losses_against_formulas():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 5, 4, 6), torch.randint(0, 5, (2, 4, 6))
    y[0, 0] = 255
    p = torch.softmax(logits, 1)
    keep = y != 255
    direct = -(torch.log(p.gather(1, y.clamp(max=4).unsqueeze(1)).squeeze(1))[keep]).mean()
    assert torch.allclose(cross_entropy(logits, y), direct, atol=1e-6)
    info = self_information(p)
    assert torch.allclose(info, -p * torch.log2(p + 1e-30) / np.log2(5))
    assert torch.allclose(entropy_map(logits), (-p * torch.log(p)).sum(1) / np.log(5), atol=1e-6)
    # OHEM: with min_kept 0 and thresh 0.7, exactly the pixels with p_y <= 0.7 are averaged
    py = p.gather(1, y.clamp(max=4).unsqueeze(1)).squeeze(1)
    sel = keep & (py <= 0.7)
    assert torch.allclose(ohem_cross_entropy(logits, y, 0.7, 0), -torch.log(py[sel]).mean(), atol=1e-6)
    # min_kept forces the hardest k pixels in
    k = int(keep.sum())
    assert torch.allclose(ohem_cross_entropy(logits, y, 0.0, k), direct, atol=1e-6)
    assert cross_entropy(logits.bfloat16(), y).dtype == torch.float32


# ---------------------------------------------------------------------------------------------- models
def test_deeplabv2_head_sums_four_branches():
    m = DeepLabV2(5, "resnet18").eval()
    feat = torch.randn(1, 512, 6, 6)
    head = m.head_main
    assert torch.allclose(head(feat), sum(c(feat) for c in head.convs), atol=1e-5)
    assert [c.dilation[0] for c in head.convs] == [6, 12, 18, 24]
    two = DeepLabV2(5, "resnet18", two_branch=True).head_main
    two.load_state_dict(head.state_dict())
    assert torch.allclose(two(feat), head.convs[0](feat) + head.convs[1](feat), atol=1e-5)
    out = m(torch.randn(1, 3, 64, 64))
    assert out["out"].shape == (1, 5, 8, 8) and out["aux"].shape == (1, 5, 8, 8)  # output stride 8


def test_deeplabv3plus_and_discriminator_shapes():
    m = DeepLabV3Plus(7, "resnet18").eval()
    o = m(torch.randn(1, 3, 64, 64), return_feat=True)
    assert o["out"].shape == (1, 7, 16, 16) and o["feat"].shape == (1, 256, 16, 16)
    assert FCDiscriminator(7)(torch.randn(2, 7, 64, 64)).shape == (2, 1, 2, 2)


def test_strict_weight_loading(tmp_path):
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, tmp_path / "r18.pth")
    m = DeepLabV2(19, "resnet18")
    load_backbone_weights(m, tmp_path / "r18.pth")
    assert torch.equal(m.backbone.conv1.weight, tv["conv1.weight"])
    # caffe-converted DeepLab files: keys under 'Scale.' and a layer5 classifier
    torch.save({"Scale." + k: v for k, v in tv.items() if not k.startswith("fc")} |
               {"Scale.layer5.conv2d_list.0.weight": torch.zeros(1)}, tmp_path / "caffe.pth")
    load_backbone_weights(DeepLabV2(19, "resnet18"), tmp_path / "caffe.pth")
    # a file for another network fails loudly and names the keys
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(WeightLoadError, match=r"(missing keys|unexpected keys|shape mismatch).*layer"):
        load_backbone_weights(m, tmp_path / "r50.pth")
    with pytest.raises(WeightLoadError, match="not found"):
        load_backbone_weights(m, tmp_path / "nope.pth")


def test_checkpoint_from_another_model_names_keys(tmp_path):
    a, cfg = make_segmenter("deeplabv2", "resnet18", 19, multi_level=True)
    torch.save({"model": a.state_dict(), "config": cfg}, tmp_path / "a.pth")
    b = DeepLabV3Plus(19, "resnet18")
    with pytest.raises(WeightLoadError, match="missing keys: .*aspp"):
        load_model_weights(b, tmp_path / "a.pth")
    m, c = segmenter_from_checkpoint(tmp_path / "a.pth")
    assert c == cfg and torch.equal(m.head_main.convs[0].weight, a.head_main.convs[0].weight)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_or_mislaid_root_says_path_and_layout(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        build_dataset("gta5", tmp_path / "nowhere", "all")
    assert "images" in str(e.value) and "expected layout" in str(e.value) and "nowhere" in str(e.value)
    (tmp_path / "cs/leftImg8bit/train").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="gtFine"):
        build_dataset("cityscapes", tmp_path / "cs", "train")
    with pytest.raises(ValueError, match="--target-root is required"):
        resolve_domain("cityscapes", None, "target")


def test_bad_labels_and_images_name_the_file(trees):
    root, ids, _ = trees
    bad = ids.copy()
    bad[0, 0] = 200
    Image.fromarray(bad, "L").save(root / "cs/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png")
    with pytest.raises(ValueError, match=r"aachen_000000_000019_gtFine_labelIds.png.*\[200\] out of range"):
        build_dataset("cityscapes", root / "cs", "train")[0]
    Image.fromarray(np.zeros((5, 4), np.uint8), "L").save(root / "gta/labels/00001.png")
    with pytest.raises(ValueError, match=r"size mismatch: image .*00001.png is 3x4 but label .*00001.png is 5x4"):
        build_dataset("gta5", root / "gta", "all")[1]
    data = (root / "gta/images/00002.png").read_bytes()
    (root / "gta/images/00002.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"00002.png.*(truncated|unreadable)"):
        build_dataset("gta5", root / "gta", "all")[2]
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(root / "gta/labels/00000.png")
    with pytest.raises(ValueError, match="00000.png has mode RGB"):
        build_dataset("gta5", root / "gta", "all")[0]


def test_evaluate_miou_and_confidence_statistics_against_direct_computation():
    """common.evaluate on a fixed-logit model: mIoU from the confusion matrix, and the confidence summary
    (normalised entropy mean, share > 0.9, wrong share among those) computed directly over labelled pixels."""
    import numpy as np
    import torch.nn.functional as F
    from common.evaluate import evaluate
    from common.metrics import ConfusionMatrix

    g = torch.Generator().manual_seed(0)
    C, H, W = 13, 6, 8  # 13: CrossCity's label space (the smallest the metrics report)
    logits = [6 * torch.randn(1, C, H, W, generator=g) for _ in range(3)]
    labels = [torch.randint(0, C, (H, W), generator=g) for _ in range(3)]
    labels[0][0, :3] = 255

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.i, self.w = 0, torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):  # the next x.shape[0] images' logits (evaluate batches the three images)
            out = torch.cat([logits[(self.i + b) % 3] for b in range(x.shape[0])])
            self.i += x.shape[0]
            return {"out": out}

    data = [{"image": torch.zeros(3, H, W), "label": y, "name": f"im{i}.png"} for i, y in enumerate(labels)]
    res = evaluate(Fixed(), data, C, torch.device("cpu"), workers=0)
    ent, n, conf, wrong = 0.0, 0, 0, 0
    cm = ConfusionMatrix(C)
    for lo, y in zip(logits, labels):
        p = F.softmax(lo[0], 0)
        v = y != 255
        ent += float((-(p * p.log()).sum(0) / np.log(C))[v].sum())
        n += int(v.sum())
        hi = (p.max(0).values > 0.9) & v
        conf += int(hi.sum())
        wrong += int((hi & (p.argmax(0) != y)).sum())
        cm.update(lo.argmax(1), y[None])
    assert res["mIoU"] == pytest.approx(cm.summary()["mIoU"])
    assert res["confidence"]["mean_entropy"] == pytest.approx(ent / n, rel=1e-5)
    assert res["confidence"]["confident_share"] == pytest.approx(conf / n)
    assert res["confidence"]["confident_wrong_share"] == pytest.approx(wrong / conf)


def test_eval_batches_group_same_size_items_in_order_within_the_caps():
    """common.datasets.eval_batches: consecutive same-shape items, at most max_images and max_pixels per batch,
    every item once and in order; mixed sizes just make smaller batches."""
    from common.datasets import eval_batches
    sizes = [(8, 8)] * 3 + [(16, 16)] * 2 + [(8, 8)] * 5
    data = [{"image": torch.full((3, h, w), float(i)), "label": torch.zeros(h, w, dtype=torch.long), "name": f"{i}"}
            for i, (h, w) in enumerate(sizes)]
    got = list(eval_batches(data, workers=0, max_images=2))
    assert [len(b["name"]) for b in got] == [2, 1, 2, 2, 2, 1]
    assert [n for b in got for n in b["name"]] == [str(i) for i in range(len(sizes))]
    assert all(float(b["image"][j, 0, 0, 0]) == int(n) for b in got for j, n in enumerate(b["name"]))
    assert [len(b["name"]) for b in eval_batches(data, workers=0, max_pixels=2 * 64)] == [2, 1, 1, 1, 2, 2, 1]
    assert [len(b["name"]) for b in eval_batches(data, workers=0, max_pixels=10)] == [1] * len(sizes)  # >= 1
    shard = [n for b in eval_batches(data, workers=0, rank=1, world_size=3) for n in b["name"]]
    assert shard == ["1", "4", "7"]


def test_eval_mode_predictions_do_not_depend_on_the_batch():
    """What batched evaluation relies on: in eval mode, an image's logits in a batch of 8 equal its logits alone."""
    torch.manual_seed(0)
    model = DeepLabV2(19, "resnet18").eval()
    x = torch.randn(8, 3, 64, 128)
    with torch.no_grad():
        together = model(x)["out"]
        alone = torch.cat([model(x[i:i + 1])["out"] for i in range(8)])
    assert torch.allclose(together, alone, atol=1e-4, rtol=1e-4)
    assert torch.equal(together.argmax(1), alone.argmax(1))
