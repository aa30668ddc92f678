"""MADA / MADAv2: objective vectors, multi-anchor clustering, active selection, the soft anchor loss
and the anchor update. Every formula the scripts use is here, top to bottom.

Notation (MADA, ICCV'21, Sec. 3; MADAv2, TPAMI, Sec. 3.2-3.3):
  f        the 256-d decoder feature just before the final 1x1 classifier (1/4 input resolution)
  M_c      mask of class c at feature resolution: (label == c) AND (argmax logits == c);
           source: label = ground truth; target: label = the model's own argmax (so M_c = prediction)
  V_c      per-image objective vector of class c = mean of f over M_c; a class with < 10 pixels
           in M_c is "absent": its row stays zero (as upstream) and its count says so
  A_k      anchor k (k = 1..K), a [C, 256] matrix: a k-means centroid of the flattened V
  d(V, A)  mean squared difference over the 19x256 entries (Eq. 2); by default here only over the
           rows of V's present classes (absent='mask'); absent='zero' is upstream's all-rows mean
  MADA score   s(V) = min_k d(V, A^src_k)                                  (Eq. 3, "far" images)
  MADAv2 score s(V) = min_k d(V, A^src_k) + min_k d(V, A^tgt_k)            ("dual distance, far")
  Anchor loss  L = sum_k w_k d_k / sum_k w_k,  w_k = 1 / d_k,  d_k = d(V_t, A^tgt_k)      (Eq. 5)
  Anchor update  A_k* <- m A_k* + (1 - m) V_t,  k* = argmin_k d_k,  m = 0.999               (Eq. 6)
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ABSENT_CHOICES = ("mask", "zero")


# ------------------------------------------------------------------------------------------------
# Objective vectors
# ------------------------------------------------------------------------------------------------
def downsample_label(label, hw):
    """Nearest-neighbour resize of a (B, H, W) class-index label to the feature size (upstream)."""
    return F.interpolate(label[:, None].float(), size=tuple(hw), mode="nearest")[:, 0].long()


def objective_vectors(feat, logits, label, num_classes, min_pixels=10):
    """Per-image, per-class masked mean of the feature (MADA Sec. 3.2).

    feat (B, D, h, w), logits (B, C, h, w), label (B, h, w) at the feature resolution (255 = ignore).
    Returns V (B, C, D) float32 and counts (B, C) int64 = |M_c|; rows with counts < min_pixels are zero.
    """
    feat = feat.float()
    pred = logits.argmax(1)
    classes = torch.arange(num_classes, device=feat.device).view(1, -1, 1, 1)
    mask = ((label[:, None] == classes) & (pred[:, None] == classes)).float()       # (B, C, h, w)
    counts = mask.flatten(2).sum(-1)                                                 # (B, C)
    sums = torch.einsum("bchw,bdhw->bcd", mask, feat)
    keep = counts >= min_pixels
    vec = torch.where(keep[..., None], sums / counts.clamp(min=1)[..., None], torch.zeros_like(sums))
    return vec, counts.long()


# ------------------------------------------------------------------------------------------------
# Distances to anchors
# ------------------------------------------------------------------------------------------------
def anchor_distances(vec, present, anchors, absent="mask"):
    """d(V_n, A_k) for a batch (torch; differentiable in vec).

    vec (B, C, D), present (B, C) bool, anchors (K, C, D) -> (B, K).
    absent='mask': mean over the D entries of V's present rows only (an image with no present row
    falls back to all rows); absent='zero': mean over all C x D entries, absent rows being zero
    (upstream)."""
    if absent not in ABSENT_CHOICES:
        raise ValueError(f"absent must be one of {ABSENT_CHOICES}")
    anchors = anchors.to(vec.dtype)
    sq = ((vec[:, None] - anchors[None]) ** 2).mean(-1)                            # (B, K, C)
    if absent == "zero":
        return sq.mean(-1)
    w = present.to(vec.dtype)
    none = w.sum(-1) == 0
    w = torch.where(none[:, None], torch.ones_like(w), w)                          # fallback: all rows
    return (sq * w[:, None]).sum(-1) / w.sum(-1)[:, None]


def min_distances(vectors, counts, anchors, min_pixels=10, absent="mask", chunk=256):
    """min_k d(V_n, A_k) and argmin for every row of a (possibly memory-mapped) [N, C, D] array,
    read chunk by chunk (the whole array is never loaded). Returns (dist (N,) float64, idx (N,))."""
    a = torch.from_numpy(np.ascontiguousarray(anchors, dtype=np.float32))
    n = len(vectors)
    dist, idx = np.empty(n, np.float64), np.empty(n, np.int64)
    for s in range(0, n, chunk):
        v = torch.from_numpy(np.array(vectors[s:s + chunk], dtype=np.float32))
        p = torch.from_numpy(np.asarray(counts[s:s + chunk]) >= min_pixels)
        d = anchor_distances(v, p, a, absent)
        m = d.min(1)
        dist[s:s + chunk], idx[s:s + chunk] = m.values.double().numpy(), m.indices.numpy()
    return dist, idx


def selection_scores(vectors, counts, src_anchors, tgt_anchors=None, criterion="mada", min_pixels=10,
                     absent="mask"):
    """MADA: s = min_k d(V, A^src_k). MADAv2 ("dual distance, far"): s = min_k d(V, A^src_k) +
    min_k d(V, A^tgt_k). Larger = farther from the anchors = selected first."""
    s, _ = min_distances(vectors, counts, src_anchors, min_pixels, absent)
    if criterion == "madav2":
        if tgt_anchors is None:
            raise ValueError("criterion madav2 needs the target (warm-up) anchors")
        s = s + min_distances(vectors, counts, tgt_anchors, min_pixels, absent)[0]
    elif criterion != "mada":
        raise ValueError(f"unknown criterion {criterion!r}")
    return s


def budget_count(n, fraction, rounding="floor"):
    """Number of images for a budget fraction: MADA int(0.05 N) (148 of 2975), MADAv2 round (149)."""
    x = fraction * n
    k = int(np.floor(x + 1e-9)) if rounding == "floor" else int(np.floor(x + 0.5))
    return max(1, min(n, k))


def top_k(scores, k):
    """Indices of the k largest scores, ties broken by the lower index (deterministic); sorted."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return np.sort(order[:k])


# ------------------------------------------------------------------------------------------------
# Anchors: faiss k-means on the flattened objective vectors
# ------------------------------------------------------------------------------------------------
def kmeans_anchors(vectors, counts, k=10, niter=20, seed=0, max_points_per_centroid=256, min_pixels=10,
                   absent="mask", chunk=1024, verbose=False):
    """faiss k-means (k, niter) on V flattened to [N, C*D] (MADA Sec. 3.2; upstream faiss.Kmeans with
    its default max_points_per_centroid = 256, i.e. a seeded sample of k*256 vectors is clustered).

    Then every vector is assigned to its nearest centroid (chunked). absent='mask' re-estimates each
    anchor row as the mean of the cluster members in which that class is present (fallback: the mean
    over all images with the class; zero if never present), so absent (zero) rows do not pull anchors
    toward zero; absent='zero' keeps faiss's centroids (upstream).
    Returns anchors (K, C, D) float32, present (K, C) bool, assign (N,) int64, the faiss objective."""
    import faiss

    n, c, dim = vectors.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} vectors, got {n}")
    rng = np.random.default_rng(seed)
    m = min(n, k * max_points_per_centroid)
    sample = np.sort(rng.choice(n, m, replace=False)) if m < n else np.arange(n)
    x = np.ascontiguousarray(np.asarray(vectors[sample], dtype=np.float32).reshape(m, c * dim))
    km = faiss.Kmeans(c * dim, k, niter=niter, seed=int(seed), verbose=verbose,
                      max_points_per_centroid=max(max_points_per_centroid, -(-m // k)))
    km.train(x)
    cent = km.centroids.reshape(k, c, dim).astype(np.float32)
    obj = float(km.obj[-1]) if len(km.obj) else float("nan")
    del x
    # Assignment of every vector (the faiss L2 criterion on flattened vectors = the 'zero' distance).
    assign = np.empty(n, np.int64)
    ct = torch.from_numpy(cent.reshape(k, -1))
    sums = np.zeros((k, c, dim), np.float64)
    cnt = np.zeros((k, c), np.int64)
    gsum, gcnt = np.zeros((c, dim), np.float64), np.zeros(c, np.int64)
    for s in range(0, n, chunk):
        v = np.array(vectors[s:s + chunk], dtype=np.float32)
        a = torch.cdist(torch.from_numpy(v.reshape(len(v), -1)), ct).argmin(1).numpy()
        assign[s:s + chunk] = a
        if absent == "mask":
            p = np.asarray(counts[s:s + chunk]) >= min_pixels                          # (b, C)
            pv = v * p[..., None]                                                       # absent rows 0
            for j in np.unique(a):
                sums[j] += pv[a == j].sum(0, dtype=np.float64)
                cnt[j] += p[a == j].sum(0)
            gsum += pv.sum(0, dtype=np.float64)
            gcnt += p.sum(0)
    if absent == "zero":
        present = np.ones((k, c), bool)
        return cent, present, assign, obj
    glob = np.where(gcnt[:, None] > 0, gsum / np.maximum(gcnt, 1)[:, None], 0.0)
    anchors = np.where(cnt[..., None] > 0, sums / np.maximum(cnt, 1)[..., None], glob[None])
    return anchors.astype(np.float32), cnt > 0, assign, obj


# ------------------------------------------------------------------------------------------------
# Stage 2: soft anchor loss and the momentum update of the nearest anchor
# ------------------------------------------------------------------------------------------------
def soft_anchor_loss(d):
    """L = sum_k w_k d_k / sum_k w_k with w_k = 1 / d_k (MADA Eq. 5, as upstream's calculate_min_mse:
    the weights are not detached, so L = K / sum_k 1/d_k, a harmonic mean dominated by the nearest
    anchors). d (B, K) -> (B,)."""
    d = d.clamp(min=1e-12)
    w = 1.0 / d
    return (w * d).sum(-1) / w.sum(-1)


@torch.no_grad()
def update_nearest_anchor(anchors, vec, present, d, momentum=0.999, absent="mask"):
    """A_k* <- m A_k* + (1 - m) V for each image (in batch order), k* = argmin_k d_k (MADA Eq. 6).
    absent='mask' updates only the rows of V's present classes; 'zero' all rows (upstream, which
    pulls absent classes' rows toward zero). anchors (K, C, D) is updated in place."""
    nearest = d.argmin(1)
    for b in range(vec.shape[0]):
        k = int(nearest[b])
        rows = present[b] if absent == "mask" else torch.ones_like(present[b])
        if rows.any():
            anchors[k, rows] = momentum * anchors[k, rows] + (1 - momentum) * vec[b, rows].to(anchors.dtype)
    return nearest


def batch_anchor_loss(feat, logits, anchors, num_classes, min_pixels=10, absent="mask"):
    """Target objective vectors of the current model (pseudo-label = own argmax, feature resolution),
    their distances to the target anchors, and the soft anchor loss averaged over the images that have
    at least one present class. Returns (loss, vec, present, d)."""
    vec, counts = objective_vectors(feat, logits.detach(), logits.detach().argmax(1), num_classes, min_pixels)
    present = counts >= min_pixels
    d = anchor_distances(vec, present, anchors, absent)
    has = present.any(1) if absent == "mask" else torch.ones_like(present[:, 0])
    per_image = soft_anchor_loss(d)
    loss = per_image[has].mean() if has.any() else feat.float().sum() * 0
    return loss, vec.detach(), present, d.detach()


# ------------------------------------------------------------------------------------------------
# Files: features (.npy memmaps), anchors (.npz), the selected set (txt + json)
# ------------------------------------------------------------------------------------------------
def load_features(folder):
    """(vectors memmap [N, C, D], counts [N, C], meta dict) of a save_features.py output folder."""
    folder = Path(folder)
    for f in ("vectors.npy", "counts.npy", "meta.json"):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"features folder {folder} lacks {f}: run mada/save_features.py first "
                                    f"(expected vectors.npy, counts.npy, meta.json)")
    vec = np.load(folder / "vectors.npy", mmap_mode="r")
    counts = np.load(folder / "counts.npy")
    meta = json.loads((folder / "meta.json").read_text())
    if vec.ndim != 3 or counts.shape != vec.shape[:2]:
        raise ValueError(f"{folder}: vectors {vec.shape} and counts {counts.shape} do not match")
    return vec, counts, meta


def load_anchors(path):
    """(anchors (K, C, D) float32, present (K, C) bool) from cluster_anchors.py's anchors.npz."""
    path = Path(path)
    if path.is_dir():
        path = path / "anchors.npz"
    if not path.is_file():
        raise FileNotFoundError(f"anchors file not found: {path} (run mada/cluster_anchors.py first)")
    with np.load(path, allow_pickle=False) as z:
        return z["anchors"].astype(np.float32), z["present"].astype(bool)


def atomic_save_npz(path, **arrays):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def read_selection(path):
    """The selected image names (relative to the target root) from selected.json or selected.txt."""
    path = Path(path)
    if path.is_dir():
        path = path / "selected.json"
    if not path.is_file():
        raise FileNotFoundError(f"selection not found: {path} (run mada/select_active.py first)")
    if path.suffix == ".json":
        names = json.loads(path.read_text())["names"]
    else:
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise ValueError(f"selection {path} is empty")
    return names


class IndexedSubset(torch.utils.data.Dataset):
    """Items `indices` of a SegDataset, keeping the (index, seed) protocol of the training sampler."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        return self.dataset[(self.indices[i], seed) if seed is not None else self.indices[i]]


def subset_by_names(dataset, names, what="selection"):
    """IndexedSubset of the dataset items whose names are `names` (error naming the missing ones)."""
    index = {dataset.name(i): i for i in range(len(dataset))}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{what}: {len(missing)} names are not images of {dataset.root} "
                         f"(first: {missing[:3]}); was it made for another target dataset?")
    return IndexedSubset(dataset, [index[n] for n in names])


# ------------------------------------------------------------------------------------------------
# Data plumbing shared by the MADA scripts
# ------------------------------------------------------------------------------------------------
def train_transform(toy, crop_hw, flip=True):
    """MADA's augmentation on real data: width rescaled to 2200 x U(0.5, 1.5), random 512x896 crop,
    flip 0.5 (upstream 'rsize 2200, rcrop [896, 512], hflip 0.5'). Toy domains: resize to the domain's
    training size + flip (the images are already small)."""
    from common.transforms import Compose, RandomHFlip, RandomScaleCrop, Resize
    first = Resize(crop_hw) if toy else RandomScaleCrop((1100, 2200), crop_hw, (0.5, 1.5))
    return Compose([first] + ([RandomHFlip()] if flip else []))


def param_groups_sgd(model, lr, momentum, weight_decay, head_mult=1.0):
    """SGD over every parameter: backbone at lr, ASPP + decoder + classifier at head_mult x lr.
    MADA trains all parameters at one lr (head_mult 1, upstream BaseNet.parameters()); MADAv2's
    optim_parameters meant backbone 1x / heads 10x (it dropped the decoder: fixed here)."""
    backbone, heads = model.param_groups()
    groups = [{"params": [p for p in backbone if p.requires_grad], "lr": lr, "lr_mult": 1.0},
              {"params": [p for p in heads if p.requires_grad], "lr": head_mult * lr, "lr_mult": head_mult}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
