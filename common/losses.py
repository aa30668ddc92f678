"""Losses that several methods share: CE with ignore, OHEM CE, entropy (self-information) map.
All are computed in fp32 whatever the autocast dtype (softmax statistics need the precision)."""
import math

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX


def cross_entropy(logits, label, weight=None):
    """Pixel-wise CE, ignore index 255, mean over labelled pixels (0 if none)."""
    if (label != IGNORE_INDEX).sum() == 0:
        return logits.float().sum() * 0
    return F.cross_entropy(logits.float(), label, weight=weight, ignore_index=IGNORE_INDEX)


def ohem_cross_entropy(logits, label, thresh=0.7, min_kept=100000, weight=None):
    """Online hard example mining CE (PSPNet/AEL style): keep pixels whose probability of the true
    class is below `thresh`, but at least the `min_kept` hardest ones; mean over kept pixels."""
    logits = logits.float()
    loss = F.cross_entropy(logits, label, weight=weight, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    valid = (label != IGNORE_INDEX).flatten()
    if valid.sum() == 0:
        return logits.sum() * 0
    with torch.no_grad():
        prob = F.softmax(logits, 1).gather(1, label.clamp(max=logits.shape[1] - 1).unsqueeze(1)).flatten()
        prob = torch.where(valid, prob, torch.ones_like(prob))
        k = min(int(min_kept), int(valid.sum())) - 1
        thr = thresh
        if k >= 0:
            kth = prob.kthvalue(k + 1).values  # k-th smallest probability
            thr = max(thresh, float(kth))
        keep = valid & (prob <= thr)
    return loss[keep].mean() if keep.any() else loss[valid].mean()


def self_information(prob):
    """ADVENT's weighted self-information map I = -p log2(p + 1e-30) / log2(C), per channel (B,C,H,W)."""
    prob = prob.float()
    c = prob.shape[1]
    return -prob * torch.log2(prob + 1e-30) / math.log2(c)


def entropy_map(logits):
    """Normalised per-pixel entropy in [0, 1] (B,H,W) from logits, in fp32."""
    return self_information(F.softmax(logits.float(), 1)).sum(1)
