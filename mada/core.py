"""MADA / MADAv2: objective vectors, multi-anchor clustering, active selection, the soft anchor loss
and the anchor update. Every formula the scripts use is here, top to bottom.

Notation (MADA, ICCV'21, Sec. 3; MADAv2, TPAMI, Sec. 3.2-3.3):
  f        the 256-d decoder feature just before the final 1x1 classifier (1/4 input resolution)
  M_c      mask of class c at feature resolution: (label == c) AND (argmax logits == c);
           source: label = ground truth; target: label = the model's own argmax (so M_c = prediction)
  V_c      per-image objective vector of class c = mean of f over M_c; a class with < 10 pixels
           in M_c is "absent": its row stays zero (as upstream) and its count says so
  A_k      anchor k (k = 1..K), a [C, 256] matrix: a k-means centroid of the flattened V
  d(V, A)  mean squared difference over the 19x256 entries (Eq. 2), absent rows being zero
           (absent='zero', upstream, the default); absent='mask' (ablation) averages over V's present rows
  MADA score   s(V) = min_k d(V, A^src_k)                                  (Eq. 3, "far" images)
  MADAv2 score s(V) = min_k d(V, A^src_k) + min_k d(V, A^tgt_k)            ("dual distance, far")
  Anchor loss  L = sum_k w_k d_k / sum_k w_k,  w_k = 1 / d_k,  d_k = d(V_t, A^tgt_k)      (Eq. 5)
  Anchor update  A_k* <- m A_k* + (1 - m) V_t,  k* = argmin_k d_k,  m = 0.999               (Eq. 6)
  Gradient of V_c in the anchor loss: dV_c/df_p = 2 / (h w) for p in M_c (upstream's
           NormalisationPoolingFunction, MADA models/utils.py:15-33 and adaptation_model.py:150-155),
           not the 1/|M_c| of a plain mean (grad='mean', ablation)
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ABSENT_CHOICES = ("zero", "mask")
GRAD_CHOICES = ("pooling", "mean")


# ------------------------------------------------------------------------------------------------
# Objective vectors
# ------------------------------------------------------------------------------------------------
def downsample_label(label, hw):
    """Nearest-neighbour resize of a (B, H, W) class-index label to the feature size (upstream)."""
    return F.interpolate(label[:, None].float(), size=tuple(hw), mode="nearest")[:, 0].long()


def objective_vectors(feat, logits, label, num_classes, min_pixels=10, grad="pooling"):
    """Per-image, per-class masked mean of the feature (MADA Sec. 3.2).

    feat (B, D, h, w), logits (B, C, h, w), label (B, h, w) at the feature resolution (255 = ignore).
    Returns V (B, C, D) float32 and counts (B, C) int64 = |M_c|; rows with counts < min_pixels are zero.
    Always computed in fp32, autocast off (a bf16 einsum over 10^5 pixels loses the mean's digits).
    grad='pooling' (upstream): the value is the mean, the gradient w.r.t. f_p (p in M_c) is 2 / (h w)
    (NormalisationPoolingFunction scales the gradient by 2|M_c|/(h w); the mean divides by |M_c|);
    grad='mean': the plain mean's gradient 1/|M_c| (an ablation).
    """
    if grad not in GRAD_CHOICES:
        raise ValueError(f"grad must be one of {GRAD_CHOICES}, got {grad!r}")
    with torch.autocast(feat.device.type, enabled=False):
        feat = feat.float()
        pred = logits.argmax(1)
        classes = torch.arange(num_classes, device=feat.device).view(1, -1, 1, 1)
        mask = ((label[:, None] == classes) & (pred[:, None] == classes)).float()   # (B, C, h, w)
        counts = mask.flatten(2).sum(-1)                                             # (B, C)
        sums = torch.einsum("bchw,bdhw->bcd", mask, feat)
        keep = (counts >= min_pixels)[..., None]
        vec = torch.where(keep, sums / counts.clamp(min=1)[..., None], torch.zeros_like(sums))
        if grad == "pooling" and sums.requires_grad:
            scaled = torch.where(keep, sums * (2.0 / (feat.shape[-2] * feat.shape[-1])), torch.zeros_like(sums))
            vec = vec.detach() + (scaled - scaled.detach())     # value: the mean; gradient: 2/(h w) per pixel
    return vec, counts.long()


# ------------------------------------------------------------------------------------------------
# Distances to anchors
# ------------------------------------------------------------------------------------------------
def anchor_distances(vec, present, anchors, absent="zero"):
    """d(V_n, A_k) for a batch (torch; differentiable in vec).

    vec (B, C, D), present (B, C) bool, anchors (K, C, D) -> (B, K).
    absent='zero' (upstream, default): mean over all C x D entries, absent rows being zero;
    absent='mask' (ablation): mean over the D entries of V's present rows only (an image with no
    present row falls back to all rows)."""
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


def min_distances(vectors, counts, anchors, min_pixels=10, absent="zero", chunk=256):
    """min_k d(V_n, A_k) and argmin for every row of a (possibly memory-mapped) [N, C, D] array,
    read chunk by chunk (the whole array is never loaded). Returns (dist (N,) float64, idx (N,)).
    In float64, as upstream's numpy (the vector is a float64 np.zeros([19, 256]) filled from fp32 features,
    MADA select_active_samples.py:88-92), so that near-equal scores rank as upstream's do."""
    a = torch.from_numpy(np.ascontiguousarray(anchors, dtype=np.float64))
    n = len(vectors)
    dist, idx = np.empty(n, np.float64), np.empty(n, np.int64)
    for s in range(0, n, chunk):
        v = torch.from_numpy(np.array(vectors[s:s + chunk], dtype=np.float64))
        p = torch.from_numpy(np.asarray(counts[s:s + chunk]) >= min_pixels)
        d = anchor_distances(v, p, a, absent)
        m = d.min(1)
        dist[s:s + chunk], idx[s:s + chunk] = m.values.numpy(), m.indices.numpy()
    return dist, idx


def selection_scores(vectors, counts, src_anchors, tgt_anchors=None, criterion="mada", min_pixels=10,
                     absent="zero"):
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
    """Number of images for a budget fraction: MADA int(0.05 N) (148 of 2975), MADAv2 Python's round(0.05 N)
    (149; halves to the even number, as step1_select_active_samples.py: round(6.5) = 6 for N = 130)."""
    x = fraction * n
    k = int(np.floor(x + 1e-9)) if rounding == "floor" else round(x)
    return max(1, min(n, k))


def top_k(scores, k):
    """Indices of the k largest scores, ties broken by the lower index (deterministic); sorted."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return np.sort(order[:k])


# ------------------------------------------------------------------------------------------------
# Anchors: faiss k-means on the flattened objective vectors
# ------------------------------------------------------------------------------------------------
def kmeans_anchors(vectors, counts, k=10, niter=20, seed=0, max_points_per_centroid=None, min_pixels=10,
                   absent="zero", chunk=1024, verbose=False):
    """faiss k-means (k, niter) on V flattened to [N, C*D] (MADA Sec. 3.2).

    max_points_per_centroid None: every vector is clustered (MADA: utils/clustering.py run_kmeans sets
    clus.max_points_per_centroid = 10,000,000, i.e. all 24,966 GTA5 vectors); 256: a seeded sample of
    k*256 vectors (MADAv2: faiss.Kmeans with faiss's default, step1_cluster_anchors_source.py:26).
    Then every vector is assigned to its nearest centroid (chunked). absent='zero' (upstream, default)
    keeps faiss's centroids; absent='mask' (ablation) re-estimates each anchor row as the mean of the
    cluster members in which that class is present (fallback: the mean over all images with the class;
    zero if never present), so absent (zero) rows do not pull anchors toward zero.
    Returns anchors (K, C, D) float32, present (K, C) bool, assign (N,) int64, the faiss objective."""
    import faiss

    n, c, dim = vectors.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} vectors, got {n}")
    rng = np.random.default_rng(seed)
    m = n if max_points_per_centroid is None else min(n, k * max_points_per_centroid)
    sample = np.sort(rng.choice(n, m, replace=False)) if m < n else np.arange(n)
    x = np.ascontiguousarray(np.asarray(vectors[sample], dtype=np.float32).reshape(m, c * dim))
    km = faiss.Kmeans(c * dim, k, niter=niter, seed=int(seed), verbose=verbose,
                      max_points_per_centroid=-(-m // k) + 1)   # the sample is drawn above: faiss keeps all m
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
def update_nearest_anchor(anchors, vec, present, d, momentum=0.999, absent="zero"):
    """A_k* <- m A_k* + (1 - m) V for each image (in batch order), k* = argmin_k d_k (MADA Eq. 6).
    absent='zero' (upstream, default) updates all rows (absent classes' rows move toward zero);
    'mask' (ablation) only the rows of V's present classes. anchors (K, C, D) is updated in place."""
    nearest = d.argmin(1)
    for b in range(vec.shape[0]):
        k = int(nearest[b])
        rows = present[b] if absent == "mask" else torch.ones_like(present[b])
        if rows.any():
            anchors[k, rows] = momentum * anchors[k, rows] + (1 - momentum) * vec[b, rows].to(anchors.dtype)
    return nearest


def batch_anchor_loss(feat, logits, anchors, num_classes, min_pixels=10, absent="zero", grad="pooling"):
    """Target objective vectors of the current model (pseudo-label = own argmax, feature resolution),
    their distances to the target anchors, and the soft anchor loss averaged over the images (absent
    'mask': over the images with at least one present class). grad: see objective_vectors.
    Returns (loss, vec, present, d)."""
    vec, counts = objective_vectors(feat, logits.detach(), logits.detach().argmax(1), num_classes, min_pixels,
                                    grad)
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


def load_anchors(path, num_classes=None, dim=256):
    """(anchors (K, C, D) float32, present (K, C) bool) from cluster_anchors.py's anchors.npz, or from an
    official anchors file (any other file: official_anchors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "anchors.npz"
    if not path.is_file():
        raise FileNotFoundError(f"anchors file not found: {path} (run mada/cluster_anchors.py first)")
    if path.suffix != ".npz":
        return official_anchors(path, num_classes, dim)
    with np.load(path, allow_pickle=False) as z:
        return z["anchors"].astype(np.float32), z["present"].astype(bool)


def official_anchors(path, num_classes=None, dim=256):
    """The anchors MADA / MADAv2 released (anchors/cluster_centroids_*.pkl), read through common.safe_pickle (no
    code in the file is run): torch.save of faiss's centroids, MADA a flat array of K*19*256 values (torch legacy
    format, utils/clustering.py:186 vector_float_to_array), MADAv2 a (K, 19*256) array (faiss.Kmeans.centroids).
    Upstream reads both as `.reshape(ncentroids, 19, 256)` (MADA select_active_samples.py:68, MADAv2
    step1_select_active_samples.py:48): row-major, anchor k, class c, feature d = our (K, C, D) layout exactly.
    Every row counts as present (upstream keeps zero rows). C defaults to upstream's 19."""
    from common import safe_pickle
    c = num_classes or 19
    got = safe_pickle.load_file(path, "MADA/MADAv2 anchors (a numpy array of K x C x 256 values)")
    arr = safe_pickle.to_numpy(got)
    if arr is None:
        size = f" of {len(got)} items (an anchors/cluster_index_* file?)" if hasattr(got, "__len__") else ""
        raise ValueError(f"{path} holds a {type(got).__name__}{size}, not anchors (expected an array of K x {c} x "
                         f"{dim} values, e.g. anchors/cluster_centroids_*.pkl)")
    if arr.size == 0 or arr.size % (c * dim):
        raise ValueError(f"{path} holds an array of shape {arr.shape} ({arr.size} values), not a multiple of "
                         f"{c} classes x {dim} features: anchors of another label space or feature size?")
    anchors = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1, c, dim)
    return anchors, np.ones(anchors.shape[:2], bool)


def atomic_save_npz(path, **arrays):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# Upstream's selection lists (MADA select_active_samples.py:105-118, MADAv2 step1_select_active_samples.py:71-83):
# selection_list/stage1_cac_list_0.05.txt holds one image per line as CITY/NAME_leftImg8bit.png (relative to
# leftImg8bit/train; MADAv2 writes the same lines from data/target_names.txt), in ascending index order;
# stage1_cac_index_0.05.txt the indices into the sorted training images. MADAv2 adds "_dual_dis_far".
OFFICIAL_LIST_SUFFIX = {"mada": "", "madav2": "_dual_dis_far", "random": "_random"}


def official_name(name):
    """Our image name (relative to the dataset root) as upstream's list writes it: the part after
    leftImg8bit/SPLIT/ (CITY/NAME_leftImg8bit.png); a name of another layout is kept."""
    parts = Path(name).parts
    if "leftImg8bit" in parts[:-2]:
        return "/".join(parts[parts.index("leftImg8bit") + 2:])
    return Path(name).as_posix()


def write_official_selection(folder, names, indices, criterion, budget):
    """selection_list/stage1_cac_list_BUDGET[SUFFIX].txt and stage1_cac_index_... in upstream's format (atomic).
    Returns the two paths."""
    folder = Path(folder) / "selection_list"
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{budget:.2f}{OFFICIAL_LIST_SUFFIX[criterion]}"
    lst, idx = folder / f"stage1_cac_list_{tag}.txt", folder / f"stage1_cac_index_{tag}.txt"
    for path, lines in ((lst, [official_name(n) for n in names]), (idx, [str(int(i)) for i in indices])):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, path)
    return lst, idx


def read_selection(path):
    """The selected image names from selected.json or selected.txt (names relative to the target root), or from
    upstream's selection_list/stage1_cac_list_*.txt (CITY/NAME lines; subset_by_names resolves both)."""
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
    """IndexedSubset of the dataset items whose names are `names`: ours (relative to the dataset root) or
    upstream's list lines (CITY/NAME, relative to leftImg8bit/train); error naming the missing ones."""
    index = {dataset.name(i): i for i in range(len(dataset))}
    for n, i in list(index.items()):
        index.setdefault(official_name(n), i)
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{what}: {len(missing)} names are not images of {dataset.root} "
                         f"(first: {missing[:3]}); was it made for another target dataset?")
    return IndexedSubset(dataset, [index[n] for n in names])


# ------------------------------------------------------------------------------------------------
# Data plumbing shared by the MADA scripts
# ------------------------------------------------------------------------------------------------
# Upstream's image sizes (configs/*.yml img_rows x img_cols): every image is first resized to these, then
# augmented. MADA's active Cityscapes set reads 1052x1914 (MADA configs/active_from_gta_to_city_stage*.yml:47-48,
# MADAv2 stage2.yml:48-49); MADAv2 step 1's active set 1024x2048 (MADAv2 configs/..._stage1.yml).
UPSTREAM_HW = {"gta5": (1052, 1914), "cityscapes": (1024, 2048), "synthia": (760, 1280)}
CROP_HW = (512, 896)    # rcrop [896, 512] = width 896, height 512
RSIZE_WIDTH, RSIZE_SCALE = 2200, (0.5, 1.5)   # rsize 2200: width U(0.5, 1.5) x 2200 (augmentations.py:369)


class RandomSizedWidth:
    """Upstream's 'rsize' (augmentations.py RandomSized): resize (bilinear / nearest) to width
    int(U(0.5, 1.5) * size) and height int(width / aspect), the aspect ratio of the incoming image kept."""

    def __init__(self, size=2200, scale=(0.5, 1.5)):
        self.size, self.scale = size, tuple(scale)

    def __call__(self, img, lbl, rng):
        from PIL import Image
        w = int(rng.uniform(*self.scale) * self.size)
        h = int(w / (img.width / img.height))
        img = img.resize((w, h), Image.BILINEAR)
        return img, (lbl.resize((w, h), Image.NEAREST) if lbl is not None else None)

    def __repr__(self):
        return f"RandomSizedWidth({self.size}, scale={self.scale})"


def train_transform(toy, crop_hw=None, flip=True, base_hw=None):
    """MADA's augmentation on real data (configs 'rsize 2200, rcrop [896, 512], hflip 0.5'): resize to the
    dataset's upstream size base_hw, then to width 2200 x U(0.5, 1.5) keeping the aspect ratio, a random
    crop_hw crop (default 512x896), flip 0.5. Toy domains: resize to crop_hw (the domain's training size)
    + flip (the images are already small)."""
    from common.transforms import Compose, RandomCrop, RandomHFlip, Resize
    if toy:
        first = [Resize(crop_hw)]
    else:
        first = ([Resize(base_hw, interp="bilinear")] if base_hw else []) + [RandomSizedWidth(RSIZE_WIDTH, RSIZE_SCALE),
                                                                  RandomCrop(crop_hw or CROP_HW)]
    return Compose(first + ([RandomHFlip()] if flip else []))


def eval_set_at(name, root, num_classes, norm, size_hw=None, split=None):
    """The target evaluation split; size_hw None: the shared protocol of common (the domain's evaluation size),
    else images resized to size_hw (upstream MADA: Cityscapes val at its full 1024x2048, configs/*.yml
    target_valid img_rows x img_cols); labels stay at full resolution, logits are upsampled to them."""
    from common.datasets import DOMAINS, build_dataset, eval_set
    from common.transforms import Compose, Resize
    if size_hw is None:
        return eval_set(name, root, num_classes, norm, split)
    kind, _, default_split, _, _ = DOMAINS[name]
    return build_dataset(kind, root, split or default_split, num_classes,
                         Compose([Resize(size_hw, resize_label=False)]), norm)


def param_groups_sgd(model, lr, momentum, weight_decay, head_mult=1.0):
    """SGD over every parameter: backbone at lr, ASPP + decoder + classifier at head_mult x lr.
    MADA trains all parameters at one lr (head_mult 1, upstream BaseNet.parameters()); MADAv2's
    optim_parameters meant backbone 1x / heads 10x (it dropped the decoder: fixed here)."""
    backbone, heads = model.param_groups()
    groups = [{"params": [p for p in backbone if p.requires_grad], "lr": lr, "lr_mult": 1.0},
              {"params": [p for p in heads if p.requires_grad], "lr": head_mult * lr, "lr_mult": head_mult}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
