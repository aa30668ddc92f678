r"""Source-only training: the "train_source" stage of MaxSquare (tools/train_source.py) and
Adversarial_DA_Exp. Supervised cross-entropy on one labelled domain (GTA5, SYNTHIA, Cityscapes or a
toy domain), validated on the target. Its checkpoint is the `--init-from` of every adaptation script.

    L = CE(main) + lambda_seg * CE(aux)           (aux term only with --multi 1; lambda_seg = 0.1)

Toy domains (no arguments; trains on toy GTA5-style, validates on toy Cityscapes-style val):
    python advent_maxsquare/train_source.py
Oracle row (train on the toy target's own labels):
    python advent_maxsquare/train_source.py --source toy_cityscapes --out runs/advent_maxsquare/oracle
GTA5 -> Cityscapes, DeepLabV2-R101, the paper's recipe:
    python advent_maxsquare/train_source.py --source gta5 --source-root /data/GTA5 \
        --target cityscapes --target-root /data/cityscapes --multi 1 \
        --init /weights/DeepLab_resnet_pretrained_init-f81d91e8.pth --init-format caffe
SYNTHIA -> Cityscapes, 16 classes:  ... --source synthia --source-root /data/RAND_CITYSCAPES --num-classes 16
Several processes:
    torchrun --nproc_per_node=2 advent_maxsquare/train_source.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import build_dataset, infinite_loader, resolve_domain, train_set, eval_set, DOMAINS
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from common.models import make_segmenter
from common.transforms import Compose, GaussianBlur, RandomHFlip, Resize

# Defaults. PAPER: MaxSquare's train_source / Adversarial_DA_Exp README (SGD 2.5e-4, momentum 0.9,
# wd 5e-4, poly 0.9 over 200k iterations stopped at 80k, batch 1 at 1280x720, random mirror and Gaussian
# blur, --freeze_bn False = only the stem bn1 frozen; README's recipe table has the file:line of each).
# TOY: a CPU-sized preset trained from scratch (no ImageNet weights can be downloaded here), so a larger lr
# and batch, all BN trained.
PAPER = dict(model="deeplabv2", backbone="resnet101", init=None, iters=200000, stop_iter=80000,
             batch_size=1, lr=2.5e-4, random_mirror=1, blur=1, freeze_bn="stem",
             eval_every=5000, save_every=5000, out="runs/advent_maxsquare/source")
TOY = dict(model="deeplabv2", backbone="resnet18", init="toy", iters=600, batch_size=8, lr=1e-2,
           random_mirror=1, blur=1, freeze_bn="none", eval_every=200, save_every=200,
           out="runs/advent_maxsquare/source")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (source-only)")
    g.add_argument("--multi", type=int, default=0, choices=[0, 1], help="1: multi-level, also train the aux "
                   "(layer3) head (the adaptation scripts' --multi 1 needs it)")
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
    g.add_argument("--freeze-bn", nargs="?", const="all", default=None, choices=["none", "stem", "all"],
                   help="BN affine params not trained (running statistics still update: train mode): "
                   "all (AdaptSegNet/ADVENT), stem = the ResNet's first BN only (MaxSquare), none; bare = all")
    g.add_argument("--two-branch", action="store_true", help="upstream 2-branch ASPP bug (compatibility)")
    g.add_argument("--source-list", default=None, help="train on the source images named in this file (one file name "
                   "a line, as in images/ or RGB/; MaxSquare trains on its gta5_list/train.txt, 12,403 images); "
                   "default: every image")
    g.add_argument("--val-source-list", default=None, help="validate on, and keep best_model.pth by, the labelled "
                   "source images named in this file (MaxSquare: gta5_list/val.txt, 6,382) instead of the target val")
    args = p.parse_args(argv)
    cli.fill_defaults(args, TOY, PAPER)
    cli.default_num_classes(args)
    if args.init is None:
        p.error("--init (backbone weights file) is required on real data; pass --init scratch to train from scratch")
    return args


def main(args):
    rank, world, device = rt.setup_distributed(args.device)
    rt.seed_everything(args.seed + rank)
    amp = rt.amp_dtype(args.amp, device)
    out = rt.prepare_run_dir(args.out, args, rank, args.resume)
    log = rt.RunLogger(out, rank, args.tensorboard)
    rt.print_config(args, rank)

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg = make_segmenter(args.model, args.backbone, args.num_classes, args.init, args.init_format,
                                 multi_level=bool(args.multi), two_branch=args.two_branch)
    if args.freeze_bn != "none":  # all: AdaptSegNet/ADVENT; stem: MaxSquare (requires_grad off on bn1 only)
        rt.freeze_bn_affine(model.backbone.bn1 if args.freeze_bn == "stem" else model)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[src][3]
    aug = [Resize(crop)] + ([RandomHFlip()] if args.random_mirror else []) + ([GaussianBlur()] if args.blur else [])
    if args.source_list:  # a split of the source (upstream MaxSquare's lists), else every image
        source = build_dataset(src_kind, src_root, "all", args.num_classes, Compose(aug), mcfg["norm"],
                               list_path=args.source_list)
    else:
        source = train_set(src, src_root, args.num_classes, mcfg["norm"], Compose(aug))
    if args.val_source_list:  # MaxSquare's checkpoint selection: on held-out source images, never the target
        val = build_dataset(src_kind, src_root, "all", args.num_classes, Compose([Resize(crop, resize_label=False)]),
                            mcfg["norm"], list_path=args.val_source_list)
    else:
        val = eval_set(tgt, tgt_root, args.num_classes, mcfg["norm"])

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
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it, args.iters))
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        if it == start:  # what the network is actually fed (the paper-preset smoke tests check it)
            log.log({"event": "inputs", "source": list(x.shape), "labels": sorted(y.unique().tolist()),
                     "ignore_share": round((y == 255).float().mean().item(), 5)})
        # -- method: supervised CE on the labelled domain (main head, + aux head with --multi 1) --
        with rt.autocast(device, amp):
            pred = ddp(x)
            main = F.interpolate(pred["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss_main = cross_entropy(main, y)
            loss = loss_main
            if args.multi:
                aux = F.interpolate(pred["aux"], size=y.shape[-2:], mode="bilinear", align_corners=True)
                loss = loss + args.lambda_seg * cross_entropy(aux, y)
        # -- end of method --
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_main": loss_main.item(),
                     "s_per_iter": (time.time() - t0) / (it - start + 1)})

        # ---- evaluate, checkpoint ---------------------------------------------------------------
        last = it + 1 == args.stop_iter
        if (it + 1) % args.eval_every == 0 or last:
            res = evaluate(model, val, args.num_classes, device, amp, rank=rank, world_size=world,
                           workers=args.workers, save_dir=out / "predictions" if last else None)
            if res["mIoU"] > best["mIoU"]:
                best = {"mIoU": res["mIoU"], "iter": it + 1}
                if rank == 0 and (args.keep_snapshots or args.val_source_list):  # a source-val pick is kept
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
                 "wall_s": round(time.time() - t0, 1), "eval_split": args.val_source_list or "val",
                 "target": src if args.val_source_list else tgt}
        rt.save_json(out / "final.json", final)
        (out / "iou_table.md").write_text(format_table(res) + "\n")
        print(format_table(res))
        print(f"[done] last mIoU {res['mIoU']:.2f} (best {best['mIoU']:.2f} @ {best.get('iter')}) -> {out}")
    rt.cleanup_distributed()


if __name__ == "__main__":
    rt.run_main(main, parse_args)
