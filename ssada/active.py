"""SS-ADA's image-level active learning: the budget plan, the acquisition scores, the selection, and
the per-round files (util/active_sample.py and util/get_acda_iters.py of ywher/SS-ADA @ a02e3d8).

Acquisition scores of an unlabeled image (its prediction at the evaluation size, C classes):
- entropy      mean over pixels of H(p) / log2 C                      (higher = selected first)
- confidence   mean over pixels of max_c p_c                          (lower first)
- iou_score    mean over pixels of IoU_{argmax p} (class IoU of the model on the labeled target set)
                                                                       (lower first)
- entropy_iou  the paper's "Entropy-IoU Sum": entropy + (1 - iou_score), both image means in [0, 1]
               (higher first; not in the released code: implemented from the paper's description)
- random       uniform, seeded.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.losses import self_information
from common.runtime import atomic_write_text

STRATEGIES = ("entropy", "iou_score", "entropy_iou", "confidence", "random")
HIGHER_FIRST = {"entropy": True, "entropy_iou": True, "confidence": False, "iou_score": False}


def budget_plan(n, init_ratio, total_ratio, rounds):
    """(initial labeled count, per-round increments) as AC_iters: init = round(N r0), final = round(N r1),
    the increment split equally over the rounds, the last round taking the remainder."""
    init = int(n * init_ratio + 0.5)
    final = int(n * total_ratio + 0.5)
    if final < init:
        raise ValueError(f"--total-ratio {total_ratio} gives fewer images ({final}) than --init-ratio ({init})")
    extra = final - init
    if not rounds:
        return init, []
    seg = extra // len(rounds)
    return init, [seg] * (len(rounds) - 1) + [extra - seg * (len(rounds) - 1)]


def epoch_plan(n, init, increments, sample_epochs, epochs, batch_size, epoch_iters=None):
    """Iterations of each epoch and the iteration at which each round starts. An epoch is
    max(labeled, unlabeled) // batch iterations (upstream's loader length) unless epoch_iters is set."""
    lengths, labeled, starts, it = [], init, [], 0
    for e in range(epochs):
        if e in sample_epochs:
            labeled += increments[sample_epochs.index(e)]
            starts.append(it)
        n_iter = epoch_iters or max(labeled, n - labeled) // batch_size
        lengths.append(max(1, n_iter))
        it += lengths[-1]
    return lengths, starts


def image_scores(logits, class_iou):
    """All acquisition scores of one image from its logits (1, C, H, W) and the class IoUs (C,) in [0, 1]."""
    return batch_image_scores(logits, class_iou)[0]


@torch.no_grad()
def batch_image_scores(logits, class_iou):
    """image_scores of each image of a batch, logits (B, C, H, W): one softmax per pixel serves all criteria.
    entropy: mean normalised entropy (common.losses.entropy_map); confidence: mean max probability; iou_score:
    mean IoU of the predicted class; entropy_iou = entropy + (1 - iou_score)."""
    prob = F.softmax(logits.float(), 1)
    conf, pred = prob.max(1)
    ent = self_information(prob).sum(1).mean((1, 2))  # = entropy_map(logits).mean() per image
    iou_s = torch.as_tensor(class_iou, dtype=torch.float32, device=pred.device)[pred].mean((1, 2))
    conf = conf.mean((1, 2))
    return [{"entropy": e, "confidence": c, "iou_score": u, "entropy_iou": e + (1.0 - u)}
            for e, c, u in zip(ent.tolist(), conf.tolist(), iou_s.tolist())]


def select(scores, k, strategy, rng=None):
    """k image ids out of scores {id: {criterion: value}} (random: from rng over the sorted ids)."""
    ids = sorted(scores)
    k = min(k, len(ids))
    if k <= 0:
        return []
    if strategy == "random":
        return [ids[i] for i in sorted(rng.choice(len(ids), size=k, replace=False))]
    rev = HIGHER_FIRST[strategy]
    order = sorted(ids, key=lambda i: (-scores[i][strategy] if rev else scores[i][strategy], i))
    return order[:k]


def class_pixel_counts(label_arrays, num_classes):
    """Per-class pixel and image counts over a list of label arrays (255 ignored)."""
    pix, img = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    for lab in label_arrays:
        c = np.bincount(lab[lab != 255].ravel().astype(np.int64), minlength=num_classes)[:num_classes]
        pix += c
        img += c > 0
    return pix, img


def write_round(folder, names, labeled, unlabeled, selected, extra):
    """Round files: labeled/unlabeled/selected lists (image paths relative to the target root) and JSON
    extras (scores, per-class pixel counts, class IoU and weights). Written atomically; a finished
    round folder is never rewritten (a resumed run skips finished rounds)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for fname, ids in (("labeled.txt", labeled), ("unlabeled.txt", unlabeled), ("selected.txt", selected)):
        atomic_write_text(folder / fname, "".join(names[i] + "\n" for i in ids))
    for key, obj in extra.items():
        if key.endswith(".md"):
            atomic_write_text(folder / key, obj + "\n")
        else:
            atomic_write_text(folder / key, json.dumps(obj, indent=1))
