r"""AdaptSegNet (Tsai et al., CVPR 2018, wasidennis/AdaptSegNet): adversarial adaptation in the output
space, from a labelled source to an unlabelled target, starting from a source-only checkpoint
(train_source.py) or from backbone weights. Seed 003's variant (Adversarial_DA_Exp) is the same with
DeepLabV3+ (single level) and its Cityscapes group0 -> group1 split.

  per level (main, aux), D sees the softmax probabilities P (Sec. 3.2-3.4):
    G: L = CE(P_s) + 0.1 CE(P_s_aux) + 1e-3 L_adv(D(P_t), src) + 2e-4 L_adv(D_aux(P_t_aux), src)
    D: 0.5 L_adv(D(P_s), src) + 0.5 L_adv(D(P_t), tgt)             (src = 0, tgt = 1, detached P)
  L_adv = BCE with logits (--gan vanilla) or squared error (--gan ls, LSGAN; single-level lambda 0.01)

Toy domains (no arguments; starts from runs/advent_maxsquare/source/model.pth when it exists):
    python advent_maxsquare/train_adaptseg.py
GTA5 -> Cityscapes, DeepLabV2-R101 multi-level, the released recipe (one stage from ImageNet/COCO weights; no
augmentation; every BN's affine frozen, running statistics updated):
    python advent_maxsquare/train_adaptseg.py --source gta5 --source-root /data/GTA5 \
        --target cityscapes --target-root /data/cityscapes \
        --init /weights/DeepLab_resnet_pretrained_init-f81d91e8.pth --init-format caffe
SYNTHIA -> Cityscapes with DeepLabV3+ (seed 003), from its source-only checkpoint (torchvision init ->
torchvision input normalisation, carried by the checkpoint):
    python advent_maxsquare/train_adaptseg.py --source synthia --source-root /data/RAND_CITYSCAPES \
        --target cityscapes --target-root /data/cityscapes --num-classes 16 --multi 0 \
        --init-from runs/synthia_source_v3/model.pth --batch-size 2
Cityscapes group0 -> group1 (seed 003): ... --source cityscapes_group0 --source-root /data/cityscapes \
        --target cityscapes_group1 --target-root /data/cityscapes
Several processes:
    torchrun --nproc_per_node=2 advent_maxsquare/train_adaptseg.py
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
from common.models import FCDiscriminator, make_segmenter
from common.transforms import Compose, GaussianBlur, RandomHFlip, Resize
from advent_maxsquare.releases import FORMAT_HELP, FORMATS, load_segmenter

SOURCE_CKPT = "runs/advent_maxsquare/source/model.pth"  # what train_source.py writes with no arguments
# Defaults. PAPER: AdaptSegNet's train_gta2cityscapes_multi.py (SGD 2.5e-4, momentum 0.9, wd 5e-4; D Adam
# 1e-4 betas (0.9, 0.99); poly 0.9 over 250k iterations stopped at 150k; batch 1; multi-level; no augmentation;
# every BN's affine frozen, train mode; a snapshot every 5000; README's recipe table has the file:line of each).
# TOY: a few hundred iterations from the toy source-only model (single-level, as train_source.py trains
# it by default), a larger lr and batch, and the target weights x10 so that 200 iterations can move the
# model at all (200 x 4+4 since issue 17's 40-minute benchmark budget; 300 x 8+8 before: the v2 numbers).
PAPER = dict(model="deeplabv2", backbone="resnet101", init=None, init_from=None, iters=250000,
             stop_iter=150000, batch_size=1, lr=2.5e-4, lr_d=1e-4, multi=1, lambda_main=1e-3, lambda_aux=2e-4,
             random_mirror=0, blur=0, freeze_bn="all",
             eval_every=5000, save_every=5000, out="runs/advent_maxsquare/adaptseg")
TOY = dict(model="deeplabv2", backbone="resnet18", init="toy", init_from=SOURCE_CKPT, iters=200,
           batch_size=4, lr=2.5e-3, lr_d=1e-4, multi=0, lambda_main=1e-2, lambda_aux=2e-3,
           random_mirror=1, blur=1, freeze_bn="none",
           eval_every=100, save_every=100, out="runs/advent_maxsquare/adaptseg")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (AdaptSegNet)")
    g.add_argument("--gan", default="vanilla", choices=["vanilla", "ls"],
                   help="vanilla: BCE with logits; ls: least squares (LSGAN, the README's single-level recipe)")
    g.add_argument("--lambda-main", type=float, default=None,
                   help="weight of the adversarial term on the main output (paper 1e-3: lambda_adv_target2)")
    g.add_argument("--lambda-aux", type=float, default=None,
                   help="weight of the adversarial term on the aux output (paper 2e-4: lambda_adv_target1)")
    g.add_argument("--init-from", default=None, help="source-only checkpoint (model.pth of train_source.py), "
                   "loaded strictly; 'scratch' = use --init instead (toy default: " + SOURCE_CKPT + " if present)")
    g.add_argument("--checkpoint-format", default="auto", choices=FORMATS, help="of --init-from: " + FORMAT_HELP)
    g.add_argument("--multi", type=int, default=None, choices=[0, 1],
                   help="multi-level: aux (layer3) head with its own loss and discriminator (paper 1; toy 0)")
    g.add_argument("--lambda-seg", type=float, default=0.1, help="weight of the aux CE with --multi 1")
    g.add_argument("--lr-d", type=float, default=None, help="discriminator Adam lr (poly schedule too)")
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
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    if not explicit_init_from and args.init_from == SOURCE_CKPT and not Path(SOURCE_CKPT).exists():
        args.init_from = "scratch (toy default: " + SOURCE_CKPT + " not found)"
    if explicit_init and not explicit_init_from and args.init != "scratch":
        args.init_from = "scratch (--init given)"
    if args.init_from and not args.init_from.startswith("scratch") and not Path(args.init_from).is_file():
        p.error(f"--init-from: no checkpoint at {args.init_from} (train one with advent_maxsquare/train_source.py)")
    if args.init_from is None and args.init is None:
        p.error("on real data pass --init-from SOURCE_CHECKPOINT or --init BACKBONE_WEIGHTS (or --init scratch)")
    return args


# ---- method: AdaptSegNet's losses (Sec. 3.2 discriminator, Sec. 3.3 adversarial, Sec. 3.4 multi-level) --
SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # the discriminator's domain labels (AdaptSegNet/ADVENT convention)


def discriminator_input(logits):
    """What D sees: the softmax probabilities of the (upsampled) prediction, in fp32."""
    return F.softmax(logits.float(), 1)


def gan_loss(d_out, domain_label, gan="vanilla"):
    """BCE with logits (vanilla) or squared error (ls) against a constant domain label (D has no sigmoid)."""
    d_out = d_out.float()
    if gan == "ls":
        return F.mse_loss(d_out, torch.full_like(d_out, domain_label))
    return F.binary_cross_entropy_with_logits(d_out, torch.full_like(d_out, domain_label))


def generator_loss(discs, pred_t, lambdas, gan="vanilla"):
    """sum_l lambda_l * L_adv(D_l(P_t_l), SOURCE): the segmenter makes target outputs look like source."""
    return sum(lambdas[l] * gan_loss(discs[l](discriminator_input(pred_t[l])), SOURCE_LABEL, gan) for l in discs)


def discriminator_loss(discs, pred, domain_label, gan="vanilla"):
    """sum_l 0.5 * L_adv(D_l(P_l.detach()), label of the domain P came from). Each level's D sees its
    own level (seed 003's code gave D2 D1's output and labelled the target step 'source')."""
    return sum(0.5 * gan_loss(discs[l](discriminator_input(pred[l].detach())), domain_label, gan) for l in discs)


@torch.no_grad()
def discriminator_accuracy(discs, pred, pred_t, gan="vanilla"):
    """Diagnostic, not a loss: the share of D's patch outputs on the right side of its decision boundary
    (above 0 (BCE logits; 0.5 for ls) = target), source and target maps weighted equally, averaged over
    the levels. 50% = D cannot tell the domains' output maps apart; near 100% = they are still separable."""
    thr = 0.5 if gan == "ls" else 0.0
    acc = [0.5 * ((discs[l](discriminator_input(pred[l])).float() <= thr).float().mean()
                  + (discs[l](discriminator_input(pred_t[l])).float() > thr).float().mean()) for l in discs]
    return float(torch.stack(acc).mean())

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
    # -- method: one discriminator per output level, on C-channel softmax maps --
    discs = {l: FCDiscriminator(args.num_classes).to(device).train() for l in levels}
    lambdas = {"out": args.lambda_main, "aux": args.lambda_aux}
    # -- end of method --

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

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = rt.sgd_10x(model, args.lr, args.momentum, args.weight_decay, args.released_repeats)
    params_d = [q for D in discs.values() for q in D.parameters()]
    opt_d = torch.optim.Adam(params_d, lr=args.lr_d, betas=(0.9, 0.99)) if discs else None
    scaler = rt.grad_scaler(device, amp)
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        for l, D in discs.items():
            D.load_state_dict(ck["discriminators"][l])
        if opt_d is not None:
            opt_d.load_state_dict(ck["optimizer_d"])
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
    ddp_discs = {l: rt.wrap_ddp(D, device, world) for l, D in discs.items()}
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)
    batches_t = infinite_loader(target, args.batch_size, args.seed + 1, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    dom_accs = []  # (iter, discriminator accuracy) at the logged iterations of this process's run
    for it in range(start, args.stop_iter):
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it, args.iters))
        if opt_d is not None:
            rt.set_lr(opt_d, rt.poly_lr(args.lr_d, it, args.iters))
        batch, batch_t = next(batches), next(batches_t)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        x_t = rt.to_device(batch_t["image"], device, amp)
        if it == start:  # what the network is actually fed (the paper-preset smoke tests check it)
            log.log({"event": "inputs", "source": list(x.shape), "target": list(x_t.shape),
                     "labels": sorted(y.unique().tolist()), "ignore_share": round((y == 255).float().mean().item(), 5)})
        optimizer.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        # -- method: (1) source CE; (2) target: fool D on P_t; (3) D on detached maps --
        with rt.autocast(device, amp):
            pred = upsample(ddp(x), y.shape[-2:], levels)
            loss_main = cross_entropy(pred["out"], y)
            loss = loss_main + (args.lambda_seg * cross_entropy(pred["aux"], y) if args.multi else 0)
        scaler.scale(loss).backward()
        for D in discs.values():  # D is fixed while the segmenter learns to fool it
            D.requires_grad_(False)
        with rt.autocast(device, amp):
            pred_t = upsample(ddp(x_t), x_t.shape[-2:], levels)
            # the un-wrapped D: no gradient for D here, so nothing for DDP to synchronise
            loss_t = generator_loss(discs, pred_t, lambdas, args.gan)
        scaler.scale(loss_t).backward()
        logs = {"loss_target": loss_t.item()}
        if discs:
            for D in discs.values():
                D.requires_grad_(True)
            with rt.autocast(device, amp):
                loss_d_s = discriminator_loss(ddp_discs, pred, SOURCE_LABEL, args.gan)
            scaler.scale(loss_d_s).backward()
            with rt.autocast(device, amp):
                loss_d_t = discriminator_loss(ddp_discs, pred_t, TARGET_LABEL, args.gan)
            scaler.scale(loss_d_t).backward()
            logs.update(loss_d_source=loss_d_s.item(), loss_d_target=loss_d_t.item())
        # -- end of method --
        scaler.step(optimizer)
        if opt_d is not None:
            scaler.step(opt_d)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            if discs:  # diagnostic: can D still tell the domains apart? (final.json reports the last quarter)
                logs["dom_acc"] = discriminator_accuracy(discs, pred, pred_t, args.gan)
                dom_accs.append((it, logs["dom_acc"]))
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
                                   discriminators={l: D.state_dict() for l, D in discs.items()},
                                   optimizer_d=opt_d.state_dict() if opt_d is not None else {},
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg)
                if args.keep_snapshots:
                    (out / "snapshots").mkdir(exist_ok=True)
                    rt.save_checkpoint(out / "snapshots" / f"iter_{it + 1:06d}.pth", model=model.state_dict(),
                                       config=mcfg, iter=it + 1)

    # ---- save ------------------------------------------------------------------------------------
    if rank == 0:
        rt.save_checkpoint(out / "model.pth", model=model.state_dict(), config=mcfg, iter=args.stop_iter)
        final = {"last": res, "best": best, "iters": args.stop_iter,
                 "wall_s": round(time.time() - t0, 1), "eval_split": "val", "target": tgt,
                 "diagnostics": {"dom_acc_last_quarter": rt.last_quarter(dom_accs, args.stop_iter)}}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
