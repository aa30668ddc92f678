"""Readers for GTA5, SYNTHIA-RAND-CITYSCAPES, Cityscapes and CrossCity (NTHU) in their real on-disk
layouts, plus the batch samplers every training script uses.

A dataset item is a dict: image (float CHW, normalised for the model's init), label (long HxW,
class indices, 255 = ignore; absent for unlabeled sets), index, name (path relative to the root).
"""
import os
import struct
from pathlib import Path

import numpy as np
import png  # pypng: 16-bit multi-channel PNG decoding (SYNTHIA labels)
import torch
from PIL import Image

from . import labels as L
from .transforms import to_tensor

IMG_EXTS = (".png", ".jpg", ".jpeg")

LAYOUTS = {
    "gta5": "ROOT/images/XXXXX.png and ROOT/labels/XXXXX.png (Cityscapes label ids)",
    "synthia": "ROOT/RGB/XXXXXXX.png and ROOT/GT/LABELS/XXXXXXX.png (16-bit, class id in channel 0)",
    "cityscapes": "ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and "
                  "ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png",
    "crosscity": "ROOT/CITY/Images/{Train,Test}/*.(png|jpg) and ROOT/CITY/Labels/Test/*_eval.png "
                 "(ROOT = NTHU_Datasets; Cityscapes label ids)",
}
# Largest legal raw label id per format (Cityscapes ids go to 33, GTA5 to 34; 255 = unlabeled).
MAX_RAW_ID = {"gta5": 34, "cityscapes": 33, "crosscity": 33, "synthia": 22}
RAW_MAPS = {"gta5": L.GTA5_ID_TO_TRAINID, "cityscapes": L.CITYSCAPES_ID_TO_TRAINID,
            "crosscity": L.CROSSCITY_ID_TO_13, "synthia": L.SYNTHIA_ID_TO_TRAINID}


class DatasetLayoutError(FileNotFoundError):
    pass


class DatasetError(ValueError):
    """A dataset whose files are there but wrong (missing labels, image/label size mismatch)."""


def _layout_error(kind, root, missing):
    return DatasetLayoutError(
        f"{kind} dataset not found: expected {missing}\n  root given: {root}\n"
        f"  expected layout: {LAYOUTS[kind]}")


def _need_dir(kind, root, path):
    if not Path(path).is_dir():
        raise _layout_error(kind, root, f"the folder {path}")
    return Path(path)


def _read_list(list_path):
    with open(list_path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def gta5_files(root, list_path=None):
    """(image, label) paths of GTA5: images/XXXXX.png, labels/XXXXX.png."""
    root = Path(root)
    img_dir = _need_dir("gta5", root, root / "images")
    lbl_dir = _need_dir("gta5", root, root / "labels")
    names = _read_list(list_path) if list_path else sorted(p.name for p in img_dir.iterdir()
                                                           if p.suffix.lower() in IMG_EXTS)
    if not names:
        raise _layout_error("gta5", root, f"at least one image in {img_dir}")
    return [(img_dir / n, lbl_dir / n) for n in names]


def synthia_files(root, list_path=None):
    """(image, label) paths of SYNTHIA-RAND-CITYSCAPES: RGB/XXXXXXX.png, GT/LABELS/XXXXXXX.png."""
    root = Path(root)
    img_dir = _need_dir("synthia", root, root / "RGB")
    lbl_dir = _need_dir("synthia", root, root / "GT" / "LABELS")
    names = _read_list(list_path) if list_path else sorted(p.name for p in img_dir.iterdir()
                                                           if p.suffix.lower() == ".png")
    if not names:
        raise _layout_error("synthia", root, f"at least one image in {img_dir}")
    return [(img_dir / n, lbl_dir / n) for n in names]


def cityscapes_files(root, split="train", cities=None, with_labels=True):
    """(image, label) paths of Cityscapes leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and
    gtFine/SPLIT/CITY/*_gtFine_labelIds.png, optionally restricted to some cities."""
    root = Path(root)
    img_dir = _need_dir("cityscapes", root, root / "leftImg8bit" / split)
    if with_labels:
        _need_dir("cityscapes", root, root / "gtFine" / split)
    pairs = []
    for city in sorted(d.name for d in img_dir.iterdir() if d.is_dir()):
        if cities is not None and city not in cities:
            continue
        for p in sorted((img_dir / city).glob("*_leftImg8bit.png")):
            stem = p.name[: -len("_leftImg8bit.png")]
            lbl = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            pairs.append((p, lbl if with_labels else None))
    if not pairs:
        raise _layout_error("cityscapes", root, f"*_leftImg8bit.png files under {img_dir}/CITY/"
                            + (f" for cities {sorted(cities)}" if cities else ""))
    return pairs


def crosscity_files(root, city="Rome", split="Test", with_labels=None):
    """CrossCity (NTHU): CITY/Images/{Train,Test}/*; labels CITY/Labels/Test/*_eval.png (Test only)."""
    root = Path(root)
    split = split.capitalize()
    img_dir = _need_dir("crosscity", root, root / city / "Images" / split)
    with_labels = (split == "Test") if with_labels is None else with_labels
    lbl_dir = _need_dir("crosscity", root, root / city / "Labels" / split) if with_labels else None
    pairs = [(p, (lbl_dir / f"{p.stem}_eval.png") if with_labels else None)
             for p in sorted(img_dir.iterdir()) if p.suffix.lower() in IMG_EXTS]
    if not pairs:
        raise _layout_error("crosscity", root, f"images in {img_dir}")
    return pairs


def read_image(path):
    """RGB PIL image; a missing, unreadable or truncated file raises an error that names it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file missing: {path}") from None
    except Exception as e:  # PIL raises OSError / UnidentifiedImageError / SyntaxError
        raise OSError(f"cannot read image {path}: {e} (unreadable or truncated file)") from None


def read_png16(path):
    """Decode any PNG (including 16-bit multi-channel) to an HxWxC (or HxW) numpy array of its true
    values. Pillow and skimage.io return zeros for 16-bit RGB PNGs; pypng does not."""
    try:
        w, h, rows, info = png.Reader(filename=str(path)).asDirect()
        arr = np.vstack([np.asarray(r, dtype=np.uint16 if info["bitdepth"] > 8 else np.uint8)
                         for r in rows])
    except FileNotFoundError:
        raise FileNotFoundError(f"label file missing: {path}") from None
    except Exception as e:
        raise OSError(f"cannot read label PNG {path}: {e}") from None
    planes = info["planes"]
    return arr.reshape(h, w, planes) if planes > 1 else arr.reshape(h, w)


def read_raw_label(path, kind):
    """Raw label ids (HxW int array) as stored on disk for the given dataset kind."""
    if kind == "synthia":
        arr = read_png16(path)
        return arr[..., 0] if arr.ndim == 3 else arr  # class id = first (R) channel
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"label {path} has mode {im.mode}: expected a single-channel PNG of "
                                 f"label ids (not a colour visualisation)")
            return np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"label file missing: {path}") from None
    except ValueError:
        raise
    except Exception as e:
        raise OSError(f"cannot read label {path}: {e} (unreadable or truncated file)") from None


class SegDataset(torch.utils.data.Dataset):
    """A list of (image, label-or-None) files in one of the real formats.

    kind: gta5 | synthia | cityscapes | crosscity (decides how labels are decoded and mapped).
    num_classes: 19, 16 or 13 (label space of the returned labels).
    transform: joint transform (img, lbl, rng) -> (img, lbl), see common.transforms.
    norm: input normalisation, 'caffe' or 'imagenet' (must match the model's init).
    Indexing with an int uses a fixed rng; the training sampler passes (index, seed) pairs.
    """

    def __init__(self, files, kind, root, num_classes=19, transform=None, norm="imagenet",
                 with_labels=True):
        self.files, self.kind, self.root = list(files), kind, Path(root)
        self.num_classes, self.transform, self.norm = num_classes, transform, norm
        self.with_labels = with_labels and all(lb is not None for _, lb in self.files)
        self.lut = L.lut_from_map(RAW_MAPS[kind], num_classes, size=65536)

    def __len__(self):
        return len(self.files)

    def name(self, i):
        return os.path.relpath(self.files[i][0], self.root)

    def load_label(self, i):
        """Label of item i in class-index space, at its stored resolution (uint8 HxW)."""
        path = self.files[i][1]
        raw = read_raw_label(path, self.kind)
        top = int(raw.max()) if raw.size else 0
        if top > MAX_RAW_ID[self.kind] and top != 255 or raw.min() < 0:
            bad = sorted(set(np.unique(raw).tolist()) - set(range(MAX_RAW_ID[self.kind] + 1)) - {255})
            raise ValueError(f"label {path}: values {bad[:8]} out of range; expected {self.kind} raw "
                             f"label ids 0..{MAX_RAW_ID[self.kind]} (train-id or colour label files "
                             f"are not accepted)")
        return self.lut[raw.astype(np.int64)]

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        img_path, lbl_path = self.files[i]
        img = read_image(img_path)
        lbl = None
        if self.with_labels:
            lab = self.load_label(i)
            if lab.shape != (img.height, img.width):
                raise ValueError(f"size mismatch: image {img_path} is {img.height}x{img.width} but "
                                 f"label {lbl_path} is {lab.shape[0]}x{lab.shape[1]}")
            lbl = Image.fromarray(lab, "L")
        if self.transform is not None:
            rng = np.random.default_rng([i] if seed is None else [seed, i])
            img, lbl = self.transform(img, lbl, rng)
        out = {"image": to_tensor(img, self.norm), "index": i, "name": self.name(i)}
        if lbl is not None:
            out["label"] = torch.from_numpy(np.asarray(lbl, dtype=np.int64).copy())
        return out


def build_dataset(kind, root, split, num_classes=19, transform=None, norm="imagenet",
                  with_labels=True, list_path=None, cities=None, city="Rome"):
    """One place that knows each dataset's layout. split: gta5/synthia 'all' (or a list file);
    cityscapes 'train'/'val'/'test'; crosscity 'Train'/'Test'."""
    if kind in ("gta5", "synthia") and split != "all" and list_path is None:
        list_path = Path(root) / split  # a list file of image names relative to the root (GTA5 splits)
        if not list_path.is_file():
            raise _layout_error(kind, root, f"the split list {list_path}")
    if kind == "gta5":
        files = gta5_files(root, list_path)
    elif kind == "synthia":
        files = synthia_files(root, list_path)
    elif kind == "cityscapes":
        files = cityscapes_files(root, split, cities, with_labels)
    elif kind == "crosscity":
        files = crosscity_files(root, city, split, with_labels=None if with_labels else False)
        with_labels = with_labels and files[0][1] is not None
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(LAYOUTS)}")
    if kind == "crosscity" and num_classes != 13:
        raise ValueError("CrossCity is labelled with 13 classes: use --num-classes 13")
    return SegDataset(files, kind, root, num_classes, transform, norm, with_labels)


# ----------------------------------------------------------------------------------------------
# Sampling: an infinite, iteration-indexed stream of batches. The batch at iteration t depends only
# on (seed, t), so a run resumed at iteration t sees exactly what an uninterrupted run would, and
# each rank of a torchrun job takes its own shard (the DistributedSampler's job, done here so that
# resume stays exact).
# ----------------------------------------------------------------------------------------------
class IterationBatchSampler(torch.utils.data.Sampler):
    def __init__(self, n, batch_size, seed, start_iter=0, rank=0, world_size=1, shuffle=True):
        if n < world_size * batch_size:
            raise ValueError(f"dataset of {n} items is too small for batch {batch_size} x {world_size} ranks")
        self.n, self.bs, self.seed, self.start = n, batch_size, seed, start_iter
        self.rank, self.world, self.shuffle = rank, world_size, shuffle
        self.per_epoch = n // (batch_size * world_size)  # drop_last

    def __iter__(self):
        t = self.start
        while True:
            epoch, k = divmod(t, self.per_epoch)
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                     else np.arange(self.n))
            shard = order[self.rank::self.world]
            for b in range(k, self.per_epoch):
                idx = shard[b * self.bs:(b + 1) * self.bs]
                yield [(int(i), int(self.seed * 100003 + epoch)) for i in idx]
            t = (epoch + 1) * self.per_epoch

    def __len__(self):  # infinite stream; len is the epoch length
        return self.per_epoch


def infinite_loader(dataset, batch_size, seed, start_iter=0, workers=2, rank=0, world_size=1):
    """Iterator of batches for iterations start_iter, start_iter+1, ... (never ends)."""
    sampler = IterationBatchSampler(len(dataset), batch_size, seed, start_iter, rank, world_size)
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False, generator=torch.Generator().manual_seed(seed)))


def eval_loader(dataset, batch_size=1, workers=2, rank=0, world_size=1):
    """Sequential loader over this rank's shard of the dataset (every item seen exactly once overall)."""
    idx = list(range(rank, len(dataset), world_size))
    # its own generator: starting the loader must not draw from the global RNG (exact resume)
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size,
                                       shuffle=False, num_workers=workers, generator=torch.Generator())


# Evaluation forward passes take up to 8 consecutive same-size images, as many as fit in this many input pixels:
# the toy domains' images (at most 72x128) go 8 at a time, any real image (Cityscapes 1024x2048, GTA5, SYNTHIA,
# CrossCity) alone, as in every official evaluation. In eval mode an image's prediction does not depend on the
# others of its batch (tests/test_common.py checks it to float rounding).
EVAL_BATCH_PIXELS = 8 * 72 * 128


def eval_batches(dataset, workers=2, rank=0, world_size=1, max_pixels=EVAL_BATCH_PIXELS, max_images=8):
    """eval_loader's items (this rank's shard, in order, each once), collated into batches of consecutive items
    whose tensors have the same shapes, at most max_images images and max_pixels input pixels per batch (always
    at least one image).
    Datasets that mix image sizes (CrossCity, or a --full-res pool) simply give smaller batches."""
    idx = list(range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=max_images, shuffle=False,
                                         num_workers=workers, collate_fn=list, generator=torch.Generator())

    def shapes(item):
        return tuple(v.shape for v in item.values() if torch.is_tensor(v))

    group = []
    for items in loader:
        for item in items:
            px = int(np.prod(item["image"].shape[-2:]))
            if group and (shapes(item) != shapes(group[0]) or len(group) == max_images
                          or (len(group) + 1) * px > max_pixels):
                yield torch.utils.data.default_collate(group)
                group = []
            group.append(item)
    if group:
        yield torch.utils.data.default_collate(group)


# ----------------------------------------------------------------------------------------------
# Domains: the names scripts accept for --source/--target, with the papers' image sizes.
# ----------------------------------------------------------------------------------------------
# name: kind, train split, eval split, training resize (H, W), evaluation input size (H, W)
DOMAINS = {
    "gta5": ("gta5", "all", None, (720, 1280), (720, 1280)),
    "synthia": ("synthia", "all", None, (760, 1280), (760, 1280)),
    "cityscapes": ("cityscapes", "train", "val", (512, 1024), (512, 1024)),
    "crosscity": ("crosscity", "Train", "Test", (512, 1024), (512, 1024)),
    # Cityscapes-to-Cityscapes (seed 003): train cities split into two fixed groups.
    "cityscapes_group0": ("cityscapes", "train", "val", (512, 1024), (512, 1024)),
    "cityscapes_group1": ("cityscapes", "train", "val", (512, 1024), (512, 1024)),
    # The embedded toy domains (common/toy.py), same formats, about 1/8 of the real sizes.
    "toy_gta5": ("gta5", "lists/train.txt", "lists/val.txt", (72, 128), (72, 128)),
    "toy_synthia": ("synthia", "lists/train.txt", "lists/val.txt", (76, 128), (76, 128)),
    "toy_cityscapes": ("cityscapes", "train", "val", (64, 128), (64, 128)),
    "toy_crosscity": ("crosscity", "Train", "Test", (64, 128), (64, 128)),
}
TOY_ALIASES = {"source": "toy_gta5", "target": "toy_cityscapes"}
# The 18 Cityscapes train cities, alternately assigned to two groups (sorted order).
CITYSCAPES_TRAIN_CITIES = ["aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt",
                           "hamburg", "hanover", "jena", "krefeld", "monchengladbach", "strasbourg",
                           "stuttgart", "tubingen", "ulm", "weimar", "zurich"]
CITY_GROUPS = {"cityscapes_group0": CITYSCAPES_TRAIN_CITIES[0::2],
               "cityscapes_group1": CITYSCAPES_TRAIN_CITIES[1::2]}


def resolve_domain(name, root=None, role="source"):
    """(name, kind, root) for a --source/--target value. 'toy' means the toy GTA5-style source for
    role 'source' and the toy Cityscapes-style target for role 'target'; toy roots default to the
    generated cache (created on first use). Real datasets need their root."""
    if name == "toy":
        name = TOY_ALIASES[role]
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; expected toy or one of {sorted(DOMAINS)}")
    if name.startswith("toy_"):
        from .toy import ensure_toy
        root = Path(root) if root else ensure_toy() / name
    elif root is None:
        raise ValueError(f"--{role}-root is required for {name} (expected layout: {LAYOUTS[DOMAINS[name][0]]})")
    return name, DOMAINS[name][0], Path(root)


def train_set(name, root, num_classes, norm, transform, with_labels=True):
    """The training split of a domain (labelled or not), with a joint transform."""
    kind, split = DOMAINS[name][0], DOMAINS[name][1]
    return build_dataset(kind, root, split, num_classes, transform, norm, with_labels,
                         cities=CITY_GROUPS.get(name))


def eval_set(name, root, num_classes, norm, split=None):
    """An evaluation split: images resized to the domain's evaluation input size, labels kept at full
    resolution (the protocol of AdaptSegNet/ADVENT: predictions are upsampled to the label size)."""
    from .transforms import Compose, Resize
    kind, _, default_split, _, eval_hw = DOMAINS[name]
    split = split or default_split
    if split is None:
        raise ValueError(f"{name} has no evaluation split; evaluate on a target domain")
    return build_dataset(kind, root, split, num_classes, Compose([Resize(eval_hw, resize_label=False)]), norm)


# ----------------------------------------------------------------------------------------------
# Up-front check of a whole dataset (every script, before its run folder is touched)
# ----------------------------------------------------------------------------------------------
def png_size(path):
    """(H, W) from a PNG's header (24 bytes read), or None for another format."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 24:
        return None
    w, h = struct.unpack(">II", head[16:24])
    return h, w


def check_files(files, label=True):
    """Problems of a file list: a missing image or label, an image/label size mismatch (PNG headers)."""
    problems = []
    for img, lbl in files:
        if not Path(img).is_file():
            problems.append(f"image missing: {img}")
        elif label and lbl is not None and not Path(lbl).is_file():
            problems.append(f"label missing: {lbl} (for {img})")
        elif label and lbl is not None:
            a, b = png_size(img), png_size(lbl)
            if b is None and Path(lbl).suffix.lower() == ".png":
                problems.append(f"label {lbl} is not a PNG file")
            elif a is not None and b is not None and a != b:
                problems.append(f"size mismatch: image {img} is {a[0]}x{a[1]} but label {lbl} is {b[0]}x{b[1]}")
    return problems


_CHECKED = set()


def check_domain(name, root=None, role="source", num_classes=None):
    """Check a --source/--target dataset as a whole before training starts: its layout, and every file of
    the splits a script reads (source: the labelled train split; target: the train split, with its labels
    where the dataset ships them, and the labelled evaluation split). Raises DatasetLayoutError (layout)
    or DatasetError (missing labels, size mismatches: the first few named, with the count). Unknown domain
    names are left to the script."""
    if name != "toy" and name not in DOMAINS:
        return
    name, kind, root = resolve_domain(name, root, role)
    if (name, str(root), role) in _CHECKED:
        return
    _, train_split, eval_split, _, _ = DOMAINS[name]
    if kind == "crosscity" and num_classes not in (None, 13):
        raise DatasetError(f"{name} is labelled with 13 classes: use --num-classes 13 (got {num_classes})")
    nc = num_classes or (13 if kind == "crosscity" else 19)
    if role == "source":
        splits = [(train_split, True)]
    else:
        train_labels = not (kind == "cityscapes" and not (root / "gtFine" / train_split).is_dir()) \
            and kind != "crosscity"
        splits = [(train_split, train_labels)] + ([(eval_split, True)] if eval_split else [])
    for split, labelled in splits:
        ds = build_dataset(kind, root, split, nc, with_labels=labelled, cities=CITY_GROUPS.get(name))
        problems = check_files(ds.files, labelled)
        if problems:
            raise DatasetError(f"{role} dataset {name} at {root} (split {split}): {len(problems)} of {len(ds.files)} "
                               f"image/label pairs are unusable, e.g. " + "; ".join(problems[:3])
                               + f". Expected layout: {LAYOUTS[kind]}")
    _CHECKED.add((name, str(root), role))
