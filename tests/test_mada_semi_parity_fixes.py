"""What the differential test of one MADAv2 step-2 iteration against the official code
(tests/upstream/test_mada_family.py::test_madav2_step2_training_iteration) found, checked without the official
code: the consistency sampling map is one H x W draw shared by the batch (upstream loss/loss.py:Criterion_cons
draws torch.rand(h, w)); `--cons-norm all` normalises over ignored pixels too (deviation 8's released behaviour);
the class confidence r is updated before the iteration's consistency terms use it (upstream's order); and
`--released-sched-order` (deviation 21) runs iteration i at poly(i + 1) in each of the three training scripts whose
upstream steps its PolynomialLR before the optimiser. The scripts' main() run for 3 iterations on a tiny
DeepLabV3+ with their data, checkpoints and evaluation replaced (no files read)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import runtime as rt
from common.models import DeepLabV3Plus
from mada import semi, train_stage1, train_stage2, train_stage2_semi

C = 19


def test_consistency_sampling_map_is_shared_by_the_batch():
    """Two identical images in a batch carry the same loss as one alone, drawn from the same seed: one (H, W) map."""
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(1, C, 6, 7, generator=g), torch.randn(1, C, 6, 7, generator=g)
    conf, lab = F.softmax(t, 1).max(1)
    r = torch.rand(C, generator=g)                                 # q well below 1 for most classes: pixels dropped
    one = semi.weighted_consistency(logits, lab, conf, r, generator=torch.Generator().manual_seed(3))
    two = semi.weighted_consistency(logits.repeat(2, 1, 1, 1), lab.repeat(2, 1, 1), conf.repeat(2, 1, 1), r,
                                    generator=torch.Generator().manual_seed(3))
    assert two.item() == pytest.approx(one.item(), rel=1e-6)
    other = semi.weighted_consistency(logits, lab, conf, r, generator=torch.Generator().manual_seed(4))
    assert other.item() != pytest.approx(one.item(), rel=1e-3)    # the draw matters at all


def test_consistency_norm_all_counts_ignored_pixels():
    g = torch.Generator().manual_seed(1)
    logits, t = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    conf, lab = F.softmax(t, 1).max(1)
    lab[:, :2] = 255
    ce = F.cross_entropy(logits, lab, ignore_index=255, reduction="none")
    w = conf ** 2                                                  # r = 0: every pixel kept
    valid = semi.weighted_consistency(logits, lab, conf, torch.zeros(4), norm="valid")
    released = semi.weighted_consistency(logits, lab, conf, torch.zeros(4), norm="all")
    assert valid.item() == pytest.approx(((w * ce).sum() / (w * (lab != 255)).sum()).item(), rel=1e-5)
    assert released.item() == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-5)
    assert released < valid


# ---------------------------------------------------------------------------------------------- scripts
def _batches(ds, batch_size, *a, **k):
    g = torch.Generator().manual_seed(batch_size * 7 + len(k))
    while True:
        y = torch.randint(0, C, (batch_size, 32, 32), generator=g)
        yield {"image": torch.randn(batch_size, 3, 32, 32, generator=g), "label": y, "index": torch.arange(batch_size)}


class _Target:
    def __len__(self):
        return 4

    def __getitem__(self, key):
        return {"image": torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(key[0]))}


def _run(monkeypatch, tmp_path, T, extra=()):
    """T.main for 3 iterations of a 10-iteration poly schedule; returns each SGD step's group lrs and the
    script's module (patched attributes restored on exit)."""
    torch.manual_seed(0)
    net = DeepLabV3Plus(C, "resnet18")
    mcfg = {"model": "deeplabv3plus", "backbone": "resnet18", "num_classes": C, "norm": "imagenet"}
    anchors = np.random.default_rng(0).random((3, C, 256)).astype(np.float32)
    lrs = []
    real_sgd = torch.optim.SGD

    def sgd(*a, **k):
        opt = real_sgd(*a, **k)
        opt.register_step_post_hook(lambda o, *_: lrs.append([g["lr"] for g in o.param_groups]))
        return opt

    monkeypatch.setattr(torch.optim, "SGD", sgd)
    monkeypatch.setattr(T.rt, "check_inputs", lambda *a, **k: None)
    monkeypatch.setattr(T, "segmenter_from_checkpoint", lambda *a, **k: (copy.deepcopy(net), mcfg))
    monkeypatch.setattr(T, "resolve_domain", lambda name, root, role: ("gta5" if role == "source" else "cityscapes",
                                                                       "real", "/nonexistent"))
    monkeypatch.setattr(T, "train_set", lambda *a, **k: _Target())
    monkeypatch.setattr(T, "infinite_loader", _batches)
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: {"mIoU": 0.0})
    monkeypatch.setattr(T, "format_table", lambda res: "")
    monkeypatch.setattr(T.core, "read_selection", lambda *a: ["img"])
    monkeypatch.setattr(T.core, "eval_set_at", lambda *a, **k: None)
    monkeypatch.setattr(T.core, "subset_by_names", lambda *a, **k: None)
    monkeypatch.setattr(T.core, "load_anchors", lambda *a, **k: (anchors.copy(), np.ones((3, C), bool)))
    args = T.parse_args(["--out", str(tmp_path / "run"), "--iters", "10", "--stop-iter", "3", "--lr", "0.01",
                         "--batch-size", "2", "--amp", "off", "--device", "cpu", "--workers", "0",
                         "--eval-every", "100", "--save-every", "100", *extra])
    T.main(args)
    return lrs, args


@pytest.mark.parametrize("T", [train_stage1, train_stage2, train_stage2_semi], ids=lambda m: m.__name__)
@pytest.mark.parametrize("released", [False, True])
def test_released_sched_order_flag(tmp_path, monkeypatch, T, released):
    """Default: iteration i at poly(i) (the base lr first); --released-sched-order: poly(i + 1), as upstream's
    scheduler_step before each step (deviation 21). Each group at its multiplier."""
    extra = ["--anchor-start", "1"] if T is train_stage2_semi else []
    lrs, args = _run(monkeypatch, tmp_path, T, extra + (["--released-sched-order"] if released else []))
    assert args.released_sched_order is released
    mult = args.head_lr_mult if hasattr(args, "head_lr_mult") else 1.0
    expect = [[rt.poly_lr(0.01, i + released, 10), rt.poly_lr(0.01, i + released, 10) * mult] for i in range(3)]
    assert lrs == expect                                        # the same float operations: exactly
    assert (lrs[0][0] == 0.01) is (not released)


def test_semi_class_confidence_updated_before_the_consistency(tmp_path, monkeypatch):
    """The consistency terms of iteration i sample with r updated by iteration i's student confidence (upstream
    adaptation_model_AEL.py:step_active_stage2 computes the momentum update, then the losses; from r = 0 the
    first iteration uses 0.001 x the confidence, not 0)."""
    used, cc = [], []
    real_wc, real_cc = semi.weighted_consistency, semi.category_confidence
    monkeypatch.setattr(semi, "weighted_consistency",
                        lambda *a, **k: used.append(a[3].clone()) or real_wc(*a, **k))
    monkeypatch.setattr(semi, "category_confidence", lambda *a: cc.append(real_cc(*a)) or cc[-1])
    _run(monkeypatch, tmp_path, train_stage2_semi)
    assert len(cc) == 3 and len(used) == 6
    r = torch.zeros(C)
    for i in range(3):
        r = 0.999 * r + 0.001 * cc[i]
        assert torch.allclose(used[2 * i], r, rtol=1e-6, atol=0) and torch.equal(used[2 * i], used[2 * i + 1])
    assert used[0].abs().max() > 0
