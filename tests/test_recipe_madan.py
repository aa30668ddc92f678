"""madan/: the README's recipe tables against the scripts' real-data presets, and the real-data presets'
pipelines on the full-resolution real-format fixture trees (tests/realdata.py): short-side resize + unpadded
400x400 translation crops, full-resolution translation and evaluation input, the segmenter's 1080x600 /
1280x760 and ADDA's 540x300 sizes, the 19-class label space, FCN8s's caffe alignment (pad 99 + 1), and
upstream's 16-of-19 mIoU."""
import ast
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recipe_tables():
    """{script: [(parameter, {name: value})]} from madan/README.md's '## Recipe tables' section."""
    text = (ROOT / "madan" / "README.md").read_text()
    sec = text[text.index("## Recipe tables"):]
    sec = sec[:sec.index("\n## ", 5)]
    out = {}
    for block in sec.split("\n### ")[1:]:
        script = re.match(r"`([^`]+)`", block).group(1)
        rows = []
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 5 or cells[0] in ("parameter", "---"):
                continue
            pairs = dict(re.findall(r"`(\w+)=([^`]+)`", cells[3]))
            rows.append((cells[0], {k: ast.literal_eval(v) for k, v in pairs.items()}))
        out[script] = rows
    return out


def real_args(script, roots=("/d/RAND_CITYSCAPES", "/d/GTA5", "/d/cityscapes")):
    from madan import test, train_adda, train_mdan, train_segmenter, train_translation, translate
    common = ["--source", "synthia,gta5", "--source-root", f"{roots[0]},{roots[1]}", "--target", "cityscapes",
              "--target-root", roots[2]]
    if script == "train_translation.py":
        return train_translation.parse_args(common + ["--classifiers", "a.pth,b.pth"])
    if script.startswith("train_segmenter.py"):
        return train_segmenter.parse_args(common + ["--init", "/w/vgg16.pth"])
    if script == "train_adda.py":
        return train_adda.parse_args(common + ["--init-from", "m.pth"])
    if script == "train_mdan.py":
        return train_mdan.parse_args(common + ["--init", "/w/vgg16.pth"])
    if script == "translate.py":
        return translate.parse_args(["--source", "synthia,gta5"])
    return test.parse_args(["--target", "cityscapes"])


def test_recipe_tables_match_the_real_data_presets():
    tables = recipe_tables()
    assert {"train_translation.py", "translate.py", "train_adda.py", "train_mdan.py", "test.py"} <= set(tables)
    assert any(k.startswith("train_segmenter.py") for k in tables)
    checked = 0
    for script, rows in tables.items():
        args = real_args(script)
        for param, pairs in rows:
            for name, value in pairs.items():
                got = getattr(args, name)
                got = tuple(got) if isinstance(got, list) else got
                assert got == value, f"{script} '{param}': README says {name}={value!r}, the preset has {got!r}"
                checked += 1
    assert checked >= 40


def test_fcn8s_output_is_aligned_with_its_input():
    """Caffe's FCN8s pads conv1_1 by 100 and its crop offsets 5/9/31 assume it. With every conv an identity
    on channel 0 (centre tap), fc6 zero and only the pool3 skip on, a delta at x comes out centred on x:
    averaged over the 8 phases of the stride-8 grid the offset is 0 (with a total pad of 101 it is +1)."""
    from common.fcn import FCN8s
    torch.manual_seed(0)
    net = FCN8s(1).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
        for m in net.features:
            if isinstance(m, torch.nn.Conv2d):
                m.weight[0, 0, 1, 1] = 1.0
        net.score_pool3.weight[0, 0] = 1.0
        img = torch.zeros(8, 3, 8, 96)
        xs = torch.arange(40, 48)
        img[torch.arange(8), 0, 4, xs] = 1.0
        rows = net(img)["out"][:, 0].sum(1)  # (8, 96)
        assert (rows.sum(1) > 0).all()
        offsets = ((rows * torch.arange(96)).sum(1) / rows.sum(1) - xs).tolist()
    assert abs(np.mean(offsets)) < 1e-3, offsets


def test_madan_miou16_is_the_sum_of_16_ious_over_16():
    from madan.test import madan_miou16
    from common import labels as L
    names = L.class_names(19)
    per = {n: float(i) for i, n in enumerate(names)}
    per["person"] = None  # absent from GT and prediction: counts 0
    expect = sum(v for n, v in per.items() if v is not None and n not in ("terrain", "truck", "train")) / 16
    assert madan_miou16({"per_class": per}, 19) == pytest.approx(expect)


@pytest.fixture(scope="module")
def trees(real_trees):
    return real_trees


def test_translation_crops_are_short_side_500_and_never_padded(trees):
    from common.datasets import read_image, build_dataset
    from madan.train_translation import translation_aug
    args = real_args("train_translation.py")
    aug = translation_aug(args)
    rng = np.random.default_rng(0)
    for kind, split in (("gta5", "all"), ("synthia", "all"), ("cityscapes", "train")):
        for img_path, _ in build_dataset(kind, trees[kind], split, with_labels=False).files:
            img = read_image(img_path)
            resized, _ = aug.transforms[0](img, None, rng)
            assert min(resized.size) == 500 and max(resized.size) == int(500 * max(img.size) / min(img.size))
            for _ in range(4):
                crop, _ = aug(img, None, rng)
                a = np.asarray(crop)
                assert a.shape == (400, 400, 3)
                assert (a.max(-1) > 0).all(), f"{kind}: zero padding in a translation crop"


def test_translate_and_evaluate_at_full_resolution(trees):
    from common.datasets import read_image, build_dataset
    from madan.translate import work_size
    from madan.test import eval_data
    for kind, split in (("gta5", "all"), ("synthia", "all")):
        img = read_image(build_dataset(kind, trees[kind], split, with_labels=False).files[0][0])
        assert work_size(img, {"load_size": 500, "fine_size": [400, 400]}, None) == (img.height, img.width)
    data = eval_data("cityscapes", trees["cityscapes"], 19, "imagenet", None, "madan")
    item = data[0]
    assert tuple(item["image"].shape) == (3, 1024, 2048) and tuple(item["label"].shape) == (1024, 2048)
    assert set(np.unique(item["label"].numpy())) - {255} == set(range(19))  # every class, 19-class space


def test_segmenter_and_adda_sizes_and_label_space(trees):
    from common.datasets import train_set
    from madan.train_adda import adda_aug
    from madan.train_segmenter import segmenter_aug
    roots = (str(trees["synthia"]), str(trees["gta5"]), str(trees["cityscapes"]))
    seg, adda = real_args("train_segmenter.py", roots), real_args("train_adda.py", roots)
    assert seg.num_classes == 19 and adda.num_classes == 19
    for name, hw in (("gta5", (600, 1080)), ("synthia", (760, 1280))):
        item = train_set(name, trees[name], 19, "imagenet", segmenter_aug(seg, name))[0]
        assert tuple(item["image"].shape[-2:]) == hw and tuple(item["label"].shape) == hw
        labels = set(np.unique(item["label"].numpy())) - {255}
        assert labels <= set(range(19)) and len(labels) >= 15, (name, labels)
        item = train_set(name, trees[name], 19, "imagenet", adda_aug(adda, name))[0]
        assert tuple(item["image"].shape[-2:]) == (300, 540) and tuple(item["label"].shape) == (300, 540)
    item = train_set("cityscapes", trees["cityscapes"], 19, "imagenet", adda_aug(adda, "cityscapes"),
                     with_labels=False)[0]
    assert tuple(item["image"].shape[-2:]) == (300, 540)


# ---- paper-preset smoke chain -------------------------------------------------------------------------
# The real-data presets themselves (FCN8s-VGG16 --init scratch, batch 8 / 4 / 1, 1080x600 and 1280x760, 400x400
# crops of the short-side-500 images, 300x540 ADDA, full-resolution translation and evaluation, 19 classes), one
# step each, on the full-resolution fixture trees with one Cityscapes val image. Measured on the 2-core CPU: one
# FCN8s training step at 1080x600 takes ~60 s PER IMAGE and a full-resolution translation ~200 s per image, so
# the chain (~40 min) runs only with SEGDA_REAL_SMOKE=1 or SEGDA_TEST_DEVICE=cuda; the cheap tests above check
# the same sizes, crops and label space on CPU.
REAL_SMOKE = os.environ.get("SEGDA_REAL_SMOKE") == "1" or os.environ.get("SEGDA_TEST_DEVICE") == "cuda"


def _one_val_image(real_trees, dst):
    cs = Path(real_trees["cityscapes"])
    for sub in ("leftImg8bit", "gtFine"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        (dst / sub / "train").symlink_to(cs / sub / "train")
    img = sorted((cs / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[0]
    lbl = cs / "gtFine" / "val" / img.parent.name / img.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    for src, sub in ((img, "leftImg8bit"), (lbl, "gtFine")):
        (dst / sub / "val" / img.parent.name).mkdir(parents=True, exist_ok=True)
        (dst / sub / "val" / img.parent.name / src.name).symlink_to(src)
    return dst


@pytest.mark.real_smoke
@pytest.mark.skipif(not REAL_SMOKE, reason="FCN8s-VGG16 at the real batch and sizes: set SEGDA_REAL_SMOKE=1 "
                    "(about 40 min on 2 CPU cores) or run with SEGDA_TEST_DEVICE=cuda")
def test_paper_preset_smoke_chain(real_trees, tmp_path):
    from conftest import run_script
    from common.datasets import build_dataset, read_image
    cs = _one_val_image(real_trees, tmp_path / "cityscapes")
    roots = f"{real_trees['synthia']},{real_trees['gta5']}"
    T = ["--target", "cityscapes", "--target-root", cs]
    one = ["--stop-iter", "1", "--workers", "0"]
    batch = os.environ.get("SEGDA_REAL_SMOKE_BATCH")  # a CPU check of the chain: scales the batch down, nothing else
    one += ["--batch-size", batch] if batch else []
    run = lambda script, *a: run_script(f"madan/{script}", *a, timeout=3600)  # noqa: E731
    cfg = lambda d: json.loads((d / "config.json").read_text())  # noqa: E731
    run("train_classifiers.py", "--source", "synthia,gta5", "--source-root", roots, *T, "--init", "scratch", *one,
        "--out", tmp_path / "cls")
    c = cfg(tmp_path / "cls" / "gta5")
    assert (c["model"], c["batch_size"], c["num_classes"], c["optimizer"]) == ("fcn8s", int(batch or 8), 19, "adam")
    clf = ",".join(str(tmp_path / "cls" / s / "model.pth") for s in ("synthia", "gta5"))
    run("train_translation.py", "--source", "synthia,gta5", "--source-root", roots, *T, "--classifiers", clf, *one,
        "--out", tmp_path / "tr")
    c = cfg(tmp_path / "tr")
    assert (c["batch_size"], c["load_size"], tuple(c["fine_size"]), c["ngf"], c["n_blocks"]) == \
        (int(batch or 4), 500, (400, 400), 64, 9)
    run("translate.py", "--checkpoint", tmp_path / "tr" / "model.pth", "--source", "synthia,gta5", "--source-root",
        roots, *T, "--limit", "1", "--out", tmp_path / "translated")
    for name, kind in (("synthia", "synthia"), ("gta5", "gta5")):
        for (a, la), (b, lb) in zip(build_dataset(kind, real_trees[name], "all").files,
                                    build_dataset(kind, tmp_path / "translated" / name, "all").files):
            assert read_image(a).size == read_image(b).size and Path(la).read_bytes() == Path(lb).read_bytes()
    troots = ",".join(str(tmp_path / "translated" / s) for s in ("synthia", "gta5"))
    run("train_segmenter.py", "--source", "synthia,gta5", "--source-root", troots, *T, "--init", "scratch", *one,
        "--out", tmp_path / "seg")
    run("train_adda.py", "--source", "synthia,gta5", "--source-root", troots, *T, "--init-from",
        tmp_path / "seg" / "model.pth", "--pretrain-d-iters", "1", *one, "--out", tmp_path / "adda")
    assert (tmp_path / "adda" / "discriminator_abv60.pth").exists()
    c = cfg(tmp_path / "adda")
    assert (c["batch_size"], tuple(c["crop_size"]), c["random_mirror"], c["pretrain_d"]) == \
        (int(batch or 8), (300, 540), 1, 1)
    run("train_mdan.py", "--source", "synthia,gta5", "--source-root", roots, *T, "--init", "scratch", *one,
        "--out", tmp_path / "mdan")
    run("test.py", "--checkpoint", tmp_path / "adda" / "model.pth", *T, "--workers", "0", "--out", tmp_path / "eval")
    res = json.loads((tmp_path / "eval" / "final.json").read_text())
    assert res["protocol"] == "madan" and res["images"] == 1 and 0 <= res["mIoU16_madan"] <= 100
    assert len(res["last"]["per_class"]) == 19


def test_readme_real_data_commands_parse():
    """Every real-data command of the README's GTA5 + SYNTHIA block parses with the script's own parser."""
    import importlib
    import shlex
    text = (ROOT / "madan" / "README.md").read_text()
    block = text[text.index("GTA5 + SYNTHIA -> Cityscapes (the paper's setting"):]
    block = block[block.index("\n\n") + 2:block.index("\n\n", block.index("\n\n") + 2)]
    lines = block.replace("\\\n", " ").splitlines()
    env = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', lines[0].replace(";", " ")))
    env = {k: v.strip('"') for k, v in env.items()}
    n = 0
    for line in lines[1:]:
        for k, v in env.items():
            line = line.replace(f"${k}", v)
        argv = shlex.split(line.strip())
        assert argv[0] == "python" and argv[1].startswith("madan/"), line
        mod = importlib.import_module("madan." + Path(argv[1]).stem)
        args = mod.parse_args(argv[2:])
        if hasattr(args, "num_classes") and args.num_classes is not None:
            assert args.num_classes == 19, line
        n += 1
    assert n >= 7
