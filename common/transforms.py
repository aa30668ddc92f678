"""Joint image/label transforms and input normalisation.

Every random transform draws from the `rng` (a numpy Generator) it is handed, so that an augmented
sample is a pure function of (seed, epoch, index): resumed and distributed runs see the same data.
Images are PIL RGB; labels are PIL 'L' images of class indices (255 = ignore), already mapped.
"""
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

# Input normalisation. It must match how the backbone's initial weights were trained; never mix.
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)  # DeepLab caffe-converted weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision weights
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("caffe", "imagenet", "unit")


def to_tensor(img, norm):
    """PIL RGB -> float CHW tensor. 'caffe': BGR, 0..255, minus the BGR mean, no std (DeepLab/caffe
    weights). 'imagenet': RGB, 0..1, minus mean, divided by std (torchvision weights). 'unit': RGB / 255, no mean,
    no std (MADA's and MADAv2's released models: their data/cityscapes_dataset.py, mean 0, img_norm)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    if norm == "caffe":
        x = x.flip(0) - torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)
    elif norm == "imagenet":
        x = (x / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    elif norm == "unit":
        x = x / 255.0
    else:
        raise ValueError(f"input norm must be one of {INPUT_NORMS}, got {norm!r}")
    return x


def denormalize(x, norm):
    """Inverse of to_tensor for one CHW tensor -> HxWx3 uint8 array (for pictures)."""
    x = x.detach().float().cpu()
    if norm == "caffe":
        x = (x + torch.tensor(CAFFE_BGR_MEAN).view(3, 1, 1)).flip(0)
    elif norm == "unit":
        x = x * 255
    else:
        x = (x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
    return x.clamp(0, 255).byte().permute(1, 2, 0).numpy()


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img, lbl, rng):
        for t in self.transforms:
            img, lbl = t(img, lbl, rng)
        return img, lbl

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class Resize:
    """Resize to (H, W): bicubic image (as AdaptSegNet/ADVENT/MaxSquare) or, with interp="bilinear", bilinear
    (MADA's dataset resize, D2ADA's ExtResize); nearest label."""

    def __init__(self, size_hw, resize_label=True, interp="bicubic"):
        self.size_hw, self.resize_label = tuple(size_hw), resize_label
        self.interp = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interp]
        self.interp_name = interp

    def __call__(self, img, lbl, rng):
        h, w = self.size_hw
        img = img.resize((w, h), self.interp)
        if lbl is not None and self.resize_label:
            lbl = lbl.resize((w, h), Image.NEAREST)
        return img, lbl

    def __repr__(self):
        return f"Resize{self.size_hw}" + ("" if self.interp_name == "bicubic" else f"[{self.interp_name}]")


class RandomScaleCrop:
    """Scale by s ~ U(lo, hi) relative to base size (H, W), then a random crop of (h, w); regions
    outside the image are padded (image 0, label ignore)."""

    def __init__(self, base_hw, crop_hw, scale=(0.5, 1.5)):
        self.base_hw, self.crop_hw, self.scale = tuple(base_hw), tuple(crop_hw), tuple(scale)

    def __call__(self, img, lbl, rng):
        s = rng.uniform(*self.scale)
        h, w = int(round(self.base_hw[0] * s)), int(round(self.base_hw[1] * s))
        img = img.resize((w, h), Image.BICUBIC)
        lbl = lbl.resize((w, h), Image.NEAREST) if lbl is not None else None
        ch, cw = self.crop_hw
        y0 = int(rng.integers(0, max(h - ch, 0) + 1))
        x0 = int(rng.integers(0, max(w - cw, 0) + 1))
        img = _crop_pad(img, x0, y0, cw, ch, 0)
        lbl = _crop_pad(lbl, x0, y0, cw, ch, 255) if lbl is not None else None
        return img, lbl

    def __repr__(self):
        return f"RandomScaleCrop(base={self.base_hw}, crop={self.crop_hw}, scale={self.scale})"


def _crop_pad(im, x0, y0, cw, ch, fill):
    out = Image.new(im.mode, (cw, ch), fill if im.mode == "L" else (fill,) * len(im.getbands()))
    out.paste(im.crop((x0, y0, min(x0 + cw, im.width), min(y0 + ch, im.height))), (0, 0))
    return out


class RandomCrop:
    """Random crop of (h, w) without rescaling (padded if the image is smaller)."""

    def __init__(self, crop_hw):
        self.crop_hw = tuple(crop_hw)

    def __call__(self, img, lbl, rng):
        ch, cw = self.crop_hw
        y0 = int(rng.integers(0, max(img.height - ch, 0) + 1))
        x0 = int(rng.integers(0, max(img.width - cw, 0) + 1))
        img = _crop_pad(img, x0, y0, cw, ch, 0)
        return img, (_crop_pad(lbl, x0, y0, cw, ch, 255) if lbl is not None else None)

    def __repr__(self):
        return f"RandomCrop{self.crop_hw}"


class RandomHFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, lbl, rng):
        if rng.random() < self.p:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            lbl = lbl.transpose(Image.FLIP_LEFT_RIGHT) if lbl is not None else None
        return img, lbl

    def __repr__(self):
        return f"RandomHFlip({self.p})"


class ColorJitter:
    """Brightness/contrast/saturation factors ~ U(1-x, 1+x), hue shift ~ U(-h, h), with probability p.
    Image only."""

    def __init__(self, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, p=1.0):
        self.b, self.c, self.s, self.h, self.p = brightness, contrast, saturation, hue, p

    def __call__(self, img, lbl, rng):
        if rng.random() >= self.p:
            return img, lbl
        for enh, x in ((ImageEnhance.Brightness, self.b), (ImageEnhance.Contrast, self.c),
                       (ImageEnhance.Color, self.s)):
            if x > 0:
                img = enh(img).enhance(rng.uniform(max(0.0, 1 - x), 1 + x))
        if self.h > 0:
            hsv = np.array(img.convert("HSV"))
            shift = int(round(rng.uniform(-self.h, self.h) * 255))
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
            img = Image.fromarray(hsv, "HSV").convert("RGB")
        return img, lbl

    def __repr__(self):
        return f"ColorJitter({self.b}, {self.c}, {self.s}, {self.h}, p={self.p})"


class GaussianBlur:
    """Gaussian blur with radius ~ U(lo, hi), with probability p (MaxSquare: p 0.5, radius U(0, 1))."""

    def __init__(self, p=0.5, radius=(0.0, 1.0)):
        self.p, self.radius = p, tuple(radius)

    def __call__(self, img, lbl, rng):
        if rng.random() < self.p:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.radius)))
        return img, lbl

    def __repr__(self):
        return f"GaussianBlur(p={self.p}, radius={self.radius})"
