r"""SS-ADA (Yan et al., T-ITS 2024): semi-supervised active domain adaptation. Source and target are
trained jointly from the start; at the configured epochs an image-level active round labels more
target images; the unlabeled rest is used with UniMatch's weak-to-strong consistency; the supervised
losses are OHEM CE with IoU-based class weights (ss_ada_bisenetv1_single.py, util/active_sample.py).

    L = [L_src + L_tl + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp] / 3        (no unlabeled image left: (L_src + L_tl) / 2)
    L_src, L_tl = mean over the 3 BiSeNet heads of OHEM-CE(w),  w_c = 1 + (u - 1)(1 - IoU_c)
    L_s1, L_s2  = CE(strong view k with CutMix from another image, weak-view pseudo label), masked
    L_fp        = CE(feature-perturbed weak view, weak-view pseudo label), masked

Toy domains (no arguments: toy GTA5-style source, toy Cityscapes-style target, 5% of target images):
    python ssada/train_ssada.py
Budgets and strategies (the benchmark's rows), oracle (100% target labels), source only:
    python ssada/train_ssada.py --total-ratio 0.25 --strategy entropy_iou --out runs/ssada/ssada25
    python ssada/train_ssada.py --total-ratio 0.25 --strategy random --out runs/ssada/random25
    python ssada/train_ssada.py --init-ratio 1 --total-ratio 1 --out runs/ssada/oracle
    python ssada/train_ssada.py --source-only --out runs/ssada/source
One joint training pass over all views instead of upstream's two (BN statistics over the joint batch; faster):
    python ssada/train_ssada.py --forward joint
Upstream's released lr (its schedule is attached to an optimiser it never steps: every lr stays constant):
    python ssada/train_ssada.py --lr-schedule constant
GTA5 -> Cityscapes, BiSeNetV1-R18 (ImageNet weights), 200 epochs, rounds at 20/40/60 (25% of the images):
    python ssada/train_ssada.py --source gta5 --source-root /data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --init /weights/resnet18-f37072fd.pth --total-ratio 0.25
Several processes:
    torchrun --nproc_per_node=2 ssada/train_ssada.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import numpy as np
import torch
from PIL import Image

from common import cli, labels as L, pictures as P, runtime as rt
from common.bisenet import make_bisenet
from common.datasets import (CITY_GROUPS, DOMAINS, build_dataset, eval_batches, infinite_loader,
                             resolve_domain, train_set)
from common.evaluate import evaluate
from common.metrics import ConfusionMatrix, format_table
from common.transforms import Compose, RandomHFlip, Resize
from ssada.active import (STRATEGIES, batch_image_scores, budget_plan, class_pixel_counts, epoch_plan, select,
                          write_round)
from ssada.data import LongSideScaleCrop, Pool, UnlabeledViews, split_partner
from ssada.losses import confidence_mask, iou_class_weights, unlabeled_ce, warmup_poly_lr, weighted_ohem_ce
from ssada.test import evaluate_sliding, predict, upsample, whole_model

# Defaults. PAPER: configs/*_acda_bisenetv1_single.yaml (SGD 0.05, momentum 0.9, wd 1e-4, heads 10x,
# 1000-iter linear warm-up + poly 0.9, batch 4, 200 epochs, rounds at epochs 20/40/60, init 1% of the
# target images, OHEM 0.7 / 200000); crops 640x640 (configs/cityscapes_bisenetv1.yaml) after scaling the
# long side by U(0.5, 2) of the image's own size; validation and active-round inference at full resolution,
# validation with 640x640 sliding windows (stride 2/3). Recipe table with file:line: ssada/README.md.
# TOY: BiSeNetV1-R18 from the toy backbone (scratch on toy v2), batch 2, 5 short epochs of 20 iters (40 before issue 17's 40-minute benchmark
# budget: the v2 numbers), toy sizes, whole-image evaluation.
PAPER = dict(init=None, batch_size=4, lr=0.05, epochs=200, sample_epochs=[20, 40, 60], epoch_iters=None,
             warmup=1000, min_kept=200000, save_every=2000, out="runs/ssada/ssada", crop_size=(640, 640),
             full_res=1, eval_mode="sliding", total_ratio=0.5)
TOY = dict(init="toy", batch_size=2, lr=0.02, epochs=5, sample_epochs=[1, 2, 3], epoch_iters=20,
           warmup=20, min_kept=2000, save_every=20, out="runs/ssada/ssada", full_res=0, eval_mode="whole",
           total_ratio=0.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (SS-ADA)")
    g.add_argument("--strategy", default="entropy_iou", choices=STRATEGIES, help="acquisition criterion")
    g.add_argument("--init-ratio", type=float, default=0.01, help="fraction of target images labeled at start")
    g.add_argument("--total-ratio", type=float, default=None,
                   help="fraction labeled after the last round (paper preset 0.5 as the released config; toy 0.05)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--sample-epochs", type=int, nargs="*", default=None, help="epochs that start with an active round")
    g.add_argument("--epoch-iters", type=int, default=None,
                   help="iterations per epoch (default: max(labeled, unlabeled) // batch, as upstream)")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up iterations before the poly decay")
    g.add_argument("--iou-weights", type=int, default=1, choices=[0, 1],
                   help="IoU-based class weights in the supervised OHEM CE (upstream ships it off)")
    g.add_argument("--upper", type=float, default=2.0, help="u of w_c = 1 + (u - 1)(1 - IoU_c)")
    g.add_argument("--ohem-thresh", type=float, default=0.7)
    g.add_argument("--min-kept", type=int, default=None, help="OHEM: keep at least this many pixels per loss")
    g.add_argument("--conf-thresh", type=float, default=0.0, help="UniMatch pseudo-label confidence threshold")
    g.add_argument("--class-threshold", action="store_true",
                   help="per-class thresholds conf >= IoU_c * threshold (* (1 - iter/total) when dynamic)")
    g.add_argument("--threshold", type=float, default=1.0, help="scale of the per-class thresholds")
    g.add_argument("--static-threshold", action="store_true", help="no (1 - iter/total) decay of the class thresholds")
    g.add_argument("--source-only", action="store_true", help="train on the source only (baseline row)")
    g.add_argument("--max-pool", type=int, default=None, help="use only the first N target images (quick tests)")
    g.add_argument("--max-val", type=int, default=None, help="validate on the first N images only (quick tests)")
    g.add_argument("--full-res", type=int, default=None, choices=[0, 1],
                   help="1 (upstream): scale crops relative to each image's own size, validate and score the pool "
                   "on full-resolution images; 0 (toy): relative to / resized to the domain's sizes")
    g.add_argument("--eval-mode", default=None, choices=["sliding", "whole"],
                   help="validation: sliding windows of --eval-crop, stride 2/3 (upstream on Cityscapes), or whole image")
    g.add_argument("--eval-crop", type=cli.hw, default=None, help="sliding-window size H,W (default: --crop-size)")
    g.add_argument("--align-corners", type=int, default=0, choices=[0, 1],
                   help="bilinear upsampling of the logits (losses, pseudo labels, acquisition, validation): 0 as "
                   "SS-ADA's heads (nn.Upsample, align_corners=False), 1 the house convention before issue 27")
    g.add_argument("--forward", default="two", choices=["two", "joint"],
                   help="two: upstream's two training passes (source + labeled + weak with the feature perturbation, "
                   "then the two strong views; one backward of the sum); joint: one pass over all views (BN "
                   "statistics over the joint batch; the default before issue 27)")
    g.add_argument("--lr-schedule", default="warmup_poly", choices=["warmup_poly", "constant"],
                   help="warmup_poly: --warmup linear iterations then poly 0.9 on the optimiser that is stepped; "
                   "constant: upstream's released behaviour (its scheduler steps a second, never-stepped optimiser): "
                   "every group keeps its initial lr (base, FFM and heads 10x) for the whole run")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--log-every", type=int, default=20, help="log line every N iterations")
    args = p.parse_args(argv)
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    if args.init is None:
        p.error("--init (ResNet-18 ImageNet weights file) is required on real data; --init scratch to train from scratch")
    if not 0 <= args.init_ratio <= args.total_ratio <= 1:
        p.error("need 0 <= --init-ratio <= --total-ratio <= 1")
    return args


def make_optimizer(model, lr, momentum, weight_decay):
    """set_optimizer_bisenet: FFM and heads at 10x; no weight decay on BN parameters and biases."""
    groups = []
    for params, mult in zip(model.param_groups(), (1.0, 10.0)):
        decay = [q for q in params if q.requires_grad and q.dim() > 1]
        no_decay = [q for q in params if q.requires_grad and q.dim() <= 1]
        groups += [{"params": decay, "lr": lr * mult, "lr_mult": mult},
                   {"params": no_decay, "lr": lr * mult, "lr_mult": mult, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


@torch.no_grad()
def active_round(model, pool_ds, labeled, k, strategy, args, device, amp, rng):
    """One SS-ADA round: (1) class IoU of the model on the labeled images, (2) scores of every unlabeled
    image, (3) the k best. Returns (selected ids, class IoU in [0,1], scores, IoU summary).
    Images go through the model in common.datasets.eval_batches' batches: 8 toy images, or one real image as
    upstream's active_sample.py (in eval mode an image's scores do not depend on its batch)."""
    model.eval()
    conf = ConfusionMatrix(args.num_classes, device)
    loader = lambda ids: eval_batches(torch.utils.data.Subset(pool_ds, ids), args.workers)
    ac = bool(args.align_corners)
    for item in loader(labeled):
        y = item["label"].to(device)
        conf.update(predict(model, rt.to_device(item["image"], device, amp), y.shape[-2:], amp, ac).argmax(1), y)
    m = conf.mat.double().cpu()
    tp = m.diag()
    class_iou = (tp / (m.sum(0) + m.sum(1) - tp + 1e-10)).float()  # absent classes -> 0 (upstream)
    scores = {}  # every criterion is logged, whichever one selects
    for item in loader(sorted(set(range(len(pool_ds))) - set(labeled))):
        logits = predict(model, rt.to_device(item["image"], device, amp), item["label"].shape[-2:], amp, ac)
        scores.update(zip(item["index"].tolist(), batch_image_scores(logits, class_iou)))
    model.train()
    return select(scores, k, strategy, rng), class_iou, scores, conf.summary()


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg = make_bisenet(args.num_classes, args.init)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[tgt][3]
    # dataset/semi.py:208-217: long side x U(0.5, 2.0) of the image, (h, w) crop padded with ignore, flip 0.5
    geo = lambda name: Compose([LongSideScaleCrop(crop, (0.5, 2.0), None if args.full_res else DOMAINS[name][3]),
                                RandomHFlip()])
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], geo(src))
    target_l = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"], geo(tgt))  # the pool, with labels
    target_u = UnlabeledViews([f for f, _ in target_l.files], geo(tgt), mcfg["norm"])
    eval_tf = None if args.full_res else Compose([Resize(DOMAINS[tgt][4], resize_label=False)])  # active_sample.py:155-161
    pool_eval = build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][1], args.num_classes,  # the pool at the eval size
                              eval_tf, mcfg["norm"],
                              cities=CITY_GROUPS.get(tgt))
    val = build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][2], args.num_classes, eval_tf, mcfg["norm"])
    if args.max_val:
        val.files = val.files[:args.max_val]
    if args.max_pool:
        target_l.files, pool_eval.files = target_l.files[:args.max_pool], pool_eval.files[:args.max_pool]
        target_u.files = target_u.files[:args.max_pool]
    n_pool = len(target_l)
    names = [target_l.name(i) for i in range(n_pool)]
    init_n, increments = budget_plan(n_pool, args.init_ratio, args.total_ratio, args.sample_epochs)
    rounds = [] if args.source_only else list(args.sample_epochs)
    lengths, round_iters = epoch_plan(n_pool, init_n, increments, rounds, args.epochs, args.batch_size * world,
                                      args.epoch_iters)
    epoch_ends = set(np.cumsum(lengths).tolist())
    args.iters = int(sum(lengths))
    args.stop_iter = min(args.stop_iter or args.iters, args.iters)

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay)
    scaler = rt.grad_scaler(device, amp)
    start, best = 0, {"mIoU": -1.0}
    rounds_done, class_iou, weight = 0, torch.zeros(args.num_classes), None
    ref_counts = None  # the pool's ground-truth class counts, read once for the selection pictures
    labeled = [] if args.source_only else \
        sorted(np.random.default_rng([args.seed, 7]).choice(n_pool, init_n, replace=False).tolist())
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        labeled, rounds_done, class_iou = list(ck["labeled"]), ck["rounds_done"], ck["class_iou"]
        weight = ck["class_weight"]
        log.log({"event": "resumed", "iter": start, "labeled": len(labeled), "rounds_done": rounds_done})
    elif rank == 0 and not args.source_only:
        pix, img = class_pixel_counts([pool_eval.load_label(i) for i in labeled], args.num_classes)
        write_round(out / "rounds" / "round_00_init", names, labeled, sorted(set(range(n_pool)) - set(labeled)),
                    labeled, {"class_counts.json": {"labeled": {"pixels": pix.tolist(), "images": img.tolist()},
                                                    "classes": L.class_names(args.num_classes)}})
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    B = args.batch_size
    batches = infinite_loader(source, B, args.seed, start, args.workers, rank, world)

    def target_loaders(it):
        """Loaders of the current labeled and unlabeled pools, positioned at iteration `it` of the round
        (each round's stream depends on (seed, round, iteration): exact resume mid-round)."""
        r0 = round_iters[rounds_done - 1] if rounds_done else 0
        seed = args.seed + 1000 * (rounds_done + 1)
        lab = unl = None
        if labeled:
            reps = -(-B * world // len(labeled))  # a pool smaller than a batch is repeated (upstream)
            lab = infinite_loader(Pool(target_l, labeled * reps), B, seed, it - r0, args.workers, rank, world)
        rest = sorted(set(range(n_pool)) - set(labeled))
        if rest:
            reps = -(-2 * B * world // len(rest))
            unl = infinite_loader(Pool(target_u, rest * reps), 2 * B, seed + 1, it - r0, args.workers, rank, world)
        return lab, unl

    lab_batches, unl_batches = (None, None) if args.source_only else target_loaders(start)

    # ---- training loop ---------------------------------------------------------------------------
    up = lambda logits, hw: upsample(logits, hw, bool(args.align_corners))  # SS-ADA: align_corners=False
    t0 = time.time()
    for it in range(start, args.stop_iter):
        # -- method: active round (class IoU on labeled images, acquisition, new pools and weights) --
        if rounds_done < len(round_iters) and it >= round_iters[rounds_done]:
            k = increments[rounds_done]
            picked, class_iou, scores, iou_sum = active_round(
                rt.unwrap(model), pool_eval, labeled, k, args.strategy, args, device, amp,
                np.random.default_rng([args.seed, 100 + rounds_done]))
            weight = iou_class_weights(class_iou, args.upper).to(device) if args.iou_weights else None
            labeled = sorted(labeled + picked)
            rounds_done += 1
            if rank == 0:
                sel_pix, sel_img = class_pixel_counts([pool_eval.load_label(i) for i in picked], args.num_classes)
                pix, img = class_pixel_counts([pool_eval.load_label(i) for i in labeled], args.num_classes)
                folder = out / "rounds" / f"round_{rounds_done:02d}"
                write_round(folder, names, labeled, sorted(set(range(n_pool)) - set(labeled)), picked, {
                    "scores.json": {"strategy": args.strategy, "scores": {names[i]: s for i, s in scores.items()}},
                    "class_counts.json": {"classes": L.class_names(args.num_classes),
                                          "selected": {"pixels": sel_pix.tolist(), "images": sel_img.tolist()},
                                          "labeled": {"pixels": pix.tolist(), "images": img.tolist()}},
                    "class_iou.json": {"iou_on_labeled_before_round": class_iou.tolist(),
                                       "class_weights": None if weight is None else weight.tolist()},
                    "iou_table.md": format_table(iou_sum)})
                save_selected_pictures(rt.unwrap(model), pool_eval, picked[:8], folder / "selected", device, amp, args)
                crit = args.strategy if picked and args.strategy in scores[picked[0]] else "entropy_iou"
                ref_counts = P.selection_pictures(  # selection.png (images, scores), selection_classes.png
                    pool_eval, picked, folder / "selection.png", f"SS-ADA round {rounds_done}: {len(picked)} "
                    f"images by {args.strategy}", [f"{crit} {scores[i][crit]:.4f}" for i in picked], reference=ref_counts)
            log.log({"iter": it, "event": "active_round", "round": rounds_done, "selected": len(picked),
                     "labeled": len(labeled), "labeled_ratio": len(labeled) / n_pool})
            lab_batches, unl_batches = target_loaders(it)
        # -- end of method --
        # constant (released, ss_ada_bisenetv1_single.py:146, :201-202, :380): the scheduler drives a second
        # optimiser, never stepped; the stepped one keeps its initial lrs (util/scheduler.py:200, :296 touch the 2nd)
        lr = rt.set_lr(optimizer, args.lr if args.lr_schedule == "constant" else
                       warmup_poly_lr(args.lr, it, args.iters, args.warmup))
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        hw = y.shape[-2:]
        # -- method: supervised OHEM (3 heads) + UniMatch on the unlabeled pool --
        ohem = lambda o, t: weighted_ohem_ce(o, t, args.ohem_thresh, args.min_kept, weight)
        heads = ("out", "aux16", "aux32")
        stats = {}
        if args.source_only:
            with rt.autocast(device, amp):
                pred = ddp(x)
            loss = loss_src = sum(ohem(up(pred[h], hw), y) for h in heads) / 3
        else:
            imgs = [x]
            if lab_batches is not None:  # (no labeled target image with --init-ratio 0 before the first round)
                lb = next(lab_batches)
                xl, yl = rt.to_device(lb["image"], device, amp), lb["label"].to(device)
                imgs.append(xl)
            if unl_batches is not None:
                u, m = split_partner(next(unl_batches))
                u = {k: v.to(device) for k, v in u.items()}
                m = {k: v.to(device) for k, v in m.items()}
                same = (u["index"] == m["index"]).view(-1, 1, 1)  # a repeated pool: never mix an image with itself
                box1, box2 = (u["box1"].bool() & ~same), (u["box2"].bool() & ~same)
                with torch.no_grad():  # partners' pseudo labels, model in eval mode (as upstream)
                    rt.unwrap(model).eval()
                    with rt.autocast(device, amp):
                        pm = up(rt.unwrap(model)(rt.to_device(m["image"], device, amp))["out"], hw).softmax(1)
                    rt.unwrap(model).train()
                conf_m, pseudo_m = pm.max(1)
                s1 = torch.where(box1[:, None], m["s1"], u["s1"])
                s2 = torch.where(box2[:, None], m["s2"], u["s2"])
                imgs += [u["image"], s1, s2]
            n = [t.shape[0] for t in imgs]
            if args.forward == "two" and unl_batches is not None:  # upstream: weak view pass, then strong views
                with rt.autocast(device, amp):
                    pred = ddp(rt.to_device(torch.cat(imgs[:-2]), device, amp), need_fp=True)
                    strong = ddp(rt.to_device(torch.cat(imgs[-2:]), device, amp))["out"]
                parts = {h: up(pred[h], hw).split(n[:-2]) for h in pred}
                parts["out"] += up(strong, hw).split(n[-2:])
            else:
                with rt.autocast(device, amp):
                    pred = ddp(rt.to_device(torch.cat(imgs), device, amp), need_fp=unl_batches is not None)
                parts = {h: up(pred[h], hw).split(n) for h in pred}
            if lab_batches is None:  # keep the chunk positions: an empty labeled chunk
                parts = {h: (v[0], v[0][:0]) + v[1:] for h, v in parts.items()}
                yl = y[:0]
            loss_src = sum(ohem(parts[h][0], y) for h in heads) / 3
            loss_tl = sum(ohem(parts[h][1], yl) for h in heads) / 3
            if unl_batches is None:
                loss = (loss_src + loss_tl) / 2
            else:
                conf_w, pseudo_w = parts["out"][2].detach().softmax(1).max(1)
                ign = u["ignore"]
                pseudo1, conf1 = torch.where(box1, pseudo_m, pseudo_w), torch.where(box1, conf_m, conf_w)
                pseudo2, conf2 = torch.where(box2, pseudo_m, pseudo_w), torch.where(box2, conf_m, conf_w)
                ign1, ign2 = torch.where(box1, m["ignore"], ign), torch.where(box2, m["ignore"], ign)
                ratio = args.threshold * (1.0 if args.static_threshold else 1 - it / args.iters)
                ciou = class_iou if args.class_threshold else None
                mask = lambda p, c: confidence_mask(p, c, args.conf_thresh, ciou, ratio)
                mk1, mk2, mkw = mask(pseudo1, conf1), mask(pseudo2, conf2), mask(pseudo_w, conf_w)
                loss_s1 = unlabeled_ce(parts["out"][3], pseudo1, mk1, ign1)
                loss_s2 = unlabeled_ce(parts["out"][4], pseudo2, mk2, ign2)
                loss_fp = unlabeled_ce(parts["fp"][2], pseudo_w, mkw, ign)
                loss = (loss_src + loss_tl + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 3
                stats = {"loss_s": (loss_s1.item() + loss_s2.item()) / 2, "loss_fp": loss_fp.item(),
                         "mask_ratio": float((mkw & (ign != 255)).float().mean())}
            stats["loss_tl"] = loss_tl.item()
        # -- end of method --
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if it % args.log_every == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "lr_read": optimizer.param_groups[0]["lr"], "loss": loss.item(),
                     "loss_src": loss_src.item(), **stats, "labeled": len(labeled),
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if ((it + 1) % args.eval_every == 0 if args.eval_every else (it + 1) in epoch_ends) or last:
            state = rt.rng_state()  # evaluation must not move the training RNG (exact resume; its loader draws a seed)
            res = evaluate_sliding(rt.unwrap(model), val, args.num_classes, args.eval_crop or crop, device, amp,
                                   out / "predictions" if last else None, 8, rank, world, args.workers,
                                   align_corners=bool(args.align_corners)) \
                if args.eval_mode == "sliding" else \
                evaluate(whole_model(model, bool(args.align_corners)), val, args.num_classes, device, amp, rank=rank,
                         world_size=world, workers=args.workers, save_dir=out / "predictions" if last else None)
            rt.set_rng_state(state)
            if res["mIoU"] > best["mIoU"]:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
                if rank == 0 and args.keep_snapshots:
                    rt.save_checkpoint(out / "best_model.pth", model=model.state_dict(), config=mcfg, iter=it + 1)
            log.log({"iter": it + 1, "val_mIoU": res["mIoU"], "best_mIoU": best["mIoU"]})
        if (it + 1) % args.save_every == 0 or (it + 1) in epoch_ends or last:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg,
                                   labeled=list(labeled), rounds_done=rounds_done, class_iou=class_iou.cpu(),
                                   class_weight=None if weight is None else weight.cpu())

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        rt.atomic_write_text(out / "labeled.txt", "".join(names[i] + "\n" for i in labeled))
        final = {"last": res, "best": best, "iters": args.stop_iter, "labeled": len(labeled),
                 "labeled_ratio": len(labeled) / n_pool, "strategy": args.strategy,
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) "
              f"with {len(labeled)}/{n_pool} target images labeled -> {out}")
    rt.cleanup_distributed()


@torch.no_grad()
def save_selected_pictures(model, pool_ds, ids, folder, device, amp, args):
    """The selected images as pictures: image | ground truth | prediction, side by side."""
    from common.transforms import denormalize
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    for i in ids:
        item = pool_ds[i]
        lab = item["label"].numpy()
        x = rt.to_device(item["image"][None], device, amp)
        pred = predict(model, x, lab.shape, amp, bool(args.align_corners)).argmax(1)[0].cpu().numpy()
        img = np.asarray(Image.fromarray(denormalize(item["image"], "imagenet")).resize(lab.shape[::-1]))
        row = np.concatenate([img, L.colorize(lab, args.num_classes), L.colorize(pred, args.num_classes)], 1)
        Image.fromarray(row).save(folder / f"{Path(pool_ds.name(i)).stem}.png")
    model.train()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
