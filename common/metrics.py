"""Confusion-matrix mIoU with 19/16/13-class reporting (MaxSquare's utils/eval.py protocol)."""
import numpy as np
import torch
import torch.distributed as dist

from . import labels as L


class ConfusionMatrix:
    """Accumulates a KxK confusion matrix (rows = ground truth, cols = prediction); ignore = 255."""

    def __init__(self, num_classes, device="cpu"):
        self.k = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred, label):
        keep = label != L.IGNORE_INDEX
        idx = label[keep].long() * self.k + pred[keep].long()
        self.mat += torch.bincount(idx, minlength=self.k * self.k).view(self.k, self.k).to(self.mat.device)

    def all_reduce(self):
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)
        return self

    def iou(self):
        """Per-class IoU as a numpy array; NaN for a class absent from both labels and predictions."""
        m = self.mat.double().cpu().numpy()
        tp = np.diag(m)
        denom = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def pixel_acc(self):
        m = self.mat.double()
        return float(m.diag().sum() / m.sum().clamp(min=1))

    def summary(self):
        """{'mIoU': ..., ('mIoU16', 'mIoU13'|'mIoU13'): ..., 'per_class': {name: IoU}} in percent.
        19 classes -> mIoU (19); 16 -> mIoU16 and mIoU13 (mIoU*); 13 -> mIoU13. nanmean over classes."""
        iou = self.iou() * 100
        names = L.class_names(self.k)
        out = {"mIoU": float(np.nanmean(iou)), "pixel_acc": 100 * self.pixel_acc(),
               "per_class": {n: (None if np.isnan(v) else round(float(v), 2)) for n, v in zip(names, iou)}}
        if self.k == 16:
            out["mIoU16"] = out["mIoU"]
            out["mIoU13"] = float(np.nanmean(iou[L.INDEX_13_IN_16]))
        if self.k == 13:
            out["mIoU13"] = out["mIoU"]
        return out


def format_table(summary):
    """Per-class IoU table as Markdown."""
    rows = ["| class | IoU |", "|---|---|"]
    rows += [f"| {n} | {'-' if v is None else f'{v:.2f}'} |" for n, v in summary["per_class"].items()]
    for k in ("mIoU", "mIoU16", "mIoU13"):
        if k in summary:
            rows.append(f"| **{k}** | **{summary[k]:.2f}** |")
    return "\n".join(rows)
