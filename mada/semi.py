"""MADAv2 step 2: the semi-supervised parts (from AEL, "adaptive equalization learning", and U2PL) that
train_stage2_semi.py uses: the class-wise CutMix bank, class-aware CutMix, the class confidence, the
confidence-weighted consistency loss and the entropy filter of the unlabelled pseudo-labels.

  class confidence  r_c <- m r_c + (1 - m) mean_{p: y_p = c} softmax(student)_c(p)   (labelled images)
  bank sampling     c ~ softmax(1 - r);  an image whose teacher prediction holds >= 1% of class c
  CutMix            box = bounding box of a random connected region (>= 0.5% of the image) of class c
                    in the sampled image's teacher prediction; x_mix = x_a (1 - M) + x_b M (and logits)
  consistency       L = sum_p w_p CE_p / sum_p w_p,  w_p = conf_p^gamma * s_p  (gamma = 2),
                    s_p = [u_p < q_{pred(p)}],  q = ((1 - r) / max(1 - r))^gamma2  (AEL's sampling),
                    u ~ U(0, 1) one H x W map shared by the batch's images (as upstream)
  entropy filter    the `percent` % highest-entropy teacher pixels are ignored (U2PL), percent = 20 (1 - e/E),
                    e = the epoch, E = the epochs (per epoch, as upstream)
"""
import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as connected_components
from skimage.measure import regionprops

IGNORE = 255


def random_box(h, w, rng, prop=0.5):
    """A random box covering `prop` of the image, aspect ratio log-uniform (AEL's init_cutmix, with the
    image's own H and W; upstream used H x H)."""
    y_prop = np.exp(rng.uniform(0, 1) * np.log(prop))
    x_prop = prop / y_prop
    bh, bw = int(round(y_prop * h)), int(round(x_prop * w))
    y0, x0 = int(round((h - bh) * rng.uniform())), int(round((w - bw) * rng.uniform()))
    return y0, x0, y0 + bh, x0 + bw


def class_box(pred, cls, area_thresh, rng):
    """Bounding box (y0, x0, y1, x1) of a random connected region of class `cls` in pred (HxW) larger than
    area_thresh of the image; a random half-image box when there is none (AEL's generate_cutmix with
    no_pad = no_slim = True, MADAv2's config)."""
    h, w = pred.shape
    comp = connected_components(pred == cls)
    regions = [r for r in regionprops(comp) if r.area > area_thresh * h * w]
    if not regions:
        return random_box(h, w, rng)
    r = regions[int(rng.integers(len(regions)))]
    return r.bbox


def box_mask(box, h, w, device):
    m = torch.zeros(h, w, device=device)
    y0, x0, y1, x1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = 1
    return m


def cutmix_pair(x, logits, mask):
    """x, logits: (2, ., H, W); returns the two mixes x_i (1 - M) + x_{i+1} M (AEL's generate_unsup_data)."""
    m = mask[None, None]
    other = torch.roll(x, -1, 0), torch.roll(logits, -1, 0)
    return x * (1 - m) + other[0] * m, logits * (1 - m) + other[1] * m


@torch.no_grad()
def update_bank(bank, pred, ids, area_thresh2):
    """bank[c, id] = 1 where the teacher's prediction of image id covers at least area_thresh2 of it with c."""
    c = bank.shape[0]
    for p, i in zip(pred, ids):
        frac = torch.bincount(p.flatten(), minlength=c)[:c].float() / p.numel()
        bank[:, int(i)] = (frac >= area_thresh2).to(bank.dtype)
    return bank


def sample_from_bank(bank, class_conf, rng):
    """Class c ~ softmax(1 - r) (rarely-confident classes first), then an image holding c (else any)."""
    z = (1 - class_conf).double().cpu().numpy()
    p = np.exp(z - z.max())
    p /= p.sum()
    c = int(rng.choice(len(p), p=p))
    holders = torch.nonzero(bank[c]).flatten().tolist()
    idx = holders[int(rng.integers(len(holders)))] if holders else int(rng.integers(bank.shape[1]))
    return idx, c


@torch.no_grad()
def category_confidence(logits, label, num_classes):
    """Mean softmax probability of class c over the pixels labelled c (0 where c is absent)."""
    prob = F.softmax(logits.float(), 1)
    out = torch.zeros(num_classes, device=logits.device)
    for c in range(num_classes):
        m = label == c
        if m.any():
            out[c] = prob[:, c][m].mean()
    return out


def weighted_consistency(logits, target, conf, class_conf, gamma=2.0, gamma2=1.0, generator=None, norm="valid"):
    """AEL/MADAv2 consistency: per-pixel CE to the teacher's label, weighted by the teacher's confidence
    to the power gamma and by a Bernoulli draw that keeps pixels of less-confident classes more often;
    weights normalised to sum 1 over the labelled (non-ignored) pixels (norm 'valid'), or over every pixel,
    ignored ones included (norm 'all': upstream, deviation 8). As upstream (loss/loss.py:Criterion_cons), one
    uniform map of H x W is drawn and shared by the images of the batch."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    w = conf.float() ** gamma
    q = 1 - class_conf.float()
    q = (q / (q.max() + 1e-12)) ** gamma2
    pred = logits.detach().argmax(1)
    u = torch.rand(pred.shape[-2:], device=pred.device, generator=generator)  # one map for the whole batch
    keep = u < q[pred]
    w = w * keep
    if norm == "valid":
        w = w * (target != IGNORE)  # ignored pixels take no weight (upstream let them dilute the mean)
    return (w * ce).sum() / (w.sum() + 1e-12)


@torch.no_grad()
def entropy_percent(base, it, epoch_iters, total_iters):
    """U2PL/MADAv2's per-epoch decay of the filtered share: base (1 - epoch / epochs), epoch = it // epoch_iters,
    epochs = total_iters / epoch_iters (step2_train_active_semi_sup.py:94-96, once per epoch)."""
    return base * (1 - (it // epoch_iters) / (total_iters / epoch_iters))


def entropy_filter(logits, percent, mode="high"):
    """Teacher labels with `percent` % of pixels ignored: mode 'high' drops the highest-entropy (least
    certain) pixels, the U2PL intent; 'low' drops the lowest-entropy ones (upstream MADAv2's inverted
    comparison). Returns (label, confidence)."""
    prob = F.softmax(logits.float(), 1)
    ent = -(prob * torch.log(prob + 1e-10)).sum(1)
    conf, lab = prob.max(1)
    if percent > 0:
        if mode == "high":
            thr = torch.quantile(ent.flatten(), 1 - percent / 100)
            lab = torch.where(ent > thr, torch.full_like(lab, IGNORE), lab)
        else:
            thr = torch.quantile(ent.flatten(), percent / 100)
            lab = torch.where(ent < thr, torch.full_like(lab, IGNORE), lab)
    return lab, conf
