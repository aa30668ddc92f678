"""ssada/ against the official SS-ADA (ywher/SS-ADA @ 483e335, and its training script at a02e3d8: folder SS-ADA-train)
and TUFL (ywher/TUFL @ e84db35) code (tests/upstream/README.md): the per-image acquisition scores (calculate_entropy,
calculate_confidence, AC_Sample.calculate_iou_score, then np.mean per image), THE SELECTED IMAGES
(AC_Sample.update_labeled_unlabeled driven with those scores), the IoU-based class weights
(AC_Sample.generate_class_weights_2), and TUFL's UnsupFocalLoss (fixed tau) and AdaptUnsupFocalLoss (adaptive tau, two
calls: the thresholds carried over) forward and gradient, the shared-threshold deviation shown exactly (and reproduced
by --shared-thresholds), and one TUFL training iteration (train_step.unsup_step + backward +
utils/optimizer.py:Optimizer.step on TUFL's BiSeNet with a
CPU stand-in for inplace_abn, vs ssada/train_tufl.py main(): every weight, BN statistic and momentum buffer). CPU, fp32.
Run: SEGDA_UPSTREAM=DIR python -m pytest -q tests/upstream/test_ssada_tufl.py -m upstream

SS-ADA's supervised criterion (util/ohem.py:ProbOhemCrossEntropy2d with the IoU class weights, min_kept 0 included)
and class-threshold pseudo-label mask (util/functions.py:generate_confidence_mask) forward and gradient; the warm-up +
poly scheduler (util/scheduler.py:WarmupLRScheduler; the listed deviation that upstream never applies it to the
stepped optimiser, recorded, and reproduced by --lr-schedule constant over three iterations of upstream's main():
test_ssada_released_lr_sequence); and ONE SS-ADA TRAINING ITERATION: ss_ada_bisenetv1_single.py's own main() (only at
commit a02e3d8, "upload ss_ada_training"; removed again in c063310, so not in the 483e335 checkout) driven for one
iteration after an active round, against ssada/train_ssada.py main() with --forward two: every head's upsampled
logits, the six OHEM terms, the pseudo labels, confidences and masks of the weak, CutMixed strong and
feature-perturbed views, the three unlabeled CE terms, the loss sum, every lr and weight decay, every weight, BN
statistic and momentum buffer after the step, and the end-of-epoch validation's predictions. Random draws: the CutMix
boxes and partners are data items given to both sides; the feature-perturbation dropout masks are fixed by
monkeypatching the draw (F.dropout / F.dropout2d: a mask per kind and shape). AC_Sample's inference loop reads
images from disk and writes PNGs; the scores are computed here with the very functions it calls on the same logits,
and update_labeled_unlabeled runs with rank 1 (the selection itself; rank 0 only writes the lists and re-reads the
ground truth). When OpenCV is absent, `cv2` is a stand-in module (util/functions.py imports it at module level to
write PNGs, never called here).
"""
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from upstream import harness as H
from ssada import active, losses

C = 19


@pytest.fixture(autouse=True)
def _cv2(monkeypatch):
    """util/functions.py imports cv2 only to write prediction PNGs (never called here) and sets its thread count at
    import: a stand-in module when OpenCV is not installed."""
    try:
        import cv2  # noqa: F401
    except ImportError:
        import sys
        monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(setNumThreads=lambda n: None))


def _logits(n, seed, hw=(12, 20)):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, C, *hw, generator=g)
    x[:, :4] += 1.5 * torch.rand(n, 4, 1, 1, generator=g)
    return x


def _iou(seed):
    return torch.rand(C, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("strategy", ["entropy", "confidence", "iou_score"])
def test_acquisition_scores_and_selected_images(strategy):
    """Per image: mean over pixels of calculate_entropy / calculate_confidence / calculate_iou_score on the (C, H, W)
    logits (AC_Sample.inference_unlabeled) == our batch_image_scores; the images update_labeled_unlabeled picks
    (sorted by score, highest entropy / lowest confidence or IoU score first, sample_increment of them) == our
    select."""
    logits = _logits(40, 1)
    iou = _iou(2)
    with H.upstream("SS-ADA"):
        fn = __import__("util.functions", fromlist=["x"])
        acs = __import__("util.active_sample", fromlist=["x"])
        fake = types.SimpleNamespace(iou_classes=iou, active_strategy=strategy, sample_times=0,
                                     ac_iters=types.SimpleNamespace(sample_increment=[7]),
                                     labeled_names=["l0", "l1"])
        crit = {"entropy": fn.calculate_entropy, "confidence": fn.calculate_confidence,
                "iou_score": types.MethodType(acs.AC_Sample.calculate_iou_score, fake)}[strategy]
        names = [f"img{i:03d}_leftImg8bit.png" for i in range(len(logits))]
        theirs = {n: np.mean(crit(x).cpu().numpy()) for n, x in zip(names, logits)}
        fake.unlabeled_names = list(names)
        acs.AC_Sample.update_labeled_unlabeled(fake, dict(theirs), rank=1)
    ours_s = active.batch_image_scores(logits, iou.float())
    ours = {n: s for n, s in zip(names, ours_s)}
    H.compare(f"{strategy} image score (40 images)", torch.tensor([ours[n][strategy] for n in names]).double(),
              torch.tensor([float(theirs[n]) for n in names]).double(),
              official=f"SS-ADA util/active_sample.py:AC_Sample.inference_unlabeled ({strategy})")
    picked = active.select(ours, 7, strategy)
    code = {n: i for i, n in enumerate(names)}
    H.compare(f"{strategy}: selected images (7 of 40, in order)", torch.tensor([code[n] for n in picked]),
              torch.tensor([code[n] for n in fake.labeled_names[2:]]),
              official="SS-ADA util/active_sample.py:AC_Sample.update_labeled_unlabeled")
    assert sorted(fake.unlabeled_names) == sorted(set(names) - set(picked))


def test_iou_class_weights():
    """generate_class_weights_2: (1 - IoU_c)(upper - 1) + 1 == our iou_class_weights."""
    iou = _iou(3)
    with H.upstream("SS-ADA"):
        acs = __import__("util.active_sample", fromlist=["x"])
        fake = types.SimpleNamespace(iou_classes=iou, num_classes=C)
        theirs = acs.AC_Sample.generate_class_weights_2(fake, fre_cfg={"upper_value": 2.0})
    H.compare("IoU-based class weights", losses.iou_class_weights(iou.float(), 2.0), theirs,
              official="SS-ADA util/active_sample.py:AC_Sample.generate_class_weights_2")


@pytest.mark.parametrize("tau,focal_type,gamma", [(0.8, 2, 2.0), (-1, 2, 2.0), (0.5, 1, 1.0)])
def test_tufl_unsup_focal_loss(tau, focal_type, gamma):
    """TUFL utils/loss.py:UnsupFocalLoss (fixed tau; -1 = no threshold) forward and its gradient w.r.t. both logits
    == our unsup_focal_loss."""
    g = torch.Generator().manual_seed(4)
    a0, b0 = 3 * torch.randn(2, C, 10, 14, generator=g), 3 * torch.randn(2, C, 10, 14, generator=g)
    with H.upstream("TUFL"):
        lm = __import__("utils.loss", fromlist=["x"])
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        crit = lm.UnsupFocalLoss(focal_gamma=gamma, focal_type=focal_type, uda_confidence_thresh=tau)
        lt = crit(a, b)
        lt.backward()
        ga, gb = a.grad.clone(), b.grad.clone()
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    lo, frac = losses.unsup_focal_loss(a, b, gamma=gamma, thresh=None if tau == -1 else tau, focal_type=focal_type)
    lo.backward()
    off = "TUFL utils/loss.py:UnsupFocalLoss.forward"
    H.compare(f"focal loss tau {tau} type {focal_type} gamma {gamma}", lo.detach(), lt.detach(), official=off)
    H.compare(f"gradient w.r.t. the reference logits (tau {tau}, type {focal_type})", a.grad, ga, official=off)
    H.compare(f"gradient w.r.t. the other view's logits (tau {tau}, type {focal_type})", b.grad, gb, official=off)


# ------------------------------------------------------------------------------------------------
# TUFL's threshold-adaptive unsupervised focal loss (AdaptUnsupFocalLoss)
# ------------------------------------------------------------------------------------------------
def _tufl_views(seed, n=2, c=13, hw=(12, 16)):
    """Two views' logits, peaked enough that every class has pixels above and below tau 0.8."""
    g = torch.Generator().manual_seed(seed)
    a = 4 * torch.randn(n, c, *hw, generator=g)
    return a, a + 1.5 * torch.randn(n, c, *hw, generator=g)


@pytest.mark.parametrize("b,weighted", [(0.8, True), (0.2, False)])
def test_tufl_adaptive_focal_loss_two_steps(b, weighted):
    """TUFL utils/loss.py:AdaptUnsupFocalLoss (focal type 1, gamma 2, a 0.9, d 8, tau0 0.8; b 0.8 as the README's
    adapt_focal command, and the class default 0.2; CityScapes_13 'middle' weights as get_loss.py passes, or none),
    called twice on two batches (its per-class thresholds carry over): after each call the thresholds
    (cls_thresh) == our AdaptiveThresholds.update, the kept fraction (adapt_ratio) == ours, the loss and its
    gradient w.r.t. both logits == our unsup_focal_loss with those thresholds (train_tufl.py's call)."""
    C13 = 13
    w = torch.tensor(losses.TUFL_CLASS_WEIGHTS["middle"]) if weighted else None
    off = "TUFL utils/loss.py:AdaptUnsupFocalLoss.forward"
    with H.upstream("TUFL"):
        lm = __import__("utils.loss", fromlist=["x"])
        crit = lm.AdaptUnsupFocalLoss(weight=w, uda_confidence_thresh=0.8, focal_gamma=2.0, adapt_b=b, adapt_a=0.9,
                                      adapt_d=8.0, a_decay=0, n_class=C13)
        theirs = []
        for step in range(2):
            a0, b0 = _tufl_views(10 + step)
            a, bb = a0.clone().requires_grad_(), b0.clone().requires_grad_()
            lt, ratio, _solid = crit(a, bb, None, step)
            lt.backward()
            theirs.append((a0, b0, lt.detach(), ratio, a.grad.clone(), bb.grad.clone(), crit.cls_thresh.clone()))
    ours_thr = losses.AdaptiveThresholds(C13, 0.8, a=0.9, b=b, d=8.0)
    for step, (a0, b0, lt, ratio, ga, gb, thr_t) in enumerate(theirs):
        a, bb = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        tau = ours_thr.update(torch.softmax(a.detach(), 1))
        lo, frac = losses.unsup_focal_loss(a, bb, gamma=2.0, thresh=tau, focal_type=1, weight=w)
        lo.backward()
        assert (thr_t - 0.8).abs().min() > 1e-4 and 0.05 < ratio < 0.95  # every threshold moved; a real selection
        what = f"(b {b}, {'weighted' if weighted else 'unweighted'}, call {step + 1})"
        H.compare(f"adaptive thresholds after the update {what}", ours_thr.tau, thr_t, official=off)
        H.compare(f"kept fraction (adapt_ratio) {what}", torch.tensor(frac).double(), torch.tensor(ratio).double(),
                  official=off)
        H.compare(f"adaptive focal loss {what}", lo.detach(), lt, official=off)
        H.compare(f"its gradient w.r.t. the reference logits {what}", a.grad, ga, official=off)
        H.compare(f"its gradient w.r.t. the other view's logits {what}", bb.grad, gb, official=off)


# ------------------------------------------------------------------------------------------------
# One TUFL training iteration: unsup/train_step.py:train_step.unsup_step + loss.backward() + Optimizer.step()
# ------------------------------------------------------------------------------------------------
class _ABN(torch.nn.Module):
    """CPU stand-in for mapillary/inplace_abn's InPlaceABN(Sync) (a compiled CUDA package), training and eval:
    batch norm with the scale |weight| + eps (src/inplace_abn_cpu.cpp forward_cpu; running statistics with the
    unbiased variance and momentum 0.1, as F.batch_norm), then its activation (leaky ReLU 0.01 or identity).
    The same parameters and buffers as the real module (no num_batches_tracked, as inplace_abn < 1.0)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, activation="leaky_relu",
                 activation_param=0.01, **kw):
        super().__init__()
        self.eps, self.momentum, self.activation, self.slope = eps, momentum, activation, activation_param
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        y = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight.abs() + self.eps,
                                           self.bias, self.training, self.momentum, self.eps)
        if self.activation == "leaky_relu":
            return torch.nn.functional.leaky_relu(y, self.slope)
        assert self.activation in ("identity", "none"), self.activation
        return y


TUFL_HW = (64, 64)
TUFL_LR = 1e-3  # larger than the README's 0.5e-5 so that a step moves the weights by more than the 1e-5 tolerance


def _tufl_batch(seed):
    g = torch.Generator().manual_seed(seed)
    x, xt, s1 = (torch.randn(1, 3, *TUFL_HW, generator=g) for _ in range(3))
    y = torch.randint(0, 13, (1, *TUFL_HW), generator=g)
    y[:, :5] = 255
    return x, y, xt, s1


def _run_tufl_upstream(monkeypatch, thresholds, freeze_bn, perturb=0.0, shared=False):
    """Upstream: BiSeNet(13, sup_mode='deep') (random weights), get_loss / get_optim / train_step with the README's
    focal (or adapt_focal) arguments, then train_paste.train()'s loop body for iteration 0: unsup_step(...),
    loss.backward(), optim.step(). train() itself is not run: it opens an NCCL process group and wraps the nets in
    DistributedDataParallel (nothing else in the loop body is skipped: no paste mode). perturb: the inputs scaled by
    1 + perturb (to measure upstream's own fp32 noise). The second view's logits
    are aligned by perform_affine_tf with a horizontal flip matrix (ours mirrors; the README lists it). Adaptive tau:
    shared=True runs upstream as released (one AdaptUnsupFocalLoss for the three heads), False gives each head its
    own copy (our default). Returns also the threshold vectors after the step, one per head."""
    x, y, xt, s1 = _tufl_batch(5)
    x, xt, s1 = x * (1 + perturb), xt * (1 + perturb), s1 * (1 + perturb)
    abn = types.ModuleType("inplace_abn")
    abn.InPlaceABNSync = abn.InPlaceABN = _ABN
    monkeypatch.setitem(__import__("sys").modules, "inplace_abn", abn)
    with H.upstream("TUFL", "unsup"), monkeypatch.context() as m:
        resnet = __import__("unsup.resnet", fromlist=["x"])
        m.setattr(resnet.Resnet18, "init_weight", lambda self: None)  # downloads ImageNet weights
        model = __import__("model")
        net = H.randomize(model.BiSeNet(n_classes=13, sup_mode="deep"), seed=3)
        init = H.clone_state(net)
        net.eval() if freeze_bn else net.train()
        get_loss = __import__("unsup.get_loss", fromlist=["x"]).get_loss
        get_optim = __import__("unsup.get_optim", fromlist=["x"]).get_optim
        ts = __import__("unsup.train_step", fromlist=["x"])
        args = types.SimpleNamespace(
            weight_mode="middle", ignore_index=255, sup_loss="regular", dataset="CityScapes", supervision_mode="unsup",
            unsup_loss="adapt_focal" if thresholds == "adaptive" else "focal", uda_confidence_thresh=0.8,
            uda_softmax_temp=-1, focal_gamma=2.0, adapt_b=0.8, adapt_a=0.9, adapt_d=8.0, a_decay=0, loss_ohem=True,
            loss_ohem_ratio=0.5, paste_mode="None", n_img_per_gpu_train=1, sup_mode="deep", unsup_coeff=0.08,
            soft_weight=0.8, momentum=0.9, weight_decay=5e-4, lr_start=TUFL_LR, max_iter=2000, lr_power=0.9,
            warm_up_ratio=0.0, warmup_start_lr=1e-5, tensorboard=False)
        crit_p, crit_u, crit_paste = get_loss(args, TUFL_HW, 13)
        heads = [crit_u] * 3
        if thresholds == "adaptive" and not shared:  # one threshold vector per head (our default, a listed deviation)
            import copy
            heads = [crit_u, copy.deepcopy(crit_u), copy.deepcopy(crit_u)]
            calls = iter(range(3))
            crit_u = lambda *a: heads[next(calls)](*a)
        rec = H.record_steps(m, watch=[net])
        optim = get_optim(args, types.SimpleNamespace(module=net))
        step = ts.train_step(args, crit_p, crit_u, crit_paste, 13)
        flip = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
        loss, *_ = step.unsup_step(x, y.unsqueeze(1), xt, s1.flip(-1), flip, ["t0"], 0, None, None, None, None, y,
                                   None, None, None, None, optim, net, None)
        loss.backward()
        optim.step()
    taus = [h.cls_thresh.clone() for h in heads] if thresholds == "adaptive" else None
    return net, init, rec, float(loss.detach()), taus


def _run_tufl_ours(monkeypatch, tmp_path, init, thresholds, freeze_bn, extra=()):
    """Ours: ssada/train_tufl.py main() in-process for one adaptation iteration (--init-from: the upstream initial
    weights through ssada.releases.from_tufl), the same batch; data,
    evaluation and checkpoint writing patched out. extra: more arguments (--shared-thresholds). Returns also the loss
    of the step and the adaptive threshold vectors after it (final.json), one per head."""
    import common.runtime as rt
    from ssada import releases, train_tufl
    from common.bisenet import BiSeNetV1
    x, y, xt, s1 = _tufl_batch(5)
    sd, cfg = releases.from_tufl(init, "upstream initial weights")
    model = BiSeNetV1(13, variant="tufl")
    sd.update({k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if k.endswith("num_batches_tracked")})
    model = H.load_strict(model, sd)  # inplace_abn keeps no step counters (load_segmenter: 0)
    loaders = iter([iter([{"image": x, "label": y}]), iter([{"image": xt, "s1": s1}])])
    (tmp_path / "init.pth").touch()
    args = train_tufl.parse_args(
        ["--source", "cityscapes", "--source-root", str(tmp_path), "--target", "crosscity", "--target-root",
         str(tmp_path), "--init-from", str(tmp_path / "init.pth"), "--out", str(tmp_path / f"ours{''.join(extra)}"),
         "--iters", "2000",
         "--stop-iter", "1", "--batch-size", "1", "--amp", "off", "--device", "cpu", "--workers", "0",
         "--crop-size", f"{TUFL_HW[0]},{TUFL_HW[1]}", "--lr", str(TUFL_LR), "--thresholds", thresholds,
         "--freeze-bn", str(int(freeze_bn)), "--eval-every", "1000", "--save-every", "1000", *extra])
    with monkeypatch.context() as m:
        m.setattr(train_tufl, "load_segmenter", lambda *a, **k: (model, dict(cfg), "tufl"))
        m.setattr(train_tufl, "resolve_domain", lambda name, root, role: (name, "real", root))
        m.setattr(train_tufl, "train_set", lambda *a, **k: None)
        m.setattr(train_tufl, "build_dataset", lambda *a, **k: types.SimpleNamespace(files=[]))
        m.setattr(train_tufl, "UnlabeledViews", lambda *a, **k: None)
        m.setattr(train_tufl, "infinite_loader", lambda *a, **k: next(loaders))
        for name in ("evaluate", "evaluate_sliding"):
            m.setattr(train_tufl, name, lambda *a, **k: {"mIoU": 0.0, "per_class": {}})
        m.setattr(rt, "check_inputs", lambda *a, **k: None)
        m.setattr(rt, "save_checkpoint", lambda *a, **k: None)
        loss = []
        rec = H.record_steps(m, watch=[model], after=lambda r, k: loss.append(
            _frame_locals("main", "train_tufl.py")["loss"]))
        train_tufl.main(args)
    taus = json.loads((tmp_path / f"ours{''.join(extra)}" / "final.json").read_text())["adaptive_tau"]
    return model, rec, loss[0], torch.tensor(taus, dtype=torch.float64)


TUFL_CASES = {"fixed-True": ("fixed", True, False), "adaptive-True": ("adaptive", True, False),
              "adaptive-shared-True": ("adaptive", True, True), "fixed-False": ("fixed", False, False)}


def _tufl_after(rec, abn):
    """An upstream step's weights and BN statistics in our names (an InPlaceABN scale |w| + eps: see below)."""
    from ssada import releases
    after = rec[0].steps[0].modules[0]
    sd = releases.bisenet_to_ours({k: v + releases.ABN_EPS if k in abn else v for k, v in after.items()})
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # inplace_abn has none


@pytest.mark.parametrize("case", list(TUFL_CASES))
def test_tufl_training_iteration(monkeypatch, tmp_path, case):
    """One adaptation iteration (README command: focal, tau 0.8, gamma 2, lambda_u 0.08, frozen BN, no warm-up;
    also adapt_focal b 0.8, and BN in training mode) from the same random weights on the same source batch and
    target views: the loss, every weight and BN statistic after the step (upstream's through
    ssada.releases.from_tufl), every momentum buffer, the four groups' learning rates, and with adaptive tau the
    threshold vectors after the step == ours. Adaptive: `adaptive-True` gives upstream one criterion per head (our
    default, a listed deviation); `adaptive-shared-True` runs upstream's released single criterion (one threshold
    vector updated by the three heads in turn) against ours with --shared-thresholds, and records our default's
    difference from it. A weight or buffer off by more than 1e-5 is held instead to upstream's own fp32 noise on it
    (below)."""
    from ssada import releases
    thresholds, freeze_bn, shared = TUFL_CASES[case]
    flag = ("--shared-thresholds",) if shared else ()
    net, init, rec_t, loss_t, tau_t = _run_tufl_upstream(monkeypatch, thresholds, freeze_bn, shared=shared)
    model, rec, loss_o, tau_o = _run_tufl_ours(monkeypatch, tmp_path, init, thresholds, freeze_bn, flag)
    off = "TUFL unsup/train_step.py:train_step.unsup_step + utils/optimizer.py:Optimizer.step"
    what = f"TUFL {thresholds} tau{' ' + flag[0] if flag else ''}, {'frozen' if freeze_bn else 'training'} BN"
    assert len(rec) == 1 and len(rec[0].steps) == 1 and len(rec_t[0].steps) == 1
    H.compare(f"{what}: SGD group learning rates", torch.tensor(sorted(rec[0].lrs[0])),
              torch.tensor(sorted(rec_t[0].lrs[0])), official=off)
    H.compare(f"{what}: loss", loss_o, torch.tensor(loss_t), official=off)
    if thresholds == "adaptive":
        assert shared == all(t is tau_t[0] or torch.equal(t, tau_t[0]) for t in tau_t)
        H.compare(f"{what}: threshold vectors after the step (out, aux16, aux32)", tau_o, torch.stack(tau_t),
                  official=off + " (utils/loss.py:AdaptUnsupFocalLoss.ias_thresh)")
    # An InPlaceABN's scale is |w| + eps; from positive initial w (asserted) a step gives w' = w - lr g, which our
    # BatchNorm (weight |w| + eps) meets as w' + eps: the sign is kept (from_tufl's abs is for a file, where a
    # negative w means the scale |w|; a large step here can carry w below 0 while ours goes negative too).
    after = rec_t[0].steps[0].modules[0]
    abn = [k for k in after if k.endswith(".weight") and k[:-6] + "running_mean" in after]
    assert all(bool((init[k] > 0).all()) for k in abn)
    sd_t = _tufl_after(rec_t, abn)
    ours_sd = rec[0].steps[0].modules[0]
    ours_sd = {k: v for k, v in ours_sd.items() if not k.endswith("num_batches_tracked")}  # inplace_abn has none
    name = {id(p): releases._rename(n) for n, p in net.named_parameters()}
    buf_t = {f"{name[i]}:{k}": v for i, s in rec_t[0].steps[0].state.items() for k, v in s.items()}
    buf = H.state_by_name(rec[0].steps[0].state, model)
    # A weight or buffer off by more than 1e-5 is held instead to upstream's own fp32 noise on it: the same upstream
    # step on the inputs scaled by 1 + 1e-7. With frozen BN the random running statistics saturate the FFM's sigmoid
    # attention and its weights' gradients come out of cancellation: measured, upstream's own ffm.conv1/conv2
    # buffers move by 1e-4 relative under that perturbation, ours are 1.1e-5 from them (and, with one thread, the
    # weights ffm.atten.0/2 1.9e-5 from upstream's). Each such tensor is named in the record's note with its noise;
    # every other one is held to 1e-5.
    relt = lambda a, b: {k: float((a[k] - v).abs().max() / v.abs().max().clamp(min=1e-30))
                         for k, v in b.items() if v.is_floating_point()}
    rel_w, rel = relt(ours_sd, sd_t), relt(buf, buf_t)
    noise_w, noise = {}, {}
    if any(r > H.RTOL for r in [*rel_w.values(), *rel.values()]):
        net_p, _, rec_p, _, _ = _run_tufl_upstream(monkeypatch, thresholds, freeze_bn, perturb=1e-7, shared=shared)
        name_p = {id(p): releases._rename(n) for n, p in net_p.named_parameters()}
        buf_p = {f"{name_p[i]}:{k}": v for i, s in rec_p[0].steps[0].state.items() for k, v in s.items()}
        noise = {k: float((buf_p[k] - buf_t[k]).abs().max() / buf_t[k].abs().max()) for k in rel if rel[k] > H.RTOL}
        sd_p = _tufl_after(rec_p, abn)
        noise_w = {k: float((sd_p[k] - sd_t[k]).abs().max() / sd_t[k].abs().max()) for k in rel_w
                   if rel_w[k] > H.RTOL}
    for kind, o, t, r, nz in (("weights and BN statistics after the step", ours_sd, sd_t, rel_w, noise_w),
                              ("SGD momentum buffers", buf, buf_t, rel, noise)):
        H.compare_states(f"{what}: {kind}", o, {k: v for k, v in t.items() if k not in nz},
                         names={k: k for k in t if k not in nz}, official=off,
                         note=f"{len(nz)} tensors off by more than 1e-5 compared to their noise in the next row")
        if nz:
            H.compare_states(f"{what}: {kind} off by > 1e-5, each held to upstream's own fp32 noise", o,
                             {k: t[k] for k in nz}, names={k: k for k in nz}, rtol=max(nz.values()), official=off,
                             note="; ".join(f"{k}: {r[k]:.2e} off, noise {nz[k]:.1e}" for k in sorted(nz)))
            assert all(r[k] <= nz[k] for k in nz), {k: (r[k], nz[k]) for k in nz}
    if shared:  # our default (one vector per head) against upstream's released shared vector: recorded
        _, rec_d, loss_d, tau_d = _run_tufl_ours(monkeypatch, tmp_path, init, thresholds, freeze_bn)
        sd_d = {k: v for k, v in rec_d[0].steps[0].modules[0].items() if not k.endswith("num_batches_tracked")}
        worst = max((r, k) for k, r in relt(sd_d, sd_t).items())
        for n, o, t, note in (("threshold vectors after the step", tau_d, torch.stack(tau_t), ""),
                              ("loss", loss_d, torch.tensor(loss_t), ""),
                              ("weights after the step", None, None, f"worst at {worst[1]}")):
            d, r, _ = H._measure(o, t) if o is not None else (None, worst[0], False)
            H.record(f"{what}: our default (one vector per head) vs upstream's shared vector: {n} (listed deviation)",
                     d, r, False, official=off, note=note or "one threshold vector per head here, shared upstream")
        assert H._measure(tau_d, torch.stack(tau_t))[1] > H.RTOL


def test_tufl_shared_thresholds():
    """The listed deviation 'TUFL adaptive thresholds' (README deviations table) and its flag, shown exactly:
    upstream's unsup_step calls ONE AdaptUnsupFocalLoss for the main, 1/16 and 1/32 heads, so its per-class thresholds
    are updated three times per step, each head seeing the previous head's update. On the same three heads' logits:
    --shared-thresholds (train_tufl.py: one AdaptiveThresholds object for the three heads, updated in head order) ==
    upstream's shared criterion after each update (thresholds and loss); our default (one vector per head) == one
    upstream criterion per head, and its difference from the shared criterion at the 1/16 and 1/32 heads is recorded
    (not asserted equal; the main head, updated first, is equal)."""
    C13 = 13
    w = torch.tensor(losses.TUFL_CLASS_WEIGHTS["middle"])
    heads = [_tufl_views(20 + h) for h in range(3)]
    off = "TUFL unsup/train_step.py:train_step.unsup_step (one criteria_unsup for the three heads)"
    kw = dict(weight=w, uda_confidence_thresh=0.8, focal_gamma=2.0, adapt_b=0.8, adapt_a=0.9, adapt_d=8.0, n_class=C13)
    with H.upstream("TUFL"):
        lm = __import__("utils.loss", fromlist=["x"])
        shared = lm.AdaptUnsupFocalLoss(**kw)
        own = [lm.AdaptUnsupFocalLoss(**kw) for _ in heads]
        t_shared, t_own = [], []
        for h, (a, b) in enumerate(heads):
            t_shared.append((shared(a, b, None, 0)[0], shared.cls_thresh.clone()))
            t_own.append((own[h](a, b, None, 0)[0], own[h].cls_thresh.clone()))
    new = lambda: losses.AdaptiveThresholds(C13, 0.8, a=0.9, b=0.8, d=8.0)
    one = new()  # --shared-thresholds: train_tufl.py's thresholds = [one] * 3
    for h, (a, b) in enumerate(heads):
        head = ("main", "1/16", "1/32")[h]
        tau_s = one.update(torch.softmax(a, 1))
        lo_s, _ = losses.unsup_focal_loss(a, b, gamma=2.0, thresh=tau_s, focal_type=1, weight=w)
        H.compare(f"{head} head, --shared-thresholds vs upstream's shared criterion: thresholds", one.tau,
                  t_shared[h][1], official=off)
        H.compare(f"{head} head, --shared-thresholds vs upstream's shared criterion: loss", lo_s, t_shared[h][0],
                  official=off)
        thr = new()  # the default: one vector per head
        tau = thr.update(torch.softmax(a, 1))
        lo, _ = losses.unsup_focal_loss(a, b, gamma=2.0, thresh=tau, focal_type=1, weight=w)
        H.compare(f"{head} head, one criterion per head: thresholds", thr.tau, t_own[h][1], official=off)
        H.compare(f"{head} head, one criterion per head: loss", lo, t_own[h][0], official=off)
        if h == 0:
            H.compare("main head, upstream's shared criterion: thresholds", thr.tau, t_shared[0][1], official=off)
            H.compare("main head, upstream's shared criterion: loss", lo, t_shared[0][0], official=off)
        else:
            for what, o, t in (("thresholds", thr.tau, t_shared[h][1]), ("loss", lo, t_shared[h][0])):
                d, r, _ = H._measure(o, t)
                H.record(f"{head} head vs upstream's shared criterion: {what} (listed deviation)", d, r, False,
                         official=off, note="one threshold vector per head here (the default), shared by the three "
                         "heads upstream (--shared-thresholds)")
                assert r > H.RTOL, f"{head} {what}: expected the shared-vector difference"


# ------------------------------------------------------------------------------------------------
# SS-ADA's losses. The supervised criterion and the class-threshold mask are in the 483e335 checkout; the training
# script ss_ada_bisenetv1_single.py (the UniMatch pseudo-label CE on the two strong views and the feature-perturbed
# view, the loss sum, the whole iteration) exists only at a02e3d8 ("upload ss_ada_training", cited by ssada/README.md's
# recipe table; removed in c063310): the second pin, folder SS-ADA-train, runs it (test_ssada_training_iteration).
# ------------------------------------------------------------------------------------------------
def _ohem_case(seed, n=2, hw=(32, 64)):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, C, *hw, generator=g)
    label = torch.randint(0, C, (n, *hw), generator=g)
    logits.scatter_(1, label.unsqueeze(1), 9.0 * torch.rand(n, 1, *hw, generator=g))  # a spread of p(true class)
    label[:, :4] = 255
    label[:, :, -3:] = 255
    return logits, label


@pytest.mark.parametrize("min_kept,weighted", [(1000, True), (3000, True), (3000, False), (10 ** 6, True), (20, False),
                                               (0, True), (0, False)])
def test_ssada_ohem_ce_with_iou_class_weights(min_kept, weighted):
    """SS-ADA util/ohem.py:ProbOhemCrossEntropy2d (thresh 0.7, ignore 255; use_weight with the IoU class weights of
    AC_Sample.generate_class_weights_2, as the training script builds criterion_l after a round, or unweighted as
    before the first round) forward and gradient w.r.t. the logits == our weighted_ohem_ce, on 2 x 19 x 32 x 64 logits
    with ignored rows/columns (3416 valid pixels, 59% of them at p(true class) <= 0.7): min_kept 3000 (the 3000th
    hardest pixel is at 0.97: the threshold moves up to it), 1000 and 20 (the 0.7 threshold holds), 10**6 (more than
    the valid pixels: no mining), 0 (upstream skips the mining: every valid pixel counts, also the 40% above 0.7;
    ours thresholded at 0.7 before issue 27)."""
    logits0, label = _ohem_case(30 + min_kept % 7)
    iou = _iou(31)
    with H.upstream("SS-ADA"):
        ohem = __import__("util.ohem", fromlist=["x"])
        acs = __import__("util.active_sample", fromlist=["x"])
        w = acs.AC_Sample.generate_class_weights_2(types.SimpleNamespace(iou_classes=iou, num_classes=C),
                                                   fre_cfg={"upper_value": 2.0}).float() if weighted else None
        crit = ohem.ProbOhemCrossEntropy2d(ignore_index=255, thresh=0.7, min_kept=min_kept, use_weight=weighted,
                                           weight=w)
        lt_in = logits0.clone().requires_grad_()
        lt = crit(lt_in, label.clone())
        lt.backward()
    lo_in = logits0.clone().requires_grad_()
    w_ours = losses.iou_class_weights(iou.float(), 2.0) if weighted else None
    lo = losses.weighted_ohem_ce(lo_in, label.clone(), thresh=0.7, min_kept=min_kept, weight=w_ours)
    lo.backward()
    off = "SS-ADA util/ohem.py:ProbOhemCrossEntropy2d.forward"
    what = f"OHEM CE min_kept {min_kept}, {'IoU-weighted' if weighted else 'unweighted'}"
    H.compare(f"{what}: loss", lo.detach(), lt.detach(), official=off)
    H.compare(f"{what}: gradient w.r.t. the logits", lo_in.grad, lt_in.grad, official=off)


@pytest.mark.parametrize("ratio", [1.0, 0.37])
def test_ssada_class_threshold_confidence_mask(ratio):
    """SS-ADA util/functions.py:generate_confidence_mask (the --class-threshold pseudo-label mask: conf >=
    IoU_{pseudo label} * threshold_ratio; the script's dynamic ratio threshold * (1 - iters / total_iters), here 1
    and 0.37) == our confidence_mask with class_iou. Exact (booleans) on 2 x 32 x 64 pseudo labels of random logits.
    (The plain mask conf >= conf_thresh is written inline in the training script, not at the pin.)"""
    logits = _logits(2, 40, hw=(32, 64))
    conf, pseudo = logits.softmax(1).max(1)
    iou = _iou(41).float()
    with H.upstream("SS-ADA"):
        fn = __import__("util.functions", fromlist=["x"])
        theirs = fn.generate_confidence_mask(pseudo, conf, iou, threshold_ratio=ratio)
    ours = losses.confidence_mask(pseudo, conf, class_iou=iou, ratio=ratio)
    assert 0 < int(theirs.sum()) < theirs.numel()
    H.compare(f"class-threshold mask (ratio {ratio})", ours.to(torch.uint8), theirs.to(torch.uint8),
              official="SS-ADA util/functions.py:generate_confidence_mask")


def test_ssada_warmup_poly_schedule():
    """util/scheduler.py:WarmupLRScheduler (linear warm-up, poly 0.9; the released config's mode) stepped through a
    whole short schedule on a throw-away optimiser == our warmup_poly_lr at every iteration, for each lr group (base
    and 10x). The listed deviation 'lr schedule' is recorded: ss_ada_bisenetv1_single.py:201-202 attaches this
    scheduler to `optimizer_start`, which is never stepped, so the lr of the stepped optimiser stays at the base lr
    (what the training-iteration test below sees); ours schedules the stepped one (--lr-schedule constant does as
    upstream: test_ssada_released_lr_sequence)."""
    total, warmup, base = 50, 10, 0.05
    with H.upstream("SS-ADA-train"):
        sch = __import__("util.scheduler", fromlist=["x"])
        opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]},
                               {"params": [torch.zeros(1, requires_grad=True)], "lr": base * 10}], lr=base)
        s = sch.WarmupLRScheduler("poly", {"power": 0.9}, 1, opt, total, 0, warmup, "linear", 5e-4)
        s.max_iter = total  # AC_iters.total_iters of a run
        theirs = []
        for _ in range(total):
            s.step()  # sets the lr of iteration s.cur_iter, then counts it
            theirs.append([g["lr"] for g in opt.param_groups])
    theirs = torch.tensor(theirs, dtype=torch.float64)
    ours = torch.tensor([[losses.warmup_poly_lr(b, it, total, warmup) for b in (base, base * 10)]
                         for it in range(total)], dtype=torch.float64)
    H.compare("warm-up + poly lr of iterations 0..49, both groups", ours, theirs,
              official="SS-ADA util/scheduler.py:WarmupLRScheduler.step")
    d, r, _ = H._measure(torch.full_like(theirs, 0) + torch.tensor([base, base * 10]), theirs)
    H.record("lr of upstream's stepped optimiser (constant base lr) vs its schedule (listed deviation)", d, r, False,
             official="SS-ADA ss_ada_bisenetv1_single.py:146, :201-202, :380",
             note="the scheduler steps optimizer_start; the stepped optimizer keeps the base lr")
    assert r > 0.5


# ------------------------------------------------------------------------------------------------
# One SS-ADA training iteration: ss_ada_bisenetv1_single.py main() @ a02e3d8 against ssada/train_ssada.py main()
# ------------------------------------------------------------------------------------------------
SS_B, SS_HW, SS_POOL, SS_LR = 2, (64, 64), 20, 0.05
SS_IOU = torch.tensor([(7 * c % 19 + 3) / 64 for c in range(C)])  # class IoUs of "the round" (exact in fp32 and fp64)


def _ssada_batches(seed=60):
    """One batch of each stream: source and labelled target (image, label with ignored rows), and 2B unlabeled
    samples (weak view, two strong views, the padding mask with 255 where the crop left the image, two CutMix
    boxes: image 0 a box in each view, image 1 none in the first view). The last B are the CutMix partners."""
    g = torch.Generator().manual_seed(seed)
    img = lambda n: torch.randn(n, 3, *SS_HW, generator=g)

    def lab(n):
        y = torch.randint(0, C, (n, *SS_HW), generator=g)
        y[:, :6] = 255
        return y

    src, tl = (img(SS_B), lab(SS_B)), (img(SS_B), lab(SS_B))
    n = 2 * SS_B
    w, s1, s2 = img(n), img(n), img(n)
    ign = torch.zeros(n, *SS_HW, dtype=torch.long)
    ign[0, :, -10:] = 255
    ign[2, -12:] = 255  # a partner's padding enters image 0's mixed views
    box1, box2 = torch.zeros(n, *SS_HW), torch.zeros(n, *SS_HW)
    box1[0, 10:40, 20:50] = 1
    box2[0, 30:60, 5:35] = 1
    box2[1, 0:20, 30:64] = 1
    box1[2:, 5:25, 5:25] = box2[2:, 40:60, 40:60] = 1  # partners' own boxes: never used (upstream: `_, _`)
    return src, tl, (w, s1, s2, ign, box1, box2)


def _fixed_dropout(monkeypatch, calls):
    """F.dropout / F.dropout2d with masks that depend only on the call's kind and shape (a fixed generator per
    kind), on both sides: upstream's nn.Dropout(0.5)(feat_sp) / nn.Dropout2d(0.5)(feat_cp8) (their forward calls
    torch.nn.functional.dropout / dropout2d) and our F.dropout / F.dropout2d in common/bisenet.py. Same shapes -> the
    same feature-perturbation masks."""
    F = torch.nn.functional

    def make(kind):
        def drop(x, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return x
            shape = x.shape if kind == "dropout" else x.shape[:2] + (1,) * (x.dim() - 2)
            keep = torch.rand(shape, generator=torch.Generator().manual_seed(11 if kind == "dropout" else 12)) >= p
            calls.append((kind, tuple(x.shape), float(keep.float().mean())))
            return x * keep.to(x.dtype) / (1 - p)
        return drop

    monkeypatch.setattr(F, "dropout", make("dropout"))
    monkeypatch.setattr(F, "dropout2d", make("dropout2d"))


def _frame_locals(name, filename):
    """The local variables of the innermost running function `name` defined in `filename` (read from an optimiser
    step hook: the training loop's losses, pseudo labels and masks of the iteration just stepped)."""
    f = sys._getframe()
    while f is not None and not (f.f_code.co_name == name and f.f_code.co_filename.endswith(filename)):
        f = f.f_back
    assert f is not None, f"{name} ({filename}) is not running"
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in f.f_locals.items()}


def _run_ssada_upstream(monkeypatch, tmp_path, case, iters=1, warmup=None):
    """Upstream: ss_ada_bisenetv1_single.py main() itself, for one epoch of one iteration that starts with an active
    round, with the released config file (configs/parking_bev2024_acda_bisenetv1_single.yaml) changed only in the
    data sizes, the case's loss switches, and a round at epoch 0 (so that the IoU class weights and class thresholds
    are in play). Driving shims (none changes a computed value): SemiDataset -> fake datasets serving the batches
    (upstream's unshuffled loaders: the second pass over trainloader_u serves the partners), AC_Sample -> a subclass
    whose round sets the class IoUs (SS_IOU) and moves images to the labelled list without reading images (the
    selection is compared in test_acquisition_scores_and_selected_images), the model constructor -> the real
    BiSeNetV1, randomised, Resnet18.init_weight (reads ImageNet weights from disk) -> no-op, the end-of-epoch
    validation -> the real evaluate_single_gpu on a list holding one batch (its DataLoader has a worker process),
    torch.utils.tensorboard -> a stand-in (not installed), the loader iterator's Python 2 `.next()` -> __next__.
    iters > 1: that many epochs of one iteration (the same batches each epoch; the round only at epoch 0); warmup:
    the config's lr_scheduler warmup_iters (1000) replaced. out.sched: the lrs of `optimizer_start` (the scheduled,
    never-stepped optimiser) at each step of the stepped one."""
    import yaml
    src, tl, unl = _ssada_batches()
    val = _ssada_val()
    base = H.repo("SS-ADA-train")
    cfg = yaml.load(open(base / "configs/parking_bev2024_acda_bisenetv1_single.yaml"), Loader=yaml.Loader)
    cfg.update(dataset="acdc", nclass=C,  # a 19-class dataset validated in "original" (whole-image) mode
               crop_size=list(SS_HW), n_sample=SS_POOL, workers=0, epochs=iters,
               batch_size=SS_B, data_root=str(tmp_path), data_list=str(tmp_path / "labeled.txt"),
               conf_thresh=case["conf_thresh"])
    cfg["source"].update(type="gtav", data_root=str(tmp_path), data_list=str(tmp_path / "src.txt"))
    cfg["criterion"]["fre_cfg"]["update_fre"] = case["weighted"]
    cfg["criterion"]["kwargs"]["min_kept"] = case["min_kept"]
    cfg["mask_ratio"]["use_class_threshold"] = case["class_threshold"]
    cfg["active"].update(init_ratio=0.1, total_ratio=0.3, sample_epoch=[0])
    if warmup is not None:
        cfg["lr_scheduler"]["warmup_iters"] = warmup
    (tmp_path / "cfg.yaml").write_text(yaml.dump(cfg))
    monkeypatch.setattr(sys, "argv", ["ss_ada_bisenetv1_single.py", "--config", str(tmp_path / "cfg.yaml"),
                                      "--save-path", str(tmp_path / "upstream")])
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = lambda *a, **k: types.SimpleNamespace(add_scalar=lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored afterwards
    monkeypatch.setattr(torch.backends.cudnn, "enabled", torch.backends.cudnn.enabled)
    from torch.utils.data import dataloader
    monkeypatch.setattr(dataloader._BaseDataLoaderIter, "next", dataloader._BaseDataLoaderIter.__next__, raising=False)
    items = {"source": [(src[0][b], src[1][b]) for b in range(SS_B)],
             "train_l": [(tl[0][b], tl[1][b]) for b in range(SS_B)],
             "train_u": [tuple(t[b] for t in unl) for b in range(2 * SS_B)],
             "val": [(val[0][0], val[1][0], "v0")]}
    # lengths: one labelled batch (zip stops after it: one iteration); 8 unlabeled batches, as the loop's log line
    # divides by max(len(trainloader_u), len(trainloader_l)) // 8 (only the first two are drawn: own, partners)
    # the source: one iterator for the whole run (trainloader_s_iter), a batch per iteration
    fakes = {m: H.fake_dataset(v, length={"train_u": 8 * SS_B, "val": 1, "source": iters * SS_B}.get(m, SS_B))
             for m, v in items.items()}
    out = types.SimpleNamespace(watch=[], drops=[], ohem=[], evals=[], locals=None, sched=[])
    with H.upstream("SS-ADA-train"), monkeypatch.context() as m:
        resnet = __import__("model.backbone.resnet18", fromlist=["x"])
        m.setattr(resnet.Resnet18, "init_weight", lambda self: None)
        script = __import__("ss_ada_bisenetv1_single")
        ohem = __import__("util.ohem", fromlist=["x"])
        acs = __import__("util.active_sample", fromlist=["x"])
        def semi_dataset(name, root, mode, *a, **k):
            ds = fakes[mode]()
            ds.ids = [f"img{i:02d}.png" for i in range(SS_POOL)]  # read for trainset_l's nsample
            return ds
        m.setattr(script, "SemiDataset", semi_dataset)

        def build(cfg_, *a, **k):
            net = H.randomize(script_bisenet(cfg_, *a, **k), seed=61)
            out.init = H.clone_state(net)
            out.watch.append(net)
            return net
        script_bisenet = script.BiSeNetV1
        m.setattr(script, "BiSeNetV1", build)

        class Sampler(acs.AC_Sample):
            def __init__(self, config, ac_iters, output_root):
                self.config, self.ac_iters, self.output_root, self.sample_times = config, ac_iters, output_root, 0
                self.output_dir = os.path.join(output_root, "AC_round_0")
                self.num_classes, self.iou_classes = config["nclass"], torch.zeros(config["nclass"])
                names = [f"img{i:02d}.png" for i in range(SS_POOL)]
                self.labeled_names, self.unlabeled_names = names[:2], names[2:]

            def run_active_learning(self, model, rank=0):
                self.sample_times += 1
                self.output_dir = os.path.join(self.output_root, f"AC_round_{self.sample_times}")
                self.iou_classes = SS_IOU.double()  # calculate_labeled_iou: torch.from_numpy(float64 IoU)
                k = self.ac_iters.sample_increment[0]
                self.labeled_names += self.unlabeled_names[:k]
                self.unlabeled_names = self.unlabeled_names[k:]
        m.setattr(script, "AC_Sample", Sampler)

        real_forward = ohem.ProbOhemCrossEntropy2d.forward

        def ohem_spy(self, pred, target):
            loss = real_forward(self, pred, target.clone())
            out.ohem.append((pred.detach().clone(), loss.detach().clone(),
                             None if not hasattr(self.criterion, "weight") or self.criterion.weight is None
                             else self.criterion.weight.clone()))
            return loss
        m.setattr(ohem.ProbOhemCrossEntropy2d, "forward", ohem_spy)
        real_eval = script.evaluate_single_gpu

        def evaluate(model, loader, mode, cfg_, show_bar=False):
            m.setattr(script, "intersectionAndUnion_gpu", lambda p, y, k, i: out.evals.append(p.clone()) or
                      script_iou(p, y, k, i))
            return real_eval(model, [(val[0], val[1], ["v0"])], mode, cfg_)
        script_iou = script.intersectionAndUnion_gpu
        m.setattr(script, "evaluate_single_gpu", evaluate)
        _fixed_dropout(m, out.drops)
        def after(r, k):
            out.locals = _frame_locals("main", "ss_ada_bisenetv1_single.py")
            out.sched.append([g["lr"] for g in out.locals["optimizer_start"].param_groups])
        rec = H.record_steps(m, watch=out.watch, after=after)
        try:
            script.main()
        finally:
            import logging
            for h in list(logging.getLogger("global").handlers):
                logging.getLogger("global").removeHandler(h)
                h.close()
    out.rec = [r for r in rec if r.steps]  # the stepped optimiser (optimizer_start is never stepped)
    assert len(rec) == 2 and len(out.rec) == 1 and len(out.rec[0].steps) == iters
    out.net = out.watch[0]
    return out


def _ssada_val():
    g = torch.Generator().manual_seed(62)
    return torch.randn(1, 3, 64, 96, generator=g), torch.randint(0, C, (1, 64, 96), generator=g)


class _OurPool:
    """What train_ssada.main() reads of its datasets besides the loaders (patched): file lists, names, labels."""
    norm = "imagenet"

    def __init__(self, n, items=None):
        self.files, self.items = [(f"img{i:02d}.png", f"lab{i:02d}.png") for i in range(n)], items

    def __len__(self):
        return len(self.files)

    def name(self, i):
        return self.files[i][0]

    def load_label(self, i):
        return np.zeros((4, 4), np.uint8)

    def __getitem__(self, i):
        return self.items[i]


def _run_ssada_ours(monkeypatch, tmp_path, init, case, forward="two", iters=1, extra=()):
    """Ours: ssada/train_ssada.py main() in-process for one iteration (one epoch of one iteration, a round at epoch 0
    whose class IoUs are SS_IOU: active_round patched, as upstream's), from upstream's initial weights
    (ssada.releases.bisenet_to_ours, strict), the same batches (infinite_loader patched to serve them; the unlabeled
    loader's 2B images: the first B trained on, the last B their CutMix partners), warm-up 0 (upstream's stepped
    optimiser runs at the base lr: listed deviation). The round's pictures and checkpoint files are patched out.
    iters > 1: that many epochs of one iteration on the same batches; extra: more arguments (the last one wins)."""
    import common.runtime as rt
    from common import evaluate as common_eval
    from common.bisenet import BiSeNetV1
    from ssada import releases, train_ssada
    src, tl, unl = _ssada_batches()
    val = _ssada_val()
    model = H.load_strict(BiSeNetV1(C, variant="ssada"), releases.bisenet_to_ours(init))
    fake_l, fake_u = _OurPool(SS_POOL), _OurPool(SS_POOL)
    val_ds = _OurPool(1, [{"image": val[0][0], "label": val[1][0], "index": 0, "name": "v0.png"}])
    w, s1, s2, ign, box1, box2 = unl
    batches = {"source": {"image": src[0], "label": src[1]}, "labeled": {"image": tl[0], "label": tl[1]},
               "unlabeled": {"image": w, "s1": s1, "s2": s2, "ignore": ign, "box1": box1, "box2": box2,
                             "index": torch.arange(2 * SS_B)}}

    def loader(ds, *a, **k):
        which = "source" if not hasattr(ds, "dataset") else "labeled" if ds.dataset is fake_l else "unlabeled"
        return iter([batches[which]] * iters)

    out = types.SimpleNamespace(drops=[], ohem=[], evals=[], locals=None, rounds=0)

    def active_round(model_, pool, labeled, k, *a, **kw):
        out.rounds += 1
        picked = sorted(set(range(SS_POOL)) - set(labeled))[:k]
        return picked, SS_IOU.clone(), {i: {"entropy": 0.0, "entropy_iou": 0.0} for i in picked}, \
            {"mIoU": 0.0, "per_class": {}}

    def ohem_spy(logits, *a, **k):
        loss = losses.weighted_ohem_ce(logits, *a, **k)
        out.ohem.append((logits.detach().clone(), loss.detach().clone()))
        return loss

    def evaluate(model_, ds, *a, **k):  # the real evaluation, on the validation batch, no picture files
        return common_eval.evaluate(model_, val_ds, C, torch.device("cpu"), workers=0)

    def predict_spy(*a, **k):
        logits = real_predict(*a, **k)
        out.evals.append(logits.argmax(1))
        return logits
    real_predict = common_eval.predict_logits
    argv = ["--source", "gta5", "--source-root", str(tmp_path), "--target", "cityscapes", "--target-root",
            str(tmp_path), "--init", "scratch", "--out", str(tmp_path / f"ours_{forward}{''.join(extra)}"),
            "--batch-size", str(SS_B), "--lr", str(SS_LR), "--epochs", str(iters), "--epoch-iters", "1",
            "--sample-epochs", "0", "--init-ratio", "0.1",
            "--total-ratio", "0.3", "--warmup", "0", "--strategy", "entropy", "--min-kept", str(case["min_kept"]),
            "--conf-thresh", str(case["conf_thresh"]), "--iou-weights", str(int(case["weighted"])),
            "--crop-size", f"{SS_HW[0]},{SS_HW[1]}", "--full-res", "1", "--eval-mode", "whole", "--device", "cpu",
            "--amp", "off", "--workers", "0", "--forward", forward, "--save-every", "1000"]
    args = train_ssada.parse_args(argv + (["--class-threshold"] if case["class_threshold"] else []) + list(extra))
    with monkeypatch.context() as m:
        m.setattr(train_ssada, "make_bisenet", lambda *a, **k: (model, {"norm": "imagenet", "model": "bisenetv1"}))
        m.setattr(train_ssada, "resolve_domain", lambda name, root, role: (name, "real", root))
        m.setattr(train_ssada, "train_set", lambda name, *a, **k: fake_l if name == "cityscapes" else _OurPool(4))
        m.setattr(train_ssada, "UnlabeledViews", lambda *a, **k: fake_u)
        m.setattr(train_ssada, "build_dataset", lambda kind, root, split, *a, **k:
                  val_ds if split == train_ssada.DOMAINS["cityscapes"][2] else _OurPool(SS_POOL))
        m.setattr(train_ssada, "infinite_loader", loader)
        m.setattr(train_ssada, "active_round", active_round)
        m.setattr(train_ssada, "save_selected_pictures", lambda *a, **k: None)
        m.setattr(train_ssada.P, "selection_pictures", lambda *a, **k: None)
        m.setattr(train_ssada, "weighted_ohem_ce", ohem_spy)
        m.setattr(train_ssada, "evaluate", evaluate)
        m.setattr(common_eval, "predict_logits", predict_spy)
        m.setattr(rt, "check_inputs", lambda *a, **k: None)
        m.setattr(rt, "save_checkpoint", lambda *a, **k: None)
        _fixed_dropout(m, out.drops)
        rec = H.record_steps(m, watch=[model], after=lambda r, k: setattr(
            out, "locals", _frame_locals("main", "train_ssada.py")))
        train_ssada.main(args)
    assert out.rounds == 1 and len(rec) == 1 and len(rec[0].steps) == iters
    out.rec, out.model = rec, model
    return out


SS_CASES = {
    # the released config's loss settings: conf_thresh 0, no class thresholds, unweighted (update_fre False),
    # min_kept 200000 (more than this batch's valid pixels: no mining)
    "config": dict(conf_thresh=0.0, class_threshold=False, weighted=False, min_kept=200000),
    # the paper's components on: IoU class weights and the IoU class thresholds, OHEM mining from the 2000th pixel
    "iou-weights-class-thresholds": dict(conf_thresh=0.0, class_threshold=True, weighted=True, min_kept=2000),
    # a fixed confidence threshold (UniMatch's configs: 0.95; here 0.15, half of the pixels) and min_kept 0
    "conf-0.15-min-kept-0": dict(conf_thresh=0.15, class_threshold=False, weighted=True, min_kept=0),
}


@pytest.mark.parametrize("case", list(SS_CASES))
def test_ssada_training_iteration(monkeypatch, tmp_path, case):
    """One SS-ADA iteration, upstream's main() (ss_ada_bisenetv1_single.py @ a02e3d8) against ours
    (train_ssada.py main() with --forward two: upstream's two training passes) from the same random weights on the
    same batches, both after a round at epoch 0 with the same class IoUs: the CutMix boxes and partners are the same
    data items on both sides; the feature-perturbation dropout masks are fixed by monkeypatching the draw
    (_fixed_dropout: a mask per kind and shape, so both sides' nn.Dropout(0.5) / Dropout2d(0.5) get the same masks).
    Compared: every head's upsampled logits (align_corners=False as upstream's nn.Upsample; ours' former True is
    recorded), the six OHEM CE terms (source / labelled x 3 heads, with the IoU class weights), the partners'
    eval-mode pseudo labels and confidences, the weak-view pseudo labels and confidences, the CutMixed pseudo labels,
    confidences and padding masks of both strong views, the three confidence masks, the two strong-view CE and the
    feature-perturbed CE, the loss sum, every lr and weight decay per parameter, every weight and BN statistic after
    the step, every momentum buffer, and the end-of-epoch validation's predictions (upstream's evaluate_single_gpu
    'original' mode vs our common.evaluate through ssada.test.AtInputSize). Config case: our default --forward joint
    (one pass, a listed deviation) is run too and its difference recorded."""
    from ssada import releases
    cfg = SS_CASES[case]
    up = _run_ssada_upstream(monkeypatch, tmp_path, cfg)
    ours = _run_ssada_ours(monkeypatch, tmp_path, up.init, cfg)
    off = "SS-ADA ss_ada_bisenetv1_single.py:main (@ a02e3d8)"
    what = lambda s: f"{case}: {s}"
    T, O = up.locals, ours.locals
    # the dropout masks: the same calls (kind, shape) on both sides, half of the units dropped
    assert [d[:2] for d in up.drops] == [d[:2] for d in ours.drops] and len(up.drops) == 2, (up.drops, ours.drops)
    assert all(0.3 < d[2] < 0.7 for d in up.drops)
    # 1. every head's logits after the upsampling (the inputs of the six OHEM terms), and the OHEM terms
    assert len(up.ohem) == len(ours.ohem) == 6
    names = [f"{d} {h}" for d in ("source", "labelled") for h in ("out", "aux16", "aux32")]
    for n, (lt, ct, wt), (lo, co) in zip(names, up.ohem, ours.ohem):
        H.compare(what(f"{n} head logits upsampled (align_corners=False)"), lo, lt, official=off + " model(...)")
        H.compare(what(f"{n} OHEM CE"), co, ct, official="SS-ADA util/ohem.py:ProbOhemCrossEntropy2d")
        assert (wt is not None) == cfg["weighted"]
    raw = O["pred"]["out"][:SS_B]  # our main head at 1/8 for the source images: the house convention True, recorded
    d, r, _ = H._measure(torch.nn.functional.interpolate(raw, size=SS_HW, mode="bilinear", align_corners=True),
                         up.ohem[0][0])
    H.record(what("source main-head logits upsampled with align_corners=True (--align-corners 1) vs upstream"), d, r,
             False, official=off, note="ours before issue 27; now --align-corners 1")
    assert r > 1e-3
    H.compare(what("L_src (mean over 3 heads)"), O["loss_src"], T["total_loss_src"], official=off)
    H.compare(what("L_tl (mean over 3 heads)"), O["loss_tl"], T["total_loss_tlb"], official=off)
    # 2. pseudo labels, confidences, CutMix, masks
    H.compare(what("partners' eval-mode pseudo labels"), O["pseudo_m"], T["mask_u_w_mix"], official=off)
    H.compare(what("partners' confidences"), O["conf_m"], T["conf_u_w_mix"], official=off)
    H.compare(what("strong view 1 after CutMix"), O["s1"], T["img_u_s1"], official=off)
    H.compare(what("strong view 2 after CutMix"), O["s2"], T["img_u_s2"], official=off)
    H.compare(what("weak-view pseudo labels"), O["pseudo_w"], T["mask_u_w"], official=off)
    H.compare(what("weak-view confidences"), O["conf_w"], T["conf_u_w"], official=off)
    for k in ("1", "2"):
        H.compare(what(f"CutMixed pseudo labels {k}"), O["pseudo" + k], T["mask_u_w_cutmixed" + k], official=off)
        H.compare(what(f"CutMixed confidences {k}"), O["conf" + k], T["conf_u_w_cutmixed" + k], official=off)
        H.compare(what(f"CutMixed padding masks {k}"), O["ign" + k], T["ignore_mask_cutmixed" + k], official=off)
        H.compare(what(f"confidence mask, strong view {k}"), O["mk" + k].to(torch.uint8),
                  T[f"mask_u_s{k}"].to(torch.uint8), official=off)
    H.compare(what("confidence mask, feature-perturbed view"), O["mkw"].to(torch.uint8),
              T["mask_u_w_fp"].to(torch.uint8), official=off)
    frac = float(T["mask_u_w_fp"].float().mean())
    assert (frac == 1.0) if cfg["conf_thresh"] == 0 and not cfg["class_threshold"] else 0.05 < frac < 0.95, frac
    assert (T["cutmix_box1"] == 1).any() and not torch.equal(T["mask_u_w_cutmixed1"], T["mask_u_w"])
    # 3. the unlabeled logits and losses, the sum
    H.compare(what("strong view logits (second pass)"), torch.cat(O["parts"]["out"][3:5]),
              torch.cat([T["pred_u_s1"], T["pred_u_s2"]]), official=off)
    H.compare(what("feature-perturbed weak-view logits"), O["parts"]["fp"][2], T["pred_u_w_fp"], official=off)
    H.compare(what("L_s1 (strong view 1 CE)"), O["loss_s1"], T["loss_u_s1"], official=off)
    H.compare(what("L_s2 (strong view 2 CE)"), O["loss_s2"], T["loss_u_s2"], official=off)
    H.compare(what("L_fp (feature-perturbed CE)"), O["loss_fp"], T["loss_u_w_fp"], official=off)
    H.compare(what("loss sum"), O["loss"], T["loss"], official=off)
    # 4. the step: lrs and weight decays per parameter, weights and BN statistics, momentum buffers
    rt_, ro = up.rec[0], ours.rec[0]
    ren = lambda n: releases._rename(n)

    def per_param(opt, module, key, rename=lambda n: n):
        own = {id(p): g[key] for g in opt.param_groups for p in g["params"]}
        return {rename(n): own[id(p)] for n, p in module.named_parameters() if id(p) in own}
    for key in ("lr", "weight_decay"):
        a, b = per_param(ro.optimizer, ours.model, key), per_param(rt_.optimizer, up.net, key, ren)
        assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:8]
        H.compare(what(f"{key} of every parameter ({len(b)})"), torch.tensor([a[k] for k in sorted(b)]),
                  torch.tensor([b[k] for k in sorted(b)]), official=off + " util/optimizer.py:set_optimizer_bisenet")
    after_t = releases.bisenet_to_ours(rt_.steps[0].modules[0])
    after_o = ro.steps[0].modules[0]
    H.compare_states(what("weights and BN statistics after the step"), after_o, after_t, official=off)
    init = releases.bisenet_to_ours(up.init)
    still = [k for k, v in after_t.items() if v.is_floating_point() and
             float((v - init[k]).abs().max()) <= 10 * H.RTOL * float(v.abs().max())]
    n_float = sum(v.is_floating_point() for v in after_t.values())
    H.record(what("tensors the step moved by less than 10x the tolerance (a count; at most 5% allowed)"), len(still),
             len(still) / n_float, False, n=n_float,
             note="BN scales (no weight decay) with tiny gradients at this random initialisation: " + ", ".join(still))
    assert len(still) <= 0.05 * n_float, f"the step hardly moved {len(still)} of {n_float} tensors: {still}"
    buf_t = {f"{ren(n)}:{k}": v for n, p in up.net.named_parameters() for k, v in rt_.steps[0].state[id(p)].items()}
    H.compare_states(what("SGD momentum buffers"), H.state_by_name(ro.steps[0].state, ours.model), buf_t,
                     official=off)
    # 5. the end-of-epoch validation (upstream 'original' mode on this dataset: model(img)[0].argmax, heads upsampled
    # with align_corners=False inside the model) == ours (common.evaluate on ssada.test.AtInputSize)
    assert len(up.evals) == len(ours.evals) == 1
    H.compare(what("validation predictions after the step (64 x 96)"), ours.evals[0], up.evals[0],
              official=off + " evaluate_single_gpu")
    if case == "config":  # our default single pass: the listed deviation 'forward passes', recorded
        joint = _run_ssada_ours(monkeypatch, tmp_path, up.init, cfg, forward="joint")
        for n, o, t in (("loss sum", joint.locals["loss"], T["loss"]),
                        ("L_s1", joint.locals["loss_s1"], T["loss_u_s1"])):
            d, r, _ = H._measure(o, t)
            H.record(what(f"{n} with our default --forward joint (listed deviation)"), d, r, False, official=off,
                     note="one pass over source, labelled, weak and strong views: BN statistics over the joint batch")
        after_j = joint.rec[0].steps[0].modules[0]
        worst = max((float((after_j[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)), k)
                    for k, v in after_t.items() if v.is_floating_point())
        H.record(what("weights after the step with --forward joint (listed deviation)"), None, worst[0], False,
                 official=off, note=f"worst at {worst[1]}")
        assert worst[0] > 1e-3


def _lr_steps(rec, module, rename=lambda n: n):
    """{parameter name: [its lr at step 1, 2, ...]} of a recorded optimiser (group lrs read at each step hook)."""
    group = {id(p): i for i, g in enumerate(rec.optimizer.param_groups) for p in g["params"]}
    return {rename(n): [lrs[group[id(p)]] for lrs in rec.lrs] for n, p in module.named_parameters() if id(p) in group}


SS_ITERS, SS_WARMUP = 3, 2


def test_ssada_released_lr_sequence(monkeypatch, tmp_path):
    """The listed deviation 'lr schedule' and its flag, over several iterations: upstream's main() (`config` case, the
    config's warm-up shortened to 2 iterations so that its schedule moves within the run) for 3 epochs of one
    iteration, against ours with --lr-schedule constant (the released behaviour) and with the default warmup_poly
    (same --warmup 2). ss_ada_bisenetv1_single.py:146 builds the stepped `optimizer`; :201-202 build a second one,
    `optimizer_start`, and attach WarmupLRScheduler to it; :379-380 step `optimizer`, then the scheduler. Compared at
    every step: the lr of every parameter (114) == ours with the flag, and every weight and BN statistic after the
    last step; the default's lrs (0 at iteration 0 in the warm-up) and weights are recorded, not asserted. The
    scheduler is live on the other optimiser (asserted: optimizer_start's lrs go to 0, then up the warm-up)."""
    from ssada import releases
    cfg = SS_CASES["config"]
    up = _run_ssada_upstream(monkeypatch, tmp_path, cfg, iters=SS_ITERS, warmup=SS_WARMUP)
    off = "SS-ADA ss_ada_bisenetv1_single.py:146, :201-202, :379-380 (@ a02e3d8)"
    base = sorted({SS_LR, SS_LR * 10})
    assert [sorted(set(s)) for s in up.sched] == [base, [0.0], [b / SS_WARMUP for b in base]], up.sched
    theirs = _lr_steps(up.rec[0], up.net, releases._rename)
    keys = sorted(theirs)
    after_t = releases.bisenet_to_ours(up.rec[0].steps[-1].modules[0])
    for extra, released in ((("--lr-schedule", "constant", "--warmup", str(SS_WARMUP)), True),
                            (("--warmup", str(SS_WARMUP)), False)):
        ours = _run_ssada_ours(monkeypatch, tmp_path, up.init, cfg, iters=SS_ITERS, extra=extra)
        lrs = _lr_steps(ours.rec[0], ours.model)
        assert sorted(lrs) == keys
        o = torch.tensor([lrs[k] for k in keys], dtype=torch.float64)
        t = torch.tensor([theirs[k] for k in keys], dtype=torch.float64)
        after_o = ours.rec[0].steps[-1].modules[0]
        what = f"iterations 0..{SS_ITERS - 1}, {' '.join(extra)}"
        if released:
            H.compare(f"{what}: lr of every parameter ({len(keys)}) at every step", o, t, official=off)
            H.compare_states(f"{what}: weights and BN statistics after step {SS_ITERS}", after_o, after_t,
                             official=off)
        else:
            d, r, _ = H._measure(o, t)
            H.record(f"{what} (our default warmup_poly): lr of every parameter at every step (listed deviation)", d,
                     r, False, official=off, n=o.numel(), note="ours schedules the stepped optimiser (0 at iteration "
                     "0 in the warm-up); upstream's stepped optimiser keeps its initial lrs")
            assert r > 0.5
            worst = max((float((after_o[k] - v).abs().max() / v.abs().max().clamp(min=1e-30)), k)
                        for k, v in after_t.items() if v.is_floating_point())
            H.record(f"{what} (our default warmup_poly): weights after step {SS_ITERS} (listed deviation)", None,
                     worst[0], False, official=off, note=f"worst at {worst[1]}")
            assert worst[0] > 1e-3
