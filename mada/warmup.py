r"""Warm-up model of MADA / MADAv2: DeepLabV3+ trained on the labelled source, optionally with
AdaptSegNet-style output-space adversarial alignment to the target (the warm-up the MADA/MADAv2
READMEs download as `..._best_model_warmup.pkl` from CAG_UDA; it cannot be downloaded here, so it is a
step of this folder). Its 256-d decoder feature gives the source anchors and the MADAv2 target anchors.

    L_G = CE(source) + lambda_adv * BCE(D(softmax(target)), source)      (lambda_adv = 0: source only)
    L_D = BCE(D(softmax(source)), source) + BCE(D(softmax(target)), target)

Toy domains (no arguments; DeepLabV3+ ResNet-18 from scratch on toy GTA5-style, val on toy Cityscapes):
    python mada/warmup.py
With the adversarial term:
    python mada/warmup.py --lambda-adv 0.001
GTA5 -> Cityscapes, DeepLabV3+ ResNet-101 (torchvision ImageNet weights):
    python mada/warmup.py --source gta5 --source-root /data/GTA5 --target cityscapes \
        --target-root /data/cityscapes --init /weights/resnet101-63fe2227.pth
Several processes:
    torchrun --nproc_per_node=2 mada/warmup.py
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python folder/script.py` finds common/

import torch
import torch.nn.functional as F

from common import cli, runtime as rt
from common.datasets import infinite_loader, resolve_domain, train_set, DOMAINS
from common.evaluate import evaluate
from common.losses import cross_entropy
from common.metrics import format_table
from common.models import FCDiscriminator, make_segmenter
from mada import core

# Defaults. PAPER: the warm-up recipe is not released with MADA/MADAv2 (its weights are downloaded);
# we use AdaptSegNet's output-space recipe (SGD 2.5e-4 momentum 0.9 wd 5e-4, poly 0.9, D Adam 1e-4,
# lambda_adv 0.001) on MADA's DeepLabV3+ R101 and augmentation. TOY: ResNet-18 from scratch.
PAPER = dict(model="deeplabv3plus", backbone="resnet101", init=None, iters=120000, batch_size=4, lr=2.5e-4,
             lambda_adv=0.001, crop_size=(512, 896), eval_size=(1024, 2048), eval_every=2000, save_every=2000, out="runs/mada/warmup")
TOY = dict(model="deeplabv3plus", backbone="resnet18", init="toy", iters=150, batch_size=8, lr=1e-2,
           lambda_adv=0.0, eval_every=150, save_every=50, out="runs/mada/warmup")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    g = p.add_argument_group("method (warm-up)")
    g.add_argument("--lambda-adv", type=float, default=None, help="weight of the output-space adversarial "
                   "loss on target (0 = source only; paper preset 0.001)")
    g.add_argument("--lr-d", type=float, default=1e-4, help="discriminator Adam learning rate")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--eval-size", type=cli.hw, default=None, help="H,W of the target evaluation input (paper preset: "
                   "Cityscapes' full 1024x2048, as upstream; toy: the shared protocol of common)")
    g.add_argument("--random-mirror", type=int, default=1, choices=[0, 1], help="random horizontal flip")
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
    adv = args.lambda_adv > 0

    # ---- model -----------------------------------------------------------------------------------
    model, mcfg = make_segmenter(args.model, args.backbone, args.num_classes, args.init, args.init_format)
    model = model.to(device, memory_format=rt.memory_format(amp)).train()
    disc = FCDiscriminator(args.num_classes).to(device).train() if adv else None

    # ---- data ------------------------------------------------------------------------------------
    src, src_kind, src_root = resolve_domain(args.source, args.source_root, "source")
    tgt, tgt_kind, tgt_root = resolve_domain(args.target, args.target_root, "target")
    crop = args.crop_size or DOMAINS[src][3]
    toy = cli.is_toy(args)
    source = train_set(src, src_root, args.num_classes, mcfg["norm"], core.train_transform(
        toy, crop, args.random_mirror, core.UPSTREAM_HW.get(DOMAINS[src][0])))
    target = train_set(tgt, tgt_root, args.num_classes, mcfg["norm"],
                       core.train_transform(toy, args.crop_size or DOMAINS[tgt][3], args.random_mirror,
                                            core.UPSTREAM_HW.get(DOMAINS[tgt][0])),
                       with_labels=False) if adv else None
    val = core.eval_set_at(tgt, tgt_root, args.num_classes, mcfg["norm"], args.eval_size)

    # ---- optimiser, resume -----------------------------------------------------------------------
    optimizer = rt.sgd_10x(model, args.lr, args.momentum, args.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr_d, betas=(0.9, 0.99)) if adv else None
    scaler = rt.grad_scaler(device, amp)
    start, best = 0, {"mIoU": -1.0}
    if args.resume and (out / "checkpoint.pth").exists():
        ck = rt.load_checkpoint(out / "checkpoint.pth")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        if adv:
            disc.load_state_dict(ck["disc"])
            opt_d.load_state_dict(ck["opt_d"])
        rt.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        start, best = ck["iter"], ck["best"]
        log.log({"event": "resumed", "iter": start})
    ddp = rt.wrap_ddp(model, device, world, compile_model=args.compile)
    ddp_d = rt.wrap_ddp(disc, device, world) if adv else None
    batches = infinite_loader(source, args.batch_size, args.seed, start, args.workers, rank, world)
    t_batches = infinite_loader(target, args.batch_size, args.seed + 1, start, args.workers, rank, world) if adv else None

    # ---- training loop ---------------------------------------------------------------------------
    t0 = time.time()
    for it in range(start, args.stop_iter):
        lr = rt.set_lr(optimizer, rt.poly_lr(args.lr, it, args.iters))
        if adv:
            rt.set_lr(opt_d, rt.poly_lr(args.lr_d, it, args.iters))
        batch = next(batches)
        x, y = rt.to_device(batch["image"], device, amp), batch["label"].to(device)
        # -- method: source CE (+ output-space adversarial alignment of the target, AdaptSegNet) --
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast(device, amp):
            pred = ddp(x)
            main = F.interpolate(pred["out"], size=y.shape[-2:], mode="bilinear", align_corners=True)
            loss_main = cross_entropy(main, y)
        scaler.scale(loss_main).backward()
        loss, loss_adv = loss_main.detach(), torch.zeros(())
        if adv:  # second forward/backward on the target (upstream order; DDP-safe)
            for q in disc.parameters():
                q.requires_grad_(False)
            with rt.autocast(device, amp):
                xt = rt.to_device(next(t_batches)["image"], device, amp)
                up = F.interpolate(ddp(xt)["out"], size=xt.shape[-2:], mode="bilinear", align_corners=True)
                pt = F.softmax(up.float(), 1)  # D sees the upsampled output (AdaptSegNet)
                d_t = disc(pt).float()  # D frozen here: the plain module, no DDP sync needed
                loss_adv = F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t))
            scaler.scale(args.lambda_adv * loss_adv).backward()
            loss = loss + args.lambda_adv * loss_adv.detach()
        scaler.step(optimizer)
        scaler.update()
        if adv:  # discriminator: source softmax -> 0 (source), target softmax -> 1 (target)
            for q in disc.parameters():
                q.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            d_s = ddp_d(F.softmax(main.detach().float(), 1))
            loss_d = 0.5 * F.binary_cross_entropy_with_logits(d_s, torch.zeros_like(d_s))
            loss_d.backward()
            d_t = ddp_d(pt.detach())
            loss_d_t = 0.5 * F.binary_cross_entropy_with_logits(d_t, torch.ones_like(d_t))
            loss_d_t.backward()
            opt_d.step()
        # -- end of method --
        if it % 20 == 0 or it + 1 == args.stop_iter:
            log.log({"iter": it, "lr": lr, "loss": loss.item(), "loss_main": loss_main.item(),
                     "loss_adv": float(loss_adv), "s_per_iter": (time.time() - t0) / (it - start + 1)})

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
                extra = dict(disc=disc.state_dict(), opt_d=opt_d.state_dict()) if adv else {}
                rt.save_checkpoint(out / "checkpoint.pth", model=model.state_dict(), optimizer=optimizer.state_dict(),
                                   scaler=scaler.state_dict(), iter=it + 1, rng=rngs, best=best, config=mcfg, **extra)

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
