"""The released artifacts of the active methods load, safely (issue 27, items 2 and 4): MADA's / MADAv2's anchor
files and selection lists (mada/core.py, select_active.py, the training scripts), D2ADA's checkpoint0X.tar and
datalist_0X.pkl / .json (d2ada/releases.py, train_ada.py --init-from --datalist, datalist.py), SS-ADA's and TUFL's
BiSeNet files (ssada/releases.py).

No official code or file is needed: each test writes the file in the official format itself (torch legacy format,
zip archive, plain pickle), a state dict in the official key layout by an inverse renaming written here, checked
against a listing of the official module's state-dict names written out from its definition. Then: a strict load
through the converter gives logits equal to ours (bit for bit), the scripts accept the files, and a missing or
unexpected key is an error naming the file and the key. The differential suite (tests/upstream/, SEGDA_UPSTREAM)
runs the official code itself."""
import heapq
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from common.bisenet import BiSeNetV1
from common.datasets import train_set
from common.models import WeightLoadError
from d2ada import datalist as DL, regions as R, releases as DR
from d2ada.model import DeepLabV2Feat, DeepLabV3PlusD2ADA
from mada import core
from ssada import releases as SR

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def randomise(net, seed=0):
    """Every parameter and BN buffer random, so that a misplaced tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.1)
    return net.eval()


# ------------------------------------------------------------------------------------------------ MADA
def write_official_anchors(d, anchors):
    """MADA: torch.save(faiss.vector_float_to_array(centroids)) = a flat float32 array, torch legacy format (the
    torch 1.x of 2021); MADAv2: torch.save(faiss.Kmeans.centroids) = (K, C*D), zip archive."""
    k = len(anchors)
    torch.save(anchors.reshape(-1).copy(), d / "cluster_centroids_full_10.pkl", _use_new_zipfile_serialization=False)
    torch.save(anchors.reshape(k, -1).copy(), d / "cluster_centroids_sub_10.pkl")
    return d / "cluster_centroids_full_10.pkl", d / "cluster_centroids_sub_10.pkl"


def upstream_selection(vectors, anchor_sets, rounding):
    """Upstream's selection written out (MADA select_active_samples.py:88-104, MADAv2
    step1_select_active_samples.py:55-70): per image, sum over the anchor sets of min_k np.mean((V - A_k)^2) on a
    float64 vector; heapq.nlargest of int()/round() 5%; indices through list.index; sorted."""
    dis = [sum(min(np.mean((v.astype(np.float64) - c) ** 2) for c in a) for a in anchor_sets) for v in vectors]
    k = int(0.05 * len(dis)) if rounding == "floor" else round(0.05 * len(dis))
    return sorted(map(dis.index, heapq.nlargest(k, dis)))


@pytest.fixture(scope="module")
def toy_target(toy_root):
    return train_set("toy_cityscapes", toy_root / "toy_cityscapes", 19, "imagenet", None)


def test_official_anchor_files_select_as_upstream_and_write_its_lists(tmp_path, toy_target):
    from mada import select_active
    rng = np.random.default_rng(0)
    n, c, d, k = 200, 19, 256, 10
    names = [toy_target.name(i) for i in range(n)]
    vec = (rng.random((n, c, d), dtype=np.float32) * (rng.random((n, c, 1)) > 0.3)).astype(np.float32)
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "vectors.npy", vec)
    np.save(feats / "counts.npy", np.where(vec.any(2), 50, 0))
    (feats / "meta.json").write_text(json.dumps({"domain": "target", "dataset": "toy_cityscapes", "names": names,
                                                 "root": str(toy_target.root), "min_pixels": 10, "checkpoint": None}))
    src, tgt = rng.random((k, c, d), dtype=np.float32), rng.random((k, c, d), dtype=np.float32) * 0.8
    mada_file, _ = write_official_anchors(tmp_path, src)
    (tmp_path / "v2").mkdir()
    _, v2_src = write_official_anchors(tmp_path / "v2", src)
    (tmp_path / "v2t").mkdir()
    _, v2_tgt = write_official_anchors(tmp_path / "v2t", tgt)
    # the files read back in our (K, C, D) layout: upstream's .reshape(10, 19, 256), row-major
    for f in (mada_file, v2_src):
        a, present = core.load_anchors(f, c)
        assert a.shape == (k, c, d) and np.array_equal(a, src) and present.all()
    core.atomic_save_npz(tmp_path / "ours_src.npz", anchors=src, present=np.ones((k, c), bool))
    core.atomic_save_npz(tmp_path / "ours_tgt.npz", anchors=tgt, present=np.ones((k, c), bool))

    runs = {"mada_official": ["--source-anchors", mada_file],
            "mada_ours": ["--source-anchors", tmp_path / "ours_src.npz"],
            "madav2_official": ["--criterion", "madav2", "--source-anchors", v2_src, "--target-anchors", v2_tgt],
            "madav2_ours": ["--criterion", "madav2", "--source-anchors", tmp_path / "ours_src.npz",
                            "--target-anchors", tmp_path / "ours_tgt.npz"]}
    sel = {}
    for name, flags in runs.items():
        select_active.main(select_active.parse_args(["--features", str(feats), "--sheet", "0", "--out",
                                                     str(tmp_path / name), *map(str, flags)]))
        sel[name] = json.loads((tmp_path / name / "selected.json").read_text())
    assert sel["mada_official"]["indices"] == sel["mada_ours"]["indices"] == upstream_selection(vec, [src], "floor")
    assert sel["madav2_official"]["indices"] == sel["madav2_ours"]["indices"] == \
        upstream_selection(vec, [src, tgt], "round")
    assert len(sel["mada_official"]["indices"]) == 10 and len(sel["madav2_official"]["indices"]) == 10
    # upstream's own list files: CITY/NAME lines (relative to leftImg8bit/train) and the index file
    lst = (tmp_path / "madav2_official" / "selection_list" / "stage1_cac_list_0.05_dual_dis_far.txt").read_text()
    idx = (tmp_path / "madav2_official" / "selection_list" / "stage1_cac_index_0.05_dual_dis_far.txt").read_text()
    chosen = sel["madav2_official"]["indices"]
    assert lst.splitlines() == [names[i].split("leftImg8bit/train/", 1)[1] for i in chosen]
    assert idx.splitlines() == [str(i) for i in chosen]
    assert (tmp_path / "mada_official" / "selection_list" / "stage1_cac_list_0.05.txt").is_file()
    # a cluster-index file or a wrong size is a clear error naming the file
    torch.save(list(range(24966)), tmp_path / "cluster_index_full_10.pkl", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="cluster_index_full_10.pkl holds a list of 24966 items"):
        core.load_anchors(tmp_path / "cluster_index_full_10.pkl", c)
    torch.save(np.zeros(1000, np.float32), tmp_path / "odd.pkl")
    with pytest.raises(ValueError, match=r"odd.pkl holds an array of shape \(1000,\)"):
        core.load_anchors(tmp_path / "odd.pkl", c)


def test_training_reads_upstreams_selection_list(toy_target, tmp_path):
    """selection_list/stage1_cac_list_0.05.txt (CITY/NAME lines) picks the same images as our names."""
    picks = [3, 17, 250]
    ours = [toy_target.name(i) for i in picks]
    lst = tmp_path / "stage1_cac_list_0.05.txt"
    lst.write_text("".join(core.official_name(n) + "\n" for n in ours))
    assert lst.read_text().splitlines()[0].count("/") == 1      # CITY/NAME, as upstream's file
    names = core.read_selection(lst)
    assert core.subset_by_names(toy_target, names).indices == picks == core.subset_by_names(toy_target, ours).indices
    lst.write_text("nowhere/nothing_leftImg8bit.png\n")
    with pytest.raises(ValueError, match="1 names are not images of"):
        core.subset_by_names(toy_target, core.read_selection(lst))


def mada_names(blocks=(3, 4, 23, 3)):
    """MADA's / MADAv2's DeepLab state-dict names (models/deeplab.py: backbone = models/backbone/resnet.py, no fc;
    aspp.py: aspp1..4 = _ASPPModule(atrous_conv, bn), global_avg_pool = (pool, conv, bn, relu), conv1, bn1;
    decoder.py: conv1, bn1, last_conv = (conv, bn, relu, dropout, conv, bn, relu, dropout, conv))."""
    names = resnet_names(blocks, True, "backbone.")
    for i in range(1, 5):
        names += [f"aspp.aspp{i}.atrous_conv.weight"] + [f"aspp.aspp{i}.bn.{s}" for s in BN]
    names += ["aspp.global_avg_pool.1.weight"] + [f"aspp.global_avg_pool.2.{s}" for s in BN]
    names += ["aspp.conv1.weight"] + [f"aspp.bn1.{s}" for s in BN]
    names += ["decoder.conv1.weight"] + [f"decoder.bn1.{s}" for s in BN]
    for conv, bn in ((0, 1), (4, 5)):
        names += [f"decoder.last_conv.{conv}.weight"] + [f"decoder.last_conv.{bn}.{s}" for s in BN]
    return set(names + ["decoder.last_conv.8.weight", "decoder.last_conv.8.bias"])


def to_mada(sd):
    """Our DeepLabV3Plus keys -> MADA's (the inverse of mada/releases.py's table, written independently)."""
    fixed = {"aspp.pool.1.": "aspp.global_avg_pool.1.", "aspp.pool.2.": "aspp.global_avg_pool.2.",
             "aspp.project.0.0.": "aspp.conv1.", "aspp.project.0.1.": "aspp.bn1.", "low_proj.0.": "decoder.conv1.",
             "low_proj.1.": "decoder.bn1.", "decoder.0.0.": "decoder.last_conv.0.", "decoder.0.1.": "decoder.last_conv.1.",
             "decoder.2.0.": "decoder.last_conv.4.", "decoder.2.1.": "decoder.last_conv.5.",
             "classifier.": "decoder.last_conv.8.", "backbone.": "backbone."}
    out = {}
    for k, v in sd.items():
        if k.startswith("aspp.branches."):
            i, part, rest = k[len("aspp.branches."):].split(".", 2)
            out[f"aspp.aspp{int(i) + 1}.{'atrous_conv' if part == '0' else 'bn'}.{rest}"] = v
            continue
        old = next(p for p in fixed if k.startswith(p))
        out[fixed[old] + k[len(old):]] = v
    return out


def test_mada_layout_is_the_official_one():
    from common.models import DeepLabV3Plus
    from mada import releases as MR
    with torch.device("meta"):
        ours = DeepLabV3Plus(19, "resnet101").state_dict()
    official = to_mada(ours)
    assert set(official) == mada_names()
    assert set(MR.mada_to_ours(official)) == set(ours)


def mada_tiny(toy_root, out, n=3):
    """A toy Cityscapes-style target whose train and val splits hold n images each (symlinks): fast scripts."""
    src = toy_root / "toy_cityscapes"
    for split in ("train", "val"):
        for sub, suffix in (("leftImg8bit", "_leftImg8bit.png"), ("gtFine", "_gtFine_labelIds.png")):
            for p in sorted((src / sub / split).rglob(f"*{suffix}"))[:n]:
                dst = out / sub / split / p.parent.name / p.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(p)
    return out


def test_mada_release_loads_strictly_with_equal_logits(tmp_path, toy_root):
    """MADA's released file ({'DeepLab': {'model_state', 'optimizer_state', 'scheduler_state'}, 'iter', 'best_iou'
    (a numpy float)}, torch's legacy format of 2021) gives our logits and decoder feature bit for bit, with the input
    norm 'unit' (RGB / 255); test.py evaluates it and train_stage1.py starts from it; a missing or unexpected key
    names the file and the key."""
    from common.models import DeepLabV3Plus
    from common.transforms import to_tensor
    from mada import releases as MR
    ref = randomise(DeepLabV3Plus(19, "resnet50"))
    f = tmp_path / "from_gta5_to_cityscapes_on_deeplab101_best_model_stage2.pkl"
    torch.save({"DeepLab": {"model_state": to_mada(ref.state_dict()), "optimizer_state": {"state": {}},
                            "scheduler_state": {"last_epoch": 4000}}, "iter": 4000, "best_iou": np.float64(0.649)},
               f, _use_new_zipfile_serialization=False)
    x = torch.randn(2, 3, 64, 96)
    for fmt in ("auto", "mada"):
        net, cfg, how = MR.load_segmenter(f, fmt)
        assert (cfg["model"], cfg["backbone"], cfg["num_classes"], cfg["norm"]) == \
            ("deeplabv3plus", "resnet50", 19, "unit") and how.startswith("mada")
        with torch.no_grad():
            o, r = net.eval()(x, return_feat=True), ref(x, return_feat=True)
        assert torch.equal(o["out"], r["out"]) and torch.equal(o["feat"], r["feat"])
    img = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))   # upstream's input: RGB / 255, mean 0
    assert torch.allclose(to_tensor(img, "unit"), torch.from_numpy(np.asarray(img, np.float64) / 255.0).permute(
        2, 0, 1).float())
    # a bare state dict without BN step counters (torch < 0.4.1), DataParallel's prefix: loaded, the same logits
    bare = {"module." + k: v for k, v in to_mada(ref.state_dict()).items() if not k.endswith("num_batches_tracked")}
    torch.save(bare, tmp_path / "bare.pkl")
    with torch.no_grad():
        assert torch.equal(MR.load_segmenter(tmp_path / "bare.pkl")[0].eval()(x)["out"], r["out"])
    bad = to_mada(ref.state_dict())
    bad["decoder.last_conv.9.weight"] = torch.zeros(1)
    torch.save({"DeepLab": {"model_state": bad}}, tmp_path / "extra.pkl")
    with pytest.raises(WeightLoadError, match=r"extra.pkl: keys that are not MADA's .*decoder.last_conv.9.weight"):
        MR.load_segmenter(tmp_path / "extra.pkl")
    bad = to_mada(ref.state_dict())
    del bad["aspp.bn1.running_var"]
    torch.save({"DeepLab": {"model_state": bad}}, tmp_path / "missing.pkl")
    with pytest.raises(WeightLoadError, match=r"missing.pkl does not match .*aspp.project.0.1.running_var"):
        MR.load_segmenter(tmp_path / "missing.pkl")
    torch.save({"FCDiscriminator": {"model_state": {}}}, tmp_path / "other.pkl")
    with pytest.raises(WeightLoadError, match="other.pkl: not a format this folder reads"):
        MR.load_segmenter(tmp_path / "other.pkl")
    # through the scripts: test.py evaluates it, train_stage1.py --init-from starts from it (its checkpoint keeps 'unit')
    tiny = mada_tiny(toy_root, tmp_path / "cs")
    run_script("mada/test.py", "--checkpoint", f, "--target", "toy_cityscapes", "--target-root", tiny,
               "--workers", 0, "--save-predictions", 0, "--out", tmp_path / "eval")
    rep = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert rep["images"] == 3 and rep["checkpoint_format"].startswith("mada (auto-detected")
    names = [str(p.relative_to(tiny)) for p in sorted((tiny / "leftImg8bit" / "train").rglob("*.png"))[:2]]
    (tmp_path / "sel.txt").write_text("".join(core.official_name(n) + "\n" for n in names))
    run_script("mada/train_stage1.py", "--init-from", f, "--checkpoint-format", "mada", "--selection",
               tmp_path / "sel.txt", "--target", "toy_cityscapes", "--target-root", tiny, "--out", tmp_path / "st1",
               "--iters", 1, "--batch-size", 2, "--eval-every", 1, "--workers", 0, "--crop-size", "32,64")
    ck = torch.load(tmp_path / "st1" / "model.pth", weights_only=True)
    assert ck["config"]["norm"] == "unit" and ck["labeled"] == [core.official_name(n) for n in names]
    init = [json.loads(ln) for ln in (tmp_path / "st1" / "log.jsonl").read_text().splitlines()
            if '"init"' in ln][0]
    assert init["checkpoint_format"] == "mada" and init["config"]["norm"] == "unit"


# ------------------------------------------------------------------------------------------------ D2ADA
def resnet_names(blocks, bottleneck, prefix):
    """torchvision ResNet state-dict names without fc (VainF's IntermediateLayerGetter stops at layer4)."""
    names = [f"{prefix}conv1.weight"] + [f"{prefix}bn1.{s}" for s in BN]
    convs = (1, 2, 3) if bottleneck else (1, 2)
    for layer, n in enumerate(blocks, 1):
        for i in range(n):
            p = f"{prefix}layer{layer}.{i}."
            for j in convs:
                names += [f"{p}conv{j}.weight"] + [f"{p}bn{j}.{s}" for s in BN]
            if i == 0 and (bottleneck or layer > 1):
                names += [f"{p}downsample.0.weight"] + [f"{p}downsample.1.{s}" for s in BN]
    return names


def vainf_names(model):
    """D2ADA's state-dict names of models/segmentation/deeplabv3.py (DeepLabHeadV3Plus: project, ASPP with
    convs[0] 1x1 / [1..3] ASPPConv / [4] ASPPPooling (pool, conv, bn, relu) and project, classifier, final) and
    deeplabv2.py (DeepLabHeadV2: aspp.convs[0..3] = Sequential(conv), final), on backbone.*"""
    names = resnet_names((3, 4, 23, 3), True, "backbone.")
    if model == "deeplabv2":
        return set(names + [f"classifier.aspp.convs.{i}.0.weight" for i in range(4)] +
                   ["classifier.final.weight", "classifier.final.bias"])
    head = ["classifier.project.0.weight"] + [f"classifier.project.1.{s}" for s in BN]
    for i in range(4):
        head += [f"classifier.aspp.convs.{i}.0.weight"] + [f"classifier.aspp.convs.{i}.1.{s}" for s in BN]
    head += ["classifier.aspp.convs.4.1.weight"] + [f"classifier.aspp.convs.4.2.{s}" for s in BN]
    head += ["classifier.aspp.project.0.weight"] + [f"classifier.aspp.project.1.{s}" for s in BN]
    head += ["classifier.classifier.0.weight"] + [f"classifier.classifier.1.{s}" for s in BN]
    return set(names + head + ["classifier.final.weight", "classifier.final.bias"])


def to_vainf(sd):
    """Our d2ada model keys -> D2ADA's (the inverse of d2ada/releases.py's table, written independently)."""
    v2 = "aspp_project.0.weight" not in sd
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head == "backbone":
            out[k] = v
        elif head == "classifier":
            out["classifier.final." + rest] = v
        elif head == "aspp" and v2:
            out[f"classifier.aspp.convs.{rest.split('.')[0]}.0.weight"] = v
        else:
            out[{"project": "classifier.project.", "aspp": "classifier.aspp.convs.",
                 "aspp_project": "classifier.aspp.project.", "decoder": "classifier.classifier."}[head] + rest] = v
    return out


@pytest.mark.parametrize("model", ["deeplabv3plus", "deeplabv2"])
def test_d2ada_layout_is_the_official_one(model):
    cls = DeepLabV3PlusD2ADA if model == "deeplabv3plus" else DeepLabV2Feat
    with torch.device("meta"):
        ours = cls(19, "resnet101").state_dict()
    official = to_vainf(ours)
    assert set(official) == vainf_names(model)
    back, name = DR.vainf_to_ours(official)
    assert set(back) == set(ours) and name == model


@pytest.mark.parametrize("model", ["deeplabv3plus", "deeplabv2"])
def test_d2ada_checkpoint_loads_strictly_with_equal_logits(tmp_path, model):
    cls = DeepLabV3PlusD2ADA if model == "deeplabv3plus" else DeepLabV2Feat
    ref = randomise(cls(19, "resnet18"))
    opt = torch.optim.SGD(ref.parameters(), lr=2.5e-4, momentum=0.9)
    ref(torch.randn(1, 3, 48, 64))["out"].sum().backward()
    opt.step()   # a real optimiser state in the file, as agent/base_agent.py saves it
    ref.eval()
    f = tmp_path / "checkpoint01.tar"
    torch.save({"model_state_dict": to_vainf(ref.state_dict()), "opt_state_dict": opt.state_dict()}, f)
    x = torch.randn(2, 3, 64, 96)
    for fmt in ("auto", "d2ada"):
        net, cfg, how = DR.load_segmenter(f, fmt)
        assert cfg["model"] == f"{model}_d2ada" and cfg["backbone"] == "resnet18" and cfg["num_classes"] == 19
        assert how.startswith("d2ada")
        with torch.no_grad():
            assert torch.equal(net.eval()(x)["out"], ref(x)["out"])
    # DataParallel prefixes are taken off; an unknown or a missing key names the file and the key
    torch.save({"model_state_dict": {"module." + k: v for k, v in to_vainf(ref.state_dict()).items()}}, f)
    DR.load_segmenter(f)
    bad = to_vainf(ref.state_dict())
    bad["classifier.extra.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": bad}, tmp_path / "extra.tar")
    with pytest.raises(WeightLoadError, match=r"extra.tar: keys that are not D2ADA's .*classifier.extra.weight"):
        DR.load_segmenter(tmp_path / "extra.tar")
    bad = to_vainf(ref.state_dict())
    del bad["classifier.final.bias"]
    torch.save({"model_state_dict": bad}, tmp_path / "missing.tar")
    with pytest.raises(WeightLoadError, match=r"missing.tar does not match .*missing keys: classifier.bias"):
        DR.load_segmenter(tmp_path / "missing.tar")
    torch.save({"weights": {}}, tmp_path / "other.tar")
    with pytest.raises(WeightLoadError, match="other.tar: not a format this folder reads"):
        DR.load_segmenter(tmp_path / "other.tar")


def d2ada_datalist(names, spx_ids, authors_root="/home/authors/data/cityscapes"):
    """A region-mode datalist as D2ADA writes it (region_active_dataset.py dump_datalist): absolute
    [image, label, superpixel] triplets, superpixel path -> region ids. spx_ids: our name -> labelled ids."""
    def triplet(n):
        rel = n.split("leftImg8bit/", 1)[1]
        return [f"{authors_root}/leftImg8bit/{rel}", f"{authors_root}/gtFine/{rel[:-len('_leftImg8bit.png')]}"
                f"_gtFine_labelIds.png", f"{authors_root}/{n.replace('leftImg8bit', 'superpixel')}"]
    lab = [triplet(n) for n in names if n in spx_ids]
    return {"src_label_im_idx": [["/home/authors/GTA5/images/00001.png", "/home/authors/GTA5/labels/00001.png",
                                  "/home/authors/GTA5/superpixel/00001.png"]],
            "trg_label_im_idx": lab, "trg_pool_im_idx": [triplet(n) for n in names],
            "trg_label_suppix": {t[2]: list(spx_ids[n]) for t, n in zip(lab, [n for n in names if n in spx_ids])},
            "trg_pool_suppix": {triplet(n)[2]: [0] for n in names}}


def test_d2ada_datalists_map_to_our_labelled_set():
    names = [f"leftImg8bit/train/c/c_{i:06d}_000019_leftImg8bit.png" for i in range(5)]
    inventory = [np.full(6, 10, np.int64) for _ in names]
    d = d2ada_datalist(names, {names[1]: [0, 4], names[3]: [5]})
    labeled, summary = DR.labeled_from_any_datalist(d, names, ["images/00001.png"], inventory, "datalist_02.pkl")
    assert labeled == {1: {0, 4}, 3: {5}}
    assert summary == {"mode": "region", "source_images": 1, "source_images_matched": 1, "labeled_images": 2,
                       "labeled_regions": 3, "pool_images": 5}
    # image mode (datalist_0X.json): a labelled image is labelled whole
    img = {k: d[k] for k in DR.DATALIST_KEYS}
    labeled, summary = DR.labeled_from_any_datalist(img, names, [], inventory)
    assert labeled == {1: set(range(6)), 3: set(range(6))} and summary["mode"] == "image"
    # ours (datalist_XX.json): names instead of triplets
    ours = {"round": 2, "src_label_im_idx": [], "trg_label_im_idx": [names[2]], "trg_pool_im_idx": names,
            "trg_label_suppix": {names[2]: [1]}, "trg_pool_suppix": {}}
    assert DR.labeled_from_any_datalist(ours, names, [], inventory)[0] == {2: {1}}
    # an image or a region that is not ours: an error naming the datalist
    with pytest.raises(Exception, match=r"datalist_09.pkl: 1 labelled target images are not images"):
        DR.labeled_from_any_datalist(d2ada_datalist(names + ["leftImg8bit/train/x/x_leftImg8bit.png"],
                                                    {"leftImg8bit/train/x/x_leftImg8bit.png": [1]}),
                                     names, [], inventory, "datalist_09.pkl")
    with pytest.raises(Exception, match=r"region 9 of .*c_000001.* other superpixel maps"):
        DR.labeled_from_any_datalist(d2ada_datalist(names, {names[1]: [9]}), names, [], inventory)


@pytest.fixture(scope="module")
def d2ada_tiny(toy_root, tmp_path_factory):
    """6 source and 6 target training images (+ 2 val), with our superpixel maps."""
    from d2ada import superpixels
    root = tmp_path_factory.mktemp("d2ada_releases")
    g = (toy_root / "toy_gta5" / "lists" / "train.txt").read_text().split()[:6]
    for sub in ("images", "labels"):
        (root / "gta" / sub).mkdir(parents=True)
        for n in g:
            shutil.copy(toy_root / "toy_gta5" / sub / n, root / "gta" / sub / n)
    (root / "gta" / "lists").mkdir()
    (root / "gta" / "lists" / "train.txt").write_text("\n".join(g) + "\n")
    (root / "gta" / "lists" / "val.txt").write_text("\n".join(g[:2]) + "\n")
    cs = toy_root / "toy_cityscapes"
    for split, k in (("train", 6), ("val", 2)):
        for p in sorted((cs / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[:k]:
            stem = p.name[: -len("_leftImg8bit.png")]
            for a in (p, cs / "gtFine" / split / p.parent.name / f"{stem}_gtFine_labelIds.png"):
                b = root / "city" / a.relative_to(cs)
                b.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(a, b)
    for name, sub in (("toy_cityscapes", "city"), ("toy_gta5", "gta")):
        superpixels.main(superpixels.parse_args(["--dataset", name, "--data-root", str(root / sub)]))
    return root


def test_train_ada_continues_a_released_round(d2ada_tiny, tmp_path):
    """--init-from checkpoint01.tar --datalist datalist_01.pkl: round 2 is trained from that model on that labelled
    set; the datalist summary counts what the file holds; d2ada/test.py evaluates the released model."""
    from d2ada import test as d2test
    city = d2ada_tiny / "city"
    target = train_set("toy_cityscapes", city, 19, "imagenet", None)
    names = [target.name(i) for i in range(len(target))]
    inventory = R.region_inventory(target)
    want = {names[0]: [0, 2], names[3]: [int(len(inventory[3]) - 1)]}
    (tmp_path / "datalist_01.pkl").write_bytes(pickle.dumps(d2ada_datalist(names, want)))
    ref = randomise(DeepLabV3PlusD2ADA(19, "resnet18"))
    torch.save({"model_state_dict": to_vainf(ref.state_dict()), "opt_state_dict": {}}, tmp_path / "checkpoint01.tar")

    out = tmp_path / "ada"
    run_script("d2ada/train_ada.py", "--source", "toy_gta5", "--source-root", d2ada_tiny / "gta",
               "--target", "toy_cityscapes", "--target-root", city, "--workers", 0, "--init-from",
               tmp_path / "checkpoint01.tar", "--datalist", tmp_path / "datalist_01.pkl", "--rounds", 2,
               "--iters", 2, "--batch-size", 2, "--out", out)
    final = json.loads((out / "final.json").read_text())
    assert [h["round"] for h in final["rounds"]] == [2]
    ck = torch.load(out / "checkpoint02.pth", weights_only=True)
    assert ck["labeled"] == {n: sorted(v) for n, v in want.items()}
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    ev = {r["event"]: r for r in log if "event" in r}
    assert ev["init"]["checkpoint_format"].startswith("d2ada (auto-detected")
    assert ev["datalist"]["start_round"] == 2 and ev["datalist"]["labeled_regions"] == 3

    res = DL.main(DL.parse_args(["summary", str(tmp_path / "datalist_01.pkl"), "--target", "toy_cityscapes",
                                 "--target-root", str(city), "--json", str(tmp_path / "summary.json")]))
    assert res["round"] == 1 and res["labeled_images"] == 2 and res["labeled_regions"] == 3
    assert res["pool_images"] == len(names) and res["target"]["matched_labeled_images"] == 2
    # per class, counted directly: majority ground-truth class of each labelled region
    regions = np.zeros(19, int)
    for n, ids in want.items():
        i = names.index(n)
        lab, sp = target.load_label(i), R.read_superpixel(city, target.files[i][0])
        for r in ids:
            y = lab[(sp == r) & (lab != 255)]
            regions[np.bincount(y, minlength=19).argmax()] += 1
    assert [v["regions"] for v in res["target"]["classes"].values()] == regions.tolist()
    assert json.loads((tmp_path / "summary.json").read_text())["labeled_regions"] == 3

    d2test.main(d2test.parse_args(["--checkpoint", str(tmp_path / "checkpoint01.tar"), "--target", "toy_cityscapes",
                                   "--target-root", str(city), "--workers", "0", "--save-predictions", "0",
                                   "--out", str(tmp_path / "eval")]))
    rep = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert rep["checkpoint_format"].startswith("d2ada") and 0 <= rep["mIoU"] <= 100


def test_import_superpixels_puts_d2adas_maps_where_we_read_them(d2ada_tiny, tmp_path):
    city = tmp_path / "city"
    shutil.copytree(d2ada_tiny / "city", city)
    target = train_set("toy_cityscapes", city, 19, "imagenet", None)
    maps = {}
    for img, _ in target.files:   # D2ADA's layout (superpixel_gen.py: the path with leftImg8bit -> superpixel)
        theirs = DL.upstream_superpixel_path(city, img, "cityscapes")
        assert "superpixel/train/" in theirs.as_posix() and theirs.name.endswith("_superpixel.png")
        theirs.parent.mkdir(parents=True, exist_ok=True)
        arr = (np.asarray(R.read_superpixel(city, img)) + 1) % 7      # other ids than ours
        Image.fromarray(arr.astype(np.uint8)).save(theirs)
        maps[img] = arr
    with pytest.raises(Exception, match="exists and differs"):
        DL.main(DL.parse_args(["import-superpixels", "--dataset", "toy_cityscapes", "--data-root", str(city)]))
    n = DL.main(DL.parse_args(["import-superpixels", "--dataset", "toy_cityscapes", "--data-root", str(city),
                               "--replace"]))
    assert n == len(maps)
    for img, arr in maps.items():
        assert np.array_equal(R.read_superpixel(city, img), arr)


# ------------------------------------------------------------------------------------------------ SS-ADA / TUFL
def bisenet_names(fmt):
    """SS-ADA's (model/semseg/bisenetv1.py + model/backbone/resnet18.py) / TUFL's (unsup/model.py + unsup/resnet.py)
    BiSeNet state-dict names, written out from their definitions. TUFL: InPlaceABN, downsample_conv/_bn,
    a two-conv FFM attention without BN, classifiers without bias."""
    names = resnet_names((2, 2, 2, 2), False, "cp.resnet.")
    if fmt == "tufl":
        names = [k.replace("downsample.0.", "downsample_conv.").replace("downsample.1.", "downsample_bn.")
                 for k in names]

    def cbr(p):
        return [f"{p}.conv.weight"] + [f"{p}.bn.{s}" for s in BN]
    for arm in ("cp.arm16", "cp.arm32"):
        names += cbr(f"{arm}.conv") + [f"{arm}.conv_atten.weight"] + [f"{arm}.bn_atten.{s}" for s in BN]
    for m in ("cp.conv_head32", "cp.conv_head16", "cp.conv_avg", "sp.conv1", "sp.conv2", "sp.conv3", "sp.conv_out",
              "ffm.convblk"):
        names += cbr(m)
    names += ["ffm.conv1.weight", "ffm.conv2.weight"] if fmt == "tufl" else \
        ["ffm.conv.weight"] + [f"ffm.bn.{s}" for s in BN]
    for h in ("conv_out", "conv_out16", "conv_out32"):
        names += cbr(f"{h}.conv") + [f"{h}.conv_out.weight"] + ([] if fmt == "tufl" else [f"{h}.conv_out.bias"])
    return set(names)


def to_bisenet_official(sd, fmt):
    """Our BiSeNetV1 keys -> SS-ADA's / TUFL's (the inverse of ssada/releases.py's table, written independently)."""
    cb = {"0": "conv", "1": "bn"}
    sp = {"0": "conv1", "1": "conv2", "2": "conv3", "3": "conv_out"}
    heads = {"head_out": "conv_out", "head_aux16": "conv_out16", "head_aux32": "conv_out32"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[0] == "backbone":
            new = "cp.resnet." + ".".join(p[1:])
            if fmt == "tufl":
                new = new.replace("downsample.0.", "downsample_conv.").replace("downsample.1.", "downsample_bn.")
        elif p[0] in ("arm16", "arm32"):
            new = f"cp.{p[0]}.conv.{cb[p[2]]}." + ".".join(p[3:]) if p[1] == "conv" else \
                f"cp.{p[0]}.conv_atten.weight" if p[2] == "0" else f"cp.{p[0]}.bn_atten." + ".".join(p[3:])
        elif p[0] in ("conv_avg", "conv_head32", "conv_head16"):
            new = f"cp.{p[0]}.{cb[p[1]]}." + ".".join(p[2:])
        elif p[0] == "sp":
            new = f"sp.{sp[p[1]]}.{cb[p[2]]}." + ".".join(p[3:])
        elif p[0] == "ffm":
            new = f"ffm.convblk.{cb[p[2]]}." + ".".join(p[3:]) if p[1] == "convblk" else \
                {"0": "ffm.conv1.weight" if fmt == "tufl" else "ffm.conv.weight", "2": "ffm.conv2.weight"}.get(p[2]) \
                or "ffm.bn." + ".".join(p[3:])
        else:
            new = f"{heads[p[0]]}.conv.{cb[p[2]]}." + ".".join(p[3:]) if p[1] == "conv" else \
                f"{heads[p[0]]}.conv_out." + ".".join(p[2:])
        out[new] = v
    return out


@pytest.mark.parametrize("fmt", ["ssada", "tufl"])
def test_bisenet_layouts_are_the_official_ones(fmt):
    ours = BiSeNetV1(19, variant=fmt).state_dict()
    official = to_bisenet_official(ours, fmt)
    assert set(official) == bisenet_names(fmt)
    assert set(SR.bisenet_to_ours(official)) == set(ours)


def test_ssada_checkpoint_loads_strictly_with_equal_logits(tmp_path):
    ref = randomise(BiSeNetV1(19, variant="ssada"))
    f = tmp_path / "best.pth"
    torch.save({"model": to_bisenet_official(ref.state_dict(), "ssada"), "optimizer": {}, "epoch": 199,
                "previous_best": np.float64(71.67)}, f)   # SS-ADA's previous_best is np.mean(...): a numpy float
    x = torch.randn(2, 3, 64, 96)
    for fmt in ("auto", "ssada"):
        net, cfg, how = SR.load_segmenter(f, fmt)
        assert cfg["variant"] == "ssada" and cfg["num_classes"] == 19 and how.startswith("ssada")
        with torch.no_grad():
            assert torch.equal(net.eval()(x)["out"], ref(x)["out"])
    # a model built without deep supervision (aux_mode='eval'): the aux heads keep their initial weights, said so;
    # one aux head half there is an error like any missing key
    bare = {k: v for k, v in to_bisenet_official(ref.state_dict(), "ssada").items()
            if not k.startswith(("conv_out16.", "conv_out32."))}
    torch.save({"model": bare}, tmp_path / "eval_model.pth")
    net, _, how = SR.load_segmenter(tmp_path / "eval_model.pth")
    assert "no aux heads in the file" in how
    with torch.no_grad():
        assert torch.equal(net.eval()(x)["out"], ref(x)["out"])
    bare["conv_out16.conv_out.weight"] = ref.state_dict()["head_aux16.cls.weight"]
    torch.save({"model": bare}, tmp_path / "half.pth")
    with pytest.raises(WeightLoadError, match=r"half.pth does not match .*missing keys: head_aux16.cls.bias"):
        SR.load_segmenter(tmp_path / "half.pth")
    aux = to_bisenet_official(ref.state_dict(), "ssada")
    aux["aux_conv_out.conv_out.weight"] = torch.zeros(16, 256, 1, 1)
    torch.save({"model": aux}, tmp_path / "aux.pth")
    with pytest.raises(WeightLoadError, match=r"aux.pth: keys that are not .*aux_conv_out.conv_out.weight"):
        SR.load_segmenter(tmp_path / "aux.pth")


def tufl_tiny(toy_root, out):
    """CrossCity-style Rome, 4 Train and 4 Test images (symlinks)."""
    cc = toy_root / "toy_crosscity" / "Rome"
    for split in ("Train", "Test"):
        (out / "Rome" / "Images" / split).mkdir(parents=True)
        for p in sorted((cc / "Images" / split).iterdir())[:4]:
            (out / "Rome" / "Images" / split / p.name).symlink_to(p)
            if split == "Test":
                (out / "Rome" / "Labels" / "Test").mkdir(parents=True, exist_ok=True)
                lab = cc / "Labels" / "Test" / f"{p.stem}_eval.png"
                (out / "Rome" / "Labels" / "Test" / lab.name).symlink_to(lab)
    return out


def test_tufl_files_load_strictly_with_equal_logits(tmp_path, toy_root, capsys):
    """TUFL's InPlaceABN scales are |w| + eps: a file with negative scales and no BN step counters (inplace_abn
    < 1.0) gives the logits of our model whose BN weights are |w| + 1e-5."""
    ref = randomise(BiSeNetV1(13, variant="tufl"))
    official = to_bisenet_official(ref.state_dict(), "tufl")
    g = torch.Generator().manual_seed(1)
    expect = ref.state_dict()
    for k in list(official):
        if k.endswith("num_batches_tracked"):
            del official[k]
        elif k.endswith(".weight") and k[:-len("weight")] + "running_mean" in official:
            official[k] = official[k] * torch.where(torch.rand(official[k].shape, generator=g) < 0.5, -1.0, 1.0)
    for k, v in SR.bisenet_to_ours(official).items():
        if k.endswith(".weight") and k[:-len("weight")] + "running_mean" in expect:
            expect[k] = v.abs() + 1e-5
    ref.load_state_dict(expect)
    torch.save(official, tmp_path / "model_epoch_2000.pth")
    net, cfg, how = SR.load_segmenter(tmp_path / "model_epoch_2000.pth")
    assert cfg["variant"] == "tufl" and cfg["num_classes"] == 13 and how.startswith("tufl (auto-detected")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(net.eval()(x)["out"], ref.eval()(x)["out"])
    # through the scripts: test.py reads it, train_tufl.py --init-from adapts from it (a tiny CrossCity-style copy)
    from ssada import test as sstest
    cc = tufl_tiny(toy_root, tmp_path / "cc")
    sstest.main(sstest.parse_args(["--checkpoint", str(tmp_path / "model_epoch_2000.pth"), "--target",
                                   "toy_crosscity", "--target-root", str(cc), "--split", "test", "--workers", "0",
                                   "--save-predictions", "0", "--out", str(tmp_path / "eval")]))
    rep = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert "format tufl (auto-detected" in capsys.readouterr().out and rep["images"] == 4
    run_script("ssada/train_tufl.py", "--init-from", tmp_path / "model_epoch_2000.pth", "--target-root", cc,
               "--source-root", toy_root / "toy_cityscapes", "--crop-size", "32,64", "--iters", 2, "--batch-size", 2,
               "--eval-every", 2, "--workers", 0, "--out", tmp_path / "tufl")
    log = [json.loads(ln) for ln in (tmp_path / "tufl" / "log.jsonl").read_text().splitlines()]
    init = [r for r in log if r.get("event") == "init"][0]
    assert init["checkpoint_format"].startswith("tufl") and init["variant"] == "tufl"
    del official["conv_out16.conv_out.weight"]
    torch.save(official, tmp_path / "missing.pth")
    with pytest.raises(WeightLoadError, match=r"missing.pth does not match .*missing keys: head_aux16.cls.weight"):
        SR.load_segmenter(tmp_path / "missing.pth", "tufl")


def test_mada_readme_release_commands_parse():
    """Every command of mada/README.md's 'Starting from the released artifacts' is accepted by its script's parser,
    and the ones naming a released model ask for (or auto-detect) the mada format."""
    import importlib
    import re
    import shlex
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "mada" / "README.md").read_text()
    section = text[text.index("## Starting from the released artifacts"):text.index("## Recipes:")]
    n = 0
    for cmd in re.findall(r"^    (python mada/.*?)(?<!\\)$", section.replace("\\\n    ", "\\\n"), re.M | re.S):
        argv = shlex.split(cmd.replace("\\\n", " "))
        args = importlib.import_module(f"mada.{Path(argv[1]).stem}").parse_args(argv[2:])
        if any(a.endswith(".pkl") and "weights/" in a for a in argv):
            assert args.checkpoint_format in ("mada", "auto"), cmd
        n += 1
    assert n >= 6
