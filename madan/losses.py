"""MADAN's loss terms, each next to the paper equation it implements (Zhao et al., NeurIPS 2019,
arXiv 1910.12181, Sec. 3), plus ADDA's gate and MDAN's aggregation. Everything in fp32."""
from collections import deque

import torch
import torch.nn.functional as F

from common.losses import cross_entropy


def lsgan(pred, real):
    """LSGAN (Mao et al.) term used for every adversarial loss of the CycleGAN part:
    mean (D(x) - 1)^2 for `real`, mean D(x)^2 for fake."""
    pred = pred.float()
    return F.mse_loss(pred, torch.full_like(pred, 1.0 if real else 0.0))


def d_loss(netD, real, fake):
    """Discriminator loss 0.5 * (LSGAN(D(real), 1) + LSGAN(D(fake), 0)), fake detached (CycleGAN)."""
    return 0.5 * (lsgan(netD(real.detach()), True) + lsgan(netD(fake.detach()), False))


def cycle(rec, real):
    """Cycle-consistency L1 ||F(G(x)) - x||_1, mean over elements (Eq. 2)."""
    return F.l1_loss(rec.float(), real.float())


def dsc(logits_real, logits_fake):
    """Dynamic Semantic Consistency (Eq. 3): KL(F_i(x_i) || F_i(G_i(x_i))) = sum_c p (log p - log q),
    p = softmax of the classifier on the source image, q on its translation; averaged over every
    element (batch, class, pixel), as upstream (KLDiv 'batchmean' / (C*H*W)). The script multiplies by
    dynamic_weight * general_semantic_weight."""
    logp = F.log_softmax(logits_real.float(), 1)
    logq = F.log_softmax(logits_fake.float(), 1)
    return (logp.exp() * (logp - logq)).sum() / logits_real.numel()


def sad_generator(d3, fake_b_other):
    """Sub-domain Aggregation Discriminator, generator side (Eq. 5): the adapted images of a non-anchor
    source should look like the anchor's adapted images to D_3: LSGAN(D_3(G_i(x_i)), 1)."""
    return lsgan(d3(fake_b_other), True)


def sad_discriminator(d3, fake_b_anchor, fake_b_other):
    """SAD, discriminator side: D_3 tells the anchor's adapted images (real) from another source's."""
    return d_loss(d3, fake_b_anchor, fake_b_other)


def ccd_generator(d_ij, fake_a_ij):
    """Cross-domain Cycle Discriminator, generator side (Eq. 6): source j's adapted image, mapped back
    with source i's inverse generator F_i(G_j(x_j)), should look like a real source-i image."""
    return lsgan(d_ij(fake_a_ij), True)


def ccd_discriminator(d_ij, real_a_i, fake_a_ij):
    """CCD, discriminator side: D_ij tells real source-i images from F_i(G_j(x_j))."""
    return d_loss(d_ij, real_a_i, fake_a_ij)


def linear_decay(epoch, niter, niter_decay, epoch_count=1):
    """CycleGAN's lr factor for 0-based epoch: 1 for `niter` epochs, then linearly down to
    1/(niter_decay+1) over `niter_decay` epochs."""
    return 1.0 - max(0, epoch + epoch_count - niter) / float(niter_decay + 1)


# ---------------------------------------------------------------------------------------------- ADDA
def domain_ce(logits, domain):
    """Per-position 2-way cross-entropy of a domain classifier; domain 1 = source, 0 = target."""
    logits = logits.float()
    lbl = torch.full((logits.shape[0], *logits.shape[2:]), domain, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, lbl)


def domain_ce_pair(logits_s, logits_t):
    """Discriminator loss of ADDA: 2-way CE with source = 1 and target = 0, averaged over all positions of
    both batches (upstream concatenates the two score maps; their sizes may differ here)."""
    ns, nt = logits_s[:, 0].numel(), logits_t[:, 0].numel()
    return (domain_ce(logits_s, 1) * ns + domain_ce(logits_t, 0) * nt) / (ns + nt)


def domain_accuracy(logits_s, logits_t):
    """Fraction of positions the discriminator classifies right (source 1, target 0)."""
    right = (logits_s.argmax(1) == 1).float().sum() + (logits_t.argmax(1) == 0).float().sum()
    return (right / (logits_s[:, 0].numel() + logits_t[:, 0].numel())).item()


class AccuracyGate:
    """ADDA's gate (CyCADA/MADAN train_fcn_adda.py): the mean discriminator accuracy over the last
    `window` steps, in percent; the generator (and the source CE) step only runs while it is above
    `threshold` (60)."""

    def __init__(self, threshold=60.0, window=100, history=()):
        self.threshold, self.acc = threshold, deque(history, maxlen=window)

    def update(self, acc):
        self.acc.append(100.0 * acc)
        return self.open()

    def mean(self):
        return sum(self.acc) / len(self.acc) if self.acc else 0.0

    def open(self):
        return self.mean() > self.threshold


# ---------------------------------------------------------------------------------------------- MDAN
def mdan_loss(task_losses, domain_losses, mu=1e-2, gamma=10.0, mode="dynamic"):
    """MDAN (Zhao et al., NeurIPS 2018), per source j: L_j = task_j + mu * domain_j.
    dynamic: (1/gamma) log sum_j exp(gamma * L_j) (a smooth max over sources);
    maxmin:  max_j task_j + mu * min_j domain_j."""
    task = torch.stack([t.float() for t in task_losses])
    dom = torch.stack([d.float() for d in domain_losses])
    if mode == "maxmin":
        return task.max() + mu * dom.min()
    if mode != "dynamic":
        raise ValueError(f"MDAN mode must be dynamic or maxmin, got {mode!r}")
    return torch.logsumexp(gamma * (task + mu * dom), 0) / gamma


def seg_ce(logits, label):
    """Pixel CE with ignore 255 on logits upsampled to the label size (bilinear, align_corners=True)."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=True)
    return cross_entropy(logits, label)

