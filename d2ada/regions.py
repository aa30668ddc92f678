"""Regions (superpixels) for D2ADA: where their PNGs live, how they are made (SLIC), per-region
statistics of a network's output (feature mean, softmax mean, entropy), and the datasets that train on
region labels (target labels outside the selected regions are ignored, paper Sec. 3.1).

Superpixel files mirror the image tree: <root>/superpixel/<image path relative to root, as .png>,
uint8 ids 0..K-1 with no gaps, at the image's own resolution.
"""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.datasets import read_image
from common.transforms import Resize, to_tensor

SUPERPIXEL_DIR = "superpixel"


def eval_set_at(name, root, num_classes, norm, size_hw, split=None):
    """common.datasets.eval_set with D2ADA's evaluation input: the image resized (bilinear) to size_hw,
    upstream's val_transform (dataset.py:32-37: 1024x2048 for Cityscapes, i.e. full resolution); the
    labels stay at full resolution."""
    from common.datasets import DOMAINS, build_dataset
    from common.transforms import Compose
    kind, _, default_split, _, _ = DOMAINS[name]
    split = split or default_split
    if split is None:
        raise ValueError(f"{name} has no evaluation split; evaluate on a target domain")
    return build_dataset(kind, root, split, num_classes, Compose([Resize(size_hw, resize_label=False, interp="bilinear")]), norm)


# ------------------------------------------------------------------------------------------------
# Superpixel files
# ------------------------------------------------------------------------------------------------
def superpixel_path(root, image_path):
    """<root>/superpixel/<image path relative to root with a .png suffix>."""
    rel = Path(os.path.relpath(image_path, root))
    return Path(root) / SUPERPIXEL_DIR / rel.with_suffix(".png")


def slic_regions(img, n_segments, compactness=10.0):
    """SLIC (scikit-image) on an HxWx3 uint8 image -> uint8 ids 0..K-1 with no gaps (K <= 255)."""
    from skimage.segmentation import slic
    seg = slic(img, n_segments=n_segments, compactness=compactness, start_label=0, enforce_connectivity=True)
    _, ids = np.unique(seg, return_inverse=True)  # relabel: contiguous ids whatever SLIC returned
    ids = ids.reshape(seg.shape)
    if ids.max() > 254:
        raise ValueError(f"SLIC gave {ids.max() + 1} regions: more than a uint8 PNG holds; lower --n-segments")
    return ids.astype(np.uint8)


def write_png_atomic(arr, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)


def read_superpixel(root, image_path, size_wh=None):
    """uint8 HxW region ids of an image; a missing or mis-sized file is an error that names it."""
    p = superpixel_path(root, image_path)
    try:
        with Image.open(p) as im:
            sp = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"superpixel file missing: {p} (run d2ada/superpixels.py on {root} first)") from None
    except Exception as e:
        raise OSError(f"cannot read superpixel file {p}: {e}") from None
    if sp.ndim != 2:
        raise ValueError(f"superpixel file {p} must be a single-channel PNG of region ids")
    if size_wh is not None and (sp.shape[1], sp.shape[0]) != tuple(size_wh):
        raise ValueError(f"superpixel file {p} is {sp.shape[0]}x{sp.shape[1]} but its image {image_path} is "
                         f"{size_wh[1]}x{size_wh[0]}: regenerate it with d2ada/superpixels.py")
    return sp


# ------------------------------------------------------------------------------------------------
# Per-region statistics (native scatter ops: index_add_)
# ------------------------------------------------------------------------------------------------
def region_sum(values, sp, k):
    """values (C, N) float, sp (N,) long in 0..k-1 -> (k, C) per-region sums. Summed along dim 1 of the
    contiguous (C, N) values: the same sums, in the same order, as index_add_ along dim 0 of values.t(), 4x faster
    on a CPU (no strided reads)."""
    return values.new_zeros(values.shape[0], k).index_add_(1, sp, values.contiguous()).t()


def bilinear_taps(n_in, n_out, align_corners, device=None):
    """The two input indices and weights behind each output position of F.interpolate(mode="linear") from n_in
    to n_out samples: (2, n_out) long and (2, n_out) float. Read off the interpolation of the identity, so they are
    PyTorch's own weights (bilinear = this along H times this along W); where one input carries the whole weight,
    the second tap has weight 0."""
    eye = torch.eye(n_in, device=device)[None]  # channel c = unit impulse at input c
    a = F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)[0]  # (n_in, n_out)
    w, i = a.topk(min(2, n_in), dim=0)
    if n_in == 1:
        w, i = torch.cat([w, torch.zeros_like(w)]), torch.cat([i, i])
    return i, w


def region_means_of_upsampled(feat, sp, align_corners):
    """(K, D) mean over each region of sp (H, W) of feat (D, h, w) upsampled bilinearly to (H, W), without
    materialising the (D, H, W) upsampled map: bilinear upsampling is linear, so the region means are a sparse
    (K x h*w) matrix M times the features, M[k, cell] = sum over region k's pixels of that pixel's weight on the
    feature cell, divided by the region's size (each pixel has 4 taps: 2 along H times 2 along W). The same
    means as F.interpolate then a per-region mean, to float rounding (tests/test_d2ada.py checks it against that
    direct evaluation). On a toy image (256 x 9 x 16 feature, 72 x 128 map) region_stats takes 3.4 ms instead
    of 11.9 ms; a whole region pass over 100 toy images 2.9 s instead of 5.9 s (one thread)."""
    D, h, w = feat.shape
    H, W = sp.shape
    k = int(sp.max()) + 1
    iy, wy = bilinear_taps(h, H, align_corners, feat.device)  # (2, H)
    jx, wx = bilinear_taps(w, W, align_corners, feat.device)  # (2, W)
    col = (iy[:, None, :, None] * w + jx[None, :, None, :])  # (2, 2, H, W): the feature cell of each tap
    val = wy[:, None, :, None] * wx[None, :, None, :]  # its weight
    row = sp[None, None].expand(2, 2, H, W)
    m = torch.sparse_coo_tensor(torch.stack([row.reshape(-1), col.reshape(-1)]), val.reshape(-1),
                                (k, h * w), check_invariants=False).coalesce()
    count = torch.bincount(sp.reshape(-1), minlength=k).to(torch.float32).clamp(min=1).unsqueeze(1)
    return torch.sparse.mm(m, feat.reshape(D, h * w).t()) / count


def region_stats(feat, logits, sp, align_corners=True):
    """Per-region statistics of one image, at the superpixel map's resolution (H, W):
    feat (D, h, w) and logits (C, h, w) are upsampled bilinearly to (H, W) (align_corners as the model's own
    upsampling: False for D2ADA's models, as upstream's feat_forward; True for common's);
    sp (H, W) long region ids 0..K-1.
    Returns dict: feat (K, D) mean feature, prob (K, C) mean softmax, entropy (K,) mean over the
    region's pixels of the per-pixel mean over classes of -p log2 p (D2ADA's uncertainty), pixels (K,).
    The feature means are taken as a linear map of the low-resolution features (region_means_of_upsampled: the
    (D, H, W) upsampled feature is never built, so full-resolution Cityscapes stays in memory); the softmax is
    not linear, so the logits are upsampled (C channels, as upstream)."""
    # fp32 and contiguous first: under bf16 autocast the model returns channels_last bf16 maps, and the
    # interpolate/reshape/index_add_ chain on those kept allocating (RSS grew ~0.5 GiB per pass over 200 toy
    # images on the CPU, to 5.8 GiB in a 5-round run); on contiguous fp32 maps it stays flat
    feat, logits = feat.float().contiguous(), logits.float().contiguous()
    with torch.autocast(feat.device.type, enabled=False):  # fp32 sums even when called under autocast
        H, W = sp.shape
        k = int(sp.max()) + 1
        spf = sp.reshape(-1)
        count = torch.bincount(spf, minlength=k).to(torch.float32)
        denom = count.clamp(min=1).unsqueeze(1)
        mean_feat = region_means_of_upsampled(feat, sp, align_corners)
        up = F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=align_corners)[0]
        p = F.softmax(up, 0).reshape(up.shape[0], -1)
        ent = (-p * torch.log2(p + 1e-12)).mean(0, keepdim=True)  # softmax_entropy: mean over classes
        return {"feat": mean_feat, "prob": region_sum(p, spf, k) / denom,
                "entropy": (region_sum(ent, spf, k) / denom)[:, 0], "pixels": count.to(torch.int64)}


# ------------------------------------------------------------------------------------------------
# Datasets over region labels
# ------------------------------------------------------------------------------------------------
class RegionLabeledSet(torch.utils.data.Dataset):
    """The labelled part of the target: images that have at least one labelled region; their labels
    are kept inside the labelled regions and set to 255 (ignore) elsewhere.
    base: a common SegDataset (labels on, no transform) over the target train split.
    labeled: {image index in base: [region ids]}; transform: joint transform (img, lbl, rng)."""

    def __init__(self, base, labeled, transform, norm):
        self.base, self.transform, self.norm = base, transform, norm
        self.items = sorted((i, sorted(r)) for i, r in labeled.items() if r)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        j, seed = item if isinstance(item, tuple) else (item, None)
        i, regions = self.items[j]
        img_path, lbl_path = self.base.files[i]
        img = read_image(img_path)
        lab = self.base.load_label(i)
        sp = read_superpixel(self.base.root, img_path, img.size)
        if lab.shape != sp.shape:
            raise ValueError(f"size mismatch: label {lbl_path} is {lab.shape} but superpixels are {sp.shape}")
        lab = np.where(np.isin(sp, regions), lab, 255).astype(np.uint8)
        lbl = Image.fromarray(lab, "L")
        if self.transform is not None:
            rng = np.random.default_rng([i] if seed is None else [seed, 1000003 + i])
            img, lbl = self.transform(img, lbl, rng)
        return {"image": to_tensor(img, self.norm), "index": i, "name": self.base.name(i),
                "label": torch.from_numpy(np.asarray(lbl, dtype=np.int64).copy())}


class ConcatSet(torch.utils.data.Dataset):
    """Source images followed by labelled target images (upstream's ConcatDataset), accepting the
    (index, seed) items of common.datasets.infinite_loader."""

    def __init__(self, *parts):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts])

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        k = int(np.searchsorted(self.ends, i, side="right"))
        j = i - (int(self.ends[k - 1]) if k else 0)
        out = self.parts[k][(j, seed) if seed is not None else j]
        return {"image": out["image"], "label": out["label"]}


# ------------------------------------------------------------------------------------------------
# Region inventory, feature extraction, datalists, pictures
# ------------------------------------------------------------------------------------------------
def region_inventory(base):
    """Pixels per region of every image of a dataset: list (one per image) of int64 arrays."""
    out = []
    for img_path, _ in base.files:
        sp = read_superpixel(base.root, img_path)
        out.append(np.bincount(sp.reshape(-1)).astype(np.int64))
    return out


def inventory_regions(inventory):
    """The region table of extract_regions without its model outputs (image, region, pixels), from
    region_inventory: all that random selection reads, so the random baseline runs no model pass."""
    return {"image": np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(inventory)]),
            "region": np.concatenate([np.arange(len(p), dtype=np.int64) for p in inventory]),
            "pixels": np.concatenate(inventory).astype(np.int64)}


class _ExtractSet(torch.utils.data.Dataset):
    """Image resized to size_hw, then `transform` (joint, e.g. colour jitter + flip) on the image and its
    superpixel map with a generator seeded by (seed, image index): the same draws on every run."""

    def __init__(self, base, indices, size_hw, norm, transform=None, seed=0):
        self.base, self.indices, self.size_hw, self.norm = base, list(indices), tuple(size_hw), norm
        self.transform, self.seed = transform, seed

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        img_path = self.base.files[i][0]
        img = read_image(img_path)
        sp = read_superpixel(self.base.root, img_path, img.size)
        img = img.resize((self.size_hw[1], self.size_hw[0]), Image.BILINEAR)  # upstream ExtResize
        if self.transform is not None:
            img, sp_img = self.transform(img, Image.fromarray(sp, "L"), np.random.default_rng([self.seed, i]))
            sp = np.asarray(sp_img)
        return to_tensor(img, self.norm), torch.from_numpy(sp.astype(np.int64)), i


def _collate(items):
    return torch.stack([a for a, _, _ in items]), [b for _, b, _ in items], [c for _, _, c in items]


@torch.no_grad()
def extract_regions(model, base, indices, size_hw, norm, device, amp=None, batch_size=4, workers=0, desc=None,
                    transform=None, seed=0):
    """Region statistics (region_stats) of the images `indices` of `base`, the model in eval mode, input
    resized to size_hw, then `transform` (None: the clean image; see _ExtractSet). Returns dict of numpy
    arrays over all their regions: image (index in base), region (id), pixels, feat (float32), prob
    (float32), entropy."""
    from tqdm import tqdm
    from common.runtime import autocast, to_device
    was = model.training
    model.eval()
    align = getattr(model, "align_corners", True)
    # its own generator: starting the loader must not draw from the global RNG, or the training that follows
    # would depend on how many region passes ran (D2ADA runs 1-3 a round, random regions none)
    loader = torch.utils.data.DataLoader(_ExtractSet(base, indices, size_hw, norm, transform, seed),
                                         batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_collate, generator=torch.Generator())
    cols = {k: [] for k in ("image", "region", "pixels", "feat", "prob", "entropy")}
    for x, sps, idx in tqdm(loader, desc=desc, disable=desc is None, mininterval=5):
        with autocast(device, amp):
            out = model(to_device(x, device, amp), return_feat=True)
        for b, (sp, i) in enumerate(zip(sps, idx)):
            st = region_stats(out["feat"][b], out["out"][b], sp.to(device), align_corners=align)
            k = st["pixels"].shape[0]
            cols["image"].append(np.full(k, i, np.int64))
            cols["region"].append(np.arange(k, dtype=np.int64))
            for key in ("pixels", "feat", "prob", "entropy"):
                cols[key].append(st[key].cpu().numpy())
    model.train(was)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


def datalist_dict(round_idx, src_names, names, inventory, labeled, picks=None, info=None):
    """The upstream datalist (src_label_im_idx, trg_label_im_idx, trg_pool_im_idx, trg_label_suppix,
    trg_pool_suppix) as JSON-ready data, with image names relative to the dataset roots, plus the
    labelled pixel share and this round's picks."""
    lab_sp, pool_sp = {}, {}
    lab_px = tot_px = 0
    for i, (n, px) in enumerate(zip(names, inventory)):
        lab = sorted(labeled.get(i, ()))
        pool = sorted(set(range(len(px))) - set(lab))
        if lab:
            lab_sp[n] = lab
        if pool:
            pool_sp[n] = pool
        lab_px += int(px[lab].sum()) if lab else 0
        tot_px += int(px.sum())
    return {"round": round_idx, "src_label_im_idx": list(src_names), "trg_label_im_idx": sorted(lab_sp),
            "trg_pool_im_idx": sorted(pool_sp), "trg_label_suppix": lab_sp, "trg_pool_suppix": pool_sp,
            "labeled_pixels": lab_px, "total_pixels": tot_px, "labeled_percent": 100.0 * lab_px / max(tot_px, 1),
            "selected": picks or [], "info": info or {}}


def labeled_from_datalist(d, names, path="datalist"):
    """{image index: set(region ids)} from a datalist dict; unknown image names are an error."""
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for n, ids in d["trg_label_suppix"].items():
        if n not in index:
            raise ValueError(f"{path}: image {n!r} is not in the target training set")
        out[index[n]] = set(int(r) for r in ids)
    return out


CRITERION_COLOURS = {"density": (255, 140, 0), "uncertainty": (30, 144, 255), "random": (50, 205, 50),
                     "earlier": (128, 128, 128)}


def draw_selection(img_path, sp, picked, earlier, path):
    """The image with every region outlined, this round's regions filled by the colour of their
    criterion (density orange, uncertainty blue, random green) and earlier labelled ones in grey."""
    from skimage.segmentation import find_boundaries
    img = np.asarray(read_image(img_path)).astype(np.float32)
    for r, crit in list(((r, "earlier") for r in earlier)) + list(picked.items()):
        m = sp == r
        img[m] = 0.45 * img[m] + 0.55 * np.array(CRITERION_COLOURS[crit], np.float32)
    img[find_boundaries(sp, mode="inner")] = (255, 255, 255)
    write_png_atomic(img.clip(0, 255).astype(np.uint8), path)
