"""Data plumbing specific to SS-ADA/TUFL: a view of a dataset restricted to some images (the labeled
or unlabeled pool), UniMatch's unlabeled sample (weak view, two strong views, CutMix boxes) and the
CutMix partner split.

UniMatch's strong view (dataset/semi.py): ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale
p 0.2, Gaussian blur sigma U(0.1, 2) with p 0.5; CutMix box with p 0.5, area U(0.02, 0.4) of the crop,
aspect ratio U(0.3, 1/0.3). Every random draw comes from the sample's rng (seed, epoch, index), so a
resumed run sees the same views.
"""
import numpy as np
import torch
from PIL import Image

from common.datasets import read_image
from common.transforms import ColorJitter, GaussianBlur, RandomCrop, to_tensor


class Pool(torch.utils.data.Dataset):
    """`dataset` restricted to `indices` (list of dataset indices); accepts the (index, seed) items of
    common.datasets.infinite_loader."""

    def __init__(self, dataset, indices):
        if len(indices) == 0:
            raise ValueError("empty image pool")
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        return self.dataset[(self.indices[i], seed) if seed is not None else self.indices[i]]


def grayscale(img, rng, p=0.2):
    return img.convert("L").convert("RGB") if rng.random() < p else img


def cutmix_box(h, w, rng, p=0.5, size=(0.02, 0.4), ratio=(0.3, 1 / 0.3)):
    """A (H, W) 0/1 mask with one rectangle (upstream's obtain_cutmix_box, for any H x W crop: upstream
    assumes a square crop)."""
    box = torch.zeros(h, w)
    if rng.random() > p:
        return box
    area = rng.uniform(*size) * h * w
    for _ in range(100):
        r = rng.uniform(*ratio)  # h / w
        bw, bh = int(np.sqrt(area / r)), int(np.sqrt(area * r))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if x + bw <= w and y + bh <= h:
            box[y:y + bh, x:x + bw] = 1
            break
    return box


class UnlabeledViews(torch.utils.data.Dataset):
    """Unlabeled target sample: weak view (scale-crop-flip `geometric`), two strong views, the padding
    mask (255 where the crop left the image) and two CutMix boxes."""

    def __init__(self, files, geometric, norm, strong=True):
        self.files, self.geometric, self.norm, self.strong = list(files), geometric, norm, strong
        self.jitter = ColorJitter(0.5, 0.5, 0.5, 0.25, p=0.8)
        self.blur = GaussianBlur(p=0.5, radius=(0.1, 2.0))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        rng = np.random.default_rng([i] if seed is None else [seed, i])
        img = read_image(self.files[i])
        pad = Image.fromarray(np.zeros((img.height, img.width), np.uint8), "L")
        img, pad = self.geometric(img, pad, rng)
        out = {"image": to_tensor(img, self.norm), "index": i,
               "ignore": torch.from_numpy(np.asarray(pad, dtype=np.int64).copy())}
        if self.strong:
            for k in ("s1", "s2"):
                s, _ = self.jitter(img, None, rng)
                s, _ = self.blur(grayscale(s, rng), None, rng)
                out[k] = to_tensor(s, self.norm)
                out["box" + k[1]] = cutmix_box(img.height, img.width, rng)
        return out


class LongSideScaleCrop:
    """SS-ADA's geometric training transform (dataset/transform.py:92-105 resize, :38-52 crop_h_w): the
    long side of the image is scaled to U(lo, hi) x its own size (aspect kept; `base_hw` replaces the
    image's own size when given: the toy preset), then a random (h, w) crop, padded (image 0, label 255)."""

    def __init__(self, crop_hw, scale=(0.5, 2.0), base_hw=None):
        self.crop_hw, self.scale, self.base_hw = tuple(crop_hw), tuple(scale), base_hw

    def __call__(self, img, lbl, rng):
        h0, w0 = self.base_hw or (img.height, img.width)
        s = rng.uniform(*self.scale)
        h, w = max(1, int(h0 * s + 0.5)), max(1, int(w0 * s + 0.5))
        img = img.resize((w, h), Image.BILINEAR)
        lbl = lbl.resize((w, h), Image.NEAREST) if lbl is not None else None
        return RandomCrop(self.crop_hw)(img, lbl, rng)

    def __repr__(self):
        return f"LongSideScaleCrop(crop={self.crop_hw}, scale={self.scale}, base={self.base_hw or 'image'})"


class ScaleChoice:
    """TUFL's RandomScale (datasets/transform.py:48-60): one factor drawn from a list, both sides scaled."""

    def __init__(self, scales=(0.75, 1.0, 1.25, 1.5)):
        self.scales = tuple(scales)

    def __call__(self, img, lbl, rng):
        s = self.scales[int(rng.integers(len(self.scales)))]
        w, h = int(img.width * s), int(img.height * s)
        img = img.resize((w, h), Image.BILINEAR)
        return img, (lbl.resize((w, h), Image.NEAREST) if lbl is not None else None)

    def __repr__(self):
        return f"ScaleChoice{self.scales}"


def split_partner(batch):
    """The unlabeled loader draws 2B distinct images per step: the first B are trained on, the last B
    are their CutMix partners (image b is mixed with image B + b, never with itself). With an odd
    batch (a pool too small for 2B), the partner of b is b + 1 (mod B)."""
    n = batch["image"].shape[0]
    half = n // 2
    if n >= 2 and n % 2 == 0:
        own, mix = list(range(half)), list(range(half, n))
    else:
        own, mix = list(range(n)), [(b + 1) % n for b in range(n)]
    take = lambda idx: {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
    return take(own), take(mix)
