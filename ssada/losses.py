"""The losses of SS-ADA (T-ITS'24) and TUFL (T-ITS'23). All computed in fp32.

SS-ADA
- iou_class_weights:  w_c = 1 + (u - 1)(1 - IoU_c), IoU_c of the model on the labeled target images
  (the paper's IoU-based class weighting, u = 2).
- weighted_ohem_ce:   OHEM cross-entropy (keep pixels whose true-class probability < 0.7, at least
  min_kept of them) with per-class weights, normalised by the kept pixels' total weight (as
  torch's weighted CE 'mean', which upstream's ProbOhemCrossEntropy2d calls).
- unlabeled_ce:       UniMatch's masked CE on pseudo labels, summed over confident pixels and divided
  by the number of valid (non-padding) pixels.
- confidence_mask:    conf >= conf_thresh, or with class thresholds conf >= IoU_{y} * ratio.
TUFL
- unsup_focal_loss:   per pixel  sum_c w_c [p_c (log p_c - d^gamma log q_c) - p_c log p_c],  p = softmax
  of the reference view (detached in the first term), q = softmax of the other view, y = argmax p,
  d = |p_y - q_y| (focal_type 2, UnsupFocalLoss' default) or d = 1 - q_y (focal_type 1,
  AdaptUnsupFocalLoss' default); w = the class weights (upstream passes CityScapes_13 'middle');
  averaged over pixels with max p > tau_y (fixed tau, or the adaptive thresholds).
- regular_ce:         TUFL's supervised RegularCrossLoss: per-pixel weighted CE (w_y CE, 0 on ignored
  pixels) averaged over ALL pixels (torch.mean of reduction='none'), not over the weight sum.
- TUFL_CLASS_WEIGHTS: utils/class_freqency.py CLASS_WEIGHT['CityScapes_13'] (small / middle / large).
- AdaptiveThresholds: TUFL's per-class thresholds: tau_c <- a tau_c + (1 - a) t_c, t_c the confidence
  ranked int(n_c * b * tau_c^d) among the n_c pixels predicted c (plus tau_c itself), capped at 0.999.
"""
import torch
import torch.nn.functional as F

IGNORE = 255
LOG_EPS = 1e-30  # TUFL's LOG_EPSILON inside log(p + eps) (utils/loss.py:9); representable in fp32
MIN_EPS = 1e-8  # TUFL's MIN_EPSILON: per-pixel losses are clamped to it before the mean (utils/loss.py:8)

# TUFL utils/class_freqency.py:13-17, CLASS_WEIGHT['CityScapes_13']: Cityscapes class-frequency weights of
# the 13 CrossCity classes; 'middle' (the --weight_mode default) doubles rider, motorcycle and bicycle.
_CS13 = [2.6236585428325134, 5.596123620428783, 3.918986130314213, 10.292995513112313, 10.343530727799257,
         5.859243792328049, 4.42640250175862, 10.075834629387431, 10.233756744980246, 8.130727555462036,
         8.797173220027153, 10.283695381014079, 10.153521817539493]
TUFL_CLASS_WEIGHTS = {
    "small": list(_CS13),
    "middle": [w * (2 if c in (8, 11, 12) else 1) for c, w in enumerate(_CS13)],
    "large": [w * {8: 2 * 1.2, 11: 2 * 1.5, 12: 2 * 1.2}.get(c, 1) for c, w in enumerate(_CS13)],
}


def iou_class_weights(iou, upper=2.0):
    """w_c = 1 + (u - 1)(1 - IoU_c) (SS-ADA Sec. III, IoU-based class weighting); iou in [0, 1]."""
    iou = torch.as_tensor(iou, dtype=torch.float32)
    return 1.0 + (upper - 1.0) * (1.0 - iou)


def weighted_ohem_ce(logits, label, thresh=0.7, min_kept=200000, weight=None):
    """OHEM CE: pixels with p(true class) <= max(thresh, p of the min_kept-th hardest) are kept; the
    loss is the weighted mean over kept pixels: sum w_y * CE / sum w_y. As upstream's ProbOhemCrossEntropy2d,
    no mining (every valid pixel kept) when min_kept exceeds the valid pixels or when min_kept is 0."""
    logits = logits.float()
    valid = label != IGNORE
    if not valid.any():
        return logits.sum() * 0
    with torch.no_grad():
        prob = F.softmax(logits, 1).gather(1, label.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        prob = torch.where(valid, prob, torch.ones_like(prob))
        n_valid = int(valid.sum())
        keep = valid
        if 0 < min_kept <= n_valid:  # upstream: fewer valid pixels than min_kept, or min_kept 0 -> no mining
            kth = prob.flatten().kthvalue(int(min_kept)).values
            keep = valid & (prob <= max(thresh, float(kth)))
    target = torch.where(keep, label, torch.full_like(label, IGNORE))
    return F.cross_entropy(logits, target, weight=None if weight is None else weight.to(logits.device).float(),
                           ignore_index=IGNORE)


def confidence_mask(pseudo, conf, conf_thresh=0.0, class_iou=None, ratio=1.0):
    """Which pseudo-labelled pixels enter the unlabeled loss. Default (UniMatch): conf >= conf_thresh.
    With per-class thresholds (SS-ADA option): conf >= IoU_{pseudo} * ratio, ratio = threshold *
    (1 - iter / total) when dynamic."""
    if class_iou is None:
        return conf >= conf_thresh
    thr = torch.as_tensor(class_iou, dtype=conf.dtype, device=conf.device) * ratio
    return conf >= thr[pseudo]


def unlabeled_ce(logits, pseudo, mask, ignore_mask):
    """UniMatch: CE(logits, pseudo) on masked pixels, divided by the count of valid pixels
    (ignore_mask != 255 marks the image, 255 the crop padding)."""
    valid = ignore_mask != IGNORE
    loss = F.cross_entropy(logits.float(), pseudo, reduction="none")
    return (loss * (mask & valid)).sum() / valid.sum().clamp(min=1)


def regular_ce(logits, label, weight=None):
    """TUFL's RegularCrossLoss (utils/loss.py:39-53): mean over all pixels of w_y * CE (ignored pixels
    count as 0 in the mean)."""
    w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32, device=logits.device)
    return F.cross_entropy(logits.float(), label, weight=w, ignore_index=IGNORE, reduction="none").mean()


def unsup_focal_loss(logits_ref, logits_other, gamma=2.0, thresh=None, focal_type=2, weight=None):
    """TUFL's unsupervised focal loss. thresh: None (all pixels), a float tau, or a (C,) tensor of
    per-class thresholds indexed by the reference prediction. focal_type 2: d = |p_y - q_y|; 1:
    d = 1 - q_y. weight: optional (C,) class weights on every class term. Returns (loss, kept fraction)."""
    p = F.softmax(logits_ref.float(), 1)
    q = F.softmax(logits_other.float(), 1)
    pd = p.detach()
    conf, y = pd.max(1)
    q_y = q.gather(1, y.unsqueeze(1))
    d = (pd.gather(1, y.unsqueeze(1)) - q_y).abs() if focal_type == 2 else (1 - q_y).abs()  # (B,1,H,W)
    kl = pd * (torch.log(pd + LOG_EPS) - d.pow(gamma) * torch.log(q + LOG_EPS))
    ent = -p * torch.log(p + LOG_EPS)
    loss = kl + ent
    if weight is not None:
        loss = loss * torch.as_tensor(weight, dtype=loss.dtype, device=loss.device).view(1, -1, 1, 1)
    loss = loss.sum(1)
    if thresh is None:
        keep = torch.ones_like(conf, dtype=torch.bool)
    elif torch.is_tensor(thresh):
        keep = conf > thresh.to(conf.device, conf.dtype)[y]
    else:
        keep = conf > thresh
    frac = float(keep.float().mean())
    if not keep.any():
        return loss.sum() * 0, frac
    return loss[keep].clamp(min=MIN_EPS).mean(), frac


class AdaptiveThresholds:
    """TUFL's threshold-adaptive selector (AdaptUnsupFocalLoss.ias_thresh): per-class thresholds
    initialised to tau0 and moved by an exponential moving average towards a confidence quantile."""

    def __init__(self, num_classes, tau0=0.8, a=0.9, b=0.8, d=8.0):
        self.tau = torch.full((num_classes,), float(tau0), dtype=torch.float64)
        self.a, self.b, self.d = a, b, d

    @torch.no_grad()
    def batch_thresholds(self, prob):
        """t_c: the confidence at rank int(n * b * tau_c^d) (descending) among the pixels predicted c,
        with tau_c appended (n counts it); tau_c itself for a class nobody predicts."""
        conf, y = prob.float().max(1)
        t = self.tau.clone()
        for c in range(len(self.tau)):
            vals = conf[y == c].double().cpu()
            if vals.numel() == 0:
                continue
            vals = torch.cat([vals, self.tau[c:c + 1]]).sort(descending=True).values
            t[c] = vals[min(int(len(vals) * self.b * float(self.tau[c]) ** self.d), len(vals) - 1)]
        return t

    @torch.no_grad()
    def update(self, prob):
        """tau <- a * tau + (1 - a) * t (capped at 0.999); returns the new thresholds (float32)."""
        self.tau = self.a * self.tau + (1 - self.a) * self.batch_thresholds(prob)
        self.tau[self.tau >= 1] = 0.999
        return self.tau.float()

    def state_dict(self):
        return {"tau": self.tau.clone()}

    def load_state_dict(self, s):
        self.tau = s["tau"].clone().double()


def warmup_poly_lr(base_lr, it, total, warmup=1000, power=0.9):
    """SS-ADA's WarmupLRScheduler (linear): base * it / warmup during warm-up, then
    base * (1 - (it - warmup) / (total - warmup)) ** power."""
    if it < warmup:
        return base_lr * it / warmup
    return base_lr * max(0.0, 1 - (it - warmup) / max(1, total - warmup)) ** power

