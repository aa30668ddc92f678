r"""MaxSquare (Chen et al., ICCV 2019, ZJULearning/MaxSquareLoss): adaptation by the maximum squares
loss on the target, from a labelled source to an unlabelled target, starting from a source-only
checkpoint (train_source.py: MaxSquare's stage 1) or from backbone weights.

    MS:  L_t = -sum_{n,c,h,w} P^2 / (2 N C H W)                                   (Sec. 3.2)
    IW:  L_t = -sum_{n,c,h,w} w_{n,h,w} P^2 / (N C),
         w = 1 / max(N_c^alpha * N^(1 - alpha), 1), N_c = pixels of image n predicted as the pixel's
         argmax class, N = pixels of image n, alpha = 0.2                            (Sec. 3.3)
    entropy (MaxSquare's MinEnt baseline): L_t = -sum P log P / (N C H W)
    L = CE(P_s) [+ 0.1 CE(P_s_aux)] + lambda_t L_t(P_t)
        [+ 0.1 lambda_t CE(P_t_aux, y_hat)]     --multi 1: self-produced guidance (Sec. 3.4):
         y_hat = argmax (P_t + P_t_aux)/2 where max P_t > 0.95 or max P_t_aux > 0.95, else ignored

Toy domains (no arguments; starts from runs/advent_maxsquare/source/model.pth when it exists):
    python advent_maxsquare/train_maxsquare.py
    python advent_maxsquare/train_maxsquare.py --target-loss iw_maxsquare --out runs/advent_maxsquare/iw_maxsquare
GTA5 -> Cityscapes, DeepLabV2-R101, from a source-only checkpoint (train_source.py), upstream README's recipes
(5 rounds x 2 passes over Cityscapes train = 29,750 iterations; only the stem BN frozen; mirror + blur):
    python advent_maxsquare/train_maxsquare.py --source gta5 --source-root /data/GTA5 \
        --target cityscapes --target-root /data/cityscapes --init-from runs/gta5_source/model.pth   # MS
  MS+IW: ... --target-loss iw_maxsquare
  MS+IW+Multi (from a train_source.py --multi 1 checkpoint): ... --target-loss iw_maxsquare --multi 1 \
        --lambda-target 0.09 --target-crop-size 640,1280
SYNTHIA -> Cityscapes, 16 classes (mIoU16 and mIoU13 reported): ... --source synthia --num-classes 16
Several processes:
    torchrun --nproc_per_node=2 advent_maxsquare/train_maxsquare.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, eval_set, DOMAINS
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from common.models import make_segmenter
from common.transforms import Compose, GaussianBlur, RandomHFlip, Resize
from advent_maxsquare.releases import FORMAT_HELP, FORMATS, load_segmenter

SOURCE_CKPT = "runs/advent_maxsquare/source/model.pth"  # what train_source.py writes with no arguments
# Defaults. PAPER: MaxSquare's solve_gta5.py and README (SGD 2.5e-4 restarted, momentum 0.9, wd 5e-4; poly 0.9
# over round_num 5 x epoch_each_round 2 passes of zip(source, target) loaders, i.e. 10 x 2,975 Cityscapes steps;
# validation every pass; batch 1; random mirror and Gaussian blur; --freeze_bn False = only the stem bn1 frozen;
# lambda_target 0.1, the multi-level recipe 0.09 and --target-crop-size 640,1280; README's recipe table has the
# file:line of each).
# TOY: a few hundred iterations from the toy source-only model (single-level, as train_source.py trains
# it by default), a larger lr and batch; lambda_target as the paper (200 x 4+4 since issue 17's 40-minute
# benchmark budget; 300 x 8+8 before: the v2 numbers).
PAPER = dict(model="deeplabv2", backbone="resnet101", init=None, init_from=None, iters=None, stop_iter=None,
             round_num=5, epoch_each_round=2, batch_size=1, lr=2.5e-4, multi=0, lambda_target=0.1,
             random_mirror=1, blur=1, freeze_bn="stem",
             eval_every=None, save_every=None, out="runs/advent_maxsquare/maxsquare")
TOY = dict(model="deeplabv2", backbone="resnet18", init="toy", init_from=SOURCE_CKPT, iters=200,
           round_num=0, epoch_each_round=2, batch_size=4, lr=2.5e-3, multi=0, lambda_target=0.1,
           random_mirror=1, blur=1, freeze_bn="none",
           eval_every=100, save_every=100, out="runs/advent_maxsquare/maxsquare")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (MaxSquare)")
    g.add_argument("--target-loss", default="maxsquare", choices=["maxsquare", "iw_maxsquare", "entropy"],
                   help="loss on the target's main output (MS, MS+IW, or the MinEnt baseline)")
    g.add_argument("--lambda-target", type=float, default=None, help="weight of the target loss (paper 0.1)")
    g.add_argument("--iw-ratio", type=float, default=0.2, help="alpha of the image-wise class-balanced weight")
    g.add_argument("--threshold", type=float, default=0.95, help="confidence of self-produced guidance (--multi 1)")
    g.add_argument("--round-num", type=int, default=None, help="length in rounds of --epoch-each-round passes over the "
                   "shorter of the two training sets (paper 5; 0 = use --iters; an explicit --iters sets it to 0)")
    g.add_argument("--epoch-each-round", type=int, default=None, help="passes per round (paper 2)")
    g.add_argument("--init-from", default=None, help="source-only checkpoint (model.pth of train_source.py), "
                   "loaded strictly; 'scratch' = use --init instead (toy default: " + SOURCE_CKPT + " if present)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--multi", type=int, default=None, choices=[0, 1],
                   help="multi-level: aux head with source CE and self-produced guidance on the target")
    g.add_argument("--lambda-seg", type=float, default=0.1, help="weight of the aux CE with --multi 1")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--released-repeats", action="store_true", help="the released optimiser: the backbone group lists "
                   "each weight once per enclosing module (3-4x larger backbone steps; README deviation 17). "
                   "Off: each weight once, at the stated lr")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--random-mirror", type=int, default=None, choices=[0, 1],
                   help="random horizontal flip (default: the preset's, see PAPER/TOY)")
    g.add_argument("--blur", type=int, default=None, choices=[0, 1],
                   help="Gaussian blur p 0.5, radius U(0,1), MaxSquare's (default: the preset's)")
    g.add_argument("--target-crop-size", type=cli.hw, default=None, help="target training input size H,W (images "
                   "resized to it; default: the target domain's, Cityscapes 512,1024)")
    g.add_argument("--freeze-bn", nargs="?", const="all", default=None, choices=["none", "stem", "all"],
                   help="BN affine params not trained (running statistics still update: train mode): "
                   "all (AdaptSegNet/ADVENT), stem = the ResNet's first BN only (MaxSquare), none; bare = all")
    g.add_argument("--two-branch", action="store_true", help="upstream 2-branch ASPP bug (compatibility)")
    args = p.parse_args(argv)
    explicit_init_from, explicit_init = args.init_from is not None, args.init is not None
    if args.iters is not None and args.round_num is None:  # an explicit length replaces the round-based one
        args.round_num = 0
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    if not args.round_num:  # a length in iterations: validate and save every 2000 unless told
        args.eval_every, args.save_every = args.eval_every or 2000, args.save_every or 2000
    if not explicit_init_from and args.init_from == SOURCE_CKPT and not Path(SOURCE_CKPT).exists():
        args.init_from = "scratch (toy default: " + SOURCE_CKPT + " not found)"
    if explicit_init and not explicit_init_from and args.init != "scratch":
        args.init_from = "scratch (--init given)"
    if args.init_from and not args.init_from.startswith("scratch") and not Path(args.init_from).is_file():
        p.error(f"--init-from: no checkpoint at {args.init_from} (train one with advent_maxsquare/train_source.py)")
    if args.init_from is None and args.init is None:
        p.error("on real data pass --init-from SOURCE_CHECKPOINT or --init BACKBONE_WEIGHTS (or --init scratch)")
    return args


# ---- method: MaxSquare's losses (Sec. 3.2 maximum squares, Sec. 3.3 image-wise weights, Sec. 3.4 guidance)
def maxsquare_loss(prob):
    """-mean_{n,c,h,w}(P^2) / 2 (Sec. 3.2): the gradient grows linearly with P, not like entropy's."""
    return -prob.float().pow(2).mean() / 2


def iw_maxsquare_loss(prob, alpha=0.2):
    """-sum_{n,c,h,w} w * P^2 / (N*C), w = 1 / max(N_c^alpha * N^(1-alpha), 1) per pixel, N_c counted per
    image over argmax classes (Sec. 3.3). Upstream multiplies (B,H,W) weights into (B,C,H,W) probabilities,
    which broadcasts correctly only for batch 1; here each image's weight map is applied to its own P."""
    prob = prob.float()
    b, c = prob.shape[:2]
    arg = prob.detach().argmax(1)  # (B,H,W)
    n_c = torch.stack([torch.bincount(a.flatten(), minlength=c) for a in arg]).float()  # (B,C)
    n = n_c.sum(1, keepdim=True)  # pixels per image
    w_class = 1 / torch.clamp(n_c.pow(alpha) * n.pow(1 - alpha), min=1)  # (B,C)
    w = torch.gather(w_class, 1, arg.flatten(1)).view_as(arg)  # (B,H,W): the weight of each pixel's class
    return -(prob.pow(2) * w.unsqueeze(1)).sum() / (b * c)


def entropy_loss(logits):
    """MaxSquare's MinEnt baseline (softCrossEntropy(P, P)): -mean_{n,c,h,w}(P * log P), natural log."""
    logits = logits.float()
    return -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).mean()


def self_produced_guidance(prob, prob_aux, threshold=0.95):
    """Sec. 3.4: the aux head's pseudo-label is argmax (P + P_aux)/2 where either head is confident
    (max P > threshold or max P_aux > threshold), else ignore (255)."""
    prob, prob_aux = prob.detach().float(), prob_aux.detach().float()
    confident = (prob.max(1).values > threshold) | (prob_aux.max(1).values > threshold)
    label = ((prob + prob_aux) / 2).argmax(1)
    return torch.where(confident, label, torch.full_like(label, 255))


def round_schedule(n_source, n_target, batch, epoch_each_round, round_num):
    """MaxSquare's length (solve_gta5.py:156, 171, 181): an epoch is one pass of zip(source loader, target
    loader), i.e. min(n_s, n_t) // batch steps (drop_last); round_num rounds of epoch_each_round epochs. The poly
    schedule runs over its iter_max = ((n_t + batch) // batch, at most 5000) * epochs (City_DataLoader's
    num_iterations, one more than the steps of an epoch). Returns (poly length, iterations, steps per epoch)."""
    per_epoch = min(n_source // batch, n_target // batch)
    epochs = epoch_each_round * round_num
    return min((n_target + batch) // batch, 5000) * epochs, per_epoch * epochs, per_epoch


def target_loss(name, logits, alpha):
    if name == "maxsquare":
        return maxsquare_loss(F.softmax(logits.float(), 1))
    if name == "iw_maxsquare":
        return iw_maxsquare_loss(F.softmax(logits.float(), 1), alpha)
    return entropy_loss(logits)
# ---- end of method's losses -------------------------------------------------------------------------


def upsample(pred, size, levels):
    """Logits of each level, upsampled (bilinear, align_corners=True) to the input size."""
    return {l: F.interpolate(pred[l], size=size, mode="bilinear", align_corners=True) for l in levels}


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    if args.init_from and not args.init_from.startswith("scratch"):
        model, mcfg, fmt = load_segmenter(args.init_from, args.checkpoint_format)  # strict; official releases too
        if mcfg["num_classes"] != args.num_classes:
            raise SystemExit(f"{args.init_from} has {mcfg['num_classes']} classes, the data {args.num_classes}")
        init = {"init_from": args.init_from, "checkpoint_format": fmt}
    else:
        model, mcfg = make_segmenter(args.model, args.backbone, args.num_classes, args.init, args.init_format,
                                     multi_level=bool(args.multi), two_branch=args.two_branch)
        init = {"init_from": args.init_from, "init": args.init}
    log.log({"event": "init", **init, "config": mcfg})
    if args.multi and not mcfg["multi_level"]:
        raise SystemExit(f"--multi 1 needs an aux head, which this {mcfg['model']} has not (a checkpoint from "
                         "train_source.py --multi 0, or DeepLabV3+): retrain with --multi 1 or pass --multi 0")
    levels = ["out", "aux"] if args.multi else ["out"]
    if args.freeze_bn != "none":  # all: AdaptSegNet/ADVENT; stem: MaxSquare (requires_grad off on bn1 only)
        rt.freeze_bn_affine(model.backbone.bn1 if args.freeze_bn == "stem" else model)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[src][3]
    crop_t = args.target_crop_size or DOMAINS[tgt][3]
    aug = ([RandomHFlip()] if args.random_mirror else []) + ([GaussianBlur()] if args.blur else [])
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], Compose([Resize(crop)] + aug))
    target = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"], Compose([Resize(crop_t)] + aug),
                       with_labels=False)
    val = eval_set(tgt, tgt_root, args.num_classes, mcfg["norm"])
    # -- method: the round-based length (validation and a checkpoint after every pass, as upstream) --
    if args.round_num:
        iters, stop, per_epoch = round_schedule(len(source), len(target), args.batch_size * world,
                                                args.epoch_each_round, args.round_num)
        args.iters, args.stop_iter = iters, args.stop_iter or stop
        args.eval_every, args.save_every = args.eval_every or per_epoch, args.save_every or per_epoch
        log.log({"event": "schedule", "round_num": args.round_num, "epoch_each_round": args.epoch_each_round,
                 "steps_per_epoch": per_epoch, "iters": args.iters, "stop_iter": args.stop_iter})
    # -- end of method --

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = rt.sgd_10x(model, args.lr, args.momentum, args.weight_decay, args.released_repeats)
    scaler = rt.grad_scaler(device, amp)
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    if start >= args.stop_iter:  # resuming a finished run: nothing to do, its results are in OUT
        log.log({"event": "already finished", "iter": start})
        rt.cleanup_distributed()
        return
    ddp = rt.wrap_ddp(model, device, world, find_unused=mcfg["multi_level"] and not args.multi,
                       compile_model=args.compile)
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)
    batches_t = infinite_loader(target, args.batch_size, args.seed + 1, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it, args.iters))
        batch, batch_t = next(batches), next(batches_t)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        x_t = rt.to_device(batch_t["image"], device, amp)
        if it == start:  # what the network is actually fed (the paper-preset smoke tests check it)
            log.log({"event": "inputs", "source": list(x.shape), "target": list(x_t.shape),
                     "labels": sorted(y.unique().tolist()), "ignore_share": round((y == 255).float().mean().item(), 5)})
        optimizer.zero_grad(set_to_none=True)
        # -- method: (1) source CE; (2) target: lambda_t L_t(P_t) [+ self-produced guidance on the aux head] --
        with rt.autocast(device, amp):
            pred = upsample(ddp(x), y.shape[-2:], levels)
            loss_main = cross_entropy(pred["out"], y)
            loss = loss_main + (args.lambda_seg * cross_entropy(pred["aux"], y) if args.multi else 0)
        scaler.scale(loss).backward()
        with rt.autocast(device, amp):
            pred_t = upsample(ddp(x_t), x_t.shape[-2:], levels)
            loss_t = args.lambda_target * target_loss(args.target_loss, pred_t["out"], args.iw_ratio)
            if args.multi:
                guide = self_produced_guidance(F.softmax(pred_t["out"].float(), 1),
                                               F.softmax(pred_t["aux"].float(), 1), args.threshold)
                loss_t = loss_t + args.lambda_seg * args.lambda_target * cross_entropy(pred_t["aux"], guide)
        scaler.scale(loss_t).backward()
        logs = {"loss_target": loss_t.item()}
        # -- end of method --
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_main": loss_main.item(), **logs,
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last:
            res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
                           workers=args.workers, save_dir=out / "predictions" if last else None)
            if res["mIoU"] > best["mIoU"]:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
                if rank == 0 and args.keep_snapshots:
                    rt.save_checkpoint(out / "best_model.pth", model=model.state_dict(), config=mcfg, iter=it + 1)
            log.log({"iter": it + 1, "val_mIoU": res["mIoU"], "best_mIoU": best["mIoU"]})
        if (it + 1) % args.save_every == 0 or last:
            rngs = [None] * world
            if world > 1:
                torch.distributed.all_gather_object(rngs, rt.rng_state())
            else:
                rngs = [rt.rng_state()]
            if rank == 0:
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg)
                if args.keep_snapshots:
                    (out / "snapshots").mkdir(exist_ok=True)
                    rt.save_checkpoint(out / "snapshots" / f"iter_{it + 1:06d}.pth", model=model.state_dict(),
                                       config=mcfg, iter=it + 1)

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        final = {"last": res, "best": best, "iters": args.stop_iter,
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
