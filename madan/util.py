"""Plumbing of the MADAN scripts that is specific to several labelled sources: parsing
`--source a,b --source-root ra,rb`, the toy/paper default switch over all domains, the image-space
conversions between a segmenter's input normalisation and the generators' [-1, 1], and PNG grids."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import cli
from common.datasets import DOMAINS, resolve_domain
from common.transforms import IMAGENET_MEAN, IMAGENET_STD, CAFFE_BGR_MEAN

SOURCES_HELP = ("comma-separated labelled sources, e.g. toy_synthia,toy_gta5 or synthia,gta5 "
                "(MADAN's order: index 1 = SYNTHIA, 2 = GTA5)")


def split_list(text):
    return [t.strip() for t in str(text).split(",") if t.strip()] if text not in (None, "") else []


def sources_of(args):
    """[(name, kind, root)] for every --source entry (roots from --source-root, same order)."""
    names = split_list(args.source)
    roots = split_list(args.source_root)
    if roots and len(roots) != len(names):
        raise SystemExit(f"--source-root has {len(roots)} entries but --source has {len(names)}: give one root "
                         "per source, comma-separated, in the same order")
    return [resolve_domain(n, roots[i] if roots else None, "source") for i, n in enumerate(names)]


def fill_defaults(args, toy, paper):
    """The toy preset when every source and the target are toy domains, else the paper's; then the
    label space. Real data: 19 classes, as upstream trains every model (num_cls 19 in all its scripts) and
    reports the 16 common classes' IoUs / 16 (scripts/eval_fcn.py:118-131; test.py --protocol madan).
    Toy: 16 classes when a SYNTHIA-style source is involved (SYNTHIA's 16-class protocol), else 19."""
    names = split_list(args.source) + [args.target]
    is_toy = all(str(n).startswith("toy") for n in names)
    table = toy if is_toy else paper
    cli.fill_defaults(args, table, table)
    if args.num_classes is None:
        kinds = [DOMAINS.get(n if n != "toy" else "toy_gta5", ("",))[0] for n in split_list(args.source)]
        args.num_classes = 13 if "crosscity" in str(args.target) else 16 if (is_toy and "synthia" in kinds) else 19
    return table is toy


def norm_to_gan(x, norm):
    """Model-normalised image batch (common.transforms.to_tensor) -> RGB in [-1, 1] (the generators')."""
    if norm == "caffe":
        rgb = (x + torch.tensor(CAFFE_BGR_MEAN, device=x.device).view(1, 3, 1, 1)).flip(1) / 255.0
    else:
        rgb = x * torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) + \
            torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    return rgb * 2 - 1


def gan_to_norm(x, norm):
    """RGB in [-1, 1] -> the input normalisation a segmenter was trained with (differentiable). The
    DSC classifiers must see their own normalisation (upstream fed them the GAN's [-1, 1] input)."""
    rgb = (x.float() + 1) / 2
    if norm == "caffe":
        return rgb.flip(1) * 255.0 - torch.tensor(CAFFE_BGR_MEAN, device=x.device).view(1, 3, 1, 1)
    return (rgb - torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)


def gan_to_uint8(x):
    """One CHW image in [-1, 1] -> HxWx3 uint8."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


class ResizeShort:
    """Resize so that the SHORT side is `size`, keeping the aspect ratio (bicubic image, nearest label):
    upstream's 'scale_width_and_crop' is `transforms.Resize(loadSize)` with an int, which torchvision
    applies to the short side (cyclegan/data/base_dataset.py:33-35). GTA5 1914x1052 -> 910x500,
    SYNTHIA 1280x760 -> 842x500, Cityscapes 2048x1024 -> 1000x500: a 400x400 crop never needs padding."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img, lbl, rng):
        w, h = img.size
        if w <= h:
            nw, nh = self.size, int(self.size * h / w)
        else:
            nw, nh = int(self.size * w / h), self.size
        img = img.resize((nw, nh), Image.BICUBIC)
        return img, (lbl.resize((nw, nh), Image.NEAREST) if lbl is not None else None)

    def __repr__(self):
        return f"ResizeShort({self.size})"


def save_grid(rows, path, height=96, titles=None):
    """Save a grid PNG: each row a list of HxWx3 uint8 arrays, resized to a common height."""
    tiles = [[Image.fromarray(a).resize((max(1, round(a.shape[1] * height / a.shape[0])), height), Image.BICUBIC)
              for a in row] for row in rows]
    width = max(sum(t.width for t in row) + 4 * (len(row) - 1) for row in tiles)
    top = 14 if titles else 0
    grid = Image.new("RGB", (width, top + len(tiles) * (height + 4)), "white")
    if titles:
        from PIL import ImageDraw
        d = ImageDraw.Draw(grid)
        x = 0
        for t, tile in zip(titles, tiles[0]):
            d.text((x + 2, 1), t, fill="black")
            x += tile.width + 4
    for r, row in enumerate(tiles):
        x = 0
        for t in row:
            grid.paste(t, (x, top + r * (height + 4)))
            x += t.width + 4
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return np.asarray(grid)


def average_gradients(modules, world):
    """All-reduce (average) the gradients of `modules` across torchrun processes; a no-op for one process.
    Used instead of DDP where a network runs several times per step (generators, ADDA, MDAN)."""
    if world <= 1:
        return
    for m in modules:
        for q in m.parameters():
            if q.grad is not None:
                torch.distributed.all_reduce(q.grad)
                q.grad /= world
