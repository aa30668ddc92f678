r"""TUFL (Yan et al., T-ITS 2023): threshold-adaptive unsupervised focal loss, Cityscapes -> CrossCity
(13 classes), BiSeNetV1-R18 (ywher/TUFL, utils/loss.py UnsupFocalLoss / AdaptUnsupFocalLoss,
unsup/train_step.py). A source model (phase 1, supervised, TUFL's `--supervision_mode sup`; skipped with
--init-from) is adapted (phase 2) with the supervised source loss plus the focal consistency between a
target view and its photometrically perturbed, mirrored copy (aligned back before the loss):

    L = L_sup + lambda_u * L_unsup,      L_sup = mean over the 3 heads of mean_pixels w_y CE (RegularCrossLoss)
    L_unsup = mean over the 3 heads of mean_{max p > tau_y} sum_c w_c [ p_c (log p_c - d^gamma log q_c) - p_c log p_c ]
    p = softmax(target view), q = softmax(perturbed view), y = argmax p, w = CityScapes_13 'middle' weights
    d = |p_y - q_y| (fixed tau: UnsupFocalLoss, focal_type 2) or 1 - q_y (adaptive: AdaptUnsupFocalLoss, type 1)
    tau: fixed (0.8) or adaptive per class (--thresholds adaptive: EMA a of the confidence ranked
         int(n_c b tau_c^d) among the pixels predicted c)
    SGD, every parameter group at 10x the base lr (upstream's `pg.get('lr_mul', True)`), no decay on BN/bias

Toy domains (no arguments: toy Cityscapes-style source -> toy CrossCity-style target, 13 classes):
    python ssada/train_tufl.py
Adaptive thresholds:
    python ssada/train_tufl.py --thresholds adaptive --out runs/ssada/tufl_adaptive
    python ssada/train_tufl.py --thresholds adaptive --shared-thresholds   # one vector for the 3 heads (upstream)
Cityscapes -> Rio, from a Cityscapes BiSeNet (the README's command: 2k iters, lr 0.5e-5, frozen BN); TUFL's
released pretrained/cityscapes.pth is read directly (format auto-detected, ssada/releases.py):
    python ssada/train_tufl.py --source cityscapes --source-root /data/cityscapes --target crosscity \
        --target-root /data/NTHU_Datasets --city Rio --init-from cityscapes.pth
Several processes:
    torchrun --nproc_per_node=2 ssada/train_tufl.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.bisenet import make_bisenet
from common.datasets import DOMAINS, build_dataset, infinite_loader, resolve_domain, train_set
from common.evaluate import evaluate
from common.losses import ohem_cross_entropy
from common.metrics import format_table
from common.transforms import ColorJitter, Compose, RandomCrop, RandomHFlip, Resize
from ssada.data import ScaleChoice, UnlabeledViews
from ssada.losses import TUFL_CLASS_WEIGHTS, AdaptiveThresholds, regular_ce, unsup_focal_loss
from ssada.releases import FORMAT_HELP, FORMATS, load_segmenter
from ssada.test import evaluate_sliding

# Defaults. PAPER: TUFL README command (2000 iterations, 1 + 1 images per GPU, lr 0.5e-5 without warm-up,
# gamma 2, tau 0.8, lambda_u 0.08, frozen BN) from a Cityscapes-trained BiSeNet (--init-from); 640x1280
# crops after a scale in {0.75, 1, 1.25, 1.5} of the full-resolution image; evaluation at full resolution
# with 647x647 sliding windows. Recipe table with file:line: ssada/README.md. TOY: the source model is
# trained here first (phase 1, from scratch), then adapted; images resized to the toy size; base lrs are
# 1/10 of the former toy values, so that with every group at 10x the backbone runs at the same rate as before;
# 200 + 100 iterations (300 + 150 before issue 17's 40-minute benchmark budget: the v2 numbers).
PAPER = dict(init=None, iters=2000, batch_size=1, lr=0.5e-5, source_iters=0, source_batch_size=8,
             source_lr=0.01, freeze_bn=1, eval_every=200, save_every=200, out="runs/ssada/tufl",
             crop_size=(640, 1280), aug="tufl", eval_mode="sliding")
TOY = dict(init="toy", iters=100, batch_size=2, lr=0.0005, source_iters=200, source_batch_size=4,
           source_lr=0.002, freeze_bn=0, eval_every=100, save_every=100, out="runs/ssada/tufl",
           aug="resize", eval_mode="whole")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p, source="toy_cityscapes", target="toy_crosscity")
    g = p.add_argument_group("method (TUFL)")
    g.add_argument("--city", default="Rome", help="CrossCity city (Rome | Rio | Taipei | Tokyo)")
    g.add_argument("--init-from", default=None, help="source model checkpoint (skips phase 1): ours, or TUFL's "
                   "pretrained/cityscapes.pth, or an SS-ADA / TUFL release (--checkpoint-format)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--source-iters", type=int, default=None, help="phase 1: supervised source iterations")
    g.add_argument("--source-batch-size", type=int, default=None)
    g.add_argument("--source-lr", type=float, default=None)
    g.add_argument("--thresholds", default="fixed", choices=["fixed", "adaptive", "none"],
                   help="confidence selection of the focal loss: fixed tau, TUFL's adaptive per-class, or none")
    g.add_argument("--tau", type=float, default=0.8, help="fixed threshold / initial adaptive threshold")
    g.add_argument("--gamma", type=float, default=2.0, help="focal exponent on d")
    g.add_argument("--focal-type", type=int, default=None, choices=[1, 2],
                   help="d = |p_y - q_y| (2) or 1 - q_y (1); default as upstream: 2 with fixed tau (UnsupFocalLoss), "
                   "1 with adaptive tau (AdaptUnsupFocalLoss)")
    g.add_argument("--sup-loss", default="regular", choices=["regular", "ohem"],
                   help="supervised source loss: class-weighted CE averaged over pixels (upstream default) or OHEM")
    g.add_argument("--class-weights", default="middle", choices=["middle", "small", "large", "none"],
                   help="TUFL's CityScapes_13 class weights (--weight_mode) in the supervised CE")
    g.add_argument("--unsup-weights", type=int, default=1, choices=[0, 1],
                   help="the same class weights on the focal loss's class terms (as upstream)")
    g.add_argument("--lr-mul", default="all", choices=["all", "heads"],
                   help="'all': every group at 10x lr (upstream's Optimizer: pg.get('lr_mul', True)); "
                   "'heads': only FFM and heads at 10x")
    g.add_argument("--aug", default=None, choices=["tufl", "resize"],
                   help="training geometry: 'tufl' = colour jitter (source), flip, scale in {0.75,1,1.25,1.5}, "
                   "random crop of --crop-size from the full image; 'resize' = resize to --crop-size, flip (toy)")
    g.add_argument("--eval-mode", default=None, choices=["sliding", "whole"],
                   help="'sliding': full-resolution images, --eval-crop windows, stride 5/6 (utils/evaluate.py); "
                   "'whole': images resized to the domain's evaluation size")
    g.add_argument("--eval-crop", type=cli.hw, default=(647, 647), help="sliding-window size H,W")
    g.add_argument("--max-val", type=int, default=None, help="evaluate only the first N images (quick tests)")
    g.add_argument("--unsup-coeff", type=float, default=0.08, help="lambda_u")
    g.add_argument("--adapt-a", type=float, default=0.9, help="EMA factor of the adaptive thresholds")
    g.add_argument("--adapt-b", type=float, default=0.8, help="rank fraction of the adaptive thresholds")
    g.add_argument("--adapt-d", type=float, default=8.0, help="exponent on tau_c in the rank")
    g.add_argument("--shared-thresholds", action="store_true",
                   help="adaptive tau: one threshold vector for the three heads, updated by the main, 1/16 and 1/32 "
                   "heads in turn (upstream's one criterion); default one vector per head")
    g.add_argument("--freeze-bn", type=int, default=None, choices=[0, 1], help="BN in eval mode while adapting")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4, help="on conv weights only (none on BN and biases)")
    args = p.parse_args(argv)
    stop, args.stop_iter = args.stop_iter, None  # counts over both phases (fill_defaults would tie it to --iters)
    cli.fill_defaults(args, TOY, PAPER)
    args.stop_iter = stop
    cli.default_num_classes(args)
    if args.focal_type is None:
        args.focal_type = 1 if args.thresholds == "adaptive" else 2
    if args.init is None and args.init_from is None:
        p.error("--init-from (a source BiSeNet) or --init (ResNet-18 weights) is required on real data")
    return args


def make_optimizer(model, lr, momentum, weight_decay, lr_mul="all"):
    """TUFL's utils/optimizer.py: groups (decay, no decay) x (backbone + spatial path, FFM + heads); no
    weight decay on BN parameters and biases; the lr of a group is 10x base when it carries lr_mul, and
    upstream reads pg.get('lr_mul', True), so with lr_mul='all' EVERY group runs at 10x."""
    groups = []
    for params, mult in zip(model.param_groups(), (10.0 if lr_mul == "all" else 1.0, 10.0)):
        decay = [q for q in params if q.requires_grad and q.dim() > 1]
        no_decay = [q for q in params if q.requires_grad and q.dim() <= 1]
        groups += [{"params": decay, "lr": lr * mult, "lr_mult": mult},
                   {"params": no_decay, "lr": lr * mult, "lr_mult": mult, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def bn_eval(model):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)

    # ---- model -----------------------------------------------------------------------------------
    if args.init_from:
        model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; the releases too
        log.log({"event": "init", "init_from": args.init_from, "checkpoint_format": fmt, "variant": mcfg["variant"]})
        if mcfg["num_classes"] != args.num_classes:
            raise SystemExit(f"{args.init_from} has {mcfg['num_classes']} classes, not {args.num_classes}")
        args.source_iters = 0
    else:
        model, mcfg = make_bisenet(args.num_classes, args.init, variant="tufl")
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[tgt][3]
    if args.aug == "tufl":  # datasets/cityscapes.py:108-121 (Shadow/Noise/Blur not reproduced), crosscity.py:125-129
        src_tf = Compose([ColorJitter(0.5, 0.5, 0.5, 0.0), RandomHFlip(), ScaleChoice(), RandomCrop(crop)])
        tgt_tf = Compose([RandomHFlip(), ScaleChoice(), RandomCrop(crop)])
    else:
        src_tf = tgt_tf = Compose([Resize(crop), RandomHFlip()])
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], src_tf)
    tfiles = build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][1], args.num_classes, None, mcfg["norm"],
                           with_labels=False, city=args.city).files
    target = UnlabeledViews([f for f, _ in tfiles], tgt_tf, mcfg["norm"])
    val_tf = None if args.eval_mode == "sliding" else Compose([Resize(DOMAINS[tgt][4], resize_label=False)])
    val = build_dataset(tgt_kind, tgt_root, DOMAINS[tgt][2], args.num_classes, val_tf, mcfg["norm"], city=args.city)
    if args.max_val:
        val.files = val.files[:args.max_val]
    cw = None if args.class_weights == "none" else torch.tensor(TUFL_CLASS_WEIGHTS[args.class_weights]).to(device)
    if cw is not None and len(cw) != args.num_classes:
        raise SystemExit(f"--class-weights {args.class_weights}: TUFL's table has 13 classes, not {args.num_classes}")
    total = args.source_iters + args.iters
    args.stop_iter = args.stop_iter or total
    cli.clamp_stop(args, total, "--source-iters + --iters")

    # ---- optimiser, resume -----------------------------------------------------------------------
    def optimiser():
        return make_optimizer(model, args.lr, args.momentum, args.weight_decay, args.lr_mul)
    optimizer = optimiser()
    scaler = rt.grad_scaler(device, amp)
    thresholds = [AdaptiveThresholds(args.num_classes, args.tau, args.adapt_a, args.adapt_b, args.adapt_d)
                  for _ in range(3)]  # one per head
    if args.shared_thresholds:  # released: unsup/train_step.py:139, :143-144 call one criteria_unsup for the 3 heads
        thresholds = thresholds[:1] * 3  # the same object: updated by out, aux16, aux32 in turn
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        for t, s in zip(thresholds, ck["thresholds"]):
            t.load_state_dict(s)
        log.log({"event": "resumed", "iter": start})
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    phase1 = start < args.source_iters
    bs = args.source_batch_size if phase1 else args.batch_size
    batches = infinite_loader(source, bs, args.seed, start if phase1 else start - args.source_iters,
                              args.workers, rank, world)
    tbatches = None if phase1 else infinite_loader(target, args.batch_size, args.seed + 1, start - args.source_iters,
                                                   args.workers, rank, world)
    heads = ("out", "aux16", "aux32")

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        if it == args.source_iters and args.source_iters > 0 and phase1:  # phase 1 -> phase 2
            phase1 = False
            if rank == 0:
                rt.save_checkpoint(out / "source_model.pth", model=model.state_dict(), config=mcfg, iter=it)
            optimizer = optimiser()
            batches = infinite_loader(source, args.batch_size, args.seed, 0, args.workers, rank, world)
            tbatches = infinite_loader(target, args.batch_size, args.seed + 1, 0, args.workers, rank, world)
            log.log({"iter": it, "event": "source phase done", "saved": "source_model.pth"})
        if phase1:
            lr = rt.set_lr(optimizer, rt.poly_lr(args.source_lr, it, args.source_iters))
        else:
            lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it - args.source_iters, args.iters))
            if args.freeze_bn:
                bn_eval(model)
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        hw = y.shape[-2:]
        up = lambda o: F.interpolate(o.float(), size=hw, mode="bilinear", align_corners=True)
        if args.sup_loss == "regular":  # utils/loss.py RegularCrossLoss with the class weights (get_loss.py:13-17)
            ohem = lambda o: regular_ce(up(o), y, cw)
        else:  # OhemCELoss(0.7, n_min = B H W / 16), weighted (get_loss.py:18-24)
            ohem = lambda o: ohem_cross_entropy(up(o), y, 0.7, y.numel() // 16, weight=cw)
        stats = {}
        if phase1:
            with rt.autocast(device, amp):
                pred = ddp(x)
            loss = loss_sup = sum(ohem(pred[h][:x.shape[0]]) for h in heads) / 3
        else:
            # -- method: supervised source + unsupervised focal loss between a target view and its
            #    perturbed mirror (logits mirrored back to align) --
            tb = next(tbatches)
            xt, xa = tb["image"].to(device), tb["s1"].to(device).flip(-1)
            n = x.shape[0]
            with rt.autocast(device, amp):
                pred = ddp(rt.to_device(torch.cat([x, xt, xa]), device, amp))
            loss_sup = sum(ohem(pred[h][:n]) for h in heads) / 3
            loss_u, kept = 0.0, []
            for j, h in enumerate(heads):
                ref, other = pred[h][n:2 * n], pred[h][2 * n:].flip(-1)
                ref = F.interpolate(ref.float(), size=hw, mode="bilinear", align_corners=True)
                other = F.interpolate(other.float(), size=hw, mode="bilinear", align_corners=True)
                if args.thresholds == "adaptive":
                    tau = thresholds[j].update(F.softmax(ref.detach(), 1))
                else:
                    tau = None if args.thresholds == "none" else args.tau
                lu, frac = unsup_focal_loss(ref, other, args.gamma, tau, args.focal_type,
                                            cw if args.unsup_weights else None)
                loss_u = loss_u + lu / 3
                kept.append(frac)
            loss = loss_sup + args.unsup_coeff * loss_u
            stats = {"loss_unsup": loss_u.item(), "kept": sum(kept) / 3}
            if args.thresholds == "adaptive":
                stats["tau_mean"] = float(thresholds[0].tau.mean())
            # -- end of method --
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "phase": "source" if phase1 else "adapt", "lr": lr, "loss": loss.item(),
                     "loss_sup": loss_sup.item(), **stats, "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last or it + 1 == args.source_iters:
            state = rt.rng_state()  # evaluation must not move the training RNG (exact resume; its loader draws a seed)
            if args.eval_mode == "sliding":  # TUFL utils/evaluate.py crop_eval: stride ceil(5/6 crop)
                res = evaluate_sliding(rt.unwrap(model), val, args.num_classes, args.eval_crop, device, amp,
                                       out / "predictions" if last else None, 8, rank, world, args.workers, 5 / 6)
            else:
                res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
                               workers=args.workers, save_dir=out / "predictions" if last else None)
            rt.set_rng_state(state)
            if res["mIoU"] > best["mIoU"] and not phase1:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
                if rank == 0 and args.keep_snapshots:
                    rt.save_checkpoint(out / "best_model.pth", model=model.state_dict(), config=mcfg, iter=it + 1)
            log.log({"iter": it + 1, "val_mIoU": res["mIoU"], **({} if phase1 else {"best_mIoU": best["mIoU"]})})
        if (it + 1) % args.save_every == 0 or last:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg,
                                   thresholds=[t.state_dict() for t in thresholds])

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        final = {"last": res, "best": best, "iters": args.stop_iter, "source_iters": args.source_iters,
                 "thresholds": args.thresholds, "adaptive_tau": [t.tau.tolist() for t in thresholds],
                 "wall_s": round(time.time() - t0, 1), "eval_split": "test", "target": tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
