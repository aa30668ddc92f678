"""The evaluation loop shared by every test.py and by the in-training validation, and what it writes
besides the numbers (PredictionOutputs): colour PNGs, the picture grid (common/pictures.py) and, for the
official Cityscapes evaluation or the benchmark server, single-channel label-id PNGs of every image."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import labels as L
from .datasets import eval_batches
from .metrics import ConfusionMatrix
from .pictures import prediction_grid
from .runtime import autocast, barrier, to_device, unwrap
from .transforms import denormalize


def label_id_name(name):
    """File name of an image's label-id prediction: the image's stem without `_leftImg8bit`, then
    `_pred_labelIds.png`: Cityscapes `CITY_SEQ_FRAME_pred_labelIds.png`, which cityscapesscripts matches to
    `CITY_SEQ_FRAME_gtFine_labelIds.png` (pattern `CITY_SEQ_FRAME*.png`); CrossCity `pano_XXXXX_pred_labelIds.png`."""
    stem = Path(name).stem
    if stem.endswith("_leftImg8bit"):
        stem = stem[: -len("_leftImg8bit")]
    return f"{stem}_pred_labelIds.png"


class PredictionOutputs:
    """The files an evaluation writes besides its numbers, fed one image at a time (`add`), finished by
    `close`:
      save_dir:     colour PNGs (train-id palette) of the first n_save images (rank 0), and grid.png: input |
                    ground truth | prediction | errors of the first n_grid images, with the class legend;
      label_id_dir: EVERY image (each rank its shard) as a single-channel 8-bit PNG at the label's full
                    resolution, classes encoded as Cityscapes label ids (labels.label_id_lut), named by
                    label_id_name. The folder must be new or empty: stale files would be matched too."""

    def __init__(self, dataset, num_classes, save_dir=None, n_save=8, label_id_dir=None, n_grid=4, rank=0,
                 world_size=1):
        self.k, self.norm = num_classes, getattr(dataset, "norm", "imagenet")
        self.save_dir = Path(save_dir) if save_dir is not None and rank == 0 else None
        self.label_id_dir = Path(label_id_dir) if label_id_dir is not None else None
        self.n_save, self.n_grid, self.saved, self.rows = n_save, n_grid, 0, []
        self.lut = L.label_id_lut(num_classes)
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        if self.label_id_dir is not None:
            if rank == 0:
                d = self.label_id_dir
                if d.exists() and (not d.is_dir() or any(d.iterdir())):
                    raise SystemExit(f"--save-label-ids {d}: expected a new or empty folder (earlier predictions "
                                     f"there would be matched to the ground truth too)")
                d.mkdir(parents=True, exist_ok=True)
            if world_size > 1:
                barrier()

    def add(self, batch, pred, label):
        """batch: the loader's dict (B images); pred, label: (B, H, W) class indices at the label's size."""
        for b, name in enumerate(batch["name"]):
            self._add_one(name, batch["image"][b], pred[b], label[b])

    def _add_one(self, name, image, pred, label):
        p = None
        if self.label_id_dir is not None:
            p = pred.cpu().numpy().astype(np.uint8)
            Image.fromarray(self.lut[p], "L").save(self.label_id_dir / label_id_name(name))
        if self.save_dir is None:
            return
        if self.saved < self.n_save or len(self.rows) < self.n_grid:
            p = pred.cpu().numpy().astype(np.uint8) if p is None else p
        if self.saved < self.n_save:
            Image.fromarray(L.colorize(p, self.k)).save(self.save_dir / f"{Path(name).stem}_pred.png")
            self.saved += 1
        if len(self.rows) < self.n_grid:
            self.rows.append({"name": Path(name).stem, "image": denormalize(image, self.norm),
                              "label": label.cpu().numpy().astype(np.uint8), "pred": p})

    def close(self):
        if self.save_dir is not None and self.rows:
            prediction_grid(self.rows, self.k, self.save_dir / "grid.png")


@torch.no_grad()
def predict_logits(model, x, out_hw, amp=None, flip=False):
    """Main-head logits upsampled (bilinear, align_corners=True) to out_hw, as fp32 probabilities'
    log-domain stand-in: with flip=True, softmax probabilities of the image and of its mirror are
    averaged (MaxSquare's flip TTA) and their log is returned."""
    with autocast(x.device, amp):
        out = model(x)["out"]
    logits = F.interpolate(out.float(), size=out_hw, mode="bilinear", align_corners=True)
    if not flip:
        return logits
    with autocast(x.device, amp):
        out_f = model(x.flip(-1))["out"]
    logits_f = F.interpolate(out_f.float(), size=out_hw, mode="bilinear", align_corners=True).flip(-1)
    return torch.log((F.softmax(logits, 1) + F.softmax(logits_f, 1)) / 2)


@torch.no_grad()
def evaluate(model, dataset, num_classes, device, amp=None, flip=False, save_dir=None, n_save=8,
             rank=0, world_size=1, workers=2, ensemble=None, label_id_dir=None, n_grid=4):
    """mIoU of `model` on `dataset` (labels at full resolution). Runs in eval mode, restores the
    previous mode. With save_dir: colour PNGs of the first n_save predictions and grid.png (input | ground
    truth | prediction | errors of the first n_grid images, legend); with label_id_dir: every prediction as
    a Cityscapes label-id PNG (PredictionOutputs).
    ensemble: optional second model whose logits are averaged 0.5/0.5 with the first (ADVENT).
    Besides the IoUs, the summary's "confidence" holds, over labelled pixels: the mean prediction entropy
    normalised by log C, the share predicted with max probability > 0.9, and the share of those that are
    wrong (what entropy minimisation and self-training act on)."""
    models = [unwrap(model)] + ([unwrap(ensemble)] if ensemble is not None else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    conf = ConfusionMatrix(num_classes, device)
    outs = PredictionOutputs(dataset, num_classes, save_dir, n_save, label_id_dir, n_grid, rank, world_size)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # entropy sum, pixels, confident, confident wrong
    for batch in eval_batches(dataset, workers, rank, world_size):  # 8 toy images / 1 real image per pass
        x = to_device(batch["image"], device, amp)
        y = batch["label"].to(device)
        logits = sum(predict_logits(m, x, y.shape[-2:], amp, flip) for m in models) / len(models)
        pred = logits.argmax(1)
        conf.update(pred, y)
        p = F.softmax(logits, 1)
        valid = y != 255
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1) / np.log(num_classes)
        confident = (p.max(1).values > 0.9) & valid
        stats += torch.stack([ent[valid].double().sum(), valid.sum().double(), confident.sum().double(),
                              (confident & (pred != y)).sum().double()])
        outs.add(batch, pred, y)
    outs.close()
    for m, was in zip(models, modes):
        m.train(was)
    if world_size > 1:
        torch.distributed.all_reduce(stats)
    res = (conf.all_reduce() if world_size > 1 else conf).summary()
    e, n, c, cw = stats.tolist()
    res["confidence"] = {"mean_entropy": e / max(n, 1), "confident_share": c / max(n, 1),
                         "confident_wrong_share": cw / max(c, 1)}
    return res


@torch.no_grad()
def adabn(model, data, device, amp=None, max_images=0, batch_size=8, workers=2, seed=0):
    """AdaBN (Li et al., ICLR-W 2017, "Revisiting batch normalization for practical domain adaptation"): every
    BN layer's running mean/var replaced by its cumulative average over target images (`data` yields dicts with
    "image"); weights untouched; the model is left in eval mode. Returns the number of images used. The control
    every method that forwards target batches in train mode should be compared with."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise SystemExit("--adabn: the model has no BatchNorm layers (FCN8s-VGG16, for one, has none)")
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average (exact mean over the batches seen)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g).tolist()
    if max_images:
        order = order[:max_images]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, order), batch_size=batch_size,
                                         num_workers=workers, drop_last=len(order) > batch_size,
                                         generator=torch.Generator())  # not a draw from the global RNG
    model.train()
    for batch in loader:
        with autocast(device, amp):
            model(to_device(batch["image"], device, amp))
    model.eval()
    return len(order)


def adabn_on_domain(model, name, root, num_classes, norm, device, amp=None, max_images=0, workers=2, world_size=1):
    """`adabn` on the unlabelled train split of domain `name` (images resized to its training size), as
    `test.py --adabn` runs it. One process only: the statistics are not all-reduced."""
    from .datasets import DOMAINS, train_set
    from .transforms import Compose, Resize
    if world_size > 1:
        raise SystemExit("--adabn runs in one process (the statistics are not all-reduced); drop torchrun")
    data = train_set(name, root, num_classes, norm, Compose([Resize(DOMAINS[name][3])]), with_labels=False)
    return adabn(model, data, device, amp, max_images, workers=workers)
