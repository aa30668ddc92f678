"""Source-only training: the "train_source" stage of MaxSquare (tools/train_source.py) and
Adversarial_DA_Exp. Supervised cross-entropy on one labelled domain (GTA5, SYNTHIA, Cityscapes or a
toy domain), validated on the target. Its checkpoint is the `--init-from` of every adaptation script.

    L = CE(main) + lambda_seg * CE(aux)           (aux term only with --multi; lambda_seg = 0.1)

Toy domains (no arguments; trains on toy GTA5-style, validates on toy Cityscapes-style val):
    python advent_maxsquare/train_source.py
Oracle row (train on the toy target's own labels):
    python advent_maxsquare/train_source.py --source toy_cityscapes --out runs/advent_maxsquare/oracle
GTA5 -> Cityscapes, DeepLabV2-R101, the paper's recipe:
    python advent_maxsquare/train_source.py --source gta5 --source-root /data/GTA5 \
        --target cityscapes --target-root /data/cityscapes --multi \
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
from common.datasets import infinite_loader, resolve_domain, train_set, eval_set, DOMAINS
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from common.models import make_segmenter
from common.transforms import Compose, GaussianBlur, RandomHFlip, Resize

# Defaults. PAPER: MaxSquare's train_source / Adversarial_DA_Exp README (SGD 2.5e-4, momentum 0.9,
# wd 5e-4, poly 0.9 over 200k iterations stopped at 80k, batch 1 at 1280x720). TOY: a CPU-sized preset
# trained from scratch (no ImageNet weights can be downloaded here), so a larger lr and batch.
PAPER = dict(model="deeplabv2", backbone="resnet101", init=None, iters=200000, stop_iter=80000,
             batch_size=1, lr=2.5e-4, eval_every=2000, save_every=2000, out="runs/advent_maxsquare/source")
TOY = dict(model="deeplabv2", backbone="resnet18", init="scratch", iters=600, batch_size=8, lr=1e-2,
           eval_every=200, save_every=200, out="runs/advent_maxsquare/source")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (source-only)")
    g.add_argument("--multi", action="store_true", help="multi-level: also train the aux (layer3) head")
    g.add_argument("--lambda-seg", type=float, default=0.1, help="weight of the aux CE with --multi")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--random-mirror", type=int, default=1, choices=[0, 1], help="random horizontal flip")
    g.add_argument("--blur", type=int, default=1, choices=[0, 1], help="Gaussian blur p 0.5, radius U(0,1) (MaxSquare)")
    g.add_argument("--freeze-bn", action="store_true", help="freeze BN affine params (AdaptSegNet/ADVENT)")
    g.add_argument("--two-branch", action="store_true", help="upstream 2-branch ASPP bug (compatibility)")
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
                                 multi_level=args.multi, two_branch=args.two_branch)
    if args.freeze_bn:
        rt.freeze_bn_affine(model)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[src][3]
    aug = [Resize(crop)] + ([RandomHFlip()] if args.random_mirror else []) + ([GaussianBlur()] if args.blur else [])
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], Compose(aug))
    val = eval_set(tgt, tgt_root, args.num_classes, mcfg["norm"])

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = rt.sgd_10x(model, args.lr, args.momentum, args.weight_decay)
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
        # -- method: supervised CE on the labelled domain (main head, + aux head with --multi) --
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
                if rank == 0:
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
    main(parse_args())
