"""A pre-trained ResNet-18 for the toy domains: the stand-in for the ImageNet initialisation every real
recipe starts from (issue 17).

Real recipes never train a segmenter from scratch: the backbone arrives knowing edges, textures and
shapes, and knowing that colour is an unreliable cue (ImageNet's objects come in every colour). A toy
model trained from scratch on one source domain learns colour shortcuts instead, and with the v3 toy
target (colours drawn per image and per object) even an oracle trained on the target's own labels
underfits at the toy budget. This file pre-trains a backbone ONCE, deterministically, on a separate
generated task, and caches it beside the toy data (like the toy domains themselves):

  the task: segment mosaics of random shapes (rectangles, ellipses, triangles, bands) by TEXTURE:
  each region gets one of the toy world's texture kinds (common/toy.py texture_pattern: noise, blobs,
  diagonal / horizontal / vertical stripes, window grid, checker, vertical gradient, flat) at a random
  period and contrast, in a uniformly random colour, under random per-image white balance, exposure,
  gamma, noise and blur. Label = texture kind, periodic kinds split into 2 period bins (14 labels).

It never sees a toy scene, a toy class, a layout or a domain's palette: what a class looks like, where
it is and what surrounds it is left to the segmentation training, as ImageNet leaves it on real data.
The head is dropped; the file holds torchvision ResNet-18 keys (`conv1.weight`, `layer1.0...`), so every
toy preset loads it with common.models.load_backbone_weights (`--init toy`).

    python -m common.toy_backbone               # pre-train (once, 25 min on 2 cores) and print where it is cached
    python -m common.toy_backbone --iters 300 --out /tmp/r18.pth   # an experiment, outside the cache
    python -m common.toy_backbone --device cuda # the same recipe with the network on a GPU (mosaics still drawn on the CPU)
(The texture accuracy on fresh mosaics and the final loss are written beside the cached file, as .json.)
"""
import argparse
import fcntl
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from .toy import texture_pattern, toy_root

KINDS = ("n", "b", "y", "f", "s", "h", "v", "g", "c")  # aperiodic first, then the 5 periodic kinds
PERIODS = (1.5, 10.0)  # texture periods, log-uniform (px at the stored 128x256; the toy classes' span)
PERIOD_BINS = (4.0,)  # periodic kinds: period < 4 px, >= 4 px
NUM_LABELS = 4 + 5 * (len(PERIOD_BINS) + 1)
SIZE = (128, 256)  # rendered at the toy domains' stored size ...
INPUT = (64, 128)  # ... and resized to the toy presets' input size, as the toy loaders do
# The recipe, fixed (a change means a new file name): SGD + poly, batch, iterations, seed.
RECIPE = dict(iters=1500, batch_size=16, lr=0.02, momentum=0.9, weight_decay=5e-4, seed=0)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def mosaic(rng):
    """One pre-training sample: (image float32 HxWx3 in 0..1 at INPUT, label int64 HxW at INPUT)."""
    H, W = SIZE
    n = int(rng.integers(6, 14))
    canvas = Image.new("I", (W, H), 0)  # region index per pixel, painted in layers
    draw = ImageDraw.Draw(canvas)
    y0 = 0
    for r in range(3):  # 2-3 horizontal background bands, like ground / facades / sky
        y1 = H if r == 2 else int(rng.uniform(y0 + H * 0.2, y0 + H * 0.5))
        draw.rectangle([0, y0, W, y1], fill=r)
        y0 = y1
        if y0 >= H:
            break
    for r in range(3, 3 + n):  # then random shapes of random size
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        w, h = W * rng.uniform(0.05, 0.4), H * rng.uniform(0.08, 0.6)
        shape = rng.integers(3)
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        if shape == 0:
            draw.rectangle(box, fill=r)
        elif shape == 1:
            draw.ellipse(box, fill=r)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (cx + rng.uniform(-w, w) / 2, box[1])], fill=r)
    reg = np.asarray(canvas, np.int64)
    m = 3 + n
    kind_i = rng.integers(len(KINDS), size=m)
    period = np.exp(rng.uniform(math.log(PERIODS[0]), math.log(PERIODS[1]), m))
    amp = rng.uniform(0.15, 0.5, m)
    col = rng.uniform(0.05, 0.95, (m, 3)).astype(np.float32)
    label = np.where(kind_i < 4, kind_i, 4 + (kind_i - 4) * (len(PERIOD_BINS) + 1) + np.digitize(period, PERIOD_BINS))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ox, oy = rng.uniform(0, 16, m), rng.uniform(0, 16, m)
    kinds = np.array(KINDS)[kind_i]
    pat = texture_pattern(kinds[reg], period[reg].astype(np.float32), xx + ox[reg], yy + oy[reg], yy, rng)
    img = col[reg] * (1 + (amp[reg] * pat)[..., None])
    img = img * np.exp(rng.normal(0, 0.25, 3)).astype(np.float32)  # white balance
    img = img @ (np.eye(3) + rng.normal(0, 0.15, (3, 3))).T.astype(np.float32)  # colour mix
    img = img * np.exp(rng.normal(0, 0.35))  # exposure
    img = img.clip(0, 1) ** np.exp(rng.normal(0, 0.25))  # gamma
    img = img + rng.normal(0, rng.uniform(0, 0.06), img.shape)  # sensor noise
    out = Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    out = out.resize(INPUT[::-1], Image.BILINEAR)
    lab = Image.fromarray(label[reg].astype(np.uint8)).resize(INPUT[::-1], Image.NEAREST)
    return np.asarray(out, np.float32) / 255, np.asarray(lab, np.int64)


def batch(rng, n):
    """n mosaics as a normalised (n, 3, h, w) float tensor and an (n, h, w) label tensor."""
    imgs, labs = zip(*(mosaic(rng) for _ in range(n)))
    x = (np.stack(imgs) - MEAN) / STD
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.stack(labs))


class _Net(nn.Module):
    """ResNet-18 at output stride 8 (as the toy presets' DeepLabV2 runs it) + a 1x1 texture head."""

    def __init__(self):
        super().__init__()
        from .models import resnet_backbone
        self.backbone = resnet_backbone("resnet18", output_stride=8)
        self.head = nn.Conv2d(512, NUM_LABELS, 1)

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.head(x)


def pretrain(iters=None, batch_size=None, seed=None, log_every=100, device="cpu"):
    """Train the backbone on the texture-mosaic task; returns (backbone state dict, stats, the whole net). The
    mosaics are drawn on the CPU either way; device="cuda" runs the network there (same recipe, other rounding)."""
    r = dict(RECIPE, **{k: v for k, v in dict(iters=iters, batch_size=batch_size, seed=seed).items() if v})
    torch.manual_seed(r["seed"])
    rng = np.random.default_rng([r["seed"], 17])
    net = _Net().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
    t0, ema = time.time(), None
    for it in range(r["iters"]):
        for g in opt.param_groups:
            g["lr"] = r["lr"] * (1 - it / r["iters"]) ** 0.9
        x, y = (t.to(device) for t in batch(rng, r["batch_size"]))
        logits = F.interpolate(net(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if log_every and (it + 1) % log_every == 0:
            print(f"[toy backbone] iter {it + 1}/{r['iters']} loss {ema:.3f} ({time.time() - t0:.0f} s)", flush=True)
    net = net.cpu()
    stats = dict(r, loss=ema, wall_s=round(time.time() - t0, 1), accuracy=accuracy(net), device=str(device))
    return {k: v.clone() for k, v in net.backbone.state_dict().items()}, stats, net


@torch.no_grad()
def accuracy(net, n=64, seed=12345):
    """Pixel accuracy of the texture head on n fresh mosaics (a check that pre-training learned)."""
    net.eval()
    x, y = batch(np.random.default_rng([seed]), n)
    pred = F.interpolate(net(x), size=y.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
    net.train()
    return round(float((pred == y).float().mean()), 4)


def backbone_path(root=None):
    return toy_root(root).parent / "toy_backbone" / "resnet18_textures_v1.pth"


def ensure_toy_backbone(root=None, device="cpu"):
    """The cached pre-trained ResNet-18 (torchvision keys), trained on first use (25 min on 2 idle cores);
    safe to call from several processes at once (file lock)."""
    path = backbone_path(root)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        print(f"[toy backbone] pre-training the toy ResNet-18 once into {path} (texture mosaics, "
              f"{RECIPE['iters']} iterations)", flush=True)
        sd, stats, _ = pretrain(device=device)
        tmp = path.with_suffix(".tmp")
        torch.save(sd, tmp)
        (path.parent / (path.stem + ".json")).write_text(json.dumps(stats, indent=1))
        os.replace(tmp, path)
        print(f"[toy backbone] done: texture accuracy {stats['accuracy']:.3f}, {stats['wall_s']:.0f} s", flush=True)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=None, help="pre-train this many iterations into --out instead "
                   "of the cache (experiments)")
    p.add_argument("--out", default=None, help="where --iters writes the backbone state dict")
    p.add_argument("--device", default="cpu", help="where the network trains (cpu, the published tables' "
                   "backbone; cuda: the same recipe in a minute or so, other rounding: the .json beside the file "
                   "records the device)")
    a = p.parse_args()
    if a.iters or a.out:
        sd, stats, _ = pretrain(iters=a.iters, device=a.device)
        if a.out:
            torch.save(sd, a.out)
        print(json.dumps(stats))
    else:
        print(ensure_toy_backbone(device=a.device))
