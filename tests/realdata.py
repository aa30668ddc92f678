"""Full-resolution fixture trees in the REAL dataset formats, for the paper-preset smoke tests.

`make_real_trees(root)` writes, at the real datasets' sizes:
    gta5/        images/XXXXX.png 1914x1052 RGB, labels/XXXXX.png (palette PNG, Cityscapes label ids)
    synthia/     RGB/XXXXXXX.png 1280x760, GT/LABELS/XXXXXXX.png (16-bit RGB, class id in R, instance in G)
    cityscapes/  leftImg8bit/{train,val}/CITY/*_leftImg8bit.png 2048x1024, gtFine/.../*_gtFine_labelIds.png
                 (train: one city of each cityscapes_group0/1 so both groups are non-empty)
    crosscity/   Rome/Images/{Train,Test}/*.png 2048x1024, Rome/Labels/Test/*_eval.png (Cityscapes ids)
The labels are street-like layouts (sky, building, road, sidewalk, vegetation, cars, people, poles...)
holding every Cityscapes class, so that a wrong label space, a padded crop or a shape error shows up;
images are smooth class colours plus mild noise (cheap to encode).

Tests use the session fixture `real_trees` (tests/conftest.py), which builds them once per session.
"""
from pathlib import Path

import numpy as np
import png
from PIL import Image

# Cityscapes label ids of the 19 train classes (train id order), and SYNTHIA's ids for the same classes.
CS_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
SYNTHIA_OF_TRAINID = {0: 3, 1: 4, 2: 2, 3: 21, 4: 5, 5: 7, 6: 15, 7: 9, 8: 6, 9: 16, 10: 1, 11: 10, 12: 17,
                      13: 8, 14: 18, 15: 19, 16: 20, 17: 12, 18: 11}
SIZES = {"gta5": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048), "crosscity": (1024, 2048)}


def street_layout(h, w, seed=0):
    """An HxW map of train ids 0..18 (255 = a few unlabelled pixels) laid out like a street scene."""
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), 2, np.uint8)                           # building
    hz = int(h * rng.uniform(0.38, 0.48))
    lab[: int(hz * 0.6)] = 10                                    # sky
    lab[hz:] = 0                                                 # road
    lab[hz:, : w // 6] = 1                                       # sidewalk
    lab[hz: hz + h // 20, w // 6: w // 3] = 8                    # vegetation
    lab[hz + h // 20: hz + h // 12, w // 6: w // 3] = 9          # terrain
    lab[hz - h // 10: hz, w // 3: w // 3 + w // 12] = 3         # wall
    lab[hz - h // 16: hz, w // 2: w // 2 + w // 10] = 4         # fence
    lab[h // 8: hz + h // 10, 7 * w // 8: 7 * w // 8 + w // 100 + 2] = 5  # pole
    lab[h // 8: h // 8 + h // 40, 7 * w // 8 - w // 60: 7 * w // 8] = 6  # traffic light
    lab[h // 6: h // 6 + h // 30, 7 * w // 8 + w // 60: 7 * w // 8 + w // 30] = 7  # traffic sign
    x = int(w * rng.uniform(0.35, 0.45))
    for cls, ww, hh in ((13, w // 8, h // 8), (14, w // 9, h // 7), (15, w // 8, h // 6), (16, w // 10, h // 7)):
        lab[hz + h // 10: hz + h // 10 + hh, x: x + ww] = cls    # car, truck, bus, train
        x += ww + w // 60
    for cls, cx in ((11, w // 12), (12, w // 12 + w // 30), (17, w // 12 + w // 15), (18, w // 12 + w // 10)):
        lab[hz: hz + h // 8, cx: cx + w // 60 + 1] = cls         # person, rider, motorcycle, bicycle
    lab[-max(2, h // 100):, : w // 50] = 255                     # unlabelled
    return lab


def _image(lab, seed):
    rng = np.random.default_rng(seed)
    colours = rng.integers(20, 235, (256, 3)).astype(np.int16)
    img = colours[lab] + rng.integers(-8, 9, (*lab.shape, 1), dtype=np.int16)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _ids(lab):
    lut = np.zeros(256, np.uint8)  # unlabelled -> id 0
    lut[np.arange(19)] = CS_IDS
    return lut[lab]


def _write_png16(path, arr):
    with open(path, "wb") as f:
        png.Writer(arr.shape[1], arr.shape[0], bitdepth=16, greyscale=False).write(f, arr.reshape(arr.shape[0], -1))


def make_real_trees(root, n=2):
    """Write the four trees under root (n images per source / per split); returns {name: path}."""
    root = Path(root)
    out = {k: root / k for k in SIZES}
    h, w = SIZES["gta5"]
    (out["gta5"] / "images").mkdir(parents=True, exist_ok=True)
    (out["gta5"] / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = street_layout(h, w, i)
        _image(lab, i).save(out["gta5"] / "images" / f"{i + 1:05d}.png", compress_level=1)
        p = Image.fromarray(_ids(lab), "P")
        p.putpalette([v for c in range(256) for v in (c, c, c)])
        p.save(out["gta5"] / "labels" / f"{i + 1:05d}.png")
    h, w = SIZES["synthia"]
    (out["synthia"] / "RGB").mkdir(parents=True, exist_ok=True)
    (out["synthia"] / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    syn_lut = np.zeros(256, np.uint16)
    for t, s in SYNTHIA_OF_TRAINID.items():
        syn_lut[t] = s
    for i in range(n):
        lab = street_layout(h, w, 10 + i)
        _image(lab, 10 + i).save(out["synthia"] / "RGB" / f"{i:07d}.png", compress_level=1)
        arr = np.zeros((h, w, 3), np.uint16)
        arr[..., 0] = syn_lut[lab]
        arr[..., 1] = 300 + i  # instance-like values above 255
        _write_png16(out["synthia"] / "GT" / "LABELS" / f"{i:07d}.png", arr)
    h, w = SIZES["cityscapes"]
    for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
        for c, city in enumerate(cities):
            d = out["cityscapes"] / "leftImg8bit" / split / city
            g = out["cityscapes"] / "gtFine" / split / city
            d.mkdir(parents=True, exist_ok=True)
            g.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed = 100 + 10 * c + i + (50 if split == "val" else 0)
                lab = street_layout(h, w, seed)
                stem = f"{city}_{c:06d}_{i:06d}"
                _image(lab, seed).save(d / f"{stem}_leftImg8bit.png", compress_level=1)
                Image.fromarray(_ids(lab), "L").save(g / f"{stem}_gtFine_labelIds.png")
    h, w = SIZES["crosscity"]
    for split in ("Train", "Test"):
        (out["crosscity"] / "Rome" / "Images" / split).mkdir(parents=True, exist_ok=True)
    (out["crosscity"] / "Rome" / "Labels" / "Test").mkdir(parents=True, exist_ok=True)
    for split in ("Train", "Test"):
        for i in range(n):
            seed = 200 + i + (10 if split == "Test" else 0)
            lab = street_layout(h, w, seed)
            _image(lab, seed).save(out["crosscity"] / "Rome" / "Images" / split / f"pano_{seed:05d}.png",
                                   compress_level=1)
            if split == "Test":
                Image.fromarray(_ids(lab), "L").save(out["crosscity"] / "Rome" / "Labels" / "Test" /
                                                     f"pano_{seed:05d}_eval.png")
    return out
